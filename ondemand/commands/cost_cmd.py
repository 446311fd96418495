"""`ondemand cost`: what keeping the model warm cost, and what scaling to zero saved.

Reads the ledger file under the config's `storage.dir` directly (read-only, safe beside a running
daemon), or asks a daemon with `--url` (`GET /v1/cost`).  No torch, no aiohttp needed."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from ondemand import config as config_mod
from ondemand.cost import report as cost
from ondemand.cost.ledger import LEDGER_FILE
from ondemand.errors import BadRequest, OndemandError, StorageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cost",
        help="idle GPU cost: on-demand vs always-on, cold starts, recommended timeouts",
        description="Report what the worker cost (GPU-hours, energy, money) against keeping it "
        "loaded 24/7, and recommend unload_after_s/exit_after_s.  Default periods: the last "
        "24 hours and the last 30 days.",
    )
    p.add_argument("--since", help="start: 30d, 24h, 90m, an ISO date/time (UTC) or Unix time")
    p.add_argument("--until", help="end (default now); same forms as --since")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (default), json (the /v1/cost document), csv (one row per day)")
    p.add_argument("--url", help="ask this daemon (GET /v1/cost) instead of reading the ledger")
    p.add_argument("--config", type=Path,
                   help="config file (default: ONDEMAND_CONFIG or ./config.toml)")
    p.set_defaults(func=cmd_cost)


def cmd_cost(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config or config_mod.default_config_path())
    doc = _fetch(args, cfg) if args.url else _local(args, cfg)
    if args.format == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif args.format == "csv":
        sys.stdout.write(render_csv(doc))
    else:
        sys.stdout.write(render_table(doc))
    return 0


def _local(args: argparse.Namespace, cfg: config_mod.Config) -> dict[str, Any]:
    from ondemand.cost.api import cost_document
    from ondemand.cost.tokens import add_tokens, read_file

    path = Path(cfg.storage.dir) / LEDGER_FILE
    if not path.is_file():
        raise OndemandError(
            f"no cost ledger at {path}: the daemon has not run with storage.dir="
            f"{cfg.storage.dir!r} (pass --config, or --url to ask a running daemon)"
        )
    now = time.time()
    try:
        since = cost.parse_when(args.since, now) if args.since else None
        until = cost.parse_when(args.until, now) if args.until else None
        doc = cost_document(path, cfg, since=since, until=until, probe=None, now=now)
        return add_tokens(doc, read_file(Path(cfg.storage.dir)))
    except ValueError as e:
        raise BadRequest(str(e)) from e
    except sqlite3.DatabaseError as e:  # a damaged ledger: one line, never a traceback
        raise StorageError(
            f"cannot read the cost ledger {path} ({e}); the daemon moves a damaged ledger "
            "aside at its next start (docs/operations.md); or ask a running daemon with --url"
        ) from e


def _fetch(args: argparse.Namespace, cfg: config_mod.Config) -> dict[str, Any]:
    from ondemand.sdk import Client

    return Client(args.url, token=cfg.auth_token()).cost(since=args.since, until=args.until).raw


# -- rendering -------------------------------------------------------------------------------

_LABELS = {"last_24h": "last 24 h", "last_30d": "last 30 d"}


def _h(x: float) -> str:
    return f"{x:.2f} h"


def _usd(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"${x:,.2f}" if abs(x) >= 0.01 or x == 0 else f"${x:.4f}"


def _s(x: float) -> str:
    return "never" if x < 0 else f"{x:g} s"


def render_table(doc: dict[str, Any]) -> str:
    periods = doc["periods"]
    heads = [_LABELS.get(p["label"], f"{p['since'][:16]} .. {p['until'][:16]}") for p in periods]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, fn: Any) -> None:
        rows.append((name, [fn(p) for p in periods]))

    row("covered by the ledger", lambda p: _h(p["covered_hours"]))
    row("GPU held (worker alive)", lambda p: _h(p["hours"]["gpu_held"]))
    row("  loading (cold starts)", lambda p: _h(p["hours"]["loading"]))
    row("  busy", lambda p: _h(p["hours"]["ready_busy"]))
    row("  idle-warm", lambda p: _h(p["idle_warm_hours"]["total"]))
    row("    schedule hold", lambda p: _h(p["idle_warm_hours"]["schedule_hold"]))
    row("    manual hold", lambda p: _h(p["idle_warm_hours"]["manual_hold"]))
    row("    idle-timeout tail", lambda p: _h(p["idle_warm_hours"]["idle_timeout"]))
    row("  unloaded, process alive", lambda p: _h(p["hours"]["unloaded_alive"]))
    row("cold starts", lambda p: _cold(p["cold_starts"]))
    row("  seconds (mean)", lambda p: _cold_s(p["cold_starts"]))
    row("energy measured", lambda p: f"{p['energy']['measured_kwh']:.3f} kWh"
        if p["energy"] else "n/a (no power readings)")
    row("always-on cost (loaded 24/7)", lambda p: _usd(p["cost"]["always_on_usd"]))
    row("on-demand cost", lambda p: _usd(p["cost"]["on_demand_usd"]))
    row("  of which idle", lambda p: _usd(p["cost"]["idle_usd"]))
    row("savings", lambda p: _usd(p["cost"]["savings_usd"]) + (
        f" ({p['cost']['savings_pct']:.1f} %)" if p["cost"]["savings_pct"] is not None else ""))

    width = max(len(r[0]) for r in rows) + 2
    cols = [max(len(h), *(len(r[1][i]) for r in rows)) + 2 for i, h in enumerate(heads)]
    out = io.StringIO()
    st = doc["settings"]
    probe = doc.get("probe")
    out.write(f"ondemand cost  (generated {doc['generated_at']})\n")
    kwh = st["energy_kwh_usd"]
    energy = f"{_usd(kwh)} per kWh" if kwh else "not priced"
    out.write(f"prices: {_usd(st['gpu_hour_usd'])} per GPU-hour, energy {energy}")
    if probe:
        fallback = " (fallback: no GPU figures)" if probe["fallback"] else ""
        out.write(f"; probe: {probe['name']}{fallback}")
    out.write("\n\n")
    out.write(" " * width + "".join(h.rjust(c) for h, c in zip(heads, cols, strict=True)) + "\n")
    for name, vals in rows:
        out.write(name.ljust(width) + "".join(v.rjust(c) for v, c in zip(vals, cols, strict=True)))
        out.write("\n")
    out.write("\n" + render_recommendation(doc["recommendation"]))
    return out.getvalue()


def _cold(c: dict[str, Any]) -> str:
    parts = [f"{k} {v['count']}" for k, v in c["by_trigger"].items()]
    failed = f", {c['failed']} failed" if c["failed"] else ""
    return f"{c['count']}" + (f" ({', '.join(parts)}{failed})" if parts else "")


def _cold_s(c: dict[str, Any]) -> str:
    if not c["count"]:
        return "-"
    return f"{c['seconds']:.1f} s ({c['seconds'] / c['count']:.1f} s)"


def render_recommendation(rec: dict[str, Any]) -> str:
    out = io.StringIO()
    gaps = rec["gaps"]
    out.write("recommendation")
    if gaps.get("count"):
        out.write(f" (from {gaps['count']} gaps between jobs: median {gaps['p50_s']:.0f} s, "
                  f"p90 {gaps['p90_s']:.0f} s, longest {gaps['max_s']:.0f} s)")
    out.write(":\n")
    cur = rec["current"]
    if rec.get("status") != "ok" or rec["recommended"] is None:
        out.write(f"  not yet: {rec.get('why', 'not enough data')}\n")
        be = rec.get("break_even_s") or {}
        if be.get("exit") is not None:
            out.write(f"  break-even: {be['exit']:.0f} s of idle-warm cost as much as one cold "
                      "start\n")
        return out.getvalue()
    new = rec["recommended"]
    for key in ("unload_after_s", "exit_after_s"):
        out.write(f"  worker.{key:<15} {_s(cur[key]):>10} -> {_s(new[key])}\n")
    out.write(
        f"  cost over those gaps: current {_usd(cur['cost_usd'])} "
        f"({cur['spawns']} spawns, {cur['reloads']} reloads), recommended "
        f"{_usd(new['cost_usd'])} ({new['spawns']} spawns, {new['reloads']} reloads), "
        f"always warm {_usd(rec['always_warm']['cost_usd'])}\n"
    )
    be = rec["break_even_s"]
    if be.get("exit") is not None:
        out.write(f"  break-even: {be['exit']:.0f} s of idle-warm cost as much as one cold start\n")
    out.write(f"  why: {rec['why']}\n")
    return out.getvalue()


CSV_FIELDS = [
    "period", "day", "covered_h", "loading_h", "busy_h", "idle_warm_h", "schedule_hold_h",
    "manual_hold_h", "idle_tail_h", "unloaded_alive_h", "cold_starts", "cold_start_s",
    "on_demand_usd", "always_on_usd", "savings_usd",
]


def render_csv(doc: dict[str, Any]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for p in doc["periods"]:
        for d in p["days"]:
            h, idle = d["hours"], d["idle_warm_hours"]
            w.writerow([
                p["label"], d["day"], f"{d['covered_hours']:.6f}", f"{h['loading']:.6f}",
                f"{h['ready_busy']:.6f}", f"{idle['total']:.6f}", f"{idle['schedule_hold']:.6f}",
                f"{idle['manual_hold']:.6f}", f"{idle['idle_timeout']:.6f}",
                f"{h['unloaded_alive']:.6f}", d["cold_starts"], f"{d['cold_start_seconds']:.3f}",
                f"{d['on_demand_usd']:.6f}", f"{d['always_on_usd']:.6f}",
                f"{d['savings_usd']:.6f}",
            ])
    return out.getvalue()

"""Prewarm benchmark: how late (or early) the worker is *ready* against a rule's fire time.

    .venv/bin/python bench/prewarm_bench.py [--model tests/fixtures/emotion2vec-tiny/model]
        [--fires 10] [--hold 1.5] [--floor 0.5] [--factor 1.25] [--out bench/out/prewarm.json]
    .venv/bin/python bench/prewarm_bench.py --fake-load-s 3.0   # the fake worker, no torch

Each fire runs the real daemon app (build_app: supervisor, ledger, prewarm scheduler) on a real
socket with a rule "* * * * *" and a wall clock shifted so the fire is `lead + 2 s` after start-up;
the worker starts cold (a fresh interpreter: imports, model load, warm-up inference), so every
fire is a full cold start, as in the morning after the worker exited overnight.  One manual load
first seeds the cost ledger; each daemon start reads its lead from the loads in the ledger
(p`percentile` x factor, floor `--floor`), exactly as a restarted daemon does.  The hold then ends,
exit_after_s = 0 takes the worker back to zero, and the daemon stops.

Per fire: the lead used, the load time, lateness = ready - fire (negative: early); targets:
lateness <= 0 on every fire and earliness <= lead.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ondemand import config as config_mod  # noqa: E402
from ondemand.daemon import api  # noqa: E402
from ondemand.daemon.app import build_app  # noqa: E402
from ondemand.daemon.events import ModelLoaded, StateChanged  # noqa: E402
from ondemand.daemon.supervisor import make_spawn, worker_env  # noqa: E402
from ondemand.prewarm import api as prewarm_api  # noqa: E402
from ondemand.prewarm.rules import build_rules, lead_s  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "emotion2vec-tiny" / "model"  # the golden fixture


def base_config(args: argparse.Namespace, storage: Path) -> config_mod.Config:
    return config_mod.build(config_mod.Config, {
        "model": {"path": str(args.model)},
        "worker": {"device": "cpu", "unload_after_s": -1, "exit_after_s": 0, "standby": False,
                   "release_timeout_s": 0},
        "storage": {"dir": str(storage)},
        "server": {"port": 0},
        "cost": {"probe": "psutil"},
        "prewarm_lead": {"floor_s": args.floor, "factor": args.factor},
    })


class Run:
    """One daemon start: the app on a loopback socket, events recorded."""

    def __init__(self, cfg: config_mod.Config, args: argparse.Namespace,
                 clock: Any = None) -> None:
        spawn = None
        if args.fake_load_s is not None:
            env = {**worker_env(), "FAKE_LOAD_S": str(args.fake_load_s)}
            spawn = make_spawn([sys.executable, str(ROOT / "tests/fake_worker.py")], env)
        self.app = build_app(cfg, spawn=spawn)
        if clock is not None:
            self.app[prewarm_api.CLOCK] = clock
        self.events: list[Any] = []
        self.app[api.BUS].subscribe(self.events.append)
        self.runner = web.AppRunner(self.app, access_log=None)

    async def __aenter__(self) -> Run:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def one_fire(args: argparse.Namespace, base: config_mod.Config) -> dict[str, Any]:
    storage = Path(base.storage.dir)
    c = base.prewarm_lead
    lead = lead_s(prewarm_api.recent_loads(storage, c.samples), floor_s=c.floor_s,
                  pct=c.percentile, factor=c.factor)  # what the daemon will compute
    real = datetime.now(UTC)
    fire = real.replace(second=0, microsecond=0) + timedelta(minutes=2)
    offset = fire - timedelta(seconds=lead + 2.0) - real

    def clock() -> datetime:
        return datetime.now(UTC) + offset

    rules = build_rules([{"name": "bench", "cron": "* * * * *", "hold": f"{args.hold}s",
                          "catch_up": False}], "prewarm")
    cfg = dataclasses.replace(base, prewarm=rules)
    async with Run(cfg, args, clock) as run:
        sched = run.app[prewarm_api.PREWARM]
        sup = run.app[api.SUPERVISOR]
        def settled() -> bool:
            return bool(sched.fired) and (sched.fired[0].ready or sched.fired[0].error) is not None

        await until(settled, lead + 2.0 + args.load_timeout, "the prewarm")
        rec = sched.fired[0]
        if rec.error:
            raise RuntimeError(rec.error)
        hold_end = rec.until
        await until(lambda: sup.state.value == "cold", args.hold + 30, "back to zero")
        cold_after = (clock() - hold_end).total_seconds()
        loaded = [e for e in run.events if isinstance(e, ModelLoaded)]
        states = [e.new for e in run.events if isinstance(e, StateChanged)]
    assert rec.lateness_s is not None
    return {
        "lead_s": round(rec.lead_s, 3),
        "load_s": round(loaded[0].seconds, 3) if loaded else None,
        "trigger": loaded[0].trigger if loaded else None,
        "started_before_fire_s": round((rec.fire - rec.started).total_seconds(), 3),
        "lateness_s": round(rec.lateness_s, 3),
        "cold_after_hold_end_s": round(cold_after, 3),
        "states": states,
    }


async def seed(args: argparse.Namespace, base: config_mod.Config) -> float:
    """One manual cold load, so the ledger holds a measured load time."""
    async with Run(base, args) as run:
        sup = run.app[api.SUPERVISOR]
        t0 = time.monotonic()
        await sup.load("manual")
        return time.monotonic() - t0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="prewarm-bench-") as tmp:
        base = base_config(args, Path(tmp))
        seed_s = await seed(args, base)
        print(f"seed: manual cold load {seed_s:.3f}s", file=sys.stderr)
        fires = []
        for i in range(args.fires):
            row = await one_fire(args, base)
            fires.append(row)
            print(f"fire {i + 1}: lead {row['lead_s']:.3f}s load {row['load_s']:.3f}s "
                  f"lateness {row['lateness_s']:+.3f}s cold {row['cold_after_hold_end_s']:.3f}s "
                  f"after the hold", file=sys.stderr)
    late = [f["lateness_s"] for f in fires]
    return {
        "worker": "fake" if args.fake_load_s is not None else f"real ({args.model})",
        "fires": fires,
        "seed_load_s": round(seed_s, 3),
        "summary": {
            "n": len(fires),
            "lateness_max_s": max(late),
            "lateness_median_s": statistics.median(late),
            "lateness_min_s": min(late),
            "all_ready_by_fire": all(x <= 0 for x in late),
            "never_earlier_than_lead": all(-f["lateness_s"] <= f["lead_s"] for f in fires),
            "load_s_median": statistics.median(f["load_s"] for f in fires),
            "lead_s_median": statistics.median(f["lead_s"] for f in fires),
            "cold_after_hold_end_max_s": max(f["cold_after_hold_end_s"] for f in fires),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=TINY)
    ap.add_argument("--fires", type=int, default=10)
    ap.add_argument("--hold", type=float, default=1.5, help="hold seconds per fire")
    ap.add_argument("--floor", type=float, default=0.5, help="prewarm_lead.floor_s")
    ap.add_argument("--factor", type=float, default=1.25, help="prewarm_lead.factor")
    ap.add_argument("--load-timeout", type=float, default=120.0)
    ap.add_argument("--fake-load-s", type=float, default=None,
                    help="use tests/fake_worker.py with this load time instead of the model")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/prewarm.json")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    text = json.dumps(res, indent=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(json.dumps(res["summary"], indent=1))
    return 0 if res["summary"]["all_ready_by_fire"] else 1


if __name__ == "__main__":
    sys.exit(main())

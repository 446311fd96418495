"""`ondemand prewarm`: the daemon's prewarm rules, each one's next fire (local and UTC), the lead
and the active hold (GET /v1/prewarm).  Text for people, `--json` for scripts.  No torch."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ondemand.commands.daemon_cmds import _client, _client_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prewarm", help="scheduled prewarm: rules, next fires, lead, holds")
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    _client_args(p)
    p.set_defaults(func=cmd_prewarm)


def cmd_prewarm(args: argparse.Namespace) -> int:
    doc = _client(args).prewarm()
    if args.json:
        sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render(doc))
    return 0


def _span(seconds: float) -> str:
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def _when(t: dict[str, str] | None) -> str:
    if not t:
        return "-"
    utc = t["utc"][11:19]
    return f"{t['local'].replace('T', ' ')}  ({utc} UTC)"


def render(doc: dict[str, Any]) -> str:
    lead = doc["lead"]
    if lead["source"] == "measured":
        how = (f"measured: p{lead['percentile']:g} of {lead['loads_recorded']} recent loads "
               f"x {lead['factor']:g}, floor {lead['floor_s']:g}s")
    else:
        how = f"floor; {lead['loads_recorded']} load(s) recorded"
    lines = [f"lead {lead['seconds']:.1f}s ({how})"]
    if not doc["rules"]:
        lines.append("no [[prewarm]] rules configured")
    for r in doc["rules"]:
        lines.append(f"rule {r['name']}: cron {r['cron']!r} {r['timezone']} hold "
                     f"{_span(r['hold_s'])}{'' if r['catch_up'] else ' (no catch-up)'}")
        lines.append(f"  next fire      {_when(r['next_fire'])}")
        lines.append(f"  loading starts {_when(r['next_start'])}")
        if r["in_window_until"]:
            lines.append(f"  in its window until {_when(r['in_window_until'])}")
        last = r["last"]
        if last:
            if last["error"]:
                outcome = f"failed: {last['error']}"
            elif last["lateness_s"] is None:
                outcome = "loading"
            elif last["lateness_s"] <= 0:
                outcome = f"ready {-last['lateness_s']:.1f}s before the fire time"
            else:
                outcome = f"ready {last['lateness_s']:.1f}s late"
            kind = "catch-up for" if last["catch_up"] else "fire"
            lines.append(f"  last {kind} {last['fire_utc'][:19]} UTC: {outcome}")
    for h in doc.get("holds", []):
        lines.append(f"hold {h['trigger']}: until {_when(h['until'])}, "
                     f"{_span(h['remaining_s'])} left")
    w = doc.get("worker") or {}
    because = f" (warm because: {w['warm_because']})" if w.get("warm_because") else ""
    lines.append(f"worker {w.get('state', '?')}{because}")
    return "\n".join(lines) + "\n"

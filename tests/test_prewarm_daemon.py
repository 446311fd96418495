"""Scheduled prewarm end to end: the real front end on a real socket, the fake worker subprocess,
short idle timeouts, and a wall clock shifted so a cron fire is a few seconds away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ondemand import config as config_mod
from ondemand.daemon.events import ModelLoaded, StateChanged
from ondemand.daemon.service import status_text
from ondemand.prewarm import api as prewarm_api
from ondemand.prewarm.rules import build_rules
from tests.conftest import Daemon, daemon_config, fake_env, wait_for

LOAD_S = 0.4  # the fake worker's load time


def shifted_clock(seconds_to_fire: float) -> tuple[Callable[[], datetime], datetime]:
    """A wall clock at real speed on which a whole minute (a cron fire) is `seconds_to_fire`
    after its first reading: the scheduler's start-up, however long the daemon took to get
    there.  Returns (clock, fire)."""
    fire = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=2)
    offset: timedelta | None = None

    def clock() -> datetime:
        nonlocal offset
        real = datetime.now(UTC)
        if offset is None:
            offset = fire - timedelta(seconds=seconds_to_fire) - real
        return real + offset

    return clock, fire


def prewarm_daemon(tmp_path: Path, clock: Callable[[], datetime], hold: str,
                   **rule: Any) -> Daemon:
    base = daemon_config(tmp_path, worker={"unload_after_s": 0.2, "exit_after_s": 0.4})
    cfg = dataclasses.replace(
        base,
        prewarm=build_rules([{"name": "m", "cron": "* * * * *", "hold": hold, **rule}],
                            "prewarm"),
        prewarm_lead=config_mod.build(config_mod.PrewarmLeadConfig,
                                      {"floor_s": 2.5, "factor": 1.5}),
    )
    d = Daemon(cfg, env=fake_env(load_s=str(LOAD_S)))
    d.app[prewarm_api.CLOCK] = clock
    return d


async def get(d: Daemon, path: str) -> dict[str, Any]:
    async with d.http.get(path) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


def test_rule_warms_by_the_fire_holds_then_scales_to_zero(tmp_path: Path) -> None:
    async def main() -> None:
        clock, fire = shifted_clock(4.0)
        hold_end = fire + timedelta(seconds=3)
        async with prewarm_daemon(tmp_path, clock, "3s", catch_up=False) as d:
            doc = await get(d, "/v1/prewarm")
            assert doc["lead"] == {**doc["lead"], "seconds": 2.5, "source": "floor"}
            rule = doc["rules"][0]
            assert rule["next_fire"]["utc"] == fire.isoformat()
            assert rule["next_start"]["utc"] == (fire - timedelta(seconds=2.5)).isoformat()
            assert d.sup.state.value == "cold" and doc["holds"] == []

            # ready with no job; started by the lead, never before it (whether it is ready by
            # the fire is the scheduler's exact timing: test_prewarm.py, on virtual time)
            await d.wait_state("ready", timeout=20)
            sched = d.app[prewarm_api.PREWARM]
            await wait_for(lambda: bool(sched.fired) and sched.fired[0].ready is not None, 10)
            rec = sched.fired[0]
            assert rec.lead_s == 2.5 and rec.started >= fire - timedelta(seconds=2.5)
            assert not rec.catch_up and rec.until == hold_end
            loaded = [e for e in d.events if isinstance(e, ModelLoaded)]
            assert [e.trigger for e in loaded] == ["schedule:m"]
            starting = [e for e in d.events if isinstance(e, StateChanged) and e.new == "starting"]
            assert [e.trigger for e in starting] == ["schedule:m"]

            # held through the window although the idle timeouts are 0.2 s / 0.4 s
            status = await d.status()
            assert status["worker"]["warm_because"] == "hold"
            assert status["worker"]["hold_trigger"] == "schedule:m"
            # systemctl status (STATUS=) says why the worker is warm
            text = status_text(d.sup.status(), status["queue"], draining=False)
            assert text.startswith("worker ready (held by schedule:m, 0h00m left), 0 queued"), text
            doc = await get(d, "/v1/prewarm")
            (hold,) = doc["holds"]
            assert hold["trigger"] == "schedule:m"
            # the supervisor's hold ends at the rule's hold end, or just after it (it counts
            # from when it took the request in), and certainly not a whole hold later
            until = datetime.fromisoformat(hold["until"]["utc"])
            assert timedelta(seconds=-0.01) <= until - hold_end < timedelta(seconds=3)
            assert doc["rules"][0]["last"]["lateness_s"] == round(rec.lateness_s, 3)
            assert doc["rules"][0]["next_fire"]["utc"] == (fire + timedelta(minutes=1)).isoformat()

            # the hold ends: normal idle rules resume and the worker goes back to zero
            await d.wait_state("cold", timeout=20)
            assert clock() >= hold_end
            # held through the window although the idle timeouts are 0.2 s / 0.4 s: the worker
            # stayed ready until the idle exit, which came after the hold end (on the rule's
            # clock; events carry the real wall time); exit came first: no unload step
            changes = d.changes()
            ready_i = [c.new for c in changes].index("ready")
            stop = changes[ready_i + 1]
            assert (stop.new, stop.reason) == ("stopping", "idle_exit")
            offset = clock() - datetime.now(UTC)
            assert datetime.fromtimestamp(stop.time, UTC) + offset >= hold_end - timedelta(
                milliseconds=10)
            assert "unloading" not in d.states()

    asyncio.run(main())


def test_startup_inside_a_window_warms_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        # the previous minute's fire was 20 s ago; its 24 s window has 4 s left
        clock, fire = shifted_clock(40.0)
        prev = fire - timedelta(minutes=1)
        async with prewarm_daemon(tmp_path, clock, "24s") as d:
            # at once: the next fire's start is 37.5 s away, so only a catch-up is ready by 20 s
            await d.wait_state("ready", timeout=20)
            sched = d.app[prewarm_api.PREWARM]
            rec = sched.fired[0]
            assert rec.catch_up and rec.fire == prev
            doc = await get(d, "/v1/prewarm")
            assert doc["rules"][0]["in_window_until"]["utc"] == (
                prev + timedelta(seconds=24)).isoformat()
            await d.wait_state("cold", timeout=30)
            assert clock() >= prev + timedelta(seconds=24)

    asyncio.run(main())


def test_no_catch_up_stays_cold(tmp_path: Path) -> None:
    async def main() -> None:
        clock, _fire = shifted_clock(40.0)
        async with prewarm_daemon(tmp_path, clock, "22s", catch_up=False) as d:
            sched = d.app[prewarm_api.PREWARM]
            # the start-up pass (where catch-up is decided) is done once a next fire is planned
            await wait_for(lambda: sched.snapshot()["rules"][0]["next_fire"] is not None, 2)
            doc = await get(d, "/v1/prewarm")
            assert doc["rules"][0]["in_window_until"] is not None
            assert doc["rules"][0]["last"] is None and not sched.fired
            assert d.sup.state.value == "cold" and d.sup.spawns == 0

            # the CLI shows the same document, as text and as JSON
            cmd = [sys.executable, "-m", "ondemand", "prewarm", "--url", d.url]
            out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                          timeout=30)
            assert out.returncode == 0, out.stderr
            assert "lead 2.5s (floor; 0 load(s) recorded)" in out.stdout
            assert "rule m: cron '* * * * *' " in out.stdout  # then the machine's zone
            assert " hold 22s (no catch-up)" in out.stdout
            assert "next fire" in out.stdout and "UTC)" in out.stdout
            assert "worker cold" in out.stdout
            out = await asyncio.to_thread(subprocess.run, [*cmd, "--json"], capture_output=True,
                                          text=True, timeout=30)
            assert json.loads(out.stdout)["rules"][0]["name"] == "m"

    asyncio.run(main())

"""Prewarm in the daemon: the scheduler's cleanup context and `GET /v1/prewarm`.

`context(cfg)` is the scheduler component; `build_app` lists it LAST among the app's
components, so it starts after the supervisor and stops before it.  The scheduler never touches
worker state: its
`start_hold` sends the supervisor `load("schedule:<name>", hold_s=...)`, the same hold mechanism as
`POST /v1/worker/load {hold_s}` (holds merge there; idle unload/exit wait for the hold's end).

The lead starts from the load durations in the cost ledger (`loading` intervals that reached
`ready`), so a restarted daemon does not fall back to the floor, and follows every `ModelLoaded`.
`app[CLOCK]` (set before start-up) replaces the wall clock: tests and the benchmark shift it to
put a cron fire a few seconds ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from ondemand.cluster import api as cluster_api
from ondemand.config import Config
from ondemand.cost.ledger import LEDGER_FILE, Phase, connect, read_intervals
from ondemand.daemon import api
from ondemand.daemon.events import ModelLoaded
from ondemand.daemon.http import json_response
from ondemand.daemon.worker_status import WorkerStatus
from ondemand.prewarm.scheduler import PrewarmScheduler, utc_now, zone_name

log = logging.getLogger(__name__)

PREWARM = web.AppKey("prewarm", PrewarmScheduler)
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("prewarm_clock")
SEED_DAYS = 90  # how far back the ledger is read for load durations


def recent_loads(storage_dir: Path, samples: int, now: float | None = None) -> list[float]:
    """Durations of the last `samples` loads that reached ready, oldest first, from the ledger
    (read-only connection; [] when there is none yet)."""
    path = storage_dir / LEDGER_FILE
    if not path.is_file():
        return []
    now = time.time() if now is None else now
    conn = connect(path, readonly=True)
    try:
        intervals = read_intervals(conn, now - SEED_DAYS * 86400, now)
    finally:
        conn.close()
    ready = (Phase.READY_BUSY, Phase.READY_IDLE)
    loads = [iv.end - iv.start for iv in intervals
             if iv.state is Phase.LOADING and iv.end is not None and iv.next_state in ready]
    return loads[-samples:]


def context(cfg: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    """The prewarm scheduler as a cleanup context (needs the supervisor and the bus)."""

    async def prewarm_ctx(app: web.Application) -> AsyncIterator[None]:
        bus = app[api.BUS]
        clock = app.get(CLOCK, utc_now)

        async def start_hold(until: datetime, trigger: str, name: str) -> None:
            hold_s = (until - clock()).total_seconds()
            if hold_s > 0:  # the local worker, or cluster.hold_replicas replicas (ray)
                await cluster_api.hold(app, f"{trigger}:{name}", hold_s, wait=True)

        try:
            loads = await asyncio.to_thread(recent_loads, Path(cfg.storage.dir),
                                            cfg.prewarm_lead.samples)
        except Exception as e:  # a damaged ledger must not stop the daemon: start at the floor
            log.warning("prewarm: cannot read past load times from the ledger (%s)", e)
            loads = []
        sched = PrewarmScheduler(cfg.prewarm, cfg.prewarm_lead, start_hold, clock=clock,
                                 loads=loads)
        unsubscribe = bus.subscribe(lambda e: sched.record_load(e.seconds), ModelLoaded)
        app[PREWARM] = sched
        if cfg.prewarm:
            log.info("prewarm: %d rule(s), lead %.1fs from %d recorded load(s)",
                     len(cfg.prewarm), sched.lead_s(), len(loads))
        sched.start()
        try:
            with app[api.GUARD].watching(sched.task):
                yield
        finally:
            unsubscribe()
            await sched.close()

    return prewarm_ctx


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/prewarm", get_prewarm)


def holds(worker: WorkerStatus, now: datetime, sched: PrewarmScheduler,
          hold: tuple[float | None, str | None] | None = None) -> list[dict[str, Any]]:
    """The supervisor's active hold (overlapping holds are merged there into one, owned by the
    trigger whose hold ends last), with its end; `hold`: the cluster's instead (ray)."""
    left = worker.hold_s
    if hold is not None:
        left, trigger = hold
    if not left:
        return []
    end = now + timedelta(seconds=left)
    return [{
        "trigger": worker.hold_trigger if hold is None else trigger,
        "remaining_s": round(left, 3),
        "until": {"local": end.astimezone(sched.local_tz).isoformat(), "utc": end.isoformat()},
    }]


async def get_prewarm(request: web.Request) -> web.Response:
    """`GET /v1/prewarm`: rules with their next fire (local and UTC), the lead used, the active
    hold and the worker's state.  Reading it is not activity (no lease, no idle-timer reset)."""
    sched = request.app[PREWARM]
    worker = request.app[api.SUPERVISOR].status()
    doc = sched.snapshot()
    now = sched.now()
    doc["timezone"] = zone_name(sched.local_tz)
    doc["holds"] = holds(worker, now, sched, cluster_api.hold_status(request.app))
    doc["worker"] = {"state": worker.state.value, "trigger": worker.trigger,
                     "warm_because": worker.warm_because}
    return json_response(doc)

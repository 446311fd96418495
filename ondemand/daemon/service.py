"""Running under systemd (Type=notify): STATUS= lines and watchdog pings for the daemon.

`ServiceNotifier(app, notifier)` is started by `serve()` once the socket listens (after READY=1).
One task owns it: it wakes on every worker state change and job completion (bus events), and at
least every half watchdog interval, and then

- sends `STATUS=worker ready, 3 queued, 1 running` when the text changed
  (`systemctl status ondemand` shows it; backoff shows the load error);
- sends `WATCHDOG=1` only when the daemon can still do its job: the event loop runs (this task
  ran), the store's database thread answered within the interval, and no owner task failed (the
  app's TaskGuard, daemon/guard.py).  A task that fails also stops the daemon with exit status 1,
  so plain `ondemand serve` is restarted by whatever manages it; without systemd's watchdog
  ping too a hung event loop is caught (WatchdogSec=, Restart=on-failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from ondemand.daemon import api
from ondemand.daemon.events import JobFinished, StateChanged
from ondemand.daemon.sdnotify import Notifier
from ondemand.daemon.worker_status import WorkerState, WorkerStatus
from ondemand.errors import OndemandError

log = logging.getLogger(__name__)

REFRESH_S = 10.0  # STATUS refresh (queue depth) when no watchdog asks for a shorter period


def status_text(worker: WorkerStatus, counts: dict[str, int], *, draining: bool) -> str:
    """`worker ready, 3 queued, 1 running` (+ the reason when backing off or draining)."""
    held = ""
    if worker.warm_because == "hold" and worker.hold_s is not None:
        h, m = divmod(int(worker.hold_s // 60), 60)  # minutes: STATUS= is resent on change only
        held = f" (held by {worker.hold_trigger}, {h}h{m:02d}m left)"
    text = (f"worker {worker.state}{held}, {counts.get('queued', 0)} queued, "
            f"{counts.get('running', 0)} running")
    err = worker.last_error
    if worker.state is WorkerState.BACKOFF and err is not None:
        text += f"; load failed ({err.code}): {err.message}"
    if draining:
        text = "stopping: running batch finishing, queued jobs kept; " + text
    return text[:400]


class ServiceNotifier:
    def __init__(self, app: web.Application, notifier: Notifier) -> None:
        self.app = app
        self.notifier = notifier
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe = app[api.BUS].subscribe(lambda _e: self._wake.set(),
                                                   StateChanged, JobFinished)
        wd = notifier.watchdog_s
        self.period_s = min(REFRESH_S, wd / 2) if wd else REFRESH_S
        self.last_status = ""
        self._store_failing = False

    def start(self) -> None:
        if self.notifier.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sd-notify")
            self.app[api.GUARD].watch(self._task)

    async def close(self) -> None:
        self._unsubscribe()
        if self._task is not None:
            self.app[api.GUARD].retire(self._task)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # reported by the guard
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.period_s)
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # never let notification kill the daemon; no ping this round
                log.exception("sd_notify tick failed")

    async def tick(self, *, ping: bool = True) -> bool:
        """Send STATUS (if changed) and a watchdog ping (if healthy and `ping`).  True when
        healthy."""
        app = self.app
        try:
            counts = await asyncio.wait_for(app[api.STORE].counts(), self.period_s)
        except TimeoutError:
            log.warning("watchdog: the job store did not answer within %.1fs; no ping",
                        self.period_s)
            return False
        except OndemandError as e:  # the job database failing (storage_unavailable): no ping,
            if not self._store_failing:  # so systemd restarts us; one line per failing streak
                log.warning("watchdog: no ping while the job store fails (%s)", e.message)
            self._store_failing = True
            return False
        self._store_failing = False
        text = status_text(app[api.SUPERVISOR].status(), counts,
                           draining=app[api.DRAINING].is_set())
        if text != self.last_status:
            self.notifier.status(text)
            self.last_status = text
        failed = app[api.GUARD].failed
        if failed is not None:
            log.error("watchdog: %s; no ping", failed)
            return False
        if ping and self.notifier.watchdog_s:
            self.notifier.watchdog()
        return True

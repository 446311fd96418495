"""Accounting: turns the supervisor's events into ledger intervals, sampler targets and metrics.

It subscribes to the event bus and owns nothing of the worker: it only listens.  The mapping
from supervisor states to ledger phases (docs/cost.md):

    cold, backoff                         -> exited
    starting, loading                     -> loading         (one cold start, from spawn to ready)
    ready with work in flight             -> ready_busy
    ready with nothing in flight          -> ready_idle      (a hold: schedule_hold / manual_hold
                                                              until it ends, then idle_timeout)
    unloading, unloaded, stopping         -> unloaded_alive  (the process still holds its CUDA
                                                              context, so the GPU is still held)
    preparing, standby                    -> standby         (host memory only: not billed)
    yielded                               -> yielded         (stepped aside: not billed)

Every change runs, in order: sampler.flush() (a reading closes the old phase), ledger.record()
(the new interval), sampler.retarget() and metrics.phase().  Callbacks run on the event loop
right after the change, with the event's wall-clock time, so intervals tile time exactly.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from ondemand.config import CostConfig, WorkerConfig
from ondemand.cost import report as cost
from ondemand.cost.ledger import IdleCause, Ledger, Phase, Trigger
from ondemand.cost.metrics import Metrics
from ondemand.cost.sampler import Reading, Sampler
from ondemand.daemon.events import (
    EventBus,
    JobFinished,
    ModelLoaded,
    StateChanged,
    SteppedAside,
    WorkerActivity,
    WorkerExited,
)
from ondemand.daemon.supervisor import WorkerState
from ondemand.gpu import GpuProbe, gpu_index

log = logging.getLogger(__name__)

_PHASES: dict[WorkerState, Phase] = {
    WorkerState.COLD: Phase.EXITED,
    WorkerState.BACKOFF: Phase.EXITED,
    WorkerState.STARTING: Phase.LOADING,
    WorkerState.LOADING: Phase.LOADING,
    WorkerState.READY: Phase.READY_IDLE,  # busy when work is in flight
    WorkerState.UNLOADING: Phase.UNLOADED_ALIVE,
    WorkerState.UNLOADED: Phase.UNLOADED_ALIVE,
    WorkerState.STOPPING: Phase.UNLOADED_ALIVE,
    WorkerState.PREPARING: Phase.STANDBY,
    WorkerState.STANDBY: Phase.STANDBY,
    WorkerState.YIELDED: Phase.YIELDED,
}


def parse_trigger(trigger: str) -> Trigger | None:
    """`job:<id>` -> job, `schedule:<name>` -> schedule, `manual` -> manual, else None
    (`idle`, `shutdown`: not what starts a worker)."""
    head = trigger.split(":", 1)[0]
    try:
        return Trigger(head)
    except ValueError:
        return None


class Accounting:
    def __init__(
        self,
        cfg: CostConfig,
        worker: WorkerConfig,
        ledger: Ledger,
        probe: GpuProbe,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.worker = worker
        self.ledger = ledger
        self.probe = probe
        self._clock = clock
        self.metrics = Metrics(
            [s.value for s in WorkerState],
            gpu_hour_usd=cfg.gpu_hour_usd,
            energy_kwh_usd=cfg.energy_kwh_usd,
            clock=clock,
        )
        self.sampler = Sampler(
            probe,
            self._on_reading,
            interval_s=cfg.sample_interval_s,
            baseline_interval_s=cfg.baseline_interval_s,
            clock=clock,
        )
        self._state = WorkerState.COLD
        self._inflight = 0
        self._hold_until: float | None = None
        self._hold_cause: IdleCause | None = None
        self._trigger: Trigger | None = None  # what started the current worker session
        self._pid: int | None = None
        self._gpu = gpu_index(worker.device)
        self._unsubscribe: list[Callable[[], None]] = []
        self._ledger_failing = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, bus: EventBus) -> None:
        """Prune old rows, open the startup interval (no worker yet), subscribe, sample."""
        now = self._clock()
        if self.cfg.retain_days > 0:
            pruned = self.ledger.prune(now - self.cfg.retain_days * cost.DAY_S)
            if pruned:
                log.info(
                    "ledger pruned %d intervals older than %g days", pruned, self.cfg.retain_days
                )
        self.ledger.record(Phase.EXITED, at=now, gpu=self._gpu, reason="startup")
        self.metrics.set_state(self._state.value)
        self.metrics.phase(Phase.EXITED, now)
        self._unsubscribe = [
            bus.subscribe(self._on_state, StateChanged),
            bus.subscribe(self._on_activity, WorkerActivity),
            bus.subscribe(self._on_loaded, ModelLoaded),
            bus.subscribe(self._on_exited, WorkerExited),
            bus.subscribe(self._on_job, JobFinished),
            bus.subscribe(lambda ev: self.metrics.stepped_aside(ev.reason), SteppedAside),
        ]
        self.sampler.start(Phase.EXITED, (), self._gpu)
        log.info(
            "accounting started probe=%s%s ledger=%s",
            self.probe.name,
            " (fallback: no GPU figures)" if self.probe.fallback else "",
            self.ledger.path,
        )

    def close(self) -> None:
        """Stop sampling and close the open interval (a clean shutdown, not a crash)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        try:
            self.sampler.flush()
            self.ledger.close()
        except sqlite3.Error as e:
            # A full disk must not turn a clean shutdown into a crash; on restart the open
            # interval is closed at its last recorded touch, as after a crash (docs/cost.md).
            log.error("cost ledger: final write failed (%s); the interval closes on restart", e)
        finally:
            self.sampler.stop()

    def probe_info(self) -> dict[str, Any]:
        return {
            "name": self.probe.name,
            "fallback": self.probe.fallback,
            "reason": getattr(self.probe, "reason", "") or None,
        }

    # -- events ----------------------------------------------------------------------------
    def phase(self) -> Phase:
        if self._state is WorkerState.READY and self._inflight > 0:
            return Phase.READY_BUSY
        return _PHASES[self._state]

    def _on_state(self, ev: StateChanged) -> None:
        old_phase = self.phase()
        self._state = WorkerState(ev.new)
        self._pid = ev.pid
        gpu = gpu_index(ev.device)
        self._gpu = gpu if gpu is not None or ev.device == "cpu" else self._gpu
        new_phase = self.phase()
        if new_phase is Phase.LOADING and old_phase is not Phase.LOADING:
            self._trigger = parse_trigger(ev.trigger) or Trigger.MANUAL
            self.metrics.load_begun(self._trigger)
        if new_phase is Phase.EXITED:
            self._inflight = 0
        self.metrics.set_state(self._state.value)
        self._enter(ev.time, ev.reason)

    def _on_activity(self, ev: WorkerActivity) -> None:
        self._inflight = ev.inflight
        if ev.hold_s > 0:
            self._hold_until = ev.time + ev.hold_s
            kind = parse_trigger(ev.hold_trigger)
            sched = kind is Trigger.SCHEDULE
            self._hold_cause = IdleCause.SCHEDULE_HOLD if sched else IdleCause.MANUAL_HOLD
        else:
            self._hold_until = self._hold_cause = None
        self._enter(ev.time, "activity")

    def _enter(self, at: float, reason: str) -> None:
        phase = self.phase()
        idle_cause = hold_until = None
        if phase is Phase.READY_IDLE:
            held = self._hold_until is not None and self._hold_until > at
            idle_cause = self._hold_cause if held else IdleCause.IDLE_TIMEOUT
            hold_until = self._hold_until if held else None
        elif phase is Phase.UNLOADED_ALIVE:
            idle_cause = IdleCause.IDLE_TIMEOUT
        cur = self.ledger.current
        changed = cur is None or (cur.state, cur.idle_cause, cur.hold_until) != (
            phase,
            idle_cause,
            hold_until,
        )
        if changed:
            self.sampler.flush()  # its sink survives a failing ledger (_on_reading)
        self._write(lambda: self.ledger.record(
            phase,
            at=at,
            trigger=self._trigger if phase.billed else None,
            idle_cause=idle_cause,
            hold_until=hold_until,
            gpu=self._gpu,
            pid=self._pid if phase.alive else None,
            reason=reason,
        ))
        pids = (self._pid,) if self._pid is not None and phase.alive else ()
        self.sampler.retarget(phase, pids, self._gpu)
        self.metrics.phase(phase, at)

    def _on_loaded(self, ev: ModelLoaded) -> None:
        self.metrics.model_loaded(ev.seconds)

    def _on_exited(self, ev: WorkerExited) -> None:
        self.metrics.worker_exited(ev.kind)

    def _on_job(self, ev: JobFinished) -> None:
        self.metrics.job_finished(ev.status, ev.queue_s, ev.compute_s)

    def _on_reading(self, r: Reading) -> None:
        s = r.sample
        self._write(lambda: self.ledger.add_sample(
            r.at,
            energy_j=r.energy_j,
            power_s=r.power_s,
            gpu_mem=s.pids_gpu_memory_bytes if s.pids else None,
            rss=s.rss_bytes,
            cpu_s=r.cpu_s,
        ))
        self.metrics.reading(r)

    def _write(self, write: Callable[[], object]) -> None:
        """A ledger write that a full disk (or an I/O error) must not turn into an exception in
        the supervisor's event or the sampler's timer (issue 10): the interval stays open in
        memory and the next write closes it; one warning per failing streak."""
        try:
            write()
        except sqlite3.Error as e:
            if not self._ledger_failing:
                log.warning("cost ledger: write failed (%s); cost figures miss what happens "
                            "until writes work again (logged once)", e)
            self._ledger_failing = True
            return
        if self._ledger_failing:
            log.info("cost ledger: writes work again")
            self._ledger_failing = False

"""The supervisor's record of loads: the one in progress, the last one, the failure streak.

Bookkeeping only.  The supervisor's owner task tells a `LoadBook` what happened (a load begins,
the worker says hello, `loaded`, `prepared`, a failure) and reads back what it reports: the
`LoadRecord` of `/v1/status` and `ModelLoaded`, the standby's `StandbyRecord`, the `LoadFailed`
errors its waiters get.  It arms no timer and changes no worker state: whether to back off is the
supervisor's decision (`failures` against `worker.max_load_failures`); how long is `backoff_s`
(load_backoff_s, doubling per further failure, at most an hour).  Times come in as arguments.
"""

from __future__ import annotations

from typing import Literal

from ondemand import protocol
from ondemand.config import WorkerConfig
from ondemand.daemon.events import ModelLoaded
from ondemand.daemon.worker_status import LoadRecord, StandbyRecord
from ondemand.errors import LoadFailed

LoadKind = Literal["spawn", "reload", "activate"]
MAX_BACKOFF_S = 3600.0


class LoadBook:
    """What the supervisor knows about loads, for reporting and for its backoff decision."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.trigger = ""  # what asked for the current (or last) load
        self.kind: LoadKind = "spawn"  # spawn | reload | activate: the load in progress
        self.started = 0.0  # the load (or prepare) request, on the supervisor's clock
        self.hello_s = 0.0  # spawn -> hello of the current process
        self.standby_started = 0.0
        self.standby: StandbyRecord | None = None  # what the current standby reported
        self.loads = 0
        self.spawns = 0
        self.last: LoadRecord | None = None
        self.failures = 0  # in a row
        self.last_error: protocol.ErrorInfo | None = None  # until a load succeeds

    @property
    def fresh(self) -> bool:
        """The load in progress needs a new interpreter (its time includes spawn -> hello)."""
        return self.kind == "spawn"

    def begin(self, kind: LoadKind, trigger: str, now: float) -> None:
        self.kind, self.trigger, self.started = kind, trigger, now

    def begin_standby(self, now: float) -> None:
        self.standby_started = self.started = now

    def hello(self, now: float) -> None:
        self.hello_s = now - self.started

    def spawned(self) -> None:
        self.spawns += 1
        self.standby = None

    def spawn_failed(self, e: OSError) -> None:
        self.failures += 1
        self.last_error = protocol.ErrorInfo("spawn_failed", str(e))

    def prepared(self, pid: int, ev: protocol.Prepared, now: float,
                 gpu_memory_mb: float | None) -> StandbyRecord:
        self.standby = StandbyRecord.prepared_by(pid, ev, seconds=now - self.standby_started,
                                                 gpu_memory_mb=gpu_memory_mb)
        return self.standby

    def loaded(self, ev: protocol.Loaded, now: float) -> LoadRecord:
        """A load succeeded: the streak of failures ends."""
        self.last = LoadRecord(
            seconds=now - self.started, fresh_process=self.fresh, trigger=self.trigger,
            interpreter_s=self.hello_s if self.fresh else 0.0, worker_s=ev.seconds,
            timings=ev.timings, kind=self.kind)
        self.loads += 1
        self.failures = 0
        self.last_error = None
        return self.last

    def event(self, pid: int | None, device: str) -> ModelLoaded:
        """`ModelLoaded` for the last load."""
        rec = self.last
        assert rec is not None
        return ModelLoaded(seconds=rec.seconds, trigger=rec.trigger, pid=pid, device=device,
                           fresh_process=rec.fresh_process, timings=dict(rec.timings),
                           kind=rec.kind)

    def failed(self, code: str, message: str) -> LoadFailed:
        """A load failed: one more in the streak; the error for the waiters that do not wait
        for the retry (its retry_after_s: 1s while retries are left, else the backoff)."""
        self.failures += 1
        self.last_error = protocol.ErrorInfo(code, message)
        return LoadFailed(f"the model failed to load ({code}): {message}",
                          retry_after_s=1.0 if self.retry else self.cfg.load_backoff_s)

    @property
    def retry(self) -> bool:
        """Another attempt is allowed before backing off."""
        return self.failures < self.cfg.max_load_failures

    def backoff_s(self) -> float:
        over = self.failures - self.cfg.max_load_failures
        return min(self.cfg.load_backoff_s * (2**over), MAX_BACKOFF_S)

    def backoff_error(self, wait_s: float) -> LoadFailed:
        """The refusal while backing off, `wait_s` before the next attempt."""
        last = self.last_error
        why = f" ({last.code}: {last.message})" if last else ""
        return LoadFailed(f"the model failed to load {self.failures} times in a row{why}; "
                          f"next attempt in {wait_s:.0f}s", retry_after_s=wait_s)

    def last_error_text(self) -> str:
        return self.last_error.message if self.last_error else "unknown error"

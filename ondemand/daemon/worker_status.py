"""What the rest of the daemon may know about the worker: its state and a status snapshot.

The supervisor (`supervisor.py`, which draws the state diagram and checks the transitions) is the
only writer; `/v1/status`, `/readyz`, the systemd STATUS= line, `/v1/prewarm` and the cost
ledger read.  `WorkerStatus` is a frozen snapshot for reporting: never branch on it to drive the
worker (send the supervisor a request and await it).  `to_json()` is the `worker` object of
`GET /v1/status` (docs/api.md), field for field.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ondemand.protocol import ErrorInfo, Prepared

WarmBecause = Literal["in_flight", "hold", "idle_timeout"]


class WorkerState(enum.StrEnum):
    COLD = "cold"  # no process
    PREPARING = "preparing"  # a standby process: imports and weights into host memory
    STANDBY = "standby"  # weights in host memory, CUDA never initialised: no GPU memory held
    YIELDED = "yielded"  # stepped aside for other GPU work; loads wait (a standby may exist)
    STARTING = "starting"  # process spawned, waiting for its hello
    LOADING = "loading"  # load sent, waiting for loaded
    READY = "ready"  # model loaded; batches may run
    UNLOADING = "unloading"  # unload sent
    UNLOADED = "unloaded"  # process alive without a model
    STOPPING = "stopping"  # asked to exit (escalates to SIGKILL), or waiting for GPU memory
    BACKOFF = "backoff"  # no process; repeated load failures; loads refused until a deadline


@dataclass(frozen=True)
class LoadRecord:
    """The breakdown of the last load (`/v1/status` `worker.last_load`)."""

    seconds: float  # load request -> loaded, as the daemon saw it
    fresh_process: bool  # a new interpreter was needed
    trigger: str
    interpreter_s: float  # spawn -> hello (0 for a reload in the same process)
    worker_s: float  # the worker's own time for the load
    timings: dict[str, float]  # the worker's breakdown: import_s, resolve_s, weights_s, ...
    kind: str = "spawn"  # spawn (a new process), reload (unloaded), activate (from standby)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 6), "fresh_process": self.fresh_process,
                "kind": self.kind, "trigger": self.trigger,
                "interpreter_s": round(self.interpreter_s, 6), "worker_s": self.worker_s,
                **self.timings}


@dataclass(frozen=True)
class StandbyRecord:
    """The standby process (`/v1/status` `worker.standby`): what it holds and the guard that it
    holds nothing on a GPU."""

    pid: int
    prepared: bool  # False while it is still reading (state preparing)
    seconds: float | None  # spawn -> prepared, as the daemon saw it
    weights_mb: float | None  # MiB of weights in host memory
    host_mb: float | None  # the process's RSS now (what standby costs in host memory)
    cuda_initialized: bool | None  # torch.cuda.is_initialized() in the worker: must be false
    gpu_memory_mb: float | None  # NVML, this PID: must be 0; None without NVML
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def preparing(cls, pid: int) -> StandbyRecord:
        """A standby that has not answered `prepared` yet."""
        return cls(pid=pid, prepared=False, seconds=None, weights_mb=None, host_mb=None,
                   cuda_initialized=None, gpu_memory_mb=None)

    @classmethod
    def prepared_by(cls, pid: int, ev: Prepared, *, seconds: float,
                    gpu_memory_mb: float | None) -> StandbyRecord:
        """What the standby's `prepared` said, `seconds` after its spawn."""
        return cls(pid=pid, prepared=True, seconds=seconds, weights_mb=ev.weights_mb,
                   host_mb=ev.host_mb, cuda_initialized=ev.cuda_initialized,
                   gpu_memory_mb=gpu_memory_mb, timings=dict(ev.timings))

    def now(self, *, host_mb: float | None, gpu_memory_mb: float | None) -> StandbyRecord:
        """The record with the process's memory as measured now (for `/v1/status`)."""
        return dataclasses.replace(self, host_mb=host_mb, gpu_memory_mb=gpu_memory_mb)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "prepared": self.prepared,
                "seconds": None if self.seconds is None else round(self.seconds, 6),
                "weights_mb": self.weights_mb,
                "host_mb": None if self.host_mb is None else round(self.host_mb, 1),
                "cuda_initialized": self.cuda_initialized,
                "gpu_memory_mb": self.gpu_memory_mb, "timings": self.timings}


@dataclass(frozen=True)
class YieldRecord:
    """Why loads wait (`/v1/status` `worker.yielded`): stepped aside for other GPU work."""

    reason: str  # other_processes (they grew into the floor) | insufficient_memory (at a load)
    pending: bool  # True while the running batch finishes before the worker exits
    for_s: float  # seconds since we stepped aside
    need_mb: float  # the model's need (weights + worker.yield_need_margin_mb)
    resume_at_free_mb: float  # free memory that lets it back (need + yield_resume_free_mb)
    settle_s: float  # how long that must hold
    settled_s: float  # how long it has held so far
    gpu: dict[str, Any] | None  # the last reading: free/total/ours/others MiB, other processes
    trigger_gpu: dict[str, Any] | None  # the reading that made it step aside

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "pending": self.pending, "for_s": round(self.for_s, 3),
                "need_mb": round(self.need_mb, 1),
                "resume_at_free_mb": round(self.resume_at_free_mb, 1),
                "settle_s": self.settle_s, "settled_s": round(self.settled_s, 3),
                "gpu": self.gpu, "trigger_gpu": self.trigger_gpu}


@dataclass(frozen=True)
class ExitRecord:
    """The last worker exit we did not ask for (`/v1/status` `worker.last_exit`): crashed,
    killed, hung, batch_timeout, ... (daemon/process.py ExitKind)."""

    pid: int
    kind: str
    detail: str
    time: float = field(default_factory=time.time)  # wall clock

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "kind": self.kind, "detail": self.detail,
                "time": round(self.time, 3)}


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot of the worker (`Supervisor.status()`), for reporting only."""

    state: WorkerState
    pid: int | None
    device: str
    dtype: str
    model: str
    trigger: str | None  # what asked for the current (or last) load
    in_flight: int
    last_load_s: float | None
    last_load: LoadRecord | None
    loads: int
    spawns: int
    unload_in_s: float | None  # seconds until the idle unload; None = not armed
    exit_in_s: float | None  # seconds until the idle exit; None = not armed
    hold_s: float | None  # seconds the hold still lasts; None = no hold
    hold_trigger: str | None
    warm_because: WarmBecause | None  # why a ready worker stays loaded; None unless ready
    load_failures: int  # in a row
    last_error: ErrorInfo | None  # the last load failure, until a load succeeds
    backoff_s: float | None  # seconds until loads are tried again; None unless backoff
    gpu_memory_mb: float | None  # None when the probe cannot tell
    batch_s: float | None = None  # seconds the batch in flight has run; None = no batch
    batch_deadline_s: float | None = None  # seconds until it counts as stuck (batch_timeout)
    stalled_s: float | None = None  # seconds without a heartbeat once two were missed, else None
    last_exit: ExitRecord | None = None  # the last exit we did not ask for
    standby: StandbyRecord | None = None  # the standby process, while there is one
    yielded: YieldRecord | None = None  # while stepped aside (or about to)

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["state"] = self.state.value
        doc["last_load"] = self.last_load.to_json() if self.last_load else None
        doc["last_error"] = self.last_error.to_json() if self.last_error else None
        doc["last_exit"] = self.last_exit.to_json() if self.last_exit else None
        doc["standby"] = self.standby.to_json() if self.standby else None
        doc["yielded"] = self.yielded.to_json() if self.yielded else None
        return doc

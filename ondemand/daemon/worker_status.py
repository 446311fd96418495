"""What the rest of the daemon may know about the worker: its state and a status snapshot.

The supervisor (`supervisor.py`, which draws the state diagram and checks the transitions) is the
only writer; `/v1/status`, `/readyz`, the systemd STATUS= line, `/v1/prewarm` and the cost
ledger read.  `WorkerStatus` is a frozen snapshot for reporting: never branch on it to drive the
worker (send the supervisor a request and await it).  `to_json()` is the `worker` object of
`GET /v1/status` (docs/api.md), field for field.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ondemand.protocol import ErrorInfo

WarmBecause = Literal["in_flight", "hold", "idle_timeout"]


class WorkerState(enum.StrEnum):
    COLD = "cold"  # no process
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

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 6), "fresh_process": self.fresh_process,
                "trigger": self.trigger, "interpreter_s": round(self.interpreter_s, 6),
                "worker_s": self.worker_s, **self.timings}


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

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["state"] = self.state.value
        doc["last_load"] = self.last_load.to_json() if self.last_load else None
        doc["last_error"] = self.last_error.to_json() if self.last_error else None
        doc["last_exit"] = self.last_exit.to_json() if self.last_exit else None
        return doc

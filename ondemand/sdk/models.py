"""Typed results of the HTTP API v1: one frozen dataclass per document, built by `from_json`.

Each keeps the whole answer in `raw` (a newer daemon may add fields before this module knows
them).  docs/api.md and `GET /v1/openapi.json` describe the documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> ErrorInfo | None:
        return None if d is None else cls(str(d["code"]), str(d["message"]))


@dataclass(frozen=True)
class Prediction:
    key: str
    labels: list[str]
    scores: list[Any]  # per label; per frame, per label for granularity=frame
    top: dict[str, Any] | None  # {"label", "score"}
    frames: int
    duration_s: float

    @property
    def label(self) -> str | None:
        return None if self.top is None else str(self.top["label"])

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Prediction | None:
        if d is None:
            return None
        return cls(key=d.get("key", ""), labels=list(d.get("labels", [])),
                   scores=list(d.get("scores", [])), top=d.get("top"),
                   frames=int(d.get("frames", 0)), duration_s=float(d.get("duration_s", 0.0)))


@dataclass(frozen=True)
class Timings:
    queue_s: float | None = None
    cold_start_s: float | None = None
    compute_s: float | None = None


@dataclass(frozen=True)
class Callback:
    """A job's webhook: waiting (job not ended), pending, delivered or failed."""

    url: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: float | None

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Callback | None:
        if d is None:
            return None
        return cls(url=d["url"], state=d["state"], attempts=int(d["attempts"]),
                   last_status=d.get("last_status"), last_error=d.get("last_error"),
                   next_attempt_at=d.get("next_attempt_at"))


@dataclass(frozen=True)
class Job:
    id: str
    status: str  # queued, running, done, failed, cancelled
    key: str = ""
    granularity: str = "utterance"
    embedding: bool = False
    duration_s: float | None = None
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    owner: str = ""
    attempts: int = 0
    result: Prediction | None = None
    error: ErrorInfo | None = None
    timings: Timings = field(default_factory=Timings)
    callback: Callback | None = None
    position: int | None = None  # /v1/recognize's 202 only
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Job:
        t = d.get("timings") or {}
        return cls(id=d["id"], status=d["status"], key=d.get("key", ""),
                   granularity=d.get("granularity", "utterance"),
                   embedding=bool(d.get("embedding", False)), duration_s=d.get("duration_s"),
                   created=d.get("created"), started=d.get("started"),
                   finished=d.get("finished"), owner=d.get("owner", ""),
                   attempts=int(d.get("attempts", 0)),
                   result=Prediction.from_json(d.get("result")),
                   error=ErrorInfo.from_json(d.get("error")),
                   timings=Timings(t.get("queue_s"), t.get("cold_start_s"), t.get("compute_s")),
                   callback=Callback.from_json(d.get("callback")), position=d.get("position"),
                   raw=d)


@dataclass(frozen=True)
class JobUpdate:
    """A `job` event of `GET /v1/events` (docs/console.md), as an event-stream waiter's
    `on_update` gets it for the job it waits on: `queued` (with `position`, jobs ahead), `running`
    (a segmented recording repeats it with `done_s` of `total_s` classified), then the final
    status.  `time`: the server's clock (Unix seconds) at the change."""

    job: str
    status: str
    time: float
    position: int | None = None
    done_s: float | None = None
    total_s: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobUpdate:
        return cls(job=d["job"], status=d["status"], time=float(d["time"]),
                   position=d.get("position"), done_s=d.get("done_s"),
                   total_s=d.get("total_s"), raw=d)


@dataclass(frozen=True)
class Accepted:
    """202 from POST /v1/jobs: queued, with the jobs ahead of it and a rough ETA."""

    id: str
    status: str
    position: int
    worker: str
    eta_s: float | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Accepted:
        return cls(id=d["id"], status=d["status"], position=int(d["position"]),
                   worker=d["worker"], eta_s=d.get("eta_s"), raw=d)


@dataclass(frozen=True)
class Removed:
    """DELETE /v1/jobs/{id}: `cancelled` (it was queued or running) or `deleted` (final)."""

    id: str
    outcome: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Removed:
        return cls(id=d["id"], outcome="deleted" if d.get("deleted") else str(d["status"]))


@dataclass(frozen=True)
class WorkerStatus:
    state: str
    pid: int | None
    device: str
    model: str
    in_flight: int
    loads: int
    spawns: int
    hold_s: float | None
    last_load_s: float | None
    last_error: ErrorInfo | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WorkerStatus:
        return cls(state=d["state"], pid=d.get("pid"), device=d.get("device", ""),
                   model=d.get("model", ""), in_flight=int(d.get("in_flight", 0)),
                   loads=int(d.get("loads", 0)), spawns=int(d.get("spawns", 0)),
                   hold_s=d.get("hold_s"), last_load_s=d.get("last_load_s"),
                   last_error=ErrorInfo.from_json(d.get("last_error")), raw=d)


@dataclass(frozen=True)
class Status:
    worker: WorkerStatus
    queued: int
    running: int
    max_pending: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Status:
        q = d["queue"]
        return cls(worker=WorkerStatus.from_json(d["worker"]), queued=int(q["queued"]),
                   running=int(q["running"]), max_pending=int(q["max_pending"]), raw=d)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str | None
    worker: str | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Readiness:
        return cls(ready=bool(d["ready"]), reason=d.get("reason"), worker=d.get("worker"))


@dataclass(frozen=True)
class TokenUsage:
    name: str
    jobs: dict[str, int]
    audio_s: float
    compute_s: float
    attributed_usd: float | None


@dataclass(frozen=True)
class CostReport:
    """GET /v1/cost (docs/cost.md): `raw` is the whole document; `tokens` the first period's
    usage per token name."""

    generated_at: str
    tokens: list[TokenUsage]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CostReport:
        periods = d.get("periods") or [{}]
        tokens = [TokenUsage(t["name"], dict(t["jobs"]), float(t["audio_s"]),
                             float(t["compute_s"]), t.get("attributed_usd"))
                  for t in periods[0].get("tokens", [])]
        return cls(generated_at=d.get("generated_at", ""), tokens=tokens, raw=d)

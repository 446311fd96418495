"""The daemon's event bus: what the supervisor and dispatcher tell the rest of the process.

Subscribers (the cost ledger, metrics, `/v1/status`, tests) register a plain callback:

    unsubscribe = bus.subscribe(on_event)                     # every event
    unsubscribe = bus.subscribe(on_state, StateChanged)       # one or more event types

Callbacks run synchronously on the event loop, in subscription order, right after the change
happened; they must be quick and must not block (hand slow work to a task).  A callback that
raises is logged and never breaks the publisher.  Events are frozen dataclasses; `time` is wall
clock (time.time()) and `mono` is time.monotonic(), both taken when the event was created.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from time import time as wall_time
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Event:
    time: float = field(default_factory=wall_time)
    mono: float = field(default_factory=monotonic)


@dataclass(frozen=True, kw_only=True)
class StateChanged(Event):
    """The worker moved from `old` to `new` (values of supervisor.WorkerState).

    `reason` says why (`job`, `load_failed`, `idle_unload`, `idle_exit`, `crash`, ...);
    `trigger` names what asked for it: `job:<id>`, `schedule:<name>`, `manual`, `idle`, `shutdown`.
    `pid` is the worker process (None when there is none); `device` is the model's device once
    known (e.g. `cuda:0`, `cpu`), else the configured one."""

    old: str
    new: str
    reason: str
    trigger: str
    pid: int | None
    device: str


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(Event):
    """A load finished: `seconds` from the load request to `loaded` (in-process reloads too);
    `fresh_process` is True when the load needed a new interpreter."""

    seconds: float
    trigger: str
    pid: int | None
    device: str
    fresh_process: bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class WorkerExited(Event):
    """A worker process ended.  `kind` (daemon/process.py ExitKind): exited (asked), load_failed,
    load_timeout, crashed, killed (by a signal we did not send: possibly the OOM killer),
    stop_escalated (we SIGKILLed), protocol_error (we SIGKILLed it for a line that is not the
    protocol), hung (we SIGKILLed it: no heartbeat on a batch for worker.heartbeat_timeout_s),
    batch_timeout (we SIGKILLed it: a batch ran past its deadline)."""

    pid: int
    returncode: int | None
    kind: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class JobFinished(Event):
    """A job reached a final state (done / failed / cancelled)."""

    job: str
    status: str
    queue_s: float | None
    compute_s: float | None
    attempts: int



@dataclass(frozen=True, kw_only=True)
class JobQueued(Event):
    """A job was accepted (its row committed); `position`: jobs pending ahead of it."""

    job: str
    position: int


@dataclass(frozen=True, kw_only=True)
class JobsStarted(Event):
    """Jobs moved from queued to running: one batch about to be sent to the worker."""

    jobs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class JobProgress(Event):
    """A running segmented job's progress (issue 12): every segment ending before `done_s` of
    the recording's `total_s` is classified (the worker's protocol.Progress)."""

    job: str
    done_s: float
    total_s: float


@dataclass(frozen=True, kw_only=True)
class WorkerActivity(Event):
    """In-flight work or a hold changed without a state change: published when the in-flight
    count goes 0 -> 1 or back to 0, and when a hold is set or cleared.  The cost ledger splits
    `ready` into busy / idle-warm with it, and idle-warm into hold / idle-timeout tail.
    `hold_s`: seconds the hold still lasts (0: none); `hold_trigger`: who set it
    (`schedule:<name>`, `manual`)."""

    inflight: int
    hold_s: float
    hold_trigger: str


Callback = Callable[[Any], None]


class EventBus:
    def __init__(self) -> None:
        self._subs: list[tuple[Callback, tuple[type[Event], ...]]] = []

    def subscribe(self, callback: Callback, *types: type[Event]) -> Callable[[], None]:
        """Call `callback(event)` for every published event (or only those of `types`).
        Returns a function that unsubscribes."""
        entry = (callback, types or (Event,))
        self._subs.append(entry)

        def unsubscribe() -> None:
            if entry in self._subs:
                self._subs.remove(entry)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for callback, types in list(self._subs):
            if isinstance(event, types):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber %r failed on %s", callback,
                                  type(event).__name__)

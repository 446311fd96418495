"""Liveness of a busy worker: the batches in flight, their deadlines, the last heartbeat.

Issue 10: a SIGSTOPped worker held a batch for minutes, the queue grew, /readyz said ready and
nothing was logged.  While a batch is in flight the supervisor runs two timers whose delays come
from here (`Liveness.timers`): HEARTBEAT, re-armed by every `heartbeat` the worker sends from its
own thread (silent for `worker.heartbeat_timeout_s` = hung), and BATCH_DEADLINE, the earliest
deadline of the batches in flight (`batch_deadline_s`: max(batch_deadline_min_s, factor x the
batch's audio seconds / the slowest of the last SPEED_SAMPLES measured speeds) = stuck).  Either
makes the supervisor SIGKILL the worker (a stopped process cannot handle SIGTERM), so its batch
fails as a crash, the dispatcher retries it and the next lease starts a fresh worker.
`stalled_s` (missed beats while they last) feeds `/v1/status` and turns `/readyz` 503.

`Liveness` is bookkeeping that only the supervisor's owner task calls.  It arms no timer and never
changes the worker's state; it answers a batch's caller (`Batch.answer`, `fail_all`) only when
the supervisor tells it to.  Every time comes in as an argument, so tests drive it with plain
numbers (tests/test_supervisor_parts.py).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass

from ondemand import protocol
from ondemand.config import WorkerConfig
from ondemand.errors import from_code

SPEED_SAMPLES = 20  # recent batches whose slowest speed sets the batch deadline
EPSILON_S = 1e-3  # a timer that fires this early has fired on time


def batch_deadline_s(audio_s: float, speeds: Iterable[float], *, min_s: float, factor: float,
                     default_speed: float) -> float:
    """How long a batch of `audio_s` seconds of audio may run: max(min_s, factor x audio / the
    slowest of `speeds` (audio seconds per second), or `default_speed` before any)."""
    speed = min(speeds, default=default_speed)
    return max(min_s, factor * audio_s / speed)


@dataclass
class Batch:
    """A batch in flight on the worker."""

    op: protocol.Infer
    fut: asyncio.Future[protocol.Result]
    audio_s: float  # the batch's audio seconds (its deadline follows them)
    sent: float  # on the supervisor's clock
    deadline: float

    def describe(self) -> str:
        return f"batch {self.op.batch} ({len(self.op.items)} jobs, {self.audio_s:.1f}s of audio)"

    def answer(self, ev: protocol.Result | protocol.BatchFailed) -> None:
        """Resolve the caller's future: the result, or the error class the worker's code names."""
        if self.fut.done():
            return  # its caller was cancelled
        if isinstance(ev, protocol.Result):
            self.fut.set_result(ev)
        else:
            self.fut.set_exception(from_code(ev.code, ev.message))


class Liveness:
    """The batches in flight, the last sign of life on them and the speeds measured so far."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.batches: dict[str, Batch] = {}
        self.last_beat = 0.0  # the last sign of life of the worker on a batch (clock)
        self.speeds: collections.deque[float] = collections.deque(maxlen=SPEED_SAMPLES)

    def deadline_s(self, audio_s: float) -> float:
        """The run time a batch of `audio_s` seconds of audio is allowed now."""
        return batch_deadline_s(audio_s, self.speeds, min_s=self.cfg.batch_deadline_min_s,
                                factor=self.cfg.batch_deadline_factor,
                                default_speed=self.cfg.batch_default_speed)

    def start(self, op: protocol.Infer, fut: asyncio.Future[protocol.Result], audio_s: float,
              now: float) -> Batch:
        batch = Batch(op, fut, audio_s, now, now + self.deadline_s(audio_s))
        self.batches[op.batch] = batch
        self.last_beat = now
        return batch

    def beat(self, batch: str, now: float) -> bool:
        """A heartbeat; False (and ignored) for a beat that crossed its batch's answer."""
        if batch not in self.batches:
            return False
        self.last_beat = now
        return True

    def finish(self, ev: protocol.Result | protocol.BatchFailed, now: float) -> Batch | None:
        """The worker answered: the batch leaves (None when it is not ours any more); a result
        with audio measures a speed."""
        running = self.batches.pop(ev.batch, None)
        self.last_beat = now
        if (running is not None and isinstance(ev, protocol.Result) and running.audio_s > 0
                and ev.seconds > 0):
            self.speeds.append(running.audio_s / ev.seconds)
        return running

    def fail_all(self, err: Exception) -> None:
        """The worker is gone: every batch in flight fails with `err` and is forgotten."""
        for running in self.batches.values():
            if not running.fut.done():
                running.fut.set_exception(err)
        self.batches.clear()

    def timers(self, now: float) -> tuple[float, float] | None:
        """The delays of (HEARTBEAT, BATCH_DEADLINE) while a batch is in flight; None: none is."""
        if not self.batches:
            return None
        return (self.last_beat + self.cfg.heartbeat_timeout_s - now,
                min(b.deadline for b in self.batches.values()) - now)

    def hung(self, now: float) -> tuple[str, str]:
        """(what, why) for a worker silent past heartbeat_timeout_s on a batch."""
        silent = now - self.last_beat
        return (next(iter(self.batches.values())).describe(),
                f"no heartbeat for {silent:.1f}s (worker.heartbeat_timeout_s="
                f"{self.cfg.heartbeat_timeout_s:g})")

    def overdue(self, now: float) -> tuple[str, str] | None:
        """(what, why) for the batch past its deadline; None when none is (one ended since)."""
        late = min(self.batches.values(), key=lambda b: b.deadline)
        if late.deadline > now + EPSILON_S:
            return None
        return late.describe(), (f"ran {now - late.sent:.1f}s, past its deadline of "
                                 f"{late.deadline - late.sent:.1f}s ({late.audio_s:.1f}s of "
                                 "audio; worker.batch_deadline_*)")

    def stalled_s(self, now: float) -> float | None:
        """Seconds since the last heartbeat once two were missed on a batch in flight, else None."""
        if not self.batches:
            return None
        silent = now - self.last_beat
        return silent if silent > 2 * self.cfg.heartbeat_s else None

    def batch_s(self, now: float) -> float | None:
        """Seconds the oldest batch in flight has run; None when none is."""
        return now - min(b.sent for b in self.batches.values()) if self.batches else None

    def deadline_in_s(self, now: float) -> float | None:
        """Seconds until the earliest batch in flight counts as stuck; None when none is."""
        if not self.batches:
            return None
        return max(0.0, min(b.deadline for b in self.batches.values()) - now)

"""Waiting for one job on `GET /v1/events` (docs/console.md), without I/O: what each event means
for the wait, when to read the job, when to reconnect and after how long.  The sync and the
async `event_stream` waiters (sync.py, aio.py) only move bytes and call back into this.

The stream has no job snapshot, ids only on history events, and a replay buffer; so:

- **Nothing finished before the stream connected is missed.**  The daemon registers a stream
  before it writes `hello`, and commits a job's outcome before it publishes the `job` event;
  so once a `hello` has arrived, the job is read once (`needs_check`): final there, or its final
  event is still to come on this stream.
- **Nothing is missed across a dropped connection.**  The first `hello`'s `last_id` (the newest
  id when we registered) is where history starts for us; every id seen moves it on; a reconnect
  sends it as `Last-Event-ID` and the daemon replays what came after.  A `reset` (the id left
  the buffer: we fell `console.events_buffer` events behind, or the daemon restarted) means the
  history is lost: the waiter falls back to long-poll for the time left.
- **A silent stream is dead**: nothing, not even the `: ping` heartbeat, for
  `DEAD_AFTER_HEARTBEATS` heartbeats; the waiter reconnects.
- **Reconnects back off**: at once after a connection that said `hello` (once per `retry:`);
  after `retry:` (or the answer's Retry-After) after one that failed; the last error is raised
  once connections have failed for `give_up_s` in a row (a daemon gone is not waited for
  forever).
- A daemon without the route (404/405) or a token without the `read` scope (403) cannot stream:
  the waiter long-polls instead (and remembers it for that daemon and token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ondemand.errors import (
    DaemonUnreachable,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    OndemandError,
    RemoteError,
    Unavailable,
)
from ondemand.sdk.models import FINAL, JobUpdate
from ondemand.sdk.sse import ServerEvent

DEFAULT_RETRY_S = 3.0  # until the stream's `retry:` says otherwise
DEFAULT_HEARTBEAT_S = 15.0  # until `hello` says otherwise
DEAD_AFTER_HEARTBEATS = 3
GIVE_UP_S = 60.0

HELLO, DONE, RESET = "hello", "done", "reset"


def refused(e: OndemandError) -> bool:
    """The stream is not to be had from this daemon with this token: long-poll instead."""
    if isinstance(e, RemoteError):
        return e.http_status in (403, 404, 405)
    return isinstance(e, NotFound | Forbidden | MethodNotAllowed)


def transient(e: OndemandError) -> bool:
    """Worth reconnecting after: no answer, a 503 (shutting down, draining), a proxy's 502/504."""
    if isinstance(e, RemoteError):
        return e.http_status in (502, 503, 504)
    return isinstance(e, DaemonUnreachable | Unavailable)


class Clock:
    """The wait's deadline (None: no limit)."""

    def __init__(self, left_s: float | None) -> None:
        self.left_s = left_s
        self._deadline = None if left_s is None else time.monotonic() + left_s

    def left(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def cap(self, seconds: float) -> float:
        left = self.left()
        return seconds if left is None else min(seconds, left)

    def expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline


@dataclass
class Follow:
    job_id: str
    status: str  # as last known: the job document, then its events
    on_update: Callable[[JobUpdate], None] | None = None
    give_up_s: float = GIVE_UP_S
    resume_id: str | None = None  # Last-Event-ID for the next connection
    needs_check: bool = True  # read the job at the next hello or final event
    retry_s: float = DEFAULT_RETRY_S
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    _said_hello: bool = False  # on the current connection
    _failing_since: float | None = field(default=None, repr=False)
    _last_quick: float | None = field(default=None, repr=False)  # the last at-once reconnect

    @property
    def dead_after_s(self) -> float:
        return DEAD_AFTER_HEARTBEATS * self.heartbeat_s

    def connecting(self) -> None:
        self._said_hello = False

    def feed(self, ev: ServerEvent, retry_ms: int | None) -> str | None:
        """HELLO (connected) or DONE (the job's final event came): read the job if
        `needs_check`; RESET (history lost: long-poll); None (keep reading)."""
        if retry_ms is not None:
            self.retry_s = retry_ms / 1000
        if ev.id:
            self.resume_id = ev.id
        if ev.event == "hello":
            data = ev.json()
            self.heartbeat_s = float(data.get("heartbeat_s") or DEFAULT_HEARTBEAT_S)
            if self.resume_id is None:  # the first connection: history starts here
                self.resume_id = str(data["last_id"])
            self._said_hello = True
            self._failing_since = None
            return HELLO
        if ev.event == "reset":
            return RESET
        if ev.event == "job":
            data = ev.json()
            if data.get("job") != self.job_id:
                return None
            update = JobUpdate.from_json(data)
            self.status = update.status
            if self.on_update is not None:
                self.on_update(update)
            if update.status not in FINAL:
                return None
            # Read the job now; if that read fails, the check after the next hello reads it
            # (the final event lies before the resume id: it will not come again).
            self.needs_check = True
            return DONE
        return None

    def ended(self, error: BaseException | None) -> float:
        """The connection ended (error: why, None: the daemon closed it).  Returns the seconds
        to wait before reconnecting; raises `error` once connections have failed (ended before
        a hello) for `give_up_s` in a row."""
        now = time.monotonic()
        if self._said_hello:  # at once, unless it did so less than `retry_s` ago
            quick = self._last_quick is None or now - self._last_quick >= self.retry_s
            self._last_quick = now
            return 0.0 if quick else self.retry_s
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.give_up_s:
            if isinstance(error, OndemandError):
                raise error
            raise DaemonUnreachable(f"the event stream kept failing for {self.give_up_s:g} s "
                                    f"({error or 'closed before it started'})") from error
        after = getattr(error, "retry_after_s", None)
        return float(after) if after else self.retry_s

    def timeout(self, clock: Clock) -> TimeoutError:
        return TimeoutError(f"job {self.job_id} is still {self.status} after "
                            f"{clock.left_s or 0:g} s")

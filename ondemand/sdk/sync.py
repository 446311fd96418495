"""The synchronous client: the standard library only (the CLI stays light), one call per method;
`wait` follows the event stream (`event_stream`) or long-polls (`long_poll`)."""

from __future__ import annotations

import collections
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from ondemand.errors import DaemonUnreachable, OndemandError
from ondemand.sdk import _calls, follow
from ondemand.sdk._calls import Audio, Call
from ondemand.sdk.models import (
    Accepted,
    CostReport,
    Job,
    JobUpdate,
    Readiness,
    Removed,
    Status,
    WorkerStatus,
)
from ondemand.sdk.sse import Decoder, ServerEvent

URL_ENV = "ONDEMAND_URL"
# How `wait` waits: a function (client, job id, seconds left or None) -> the final Job.
Waiter = Callable[["Client", str, float | None], Job]


class Transport:
    """HTTP to the daemon: JSON in and out; an error answer raises the API's error class."""

    def __init__(self, url: str, *, token: str = "", timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def call(self, c: Call) -> Any:
        url = self.url + c.path
        if c.query:
            url += "?" + urllib.parse.urlencode(c.query)
        req = urllib.request.Request(url, data=c.body, method=c.method)
        if c.content_type:
            req.add_header("Content-Type", c.content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        timeout = (c.timeout_s or self.timeout_s) + c.extra_timeout_s
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            if e.code in c.accept:
                return json.loads(body)
            retry = e.headers.get("Retry-After") if e.headers else None
            raise _calls.error_from(e.code, body, retry) from None
        except (urllib.error.URLError, OSError) as e:
            raise self.unreachable(getattr(e, "reason", e)) from None
        if c.raw:
            return data
        return json.loads(data)

    def unreachable(self, reason: object) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"cannot reach the daemon at {self.url} ({reason}); is `ondemand serve` running? "
            f"(set --url or {URL_ENV})")

    def request(self, method: str, path: str, *, body: bytes | None = None,
                content_type: str | None = None, query: dict[str, Any] | None = None,
                timeout_s: float | None = None, raw: bool = False) -> Any:
        """Any route, as JSON (or bytes with `raw`)."""
        q = {k: str(v) for k, v in (query or {}).items() if v is not None}
        return self.call(Call(method, path, q, body=body, content_type=content_type,
                              timeout_s=timeout_s, raw=raw))


def long_poll(poll_s: float = 30.0) -> Waiter:
    """Wait with `GET /v1/jobs/{id}?wait=S`, `poll_s` at a time (the daemon caps each wait at
    server.max_wait_s)."""

    def wait(client: Client, job_id: str, left_s: float | None) -> Job:
        deadline = None if left_s is None else time.monotonic() + left_s
        while True:
            step = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
            job = client.job(job_id, wait_s=max(0.0, step))
            if job.final:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {left_s:g} s")

    return wait


def event_stream(*, on_update: Callable[[JobUpdate], None] | None = None,
                 fallback: Waiter | None = None, give_up_s: float = follow.GIVE_UP_S) -> Waiter:
    """Wait by following `GET /v1/events` (ondemand/sdk/follow.py says how nothing is missed):
    one read of the job, the stream until its final `job` event, one more read for the
    document.  `on_update(JobUpdate)` sees each of the job's events (a segmented recording's
    progress: `done_s` of `total_s`).  Long-polls (`fallback`, default `long_poll()`) on a
    daemon without the route, a token without the `read` scope, or a `reset`."""
    poll = fallback or long_poll()
    no_stream: set[tuple[str, str]] = set()  # (url, token) that answered 403/404/405

    def wait(client: Client, job_id: str, left_s: float | None) -> Job:
        if (client.url, client.token) in no_stream:
            return poll(client, job_id, left_s)
        clock = follow.Clock(left_s)
        job = client.job(job_id)
        if job.final:
            return job
        f = follow.Follow(job_id, job.status, on_update, give_up_s)
        while True:
            if clock.expired():
                raise f.timeout(clock)
            f.connecting()
            error: BaseException | None = None
            try:
                stream = client.events(last_event_id=f.resume_id,
                                       timeout_s=max(0.05, clock.cap(client.timeout_s)))
            except OndemandError as e:
                if follow.refused(e):
                    no_stream.add((client.url, client.token))
                    return poll(client, job_id, clock.left())
                if not follow.transient(e):
                    raise
                error = e
            else:
                with stream:
                    try:
                        outcome = _follow(client, stream, f, clock)
                    except (OSError, http.client.HTTPException, DaemonUnreachable) as e:
                        outcome, error = None, e  # TimeoutError is an OSError: a dead stream
                if isinstance(outcome, Job):
                    return outcome
                if outcome == follow.RESET:
                    return poll(client, job_id, clock.left())
            if clock.expired():
                raise f.timeout(clock)
            delay = clock.cap(f.ended(error))
            if delay > 0:
                time.sleep(delay)

    return wait


def _follow(client: Client, stream: EventStream, f: follow.Follow,
            clock: follow.Clock) -> Job | str | None:
    """Read one connection: the final Job, RESET, or None when it ended (reconnect)."""
    while True:
        ev = stream.next(clock.cap(f.dead_after_s))  # TimeoutError: silent, or the wait is over
        if ev is None:
            return None
        what = f.feed(ev, stream.retry_ms)
        if what == follow.RESET:
            return follow.RESET
        if what in (follow.HELLO, follow.DONE) and f.needs_check:
            job = client.job(f.job_id)
            f.needs_check = False
            if job.final:
                return job


class EventStream:
    """An open `GET /v1/events` (`Client.events`): `next(timeout_s)` is the next event, None
    once the daemon ended the stream; TimeoutError when nothing (not even a heartbeat) came in
    time (the stream cannot be read after that: close it).  Iterating yields events until the
    end.  Close it (or use `with`)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 sock: socket.socket) -> None:
        self._conn, self._resp, self._sock = conn, resp, sock
        self._decoder = Decoder()
        self._ready: collections.deque[ServerEvent] = collections.deque()

    @property
    def retry_ms(self) -> int | None:
        """The stream's `retry:` (the reconnect delay it asks for), once sent."""
        return self._decoder.retry_ms

    @property
    def comments(self) -> int:
        """Comment lines so far (the daemon's heartbeats)."""
        return self._decoder.comments

    def next(self, timeout_s: float | None = None) -> ServerEvent | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ready:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no event for {timeout_s:g} s")
            self._sock.settimeout(left)
            chunk = self._resp.read1(65536)
            if not chunk:
                return None
            self._ready.extend(self._decoder.feed(chunk))
        return self._ready.popleft()

    def __iter__(self) -> Iterator[ServerEvent]:
        while (ev := self.next()) is not None:
            yield ev

    def close(self) -> None:
        self._resp.close()
        self._conn.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Client(Transport):
    """The daemon's HTTP API v1, typed.  Errors raise the classes of ondemand/errors.py
    (`NotFound`, `QueueFull`, `TooManyRequests`, ...) with `retry_after_s`; no answer at all
    raises `DaemonUnreachable`.  `waiter`: how `wait` waits unless told (default:
    `event_stream()`, which long-polls where the daemon or the token has no stream)."""

    def __init__(self, url: str, *, token: str = "", timeout_s: float = 30.0,
                 waiter: Waiter | None = None) -> None:
        super().__init__(url, token=token, timeout_s=timeout_s)
        self.waiter = waiter or event_stream()

    def submit(self, audio: Audio, *, filename: str | None = None,
               granularity: str = "utterance", embedding: bool = False,
               key: str | None = None, callback_url: str | None = None,
               segments: str = "none", window_s: float | None = None,
               hop_s: float | None = None) -> Accepted:
        """Queue a clip: a path, bytes or a binary file.  `segments` vad or fixed (with
        window_s, hop_s): a timeline of a long recording (docs/recordings.md)."""
        return Accepted.from_json(self.call(_calls.submit(
            "/v1/jobs", audio, filename=filename, granularity=granularity,
            embedding=embedding, key=key, callback_url=callback_url, segments=segments,
            window_s=window_s, hop_s=hop_s)))

    def recognize(self, audio: Audio, *, filename: str | None = None,
                  granularity: str = "utterance", embedding: bool = False,
                  key: str | None = None, callback_url: str | None = None) -> Job:
        """Submit and wait (up to the daemon's server.max_wait_s) in one call."""
        c = _calls.submit("/v1/recognize", audio, filename=filename, granularity=granularity,
                          embedding=embedding, key=key, callback_url=callback_url)
        return Job.from_json(self.call(Call(c.method, c.path, c.query, c.body, c.content_type,
                                            timeout_s=self.timeout_s + 600)))

    def job(self, job_id: str, *, wait_s: float = 0.0) -> Job:
        return Job.from_json(self.call(_calls.job(job_id, wait_s)))

    def wait(self, job_id: str, *, timeout_s: float | None = None,
             waiter: Waiter | None = None) -> Job:
        """The job once it is final (done, failed, cancelled); TimeoutError after `timeout_s`.
        `waiter` chooses how (default: the client's, `event_stream()` unless set)."""
        return (waiter or self.waiter)(self, job_id, timeout_s)

    def events(self, *, last_event_id: str | None = None,
               timeout_s: float | None = None) -> EventStream:
        """Open `GET /v1/events` (docs/console.md), resumed after `last_event_id`.  `timeout_s`
        bounds the connect and the answer's head (default: the client's timeout)."""
        parts = urllib.parse.urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc.rpartition("@")[2], timeout=timeout_s or self.timeout_s)
        try:
            conn.request("GET", parts.path + _calls.EVENTS,
                         headers=_calls.events_headers(self.token, last_event_id))
            sock = conn.sock  # kept: getresponse() drops it when the answer closes the connection
            resp = conn.getresponse()
            if resp.status != 200:
                body = resp.read()
                conn.close()
                raise _calls.error_from(resp.status, body, resp.getheader("Retry-After"))
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self.unreachable(e) from None
        assert sock is not None
        return EventStream(conn, resp, sock)

    def cancel(self, job_id: str) -> Removed:
        """Cancel a queued or running job, or delete a final one."""
        return Removed.from_json(self.call(Call("DELETE", f"/v1/jobs/{job_id}")))

    def embedding_bytes(self, job_id: str) -> bytes:
        data: bytes = self.call(Call("GET", f"/v1/jobs/{job_id}/embedding.npy", raw=True))
        return data

    def embedding(self, job_id: str) -> Any:
        """The embedding as a numpy array (float32, (D,) or (T, D))."""
        return _calls.read_npy(self.embedding_bytes(job_id))

    def status(self) -> Status:
        return Status.from_json(self.call(Call("GET", "/v1/status")))

    def ready(self) -> Readiness:
        return Readiness.from_json(self.call(Call("GET", "/readyz", accept=(503,))))

    def healthy(self) -> bool:
        return bool(self.call(Call("GET", "/healthz")).get("ok"))

    def load(self, *, hold_s: float = 0.0, wait: bool = True,
             timeout_s: float = 600.0) -> WorkerStatus:
        return WorkerStatus.from_json(self.call(_calls.json_body(
            "POST", "/v1/worker/load", {"hold_s": hold_s, "wait": wait}, timeout_s)))

    def unload(self, *, exit: bool = False) -> WorkerStatus:
        return WorkerStatus.from_json(self.call(_calls.json_body(
            "POST", "/v1/worker/unload", {"exit": exit})))

    def prewarm(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.call(Call("GET", "/v1/prewarm"))
        return doc

    def cost(self, *, since: str | None = None, until: str | None = None) -> CostReport:
        query = {k: v for k, v in (("since", since), ("until", until)) if v}
        return CostReport.from_json(self.call(Call("GET", "/v1/cost", query)))

    def metrics(self) -> str:
        data: bytes = self.call(Call("GET", "/metrics", raw=True))
        return data.decode()

    def openapi(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.call(Call("GET", "/v1/openapi.json"))
        return doc

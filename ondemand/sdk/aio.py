"""The asyncio client (aiohttp): the same methods as `ondemand.sdk.Client`, awaited, and the
same waiters (`event_stream`, `long_poll`)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import aiohttp

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
from ondemand.sdk.sync import URL_ENV

AsyncWaiter = Callable[["AsyncClient", str, float | None], Awaitable[Job]]


def long_poll(poll_s: float = 30.0) -> AsyncWaiter:
    """Wait with `GET /v1/jobs/{id}?wait=S`, `poll_s` at a time."""

    async def wait(client: AsyncClient, job_id: str, left_s: float | None) -> Job:
        deadline = None if left_s is None else time.monotonic() + left_s
        while True:
            step = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
            job = await client.job(job_id, wait_s=max(0.0, step))
            if job.final:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {left_s:g} s")

    return wait


def event_stream(*, on_update: Callable[[JobUpdate], None] | None = None,
                 fallback: AsyncWaiter | None = None,
                 give_up_s: float = follow.GIVE_UP_S) -> AsyncWaiter:
    """`ondemand.sdk.event_stream`, awaited: follow `GET /v1/events` until the job's final
    event (ondemand/sdk/follow.py); long-poll where there is no stream or on `reset`."""
    poll = fallback or long_poll()
    no_stream: set[tuple[str, str]] = set()  # (url, token) that answered 403/404/405

    async def wait(client: AsyncClient, job_id: str, left_s: float | None) -> Job:
        if (client.url, client.token) in no_stream:
            return await poll(client, job_id, left_s)
        clock = follow.Clock(left_s)
        job = await client.job(job_id)
        if job.final:
            return job
        f = follow.Follow(job_id, job.status, on_update, give_up_s)
        while True:
            if clock.expired():
                raise f.timeout(clock)
            f.connecting()
            error: BaseException | None = None
            try:
                stream = await client.events(last_event_id=f.resume_id,
                                             timeout_s=max(0.05, clock.cap(client.timeout_s)))
            except OndemandError as e:
                if follow.refused(e):
                    no_stream.add((client.url, client.token))
                    return await poll(client, job_id, clock.left())
                if not follow.transient(e):
                    raise
                error = e
            else:
                async with stream:
                    try:
                        outcome = await _follow(client, stream, f, clock)
                    except (OSError, aiohttp.ClientError, DaemonUnreachable) as e:
                        outcome, error = None, e  # TimeoutError is an OSError: a dead stream
                if isinstance(outcome, Job):
                    return outcome
                if outcome == follow.RESET:
                    return await poll(client, job_id, clock.left())
            if clock.expired():
                raise f.timeout(clock)
            delay = clock.cap(f.ended(error))
            if delay > 0:
                await asyncio.sleep(delay)

    return wait


async def _follow(client: AsyncClient, stream: AsyncEventStream, f: follow.Follow,
                  clock: follow.Clock) -> Job | str | None:
    """Read one connection: the final Job, RESET, or None when it ended (reconnect)."""
    while True:
        ev = await stream.next(clock.cap(f.dead_after_s))  # TimeoutError: silent, or time's up
        if ev is None:
            return None
        what = f.feed(ev, stream.retry_ms)
        if what == follow.RESET:
            return follow.RESET
        if what in (follow.HELLO, follow.DONE) and f.needs_check:
            job = await client.job(f.job_id)
            f.needs_check = False
            if job.final:
                return job


class AsyncEventStream:
    """An open `GET /v1/events` (`AsyncClient.events`): `await next(timeout_s)` is the next
    event, None once the daemon ended the stream; TimeoutError when nothing (not even a
    heartbeat) came in time.  `async for` yields events until the end.  Close it (or use
    `async with`)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._decoder = Decoder()
        self._ready: collections.deque[ServerEvent] = collections.deque()

    @property
    def retry_ms(self) -> int | None:
        return self._decoder.retry_ms

    @property
    def comments(self) -> int:
        return self._decoder.comments

    async def next(self, timeout_s: float | None = None) -> ServerEvent | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ready:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no event for {timeout_s:g} s")
            chunk = await asyncio.wait_for(self._resp.content.readany(), left)
            if not chunk:
                return None
            self._ready.extend(self._decoder.feed(chunk))
        return self._ready.popleft()

    async def __aiter__(self) -> AsyncIterator[ServerEvent]:
        while (ev := await self.next()) is not None:
            yield ev

    async def close(self) -> None:
        self._resp.close()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncClient:
    """`async with AsyncClient(url, token=...) as c: job = await c.wait((await c.submit(p)).id)`.
    Errors raise the classes of ondemand/errors.py, as the sync client's do.  `waiter`: how
    `wait` waits unless told (default: `event_stream()`)."""

    def __init__(self, url: str, *, token: str = "", timeout_s: float = 30.0,
                 session: aiohttp.ClientSession | None = None,
                 waiter: AsyncWaiter | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.waiter = waiter or event_stream()
        self._session = session
        self._own = session is None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _unreachable(self, reason: object) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"cannot reach the daemon at {self.url} ({reason}); is `ondemand serve` running? "
            f"(set --url or {URL_ENV})")

    async def call(self, c: Call) -> Any:
        session = self._open()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if c.content_type:
            headers["Content-Type"] = c.content_type
        timeout = aiohttp.ClientTimeout(total=(c.timeout_s or self.timeout_s) + c.extra_timeout_s)
        try:
            async with session.request(c.method, self.url + c.path, params=c.query,
                                             data=c.body, headers=headers,
                                             timeout=timeout) as resp:
                body = await resp.read()
                if resp.status >= 400 and resp.status not in c.accept:
                    raise _calls.error_from(resp.status, body, resp.headers.get("Retry-After"))
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise self._unreachable(e) from None
        return body if c.raw else json.loads(body)

    async def submit(self, audio: Audio, *, filename: str | None = None,
                     granularity: str = "utterance", embedding: bool = False,
                     key: str | None = None, callback_url: str | None = None,
                     segments: str = "none", window_s: float | None = None,
                     hop_s: float | None = None) -> Accepted:
        return Accepted.from_json(await self.call(_calls.submit(
            "/v1/jobs", audio, filename=filename, granularity=granularity,
            embedding=embedding, key=key, callback_url=callback_url, segments=segments,
            window_s=window_s, hop_s=hop_s)))

    async def recognize(self, audio: Audio, *, filename: str | None = None,
                        granularity: str = "utterance", embedding: bool = False,
                        key: str | None = None, callback_url: str | None = None) -> Job:
        c = _calls.submit("/v1/recognize", audio, filename=filename, granularity=granularity,
                          embedding=embedding, key=key, callback_url=callback_url)
        return Job.from_json(await self.call(Call(c.method, c.path, c.query, c.body,
                                                  c.content_type,
                                                  timeout_s=self.timeout_s + 600)))

    async def job(self, job_id: str, *, wait_s: float = 0.0) -> Job:
        return Job.from_json(await self.call(_calls.job(job_id, wait_s)))

    async def wait(self, job_id: str, *, timeout_s: float | None = None,
                   waiter: AsyncWaiter | None = None) -> Job:
        return await (waiter or self.waiter)(self, job_id, timeout_s)

    async def events(self, *, last_event_id: str | None = None,
                     timeout_s: float | None = None) -> AsyncEventStream:
        """Open `GET /v1/events` (docs/console.md), resumed after `last_event_id`.  `timeout_s`
        bounds the connect and the answer's head (default: the client's timeout)."""
        session = self._open()
        limit = timeout_s or self.timeout_s
        try:
            resp = await asyncio.wait_for(session.get(
                self.url + _calls.EVENTS, headers=_calls.events_headers(self.token, last_event_id),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None)), limit)
        except (aiohttp.ClientConnectionError, OSError) as e:  # TimeoutError too
            raise self._unreachable(e) from None
        if resp.status != 200:
            try:
                body = await resp.read()
            finally:
                resp.release()
            raise _calls.error_from(resp.status, body, resp.headers.get("Retry-After"))
        return AsyncEventStream(resp)

    async def cancel(self, job_id: str) -> Removed:
        return Removed.from_json(await self.call(Call("DELETE", f"/v1/jobs/{job_id}")))

    async def embedding_bytes(self, job_id: str) -> bytes:
        data: bytes = await self.call(Call("GET", f"/v1/jobs/{job_id}/embedding.npy", raw=True))
        return data

    async def embedding(self, job_id: str) -> Any:
        return _calls.read_npy(await self.embedding_bytes(job_id))

    async def status(self) -> Status:
        return Status.from_json(await self.call(Call("GET", "/v1/status")))

    async def ready(self) -> Readiness:
        return Readiness.from_json(await self.call(Call("GET", "/readyz", accept=(503,))))

    async def healthy(self) -> bool:
        return bool((await self.call(Call("GET", "/healthz"))).get("ok"))

    async def load(self, *, hold_s: float = 0.0, wait: bool = True,
                   timeout_s: float = 600.0) -> WorkerStatus:
        return WorkerStatus.from_json(await self.call(_calls.json_body(
            "POST", "/v1/worker/load", {"hold_s": hold_s, "wait": wait}, timeout_s)))

    async def unload(self, *, exit: bool = False) -> WorkerStatus:
        return WorkerStatus.from_json(await self.call(_calls.json_body(
            "POST", "/v1/worker/unload", {"exit": exit})))

    async def prewarm(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self.call(Call("GET", "/v1/prewarm"))
        return doc

    async def cost(self, *, since: str | None = None, until: str | None = None) -> CostReport:
        query = {k: v for k, v in (("since", since), ("until", until)) if v}
        return CostReport.from_json(await self.call(Call("GET", "/v1/cost", query)))

    async def metrics(self) -> str:
        data: bytes = await self.call(Call("GET", "/metrics", raw=True))
        return data.decode()

    async def openapi(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self.call(Call("GET", "/v1/openapi.json"))
        return doc

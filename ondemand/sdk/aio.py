"""The asyncio client (aiohttp): the same methods as `ondemand.sdk.Client`, awaited."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ondemand.errors import DaemonUnreachable
from ondemand.sdk import _calls
from ondemand.sdk._calls import Audio, Call
from ondemand.sdk.models import (
    Accepted,
    CostReport,
    Job,
    Readiness,
    Removed,
    Status,
    WorkerStatus,
)
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


class AsyncClient:
    """`async with AsyncClient(url, token=...) as c: job = await c.wait((await c.submit(p)).id)`.
    Errors raise the classes of ondemand/errors.py, as the sync client's do."""

    def __init__(self, url: str, *, token: str = "", timeout_s: float = 30.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
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

    async def call(self, c: Call) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if c.content_type:
            headers["Content-Type"] = c.content_type
        timeout = aiohttp.ClientTimeout(total=(c.timeout_s or self.timeout_s) + c.extra_timeout_s)
        try:
            async with self._session.request(c.method, self.url + c.path, params=c.query,
                                             data=c.body, headers=headers,
                                             timeout=timeout) as resp:
                body = await resp.read()
                if resp.status >= 400 and resp.status not in c.accept:
                    raise _calls.error_from(resp.status, body, resp.headers.get("Retry-After"))
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise DaemonUnreachable(
                f"cannot reach the daemon at {self.url} ({e}); is `ondemand serve` running? "
                f"(set --url or {URL_ENV})") from None
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
        return await (waiter or long_poll())(self, job_id, timeout_s)

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

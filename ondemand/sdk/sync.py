"""The synchronous client: stdlib urllib only (the CLI stays light), one call per method."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

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
            reason = getattr(e, "reason", e)
            raise DaemonUnreachable(
                f"cannot reach the daemon at {self.url} ({reason}); is `ondemand serve` "
                f"running? (set --url or {URL_ENV})") from None
        if c.raw:
            return data
        return json.loads(data)

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


class Client(Transport):
    """The daemon's HTTP API v1, typed.  Errors raise the classes of ondemand/errors.py
    (`NotFound`, `QueueFull`, `TooManyRequests`, ...) with `retry_after_s`; no answer at all
    raises `DaemonUnreachable`."""

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
        `waiter` chooses how (default: long-poll)."""
        return (waiter or long_poll())(self, job_id, timeout_s)

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

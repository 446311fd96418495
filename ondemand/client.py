"""A small synchronous client for the daemon's HTTP API v1 (stdlib only: no torch, no aiohttp).

Used by `ondemand submit/status/load/unload` and the benchmarks.  Server errors arrive as
`RemoteError` with the server's stable code and message; no answer at all is
`DaemonUnreachable`."""

from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ondemand.config import Config
from ondemand.errors import DaemonUnreachable, RemoteError

URL_ENV = "ONDEMAND_URL"


def default_url(cfg: Config) -> str:
    env = os.environ.get(URL_ENV)
    if env:
        return env
    host = cfg.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.server.port}"


class Client:
    def __init__(self, url: str, *, token: str = "", timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        query: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        raw: bool = False,
    ) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            raise _server_error(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DaemonUnreachable(
                f"cannot reach the daemon at {self.url} ({reason}); is `ondemand serve` "
                f"running? (set --url or {URL_ENV})") from None
        return data if raw else json.loads(data)

    # -- API --------------------------------------------------------------------------------
    def submit(self, path: Path, *, granularity: str = "utterance", embedding: bool = False,
               key: str | None = None) -> dict[str, Any]:
        data = Path(path).read_bytes()
        ctype = mimetypes.guess_type(str(path))[0] or ""
        if not ctype.startswith("audio/"):
            ctype = "application/octet-stream"
        return self.request("POST", "/v1/jobs", body=data, content_type=ctype, query={
            "granularity": granularity, "embedding": "true" if embedding else "false",
            "key": key if key is not None else Path(path).stem})

    def job(self, job_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
        query = {"wait": wait_s} if wait_s > 0 else None
        return self.request("GET", f"/v1/jobs/{job_id}", query=query,
                            timeout_s=wait_s + self.timeout_s)

    def wait(self, job_id: str, *, poll_s: float = 30.0) -> dict[str, Any]:
        """Long-poll until the job is final."""
        while True:
            job = self.job(job_id, wait_s=poll_s)
            if job["status"] in ("done", "failed", "cancelled"):
                return job

    def embedding(self, job_id: str) -> bytes:
        return self.request("GET", f"/v1/jobs/{job_id}/embedding.npy",
                            raw=True)

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def load(self, *, hold_s: float = 0.0, wait: bool = True, timeout_s: float = 600.0
             ) -> dict[str, Any]:
        body = json.dumps({"hold_s": hold_s, "wait": wait}).encode()
        return self.request("POST", "/v1/worker/load", body=body,
                            content_type="application/json", timeout_s=timeout_s)

    def unload(self, *, exit: bool = False) -> dict[str, Any]:
        body = json.dumps({"exit": exit}).encode()
        return self.request("POST", "/v1/worker/unload", body=body,
                            content_type="application/json")


def _server_error(e: urllib.error.HTTPError) -> RemoteError:
    try:
        err = json.loads(e.read())["error"]
        code, message = str(err["code"]), str(err["message"])
    except Exception:
        code, message = "http_error", f"HTTP {e.code} {e.reason}"
    retry = e.headers.get("Retry-After") if e.headers else None
    if retry:
        message += f" (retry after {retry}s)"
    return RemoteError(message, remote_code=code, http_status=e.code)

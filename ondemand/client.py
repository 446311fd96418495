"""The dict-returning client of before `ondemand.sdk` (tests and benchmarks read its answers as
dicts).  New code uses `ondemand.sdk.Client`, which this shares its transport with: one HTTP
implementation, the same errors (ondemand/errors.py classes; `DaemonUnreachable`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ondemand.config import Config
from ondemand.sdk import _calls
from ondemand.sdk.sync import URL_ENV, Transport

__all__ = ["URL_ENV", "Client", "default_url"]


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


class Client(Transport):
    def submit(self, path: Path, *, granularity: str = "utterance", embedding: bool = False,
               key: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = self.call(_calls.submit(
            "/v1/jobs", Path(path), filename=None, granularity=granularity, embedding=embedding,
            key=key if key is not None else Path(path).stem, callback_url=None))
        return doc

    def job(self, job_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
        doc: dict[str, Any] = self.call(_calls.job(job_id, wait_s))
        return doc

    def wait(self, job_id: str, *, poll_s: float = 30.0) -> dict[str, Any]:
        """Long-poll until the job is final."""
        while True:
            job = self.job(job_id, wait_s=poll_s)
            if job["status"] in ("done", "failed", "cancelled"):
                return job

    def embedding(self, job_id: str) -> bytes:
        data: bytes = self.request("GET", f"/v1/jobs/{job_id}/embedding.npy", raw=True)
        return data

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.request("GET", "/v1/status")
        return doc

    def load(self, *, hold_s: float = 0.0, wait: bool = True, timeout_s: float = 600.0
             ) -> dict[str, Any]:
        doc: dict[str, Any] = self.request(
            "POST", "/v1/worker/load", body=json.dumps({"hold_s": hold_s, "wait": wait}).encode(),
            content_type="application/json", timeout_s=timeout_s)
        return doc

    def unload(self, *, exit: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = self.request(
            "POST", "/v1/worker/unload", body=json.dumps({"exit": exit}).encode(),
            content_type="application/json")
        return doc

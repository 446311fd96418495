"""Shared test helpers.

Daemon harness (tests/test_daemon_*.py): `Daemon` runs the real aiohttp app on a real socket
(127.0.0.1, port 0) with the fake worker subprocess (tests/fake_worker.py) or the real one, short
timeouts from config, and helpers that wait on conditions with deadlines."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile as sf
from aiohttp import web

from ondemand import config as config_mod
from ondemand.daemon import api
from ondemand.daemon.app import build_app
from ondemand.daemon.events import Event
from ondemand.daemon.supervisor import Supervisor, make_spawn
from ondemand.gpu import PsutilProbe

TESTS = Path(__file__).resolve().parent
FAKE_WORKER = TESTS / "fake_worker.py"
GOLDEN = TESTS.parent.parent / "shared" / "golden" / "emotion2vec-tiny"

FAST: dict[str, dict[str, Any]] = {
    "worker": {"load_timeout_s": 10.0, "unload_after_s": -1, "exit_after_s": -1,
               "stop_timeout_s": 2.0, "max_load_failures": 2, "load_backoff_s": 30.0,
               "release_timeout_s": 0.0},
    "queue": {"max_attempts": 3},
    "server": {"max_wait_s": 20.0, "stop_timeout_s": 5.0},
}


def daemon_config(storage: Path, **sections: dict[str, Any]) -> config_mod.Config:
    data: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    data.setdefault("storage", {})["dir"] = str(storage)
    return config_mod.build(config_mod.Config, data)


def wav_bytes(seconds: float, *, rate: int = 16000, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV",
             subtype="FLOAT")
    return buf.getvalue()


def fake_env(**knobs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env.update({f"FAKE_{k.upper()}": str(v) for k, v in knobs.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                   what: str = "condition") -> None:
    """Wait until `cond()` is true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Daemon:
    """The real front end on a real socket, with an injected worker command."""

    def __init__(self, cfg: config_mod.Config, *, worker_cmd: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        cmd = worker_cmd or [sys.executable, str(FAKE_WORKER)]
        self.app = build_app(cfg, spawn=make_spawn(cmd, env or fake_env()), gpu=PsutilProbe())
        self.events: list[Event] = []
        self.app[api.BUS].subscribe(self.events.append)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Daemon:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.http = aiohttp.ClientSession(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None
        await self.http.close()
        await self.runner.cleanup()

    @property
    def sup(self) -> Supervisor:
        return self.app[api.SUPERVISOR]

    async def submit(self, audio: bytes, *, expect: int = 202, **params: Any) -> dict[str, Any]:
        assert self.http is not None
        query = {k: str(v) for k, v in params.items()}
        async with self.http.post("/v1/jobs", data=audio, params=query,
                                  headers={"Content-Type": "audio/wav"}) as r:
            body = await r.json()
            assert r.status == expect, body
            return body  # type: ignore[no-any-return]

    async def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        assert self.http is not None
        params = {"wait": str(wait)} if wait else {}
        async with self.http.get(f"/v1/jobs/{job_id}", params=params) as r:
            assert r.status == 200, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    async def final(self, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id, wait=min(5.0, max(0.1, deadline - time.monotonic())))
            if job["status"] in ("done", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not final after {timeout}s: {job}")

    async def status(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get("/v1/status") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def wait_state(self, state: str, timeout: float = 10.0) -> None:
        await wait_for(lambda: self.sup.state.value == state, timeout, f"worker {state}")

    def states(self) -> list[str]:
        from ondemand.daemon.events import StateChanged

        return [e.new for e in self.events if isinstance(e, StateChanged)]

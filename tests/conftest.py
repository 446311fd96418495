"""Shared test helpers: the one copy of each.  Test modules import helpers from here (or from
tests/golden.py), never from one another.

- `run(coro)`: run a test's async body.
- `Daemon`: the real aiohttp app in-process on a real socket (127.0.0.1, port 0) with the fake
  worker subprocess (tests/fake_worker.py) or the real one, short timeouts from config.
- `serve_config` + `start_serve`: `ondemand serve` in a subprocess, as an operator runs it.
- `gated_worker`, `nth_spawn_worker`, `frozen`: hold the fake worker at a point the test
  chooses (before it starts, in a hung batch, SIGSTOPped), so a test never bets on how long a
  load, a batch or an unload takes.
- `run_virtual`: an event loop on virtual time, for timing tests of code without real I/O.
- `wait_for` and friends: wait on conditions with deadlines, never bare sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import soundfile as sf
from aiohttp import web

from ondemand import config as config_mod
from ondemand.daemon import api
from ondemand.daemon.app import build_app
from ondemand.daemon.events import Event, StateChanged, WorkerExited
from ondemand.daemon.http import make_runner
from ondemand.daemon.supervisor import Supervisor, make_spawn
from ondemand.gpu import PsutilProbe

T = TypeVar("T")
TESTS = Path(__file__).resolve().parent
FAKE_WORKER = TESTS / "fake_worker.py"

FAST: dict[str, dict[str, Any]] = {
    "worker": {"load_timeout_s": 10.0, "unload_after_s": -1, "exit_after_s": -1,
               "stop_timeout_s": 2.0, "max_load_failures": 2, "load_backoff_s": 30.0,
               "release_timeout_s": 0.0},
    "queue": {"max_attempts": 3},
    "server": {"max_wait_s": 20.0, "stop_timeout_s": 5.0},
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test's async body on a fresh event loop."""
    return asyncio.run(coro)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: when nothing is ready it jumps to its next timer instead
    of waiting for it, so timed code (sleep, wait_for, call_later) runs at once and exactly on
    time however loaded the machine is.  For code that does no real I/O (a scheduler against a
    fake, a sampler against a scripted probe); a test reads its clock as `loop.time()`."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0 if timeout else timeout)
        if not events and timeout:
            self._loop.now += timeout  # the loop then runs the timer that was due
        return events


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test's async body on a VirtualClockLoop."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(coro)


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


def fake_log(path: Path) -> list[dict[str, Any]]:
    """The fake worker's FAKE_LOG: one {"pid", "op", "n", "keys"} per load/infer/unload."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the fake worker behind a small wrapper: a start gate, knobs for the n-th spawn only ------
_WRAPPER = (
    "import json, os, sys, time\n"
    "gate, spawns, nth, knobs, worker = sys.argv[1:6]\n"
    "while gate and not os.path.exists(gate):\n"
    "    time.sleep(0.01)\n"
    "if spawns:\n"
    "    n = 1\n"
    "    while True:  # this is spawn n: the first to create spawns/n\n"
    "        try:\n"
    "            os.close(os.open(os.path.join(spawns, str(n)), os.O_CREAT | os.O_EXCL))\n"
    "            break\n"
    "        except FileExistsError:\n"
    "            n += 1\n"
    "    if n == int(nth):\n"
    "        os.environ.update(json.loads(knobs))\n"
    "os.execv(sys.executable, [sys.executable, worker])\n"
)


def gated_worker(gate: Path) -> list[str]:
    """A worker command: the fake worker, started only once `gate` exists.  Until then the
    supervisor waits for its hello (state starting), so every job submitted meanwhile is queued
    when the model becomes ready: the first batch holds them all, however slow the machine."""
    return [sys.executable, "-c", _WRAPPER, str(gate), "", "", "", str(FAKE_WORKER)]


def nth_spawn_worker(spawns: Path, nth: int, **knobs: str) -> list[str]:
    """A worker command: the `nth` fake worker spawned (counted with files in `spawns`, across
    daemon restarts) runs with these extra knobs, the others without; `hang_batch="1"` makes a
    worker that is certain to be inside a batch when the test kills something."""
    spawns.mkdir(parents=True, exist_ok=True)
    extra = {f"FAKE_{k.upper()}": str(v) for k, v in knobs.items()}
    return [sys.executable, "-c", _WRAPPER, "", str(spawns), str(nth), json.dumps(extra),
            str(FAKE_WORKER)]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` for the block, SIGCONT after (also when the block fails).  A frozen worker
    cannot answer, so the daemon waits in whatever state it is in (unloading, stopping, in a
    batch) until the test lets go: the test decides when, not a timer."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- `ondemand serve` in a subprocess --------------------------------------------------------
SERVE: dict[str, dict[str, Any]] = {
    "server": {"port": 0, "stop_timeout_s": 5.0},
    "worker": {"command": f"{sys.executable} {FAKE_WORKER}", "unload_after_s": -1,
               "exit_after_s": -1, "stop_timeout_s": 1.0, "load_timeout_s": 10.0},
}
SERVING = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def serve_config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """Write tmp/config.toml for `ondemand serve`: port 0, the fake worker, no idle ladder,
    state in tmp/var; `sections` are merged over those defaults (SERVE)."""
    data: dict[str, dict[str, Any]] = {k: dict(v) for k, v in SERVE.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    data.setdefault("storage", {})["dir"] = str(tmp / "var")
    path = tmp / "config.toml"
    path.write_text("".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
        for name, values in data.items()
    ))
    return path


def start_serve(
    cfg: Path, env: dict[str, str], **popen: Any
) -> tuple[subprocess.Popen[str], str]:
    """`ondemand serve` in a subprocess; returns it and its URL once it is listening."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, **popen,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = SERVING.search(line)
        if m:
            # keep draining stderr so the daemon never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("ondemand serve did not start")


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
        # the production runner (as `ondemand serve`): parser refusals answer in JSON too
        self.runner = make_runner(self.app, cfg.server, access_log=None)
        self.url = ""
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Daemon:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._http = aiohttp.ClientSession(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.runner.cleanup()

    @property
    def http(self) -> aiohttp.ClientSession:
        """A client session on the daemon's URL (inside `async with`)."""
        if self._http is None:
            raise RuntimeError("use the Daemon inside `async with`")
        return self._http

    @property
    def sup(self) -> Supervisor:
        return self.app[api.SUPERVISOR]

    async def submit(self, audio: bytes, *, expect: int = 202, **params: Any) -> dict[str, Any]:
        query = {k: str(v) for k, v in params.items()}
        async with self.http.post("/v1/jobs", data=audio, params=query,
                                  headers={"Content-Type": "audio/wav"}) as r:
            body = await r.json()
            assert r.status == expect, body
            return body  # type: ignore[no-any-return]

    async def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
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
        async with self.http.get("/v1/status") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def wait_state(self, state: str, timeout: float = 10.0) -> None:
        await wait_for(lambda: self.sup.state.value == state, timeout, f"worker {state}")

    def states(self) -> list[str]:
        return [e.new for e in self.events if isinstance(e, StateChanged)]

    def changes(self) -> list[StateChanged]:
        return [e for e in self.events if isinstance(e, StateChanged)]

    def exits(self) -> list[WorkerExited]:
        return [e for e in self.events if isinstance(e, WorkerExited)]

    def waiting(self) -> int:
        """Lease and load requests the supervisor holds until the model is ready.  Read from
        a private field: the supervisor does not publish it (yet) in status()."""
        return len(self.sup._waiters)

"""The worker supervisor: the one owner of the GPU worker process and its state.

A single task (`_run`) owns every piece of worker state.  Everyone else sends it a message and
awaits the outcome: `async with supervisor.lease(trigger) as lease: await lease.infer(...)`,
`await supervisor.load(trigger, hold_s=...)`, `await supervisor.unload(...)`.  Pipe lines, process
exits and timers arrive as messages in the same queue, so no state is ever changed from two places
(llama-swap raced until it moved to exactly this).

States and transitions (TRANSITIONS below is checked by `_set_state`):

    cold ──spawn──> starting ──hello──> loading ──loaded──> ready <──load── unloaded
      ^                │                   │                 │  ──idle unload──> unloading ──┘
      │                └──────── any failure / idle exit / shutdown ─────> stopping ──exit──┘
      └── backoff <── (load failed max_load_failures times in a row; refuses loads until a deadline)

In-flight work is counted by leases; the idle timer is armed only when the count is zero and is
re-checked when it fires (LocalAI #5221, llama.cpp #28698: never unload under a running job).
Idle ladder: `unload_after_s` drops the model but keeps the process (cheap reactivation);
`exit_after_s` ends the process, the only way to free the CUDA context.  0 = at once, -1 = never.
Holds (`load(hold_s=...)`) suspend both while active; overlapping holds merge.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ondemand.config import ModelConfig, WorkerConfig
from ondemand.daemon.events import EventBus, ModelLoaded, StateChanged, WorkerActivity, WorkerExited
from ondemand.errors import LoadFailed, WorkerCrashed, WorkerUnavailable, from_code
from ondemand.gpu import GpuProbe, gpu_index

log = logging.getLogger(__name__)

STREAM_LIMIT = 16 * 1024 * 1024  # longest protocol line we accept from the worker
RELEASE_POLL_S = 0.25  # NVML poll period while waiting for GPU memory to come back (Ollama)


class WorkerState(enum.StrEnum):
    COLD = "cold"  # no process
    STARTING = "starting"  # process spawned, waiting for its hello
    LOADING = "loading"  # load sent, waiting for loaded
    READY = "ready"  # model loaded; batches may run
    UNLOADING = "unloading"  # unload sent
    UNLOADED = "unloaded"  # process alive without a model
    STOPPING = "stopping"  # asked to exit (escalates to SIGKILL), or waiting for GPU memory
    BACKOFF = "backoff"  # no process; repeated load failures; loads refused until a deadline


S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.COLD: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.LOADING, S.STOPPING, S.COLD, S.BACKOFF}),
    S.LOADING: frozenset({S.READY, S.STOPPING, S.COLD, S.BACKOFF}),
    S.READY: frozenset({S.UNLOADING, S.STOPPING, S.COLD}),
    S.UNLOADING: frozenset({S.UNLOADED, S.STOPPING, S.COLD}),
    S.UNLOADED: frozenset({S.LOADING, S.STOPPING, S.COLD}),
    S.STOPPING: frozenset({S.COLD, S.BACKOFF}),
    S.BACKOFF: frozenset({S.COLD}),
}
ALIVE = frozenset({S.STARTING, S.LOADING, S.READY, S.UNLOADING, S.UNLOADED, S.STOPPING})


def held_gpu_mb(probe: GpuProbe | None, pid: int, device: str) -> float | None:
    """GPU memory `pid` holds in MiB (0 when none), None when the probe cannot tell."""
    index = gpu_index(device)
    if probe is None or probe.fallback or index is None:
        return None
    held = probe.sample([pid], index).pids_gpu_memory_bytes
    return None if held is None else held / 2**20


Spawn = Callable[[], Awaitable[asyncio.subprocess.Process]]


def default_command(worker: WorkerConfig) -> list[str]:
    """`worker.command` split shell-style, else a fresh interpreter running ondemand.worker."""
    if worker.command:
        return shlex.split(worker.command)
    return [sys.executable, "-m", "ondemand.worker"]


def make_spawn(command: list[str], env: dict[str, str] | None = None) -> Spawn:
    async def spawn() -> asyncio.subprocess.Process:
        # A fresh interpreter, never a fork: CUDA state must not be inherited.
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal goes to the daemon, not the GPU
        )

    return spawn


# -- messages to the owner task -----------------------------------------------------------
@dataclass
class _Acquire:
    trigger: str
    fut: asyncio.Future[None]


@dataclass
class _Release:
    pass


@dataclass
class _Load:
    trigger: str
    hold_s: float
    fut: asyncio.Future[None] | None


@dataclass
class _Unload:
    trigger: str
    exit: bool
    fut: asyncio.Future[None] | None = None  # resolved once the request is taken in


@dataclass
class _Infer:
    request: dict[str, Any]
    fut: asyncio.Future[dict[str, Any]]


@dataclass
class _Line:
    pid: int
    msg: dict[str, Any]


@dataclass
class _Exited:
    pid: int
    returncode: int | None


@dataclass
class _Timer:
    kind: str  # idle | load_deadline | stop_deadline | backoff_end | release_poll
    gen: int


@dataclass
class _Shutdown:
    fut: asyncio.Future[None]


@dataclass
class _Proc:
    proc: asyncio.subprocess.Process
    pid: int
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=20)
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop_reason: str = ""  # why we asked it to stop ("" = we did not)
    killed: bool = False  # we sent SIGKILL


class Lease:
    """Held while a caller runs work on the worker: the in-flight count is one higher."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    async def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send an `infer` op (see docs/design.md) and return the worker's `result` event
        (`results`, `seconds`).  Raises WorkerCrashed when the worker dies under it, and the
        error the worker named (errors.from_code) on `batch_failed`."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._sup._post(_Infer(request, fut))
        return await fut


class Supervisor:
    def __init__(
        self,
        worker: WorkerConfig,
        model: ModelConfig,
        bus: EventBus,
        *,
        spawn: Spawn | None = None,
        gpu: GpuProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = worker
        self.model = model
        self.bus = bus
        self._spawn = spawn or make_spawn(default_command(worker))
        self._gpu = gpu
        self._clock = clock
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

        self.state = S.COLD
        self._proc: _Proc | None = None
        self._trigger = ""  # what asked for the current load
        self._reason = ""
        self._inflight = 0
        self._waiters: list[_Acquire | _Load] = []
        self._batches: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._last_used = clock()
        self._hold_until = 0.0
        self._hold_trigger = ""
        self._pending_unload: _Unload | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._gens: dict[str, int] = collections.defaultdict(int)
        self._deadlines: dict[str, float] = {}
        self._load_started = 0.0
        self._load_fresh = False
        self._failures = 0
        self._last_error: dict[str, str] | None = None
        self._backoff_until = 0.0
        self._release_deadline = 0.0
        self._shutdown: _Shutdown | None = None
        self.device = worker.device
        self.dtype = worker.dtype
        self.last_load_s: float | None = None
        self.last_load: dict[str, Any] | None = None  # breakdown of the last load
        self._hello_s = 0.0
        self.loads = 0
        self.spawns = 0

    # -- public API (any task) ------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="supervisor")

    async def close(self) -> None:
        """Stop the worker (ask, wait, SIGKILL, reap) and end the owner task.  Idempotent."""
        if self._task is None or self._task.done():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(_Shutdown(fut))
        await fut
        await self._task

    @contextlib.asynccontextmanager
    async def lease(self, trigger: str) -> AsyncIterator[Lease]:
        """Wait until the model is loaded (loading it if needed) and hold it while the body runs.
        Raises LoadFailed / WorkerUnavailable when it cannot be loaded."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(_Acquire(trigger, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._post(_Release())  # granted just as we were cancelled
            raise
        try:
            yield Lease(self)
        finally:
            self._post(_Release())

    async def load(self, trigger: str, *, hold_s: float = 0.0, wait: bool = True) -> None:
        """Load the model (manual or scheduled); keep it at least `hold_s` seconds."""
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._post(_Load(trigger, hold_s, fut))
        if fut is not None:
            await fut

    async def unload(self, trigger: str = "manual", *, exit: bool = False) -> None:
        """Drop the model once in-flight work is done (`exit`: end the process too).
        Clears holds.  Returns once the request is taken in, not when the unload is done."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(_Unload(trigger, exit, fut))
        await fut

    def status(self) -> dict[str, Any]:
        now = self._clock()
        proc = self._proc
        unload_in = exit_in = None
        if self._inflight == 0 and self.state in (S.READY, S.UNLOADED):
            unload_at, exit_at = self._idle_deadlines()
            if unload_at is not None and self.state is S.READY:
                unload_in = max(0.0, unload_at - now)
            if exit_at is not None:
                exit_in = max(0.0, exit_at - now)
        gpu_mb = held_gpu_mb(self._gpu, proc.pid, self.device) if proc else None
        return {
            "state": self.state.value,
            "pid": proc.pid if proc else None,
            "device": self.device,
            "dtype": self.dtype,
            "model": self.model.spec,
            "trigger": self._trigger or None,
            "in_flight": self._inflight,
            "last_load_s": self.last_load_s,
            "last_load": self.last_load,
            "loads": self.loads,
            "spawns": self.spawns,
            "unload_in_s": unload_in,
            "exit_in_s": exit_in,
            "hold_s": max(0.0, self._hold_until - now) if self._hold_until > now else None,
            "hold_trigger": (self._hold_trigger or None) if self._hold_until > now else None,
            # why a ready worker stays loaded: in_flight, hold (see hold_trigger) or idle_timeout
            "warm_because": self._warm_because(now),
            "load_failures": self._failures,
            "last_error": self._last_error,
            "backoff_s": (
                max(0.0, self._backoff_until - now) if self.state is S.BACKOFF else None
            ),
            "gpu_memory_mb": gpu_mb,
        }

    def _warm_because(self, now: float) -> str | None:
        if self.state is not S.READY:
            return None
        if self._inflight:
            return "in_flight"
        return "hold" if self._hold_until > now else "idle_timeout"

    def retry_after_s(self) -> float:
        return max(1.0, self._backoff_until - self._clock()) if self.state is S.BACKOFF else 1.0

    # -- owner task -----------------------------------------------------------------------
    def _post(self, msg: Any) -> None:
        self._inbox.put_nowait(msg)

    async def _run(self) -> None:
        handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            _Acquire: self._on_acquire,
            _Release: self._on_release,
            _Load: self._on_load,
            _Unload: self._on_unload,
            _Infer: self._on_infer,
            _Line: self._on_line,
            _Exited: self._on_exited,
            _Timer: self._on_timer,
            _Shutdown: self._on_shutdown,
        }
        while True:
            msg = await self._inbox.get()
            try:
                await handlers[type(msg)](msg)
            except Exception:
                log.exception("supervisor failed handling %s", type(msg).__name__)
                await self._stop(force=True, reason="internal_error")
            if self._shutdown is not None and self.state in (S.COLD, S.BACKOFF):
                for name in list(self._timers):
                    self._cancel_timer(name)
                if not self._shutdown.fut.done():
                    self._shutdown.fut.set_result(None)
                return

    def _set_state(self, new: WorkerState, reason: str, trigger: str | None = None) -> None:
        old = self.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"illegal worker transition {old} -> {new} ({reason})")
        self.state = new
        trig = trigger if trigger is not None else self._trigger
        pid = self._proc.pid if self._proc else None
        log.info("worker %s -> %s reason=%s trigger=%s pid=%s", old, new, reason, trig or "-", pid)
        self.bus.publish(
            StateChanged(old=old.value, new=new.value, reason=reason, trigger=trig, pid=pid,
                         device=self.device)
        )

    # timers ------------------------------------------------------------------------------
    def _arm(self, kind: str, delay: float) -> None:
        self._cancel_timer(kind)
        self._gens[kind] += 1
        gen = self._gens[kind]
        self._deadlines[kind] = self._clock() + max(0.0, delay)
        self._timers[kind] = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._post, _Timer(kind, gen)
        )

    def _cancel_timer(self, kind: str) -> None:
        handle = self._timers.pop(kind, None)
        if handle is not None:
            handle.cancel()
        self._gens[kind] += 1  # a message already queued for it is now stale
        self._deadlines.pop(kind, None)

    async def _on_timer(self, msg: _Timer) -> None:
        if msg.gen != self._gens[msg.kind]:
            return
        self._timers.pop(msg.kind, None)
        if msg.kind == "idle":
            await self._idle_expired()
        elif msg.kind == "load_deadline" and self.state in (S.STARTING, S.LOADING):
            self._load_failed("load_timeout", f"the model did not load within "
                              f"worker.load_timeout_s={self.cfg.load_timeout_s:g}s")
            await self._stop(force=True, reason="load_timeout")
        elif msg.kind == "stop_deadline" and self._proc is not None:
            log.warning("worker pid=%d did not exit within %gs: SIGKILL", self._proc.pid,
                        self.cfg.stop_timeout_s)
            self._kill(self._proc)
        elif msg.kind == "backoff_end" and self.state is S.BACKOFF:
            self._set_state(S.COLD, "backoff_over")
            if self._waiters:
                await self._begin_load(self._waiters[0].trigger)
        elif msg.kind == "release_poll":
            self._poll_release()

    # requests ----------------------------------------------------------------------------
    async def _on_acquire(self, msg: _Acquire) -> None:
        if msg.fut.done():
            return
        if self.state is S.READY:
            self._grant(msg)
            return
        if self._refuse(msg):
            return
        self._waiters.append(msg)
        if self.state in (S.COLD, S.UNLOADED):
            await self._begin_load(msg.trigger)

    def _grant(self, msg: _Acquire) -> None:
        self._inflight += 1
        self._cancel_timer("idle")
        if self._inflight == 1:
            self._activity()
        msg.fut.set_result(None)

    def _activity(self) -> None:
        """Tell the cost ledger that in-flight work or a hold changed (ready busy vs idle)."""
        hold = max(0.0, self._hold_until - self._clock())
        self.bus.publish(WorkerActivity(inflight=self._inflight, hold_s=hold,
                                        hold_trigger=self._hold_trigger if hold else ""))

    def _refuse(self, msg: _Acquire | _Load) -> bool:
        """Fail the request at once when the worker is backing off or shutting down."""
        err: WorkerUnavailable | None = None
        if self._shutdown is not None:
            err = WorkerUnavailable("the daemon is shutting down", retry_after_s=5)
        elif self.state is S.BACKOFF:
            last = self._last_error or {}
            wait = self.retry_after_s()
            err = LoadFailed(
                f"the model failed to load {self._failures} times in a row "
                f"({last.get('code')}: {last.get('message')}); next attempt in {wait:.0f}s",
                retry_after_s=wait,
            )
        if err is None:
            return False
        if msg.fut is not None and not msg.fut.done():
            msg.fut.set_exception(err)
        return True

    async def _on_release(self, msg: _Release) -> None:
        self._inflight -= 1
        assert self._inflight >= 0, "lease released twice"
        if self._inflight == 0:
            self._last_used = self._clock()
            self._activity()
            if self._pending_unload is not None:
                pending, self._pending_unload = self._pending_unload, None
                await self._on_unload(pending)
            else:
                self._arm_idle()

    async def _on_load(self, msg: _Load) -> None:
        if msg.hold_s > 0:
            until = self._clock() + msg.hold_s
            if until > self._hold_until:
                self._hold_until, self._hold_trigger = until, msg.trigger
            log.info("worker hold %.0fs trigger=%s", msg.hold_s, msg.trigger)
            self._activity()
        self._pending_unload = None
        if self.state is S.READY:
            self._last_used = self._clock()
            self._arm_idle()
            if msg.fut is not None:
                msg.fut.set_result(None)
            return
        if self._refuse(msg):
            return
        if msg.fut is not None:
            self._waiters.append(msg)
        if self.state in (S.COLD, S.UNLOADED):
            await self._begin_load(msg.trigger)
        elif msg.fut is None and self.state in (S.UNLOADING, S.STOPPING):
            self._waiters.append(msg)  # load again once the process settles

    async def _on_unload(self, msg: _Unload) -> None:
        try:
            await self._unload(msg)
        finally:
            if msg.fut is not None and not msg.fut.done():
                msg.fut.set_result(None)

    async def _unload(self, msg: _Unload) -> None:
        had_hold = bool(self._hold_trigger)
        self._hold_until, self._hold_trigger = 0.0, ""
        if had_hold:
            self._activity()
        if self._inflight > 0:
            self._pending_unload = msg  # never under a running batch
            log.info("worker unload requested trigger=%s: after %d in-flight", msg.trigger,
                     self._inflight)
            return
        self._cancel_timer("idle")
        if msg.exit and self.state in (S.STARTING, S.LOADING, S.READY, S.UNLOADING, S.UNLOADED):
            self._fail_waiters(WorkerUnavailable("the worker was stopped on request"))
            await self._stop(force=False, reason="unload_exit", trigger=msg.trigger)
        elif self.state is S.READY:
            await self._send_unload(msg.trigger)

    async def _on_infer(self, msg: _Infer) -> None:
        proc = self._proc
        if self.state is not S.READY or proc is None:
            msg.fut.set_exception(WorkerCrashed(f"the worker is {self.state}, not ready"))
            return
        batch = str(msg.request["batch"])
        self._batches[batch] = msg.fut
        await self._send(proc, {"op": "infer", **msg.request})

    # worker output -----------------------------------------------------------------------
    async def _on_line(self, msg: _Line) -> None:
        proc = self._proc
        if proc is None or msg.pid != proc.pid:
            return
        event = msg.msg.get("event")
        if event == "hello" and self.state is S.STARTING:
            self._hello_s = self._clock() - self._load_started
            self._set_state(S.LOADING, "spawned")
            await self._send_load(proc)
        elif event == "loaded" and self.state is S.LOADING:
            self._on_loaded(msg.msg)
        elif event == "load_failed" and self.state is S.LOADING:
            self._load_failed(str(msg.msg.get("code", "load_failed")),
                              str(msg.msg.get("message", "")))
            await self._stop(force=False, reason="load_failed")
        elif event == "unloaded" and self.state is S.UNLOADING:
            self._set_state(S.UNLOADED, self._reason)
            if self._waiters:
                await self._begin_load(self._waiters[0].trigger)
            else:
                self._arm_idle()
        elif event in ("result", "batch_failed"):
            fut = self._batches.pop(str(msg.msg.get("batch")), None)
            if fut is None or fut.done():
                return
            if event == "result":
                fut.set_result(msg.msg)
            else:
                fut.set_exception(from_code(str(msg.msg.get("code", "internal")),
                                            str(msg.msg.get("message", ""))))
        else:
            log.warning("worker pid=%d unexpected %s in state %s", proc.pid, event, self.state)

    def _on_loaded(self, m: dict[str, Any]) -> None:
        self._cancel_timer("load_deadline")
        seconds = self._clock() - self._load_started
        self.last_load_s = seconds
        self.last_load = {"seconds": round(seconds, 6), "fresh_process": self._load_fresh,
                          "trigger": self._trigger,
                          "interpreter_s": round(self._hello_s, 6) if self._load_fresh else 0.0,
                          "worker_s": m.get("seconds"), **dict(m.get("timings") or {})}
        self.loads += 1
        self._failures = 0
        self._last_error = None
        self.device = str(m.get("device", self.device))
        self.dtype = str(m.get("dtype", self.dtype))
        self._set_state(S.READY, "loaded")
        pid = self._proc.pid if self._proc else None
        self.bus.publish(ModelLoaded(seconds=seconds, trigger=self._trigger, pid=pid,
                                     device=self.device, fresh_process=self._load_fresh,
                                     timings=dict(m.get("timings") or {})))
        self._last_used = self._clock()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.fut is None or w.fut.done():
                continue
            if isinstance(w, _Acquire):
                self._grant(w)
            else:
                w.fut.set_result(None)
        if self._inflight == 0:
            self._arm_idle()

    async def _on_exited(self, msg: _Exited) -> None:
        proc = self._proc
        if proc is None or msg.pid != proc.pid:
            return
        rc = msg.returncode
        kind, detail = self._classify(proc, rc)
        log.log(logging.INFO if kind == "exited" else logging.WARNING,
                "worker pid=%d exit kind=%s rc=%s %s", proc.pid, kind, rc, detail)
        self.bus.publish(WorkerExited(pid=proc.pid, returncode=rc, kind=kind, detail=detail))
        for t in proc.tasks:
            t.cancel()
        self._cancel_timer("stop_deadline")
        self._cancel_timer("load_deadline")
        self._cancel_timer("idle")
        crash = WorkerCrashed(f"the worker {kind} ({detail})")
        for fut in self._batches.values():
            if not fut.done():
                fut.set_exception(crash)
        self._batches.clear()
        if self.state in (S.STARTING, S.LOADING):
            self._load_failed(kind if kind != "crashed" else "exited_during_load",
                              f"the worker exited during load ({detail})")
        if self.state is not S.STOPPING:
            self._set_state(S.STOPPING, kind)
        # Wait for the GPU memory to come back before calling the worker cold (Ollama sched.go).
        self._release_deadline = self._clock() + self.cfg.release_timeout_s
        self._poll_release()

    def _poll_release(self) -> None:
        proc = self._proc
        assert proc is not None
        held = held_gpu_mb(self._gpu, proc.pid, self.device)
        if held and self._clock() < self._release_deadline:
            self._arm("release_poll", RELEASE_POLL_S)
            return
        if held:
            log.warning("worker pid=%d: %.0f MiB still held %.1fs after exit", proc.pid, held,
                        self.cfg.release_timeout_s)
        self._proc = None
        self._after_exit()

    def _after_exit(self) -> None:
        """The process is gone: cold, or backoff after too many load failures."""
        if self._failures >= self.cfg.max_load_failures and self._shutdown is None:
            over = self._failures - self.cfg.max_load_failures
            wait = min(self.cfg.load_backoff_s * (2**over), 3600.0)
            self._backoff_until = self._clock() + wait
            self._set_state(S.BACKOFF, "load_failures")
            self._arm("backoff_end", wait)
            self._fail_waiters_backoff()
            return
        self._set_state(S.COLD, "exited")
        if self._waiters and self._shutdown is None:
            self._post(_Load(self._waiters[0].trigger, 0.0, None))

    def _fail_waiters_backoff(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._refuse(w)

    def _fail_waiters(self, err: Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.fut is not None and not w.fut.done():
                w.fut.set_exception(err)

    def _classify(self, proc: _Proc, rc: int | None) -> tuple[str, str]:
        tail = " | ".join(list(proc.stderr_tail)[-3:])
        if rc is None:
            return "crashed", "no exit status"
        what = f"rc={rc}" if rc >= 0 else f"signal {_signame(-rc)}"
        if proc.killed:
            return "stop_escalated", f"{what} after worker.stop_timeout_s"
        if proc.stop_reason in ("load_failed", "load_timeout"):
            return proc.stop_reason, what
        if proc.stop_reason and rc in (0, -signal.SIGTERM):
            return "exited", f"{what} ({proc.stop_reason})"
        if rc == -signal.SIGKILL:
            return "killed", f"{what}: killed from outside, possibly by the out-of-memory killer"
        return "crashed", f"{what}{': ' + tail if tail else ''}"

    def _load_failed(self, code: str, message: str) -> None:
        self._failures += 1
        self._last_error = {"code": code, "message": message}
        log.warning("worker load failed (%d in a row) code=%s: %s", self._failures, code, message)
        retry = self._failures < self.cfg.max_load_failures
        err = LoadFailed(f"the model failed to load ({code}): {message}",
                         retry_after_s=1.0 if retry else self.cfg.load_backoff_s)
        # Job leases wait for the retry (a fresh process); manual loads learn about it now.
        keep: list[_Acquire | _Load] = []
        for w in self._waiters:
            if isinstance(w, _Acquire) and retry:
                keep.append(w)
            elif w.fut is not None and not w.fut.done():
                w.fut.set_exception(err)
        self._waiters = keep

    # process control ---------------------------------------------------------------------
    async def _begin_load(self, trigger: str) -> None:
        self._trigger = trigger
        self._load_started = self._clock()
        self._arm("load_deadline", self.cfg.load_timeout_s)
        if self.state is S.UNLOADED and self._proc is not None:
            self._load_fresh = False
            self._set_state(S.LOADING, "reload", trigger)
            await self._send_load(self._proc)
            return
        self._load_fresh = True
        try:
            proc = await self._spawn()
        except OSError as e:
            self._cancel_timer("load_deadline")
            self._failures += 1
            self._last_error = {"code": "spawn_failed", "message": str(e)}
            self._fail_waiters(LoadFailed(f"cannot start the worker: {e}"))
            return
        self.spawns += 1
        handle = _Proc(proc=proc, pid=proc.pid)
        handle.tasks = [
            asyncio.create_task(self._read_stdout(handle), name=f"worker-{proc.pid}-stdout"),
            asyncio.create_task(self._read_stderr(handle), name=f"worker-{proc.pid}-stderr"),
        ]
        self._proc = handle
        self._set_state(S.STARTING, "job" if trigger.startswith("job") else "load", trigger)

    async def _send_load(self, proc: _Proc) -> None:
        m = self.model
        await self._send(proc, {"op": "load", "model": m.spec, "revision": m.revision,
                                "cache_dir": m.cache_dir, "device": self.cfg.device,
                                "dtype": self.cfg.dtype})

    async def _send_unload(self, trigger: str) -> None:
        assert self._proc is not None
        self._reason = "idle_unload" if trigger == "idle" else "unload"
        self._set_state(S.UNLOADING, self._reason, trigger)
        await self._send(self._proc, {"op": "unload"})

    async def _send(self, proc: _Proc, obj: dict[str, Any]) -> None:
        stdin = proc.proc.stdin
        if stdin is None or stdin.is_closing():
            return  # it is exiting; the exit message follows
        stdin.write((json.dumps(obj) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await stdin.drain()

    async def _stop(self, *, force: bool, reason: str, trigger: str | None = None) -> None:
        """Ask the worker to exit (force: SIGTERM as well), SIGKILL after stop_timeout_s;
        the reader reaps it and posts _Exited."""
        proc = self._proc
        if proc is None:
            return
        if self.state is not S.STOPPING:
            self._set_state(S.STOPPING, reason, trigger)
        if proc.stop_reason:
            return
        proc.stop_reason = reason
        self._cancel_timer("idle")
        await self._send(proc, {"op": "exit"})
        stdin = proc.proc.stdin
        if stdin is not None:
            stdin.close()
        if force and proc.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.proc.send_signal(signal.SIGTERM)
        self._arm("stop_deadline", self.cfg.stop_timeout_s)

    def _kill(self, proc: _Proc) -> None:
        proc.killed = True
        with contextlib.suppress(ProcessLookupError):
            proc.proc.kill()

    async def _read_stdout(self, handle: _Proc) -> None:
        stream = handle.proc.stdout
        assert stream is not None
        try:
            while True:
                line = await stream.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("worker pid=%d wrote a non-JSON line: %.200r", handle.pid, line)
                    continue
                if isinstance(msg, dict):
                    self._post(_Line(handle.pid, msg))
        except (ValueError, ConnectionError) as e:  # over-long line, broken pipe
            log.warning("worker pid=%d stdout unreadable (%s): stopping it", handle.pid, e)
            self._kill(handle)
        rc = await handle.proc.wait()
        self._post(_Exited(handle.pid, rc))

    async def _read_stderr(self, handle: _Proc) -> None:
        stream = handle.proc.stderr
        assert stream is not None
        with contextlib.suppress(ValueError, ConnectionError):
            async for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                handle.stderr_tail.append(line)
                log.info("worker[%d] %s", handle.pid, line)

    # idle ladder ---------------------------------------------------------------------------
    def _idle_deadlines(self) -> tuple[float | None, float | None]:
        """(unload_at, exit_at) on the monotonic clock; None = never.  Holds push both."""
        base = self._last_used
        floor = self._hold_until
        u, x = self.cfg.unload_after_s, self.cfg.exit_after_s
        unload_at = max(base + u, floor) if u >= 0 else None
        exit_at = max(base + x, floor) if x >= 0 else None
        if unload_at is not None and exit_at is not None and exit_at <= unload_at:
            unload_at = None  # exiting frees everything; unloading first gains nothing
        return unload_at, exit_at

    def _arm_idle(self) -> None:
        if self._inflight > 0 or self.state not in (S.READY, S.UNLOADED):
            self._cancel_timer("idle")
            return
        unload_at, exit_at = self._idle_deadlines()
        if self.state is S.UNLOADED:
            unload_at = None
        nxt = min((t for t in (unload_at, exit_at) if t is not None), default=None)
        if nxt is None:
            self._cancel_timer("idle")
            return
        self._arm("idle", nxt - self._clock())

    async def _idle_expired(self) -> None:
        if self._inflight > 0 or self.state not in (S.READY, S.UNLOADED):
            return
        unload_at, exit_at = self._idle_deadlines()
        now = self._clock() + 1e-3
        if exit_at is not None and now >= exit_at:
            await self._stop(force=False, reason="idle_exit", trigger="idle")
        elif unload_at is not None and now >= unload_at and self.state is S.READY:
            await self._send_unload("idle")
        else:
            self._arm_idle()  # a hold or new use moved the deadline

    async def _on_shutdown(self, msg: _Shutdown) -> None:
        self._shutdown = msg
        self._fail_waiters(WorkerUnavailable("the daemon is shutting down"))
        if self._proc is not None:
            # A load in progress is not worth waiting for: SIGTERM it along with the request.
            await self._stop(force=self.state in (S.STARTING, S.LOADING), reason="shutdown",
                             trigger="shutdown")
        elif self.state is S.BACKOFF:
            self._cancel_timer("backoff_end")


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def worker_env() -> dict[str, str]:
    """The environment for the worker: ours, unbuffered."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env

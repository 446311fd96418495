"""The worker supervisor: the one owner of the GPU worker process and its state.

A single task (`_run`) owns every piece of worker state.  Everyone else sends it a message and
awaits the outcome: `async with supervisor.lease(trigger) as lease: await lease.infer(op)`,
`await supervisor.load(trigger, hold_s=...)`, `await supervisor.unload(...)`.  Worker events,
process exits and timers arrive as messages in the same queue, so no state is ever changed from
two places (llama-swap raced until it moved to exactly this).  The process itself (spawn, pipes,
the steps of a stop, exit classification) is `process.WorkerProcess`; what crosses its pipe is
`ondemand.protocol`.

States and transitions (TRANSITIONS below is checked by `_set_state`):

    cold ──spawn──> starting ──hello──> loading ──loaded──> ready <──load── unloaded
      ^                │                   │                 │  ──idle unload──> unloading ──┘
      │                └──────── any failure / idle exit / shutdown ─────> stopping ──exit──┘
      └── backoff <── (load failed max_load_failures times in a row; refuses loads until a deadline)

    cold ──standby spawn──> preparing ──prepared──> standby ──job / load (activate)──> loading
                                └──── job / load: `load` sent behind `prepare` ────────────┘

Standby (`worker.standby`, docs/ladder.md): after every exit, and at start-up, one worker process
is spawned with `prepare`: it imports torch and the engine and reads the weights into host
memory, never initialising CUDA, so it holds no GPU memory; a job or a load then only pays CUDA
initialisation, the copy to the device and the warm-up.  `unload(exit=True)` on a standby ends it
and none is prepared until the next load has come and gone.

Stepping aside (`worker.yield_gpu`, daemon/yielding.py): while the worker may hold the GPU, and
while aside, GPU_POLL reads the GPU every `yield_poll_s`.  When other processes need the room the
supervisor revokes the leases (the dispatcher starts no new batch), lets the running batch finish,
stops the worker and goes to `yielded` (a standby is prepared meanwhile: it holds no GPU).  A load
whose need does not fit goes to `yielded` instead of dying of out-of-memory.  Loads wait there,
jobs stay queued, until the policy lets us back; then standby (or cold) and the waiting loads run.

In-flight work is counted by leases; the idle timer is armed only when the count is zero and is
re-checked when it fires (LocalAI #5221, llama.cpp #28698: never unload under a running job).
Idle ladder: `unload_after_s` drops the model but keeps the process (cheap reactivation);
`exit_after_s` ends the process, the only way to free the CUDA context.  0 = at once, -1 = never.
Holds (`load(hold_s=...)`) suspend both while active; overlapping holds merge.

Liveness of a busy worker (issue 10: a SIGSTOPped worker held a batch for minutes, the queue grew,
/readyz said ready and nothing was logged).  While a batch is in flight two timers run: HEARTBEAT
(re-armed by every `heartbeat` the worker sends from its own thread; silent for
`heartbeat_timeout_s` = hung) and BATCH_DEADLINE (max(batch_deadline_min_s, factor x the
batch's audio seconds / the slowest recent speed) = stuck); HEARTBEAT also bounds the wait for
`unloaded`.  Either SIGKILLs the worker (a stopped process cannot handle SIGTERM), so its batch
fails as a crash (the dispatcher retries it, attempts counted) and the next lease starts a fresh
worker.  `status().stalled_s` shows missed beats while they last; `unready_reason()` turns
/readyz 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ondemand import protocol
from ondemand.config import ModelConfig, WorkerConfig
from ondemand.daemon.events import (
    EventBus,
    JobProgress,
    ModelLoaded,
    StateChanged,
    SteppedAside,
    WorkerActivity,
    WorkerExited,
)
from ondemand.daemon.process import (
    ExitKind,
    Spawn,
    WorkerProcess,
    default_command,
    make_spawn,
    worker_env,
)
from ondemand.daemon.timers import Fired, Timers
from ondemand.daemon.worker_status import (
    ExitRecord,
    LoadRecord,
    StandbyRecord,
    WarmBecause,
    WorkerState,
    WorkerStatus,
    YieldRecord,
)
from ondemand.daemon.yielding import GpuReading, Verdict, YieldPolicy
from ondemand.errors import LoadFailed, WorkerCrashed, WorkerUnavailable, from_code
from ondemand.gpu import GpuProbe, gpu_index, host_usage

# Also the import path of WorkerState, Spawn, make_spawn and worker_env for app.py, tests, bench.
__all__ = ["TRANSITIONS", "Lease", "Spawn", "Supervisor", "TimerKind", "WorkerState",
           "WorkerStatus", "make_spawn", "worker_env"]

log = logging.getLogger(__name__)

RELEASE_POLL_S = 0.25  # NVML poll period while waiting for GPU memory to come back (Ollama)
SPEED_SAMPLES = 20  # recent batches whose slowest speed sets the batch deadline


S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.COLD: frozenset({S.STARTING, S.PREPARING, S.YIELDED}),
    S.PREPARING: frozenset({S.STANDBY, S.LOADING, S.YIELDED, S.STOPPING}),
    S.STANDBY: frozenset({S.LOADING, S.YIELDED, S.STOPPING}),
    S.YIELDED: frozenset({S.STANDBY, S.PREPARING, S.COLD, S.STOPPING}),
    S.STARTING: frozenset({S.LOADING, S.STOPPING, S.COLD, S.BACKOFF}),
    S.LOADING: frozenset({S.READY, S.STOPPING, S.COLD, S.BACKOFF}),
    S.READY: frozenset({S.UNLOADING, S.STOPPING, S.COLD}),
    S.UNLOADING: frozenset({S.UNLOADED, S.STOPPING, S.COLD}),
    S.UNLOADED: frozenset({S.LOADING, S.STOPPING, S.COLD}),
    S.STOPPING: frozenset({S.COLD, S.BACKOFF}),
    S.BACKOFF: frozenset({S.COLD}),
}


class TimerKind(enum.Enum):
    IDLE = "idle"  # the idle ladder's next step (unload or exit)
    LOAD_DEADLINE = "load_deadline"  # worker.load_timeout_s from the load request
    STOP_DEADLINE = "stop_deadline"  # worker.stop_timeout_s from asking it to exit to SIGKILL
    BACKOFF_END = "backoff_end"  # loads are refused until then
    RELEASE_POLL = "release_poll"  # the next look at GPU memory a dead worker still holds
    HEARTBEAT = "heartbeat"  # worker.heartbeat_timeout_s after the last sign of life on a batch
    BATCH_DEADLINE = "batch_deadline"  # the earliest deadline of the batches in flight
    GPU_POLL = "gpu_poll"  # worker.yield_poll_s: the next look at the GPU for stepping aside


# States in which our worker may hold GPU memory (a CUDA context, weights): stepping aside acts.
HOLDING = frozenset({S.STARTING, S.LOADING, S.READY, S.UNLOADING, S.UNLOADED})
# States from which a load request starts a load at once (yielded: once the GPU is back).
LOADABLE = frozenset({S.COLD, S.UNLOADED, S.PREPARING, S.STANDBY, S.YIELDED})


# -- messages to the owner task ----------------------------------------------------------------
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
    op: protocol.Infer
    fut: asyncio.Future[protocol.Result]
    audio_s: float  # the batch's audio seconds (its deadline follows them)


@dataclass
class _Batch:
    """A batch in flight on the worker."""

    op: protocol.Infer
    fut: asyncio.Future[protocol.Result]
    audio_s: float
    sent: float  # on the supervisor's clock
    deadline: float


@dataclass
class _FromWorker:
    pid: int
    event: protocol.Event


@dataclass
class _Exited:
    pid: int
    returncode: int | None


@dataclass
class _Shutdown:
    fut: asyncio.Future[None]


@dataclass
class _Standby:
    """Prepare a standby process if the worker is cold and nothing waits."""


def _what(batch: _Batch) -> str:
    return f"batch {batch.op.batch} ({len(batch.op.items)} jobs, {batch.audio_s:.1f}s of audio)"


class Lease:
    """Held while a caller runs work on the worker: the in-flight count is one higher."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    @property
    def revoked(self) -> str | None:
        """Why the supervisor asks the holder to start no further batch and release the lease
        (`yield`: other GPU work needs the room), else None.  A request from the owner, not
        state to branch on otherwise: the batch already formed may still run."""
        return self._sup._revoked

    async def infer(self, op: protocol.Infer, *, audio_s: float = 0.0) -> protocol.Result:
        """Run one batch (`audio_s` seconds of audio: its deadline) on the worker.  Raises
        WorkerCrashed when the worker dies under it (also when it is killed as hung or past the
        deadline), and the error the worker named (errors.from_code) on BatchFailed."""
        fut: asyncio.Future[protocol.Result] = asyncio.get_running_loop().create_future()
        self._sup._post(_Infer(op, fut, audio_s))
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
        self._timers: Timers[TimerKind] = Timers(self._post, clock)

        self.state = S.COLD
        self._proc: WorkerProcess | None = None
        self._trigger = ""  # what asked for the current load
        self._unload_reason = ""
        self._inflight = 0
        self._waiters: list[_Acquire | _Load] = []
        self._batches: dict[str, _Batch] = {}
        self._last_beat = 0.0  # the last sign of life of the worker on a batch (clock)
        self._speeds: collections.deque[float] = collections.deque(maxlen=SPEED_SAMPLES)
        self.last_exit: ExitRecord | None = None
        self._last_used = clock()
        self._standby_started = 0.0
        self._hold_until = 0.0
        self._hold_trigger = ""
        self._pending_unload: _Unload | None = None
        self._load_started = 0.0
        self._load_fresh = False
        self._hello_s = 0.0
        self._failures = 0
        self._last_error: protocol.ErrorInfo | None = None
        self._release_deadline = 0.0
        self._shutdown: _Shutdown | None = None
        self.device = worker.device
        self.dtype = worker.dtype
        self.last_load_s: float | None = None
        self.last_load: LoadRecord | None = None
        self.loads = 0
        self.spawns = 0
        self._load_kind = "spawn"  # spawn | reload | activate: the load in progress
        self._prepared = False  # the current process answered `prepared` (a standby)
        self._standby: StandbyRecord | None = None  # what it reported
        self._standby_declined = False  # unload(exit) ended a standby: none until the next load
        self._weights_mb: float | None = None  # from prepared/loaded: the need's base
        self._revoked: str | None = None  # leases asked to end (Lease.revoked)
        self._yield_pending = False  # aside, but the running batch finishes first
        self._gpu_index = gpu_index(worker.device)
        self._policy: YieldPolicy | None = None
        if worker.yield_gpu:
            if gpu is None or gpu.fallback or self._gpu_index is None:
                log.info("worker.yield_gpu: no NVML view of the GPU (device %s, probe %s); "
                         "stepping aside is off", worker.device, gpu.name if gpu else "none")
            else:
                self._policy = YieldPolicy(free_below_mb=worker.yield_free_below_mb,
                                           resume_free_mb=worker.yield_resume_free_mb,
                                           settle_s=worker.yield_settle_s)

    # -- public API (any task) ------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="supervisor")
        if self.cfg.standby:
            self._post(_Standby())

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The owner task (watched by the app's TaskGuard)."""
        return self._task

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

    def status(self) -> WorkerStatus:
        now = self._clock()
        proc = self._proc
        unload_in = exit_in = None
        if self._inflight == 0 and self.state in (S.READY, S.UNLOADED):
            unload_at, exit_at = self._idle_deadlines()
            if unload_at is not None and self.state is S.READY:
                unload_in = max(0.0, unload_at - now)
            if exit_at is not None:
                exit_in = max(0.0, exit_at - now)
        held = self._hold_until > now
        batch_s = deadline_s = None
        if self._batches:
            batch_s = now - min(b.sent for b in self._batches.values())
            deadline_s = max(0.0, min(b.deadline for b in self._batches.values()) - now)
        return WorkerStatus(
            state=self.state, pid=proc.pid if proc else None, device=self.device,
            dtype=self.dtype, model=self.model.spec, trigger=self._trigger or None,
            in_flight=self._inflight, last_load_s=self.last_load_s, last_load=self.last_load,
            loads=self.loads, spawns=self.spawns, unload_in_s=unload_in, exit_in_s=exit_in,
            hold_s=self._hold_until - now if held else None,
            hold_trigger=(self._hold_trigger or None) if held else None,
            warm_because=self._warm_because(now), load_failures=self._failures,
            last_error=self._last_error,
            backoff_s=self._timers.left(TimerKind.BACKOFF_END) if self.state is S.BACKOFF else None,
            gpu_memory_mb=proc.held_gpu_mb(self._gpu, self.device) if proc else None,
            batch_s=batch_s, batch_deadline_s=deadline_s, stalled_s=self._stalled_s(now),
            last_exit=self.last_exit, standby=self._standby_status(),
            yielded=self._yield_status(now),
        )

    def _standby_status(self) -> StandbyRecord | None:
        proc = self._proc
        if proc is None or self.state not in (S.PREPARING, S.STANDBY, S.YIELDED):
            return None
        _, rss, _ = host_usage([proc.pid])
        base = self._standby or StandbyRecord(pid=proc.pid, prepared=False, seconds=None,
                                              weights_mb=None, host_mb=None,
                                              cuda_initialized=None, gpu_memory_mb=None)
        return dataclasses.replace(base, host_mb=None if rss is None else rss / 2**20,
                                   gpu_memory_mb=proc.held_gpu_mb(self._gpu, self.cfg.device))

    def _yield_status(self, now: float) -> YieldRecord | None:
        pol = self._policy
        if pol is None or not pol.yielded:
            return None
        last, trig = pol.last, pol.trigger
        return YieldRecord(
            reason=pol.reason, pending=self._yield_pending,
            for_s=now - (pol.since if pol.since is not None else now), need_mb=pol.need_mb,
            resume_at_free_mb=pol.resume_at_free_mb(), settle_s=pol.settle_s,
            settled_s=pol.settled_s(now), gpu=last.to_json() if last else None,
            trigger_gpu=trig.to_json() if trig else None)

    def _stalled_s(self, now: float) -> float | None:
        """Seconds since the last heartbeat once two were missed (a batch in flight), else None."""
        if not self._batches or self.state is not S.READY:
            return None
        silent = now - self._last_beat
        return silent if silent > 2 * self.cfg.heartbeat_s else None

    def unready_reason(self) -> str | None:
        """Why the worker cannot take work now although it is up (for /readyz), else None."""
        stalled = self._stalled_s(self._clock())
        if stalled is not None:
            proc = self._proc
            return (f"worker stalled: no heartbeat for {stalled:.1f}s on a batch "
                    f"(pid {proc.pid if proc else '-'}); it is killed after "
                    f"worker.heartbeat_timeout_s={self.cfg.heartbeat_timeout_s:g}s")
        proc = self._proc
        if proc is not None and proc.killed is not None and proc.killed[0] in (
                ExitKind.HUNG, ExitKind.BATCH_TIMEOUT):
            return f"worker {proc.killed[0]} (pid {proc.pid}): killed, a new one follows"
        return None

    def batch_deadline_s(self, audio_s: float) -> float:
        """How long a batch of `audio_s` seconds of audio may run: max(floor, factor x audio /
        the slowest speed of the last SPEED_SAMPLES batches, or the default speed before any)."""
        speed = min(self._speeds) if self._speeds else self.cfg.batch_default_speed
        return max(self.cfg.batch_deadline_min_s,
                   self.cfg.batch_deadline_factor * audio_s / speed)

    def _warm_because(self, now: float) -> WarmBecause | None:
        if self.state is not S.READY:
            return None
        if self._inflight:
            return "in_flight"
        return "hold" if self._hold_until > now else "idle_timeout"

    def retry_after_s(self) -> float:
        left = self._timers.left(TimerKind.BACKOFF_END) if self.state is S.BACKOFF else None
        return max(1.0, left or 0.0)

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
            _FromWorker: self._on_event,
            _Exited: self._on_exited,
            Fired: self._on_timer,
            _Shutdown: self._on_shutdown,
            _Standby: self._on_standby,
        }
        while True:
            msg = await self._inbox.get()
            try:
                await handlers[type(msg)](msg)
            except Exception:
                log.exception("supervisor failed handling %s", type(msg).__name__)
                await self._stop(force=True, reason="internal_error")
            if self._shutdown is not None and self.state in (S.COLD, S.BACKOFF):
                self._timers.cancel()
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
        self._arm_gpu_poll()

    async def _on_timer(self, msg: Fired[TimerKind]) -> None:
        if not self._timers.fired(msg):
            return
        match msg.kind:
            case TimerKind.IDLE:
                await self._idle_expired()
            case TimerKind.LOAD_DEADLINE if self._preparing() or self.state in (
                    S.STARTING, S.LOADING):
                what = "prepare a standby" if self._preparing() else "load"
                self._load_failed(ExitKind.LOAD_TIMEOUT, f"the model did not {what} within "
                                  f"worker.load_timeout_s={self.cfg.load_timeout_s:g}s")
                await self._stop(force=True, reason=ExitKind.LOAD_TIMEOUT)
            case TimerKind.GPU_POLL:
                await self._gpu_poll()
            case TimerKind.STOP_DEADLINE if self._proc is not None:
                log.warning("worker pid=%d did not exit within %gs: SIGKILL", self._proc.pid,
                            self.cfg.stop_timeout_s)
                self._proc.kill()
            case TimerKind.BACKOFF_END if self.state is S.BACKOFF:
                self._set_state(S.COLD, "backoff_over")
                if self._waiters:
                    await self._begin_load(self._waiters[0].trigger)
                else:
                    await self._begin_standby()
            case TimerKind.RELEASE_POLL:
                self._poll_release()
            case TimerKind.HEARTBEAT if self._batches:
                silent = self._clock() - self._last_beat
                self._kill_stuck(ExitKind.HUNG, _what(next(iter(self._batches.values()))),
                                 f"no heartbeat for {silent:.1f}s (worker.heartbeat_timeout_s="
                                 f"{self.cfg.heartbeat_timeout_s:g})")
            case TimerKind.HEARTBEAT if self.state is S.UNLOADING:
                self._kill_stuck(ExitKind.HUNG, "unload",
                                 f"no answer for {self.cfg.heartbeat_timeout_s:g}s "
                                 "(worker.heartbeat_timeout_s)")
            case TimerKind.BATCH_DEADLINE if self._batches:
                now = self._clock()
                late = min(self._batches.values(), key=lambda b: b.deadline)
                if late.deadline > now + 1e-3:
                    self._arm_liveness()  # a batch ended meanwhile
                    return
                self._kill_stuck(ExitKind.BATCH_TIMEOUT, _what(late),
                                 f"ran {now - late.sent:.1f}s, past its deadline of "
                                 f"{late.deadline - late.sent:.1f}s ({late.audio_s:.1f}s of "
                                 "audio; worker.batch_deadline_*)")

    # requests ----------------------------------------------------------------------------
    async def _on_acquire(self, msg: _Acquire) -> None:
        if msg.fut.done():
            return
        if self.state is S.READY and self._revoked is None:
            self._grant(msg)
            return
        if self._refuse(msg):
            return
        self._waiters.append(msg)
        self._standby_declined = False
        if self.state in LOADABLE:
            await self._begin_load(msg.trigger)

    def _grant(self, msg: _Acquire) -> None:
        self._inflight += 1
        self._timers.cancel(TimerKind.IDLE)
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
            last = self._last_error
            why = f" ({last.code}: {last.message})" if last else ""
            wait = self.retry_after_s()
            err = LoadFailed(f"the model failed to load {self._failures} times in a row{why}; "
                             f"next attempt in {wait:.0f}s", retry_after_s=wait)
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
            if self._yield_pending:
                await self._stop_for_yield()
            elif self._pending_unload is not None:
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
        self._standby_declined = False
        if self.state is S.READY and self._revoked is None:
            self._last_used = self._clock()
            self._arm_idle()
            if msg.fut is not None:
                msg.fut.set_result(None)
            return
        if self._refuse(msg):
            return
        if msg.fut is not None:
            self._waiters.append(msg)
        if self.state in LOADABLE:
            await self._begin_load(msg.trigger)
        elif msg.fut is None and self.state in (S.UNLOADING, S.STOPPING, S.READY):
            self._waiters.append(msg)  # load again once the process settles (or the GPU frees)

    async def _on_unload(self, msg: _Unload) -> None:
        if msg.fut is not None and not msg.fut.done():
            msg.fut.set_result(None)  # taken in; the unload itself may wait for in-flight work
        had_hold = bool(self._hold_trigger)
        self._hold_until, self._hold_trigger = 0.0, ""
        if had_hold:
            self._activity()
        if self._inflight > 0:
            self._pending_unload = msg  # never under a running batch
            log.info("worker unload requested trigger=%s: after %d in-flight", msg.trigger,
                     self._inflight)
            return
        self._timers.cancel(TimerKind.IDLE)
        if msg.exit and self.state in (S.PREPARING, S.STANDBY, S.YIELDED) and self._proc:
            # Ending a standby: the operator wants its host memory back too.  None is prepared
            # again until a load has come and gone (each exit request is one rung down).
            self._standby_declined = True
            await self._stop(force=self.state is not S.STANDBY, reason="unload_exit",
                             trigger=msg.trigger)
        elif msg.exit and self.state in HOLDING:
            self._fail_waiters(WorkerUnavailable("the worker was stopped on request"))
            await self._stop(force=False, reason="unload_exit", trigger=msg.trigger)
        elif self.state is S.READY:
            await self._send_unload(msg.trigger)

    async def _on_infer(self, msg: _Infer) -> None:
        proc = self._proc
        if self.state is not S.READY or proc is None:
            msg.fut.set_exception(WorkerCrashed(f"the worker is {self.state}, not ready"))
            return
        now = self._clock()
        op = dataclasses.replace(msg.op, heartbeat_s=self.cfg.heartbeat_s)
        self._batches[op.batch] = _Batch(op, msg.fut, msg.audio_s, now,
                                         now + self.batch_deadline_s(msg.audio_s))
        self._last_beat = now
        self._arm_liveness()
        await proc.send(op)

    def _arm_liveness(self) -> None:
        """HEARTBEAT and BATCH_DEADLINE while a batch is in flight; neither when none is."""
        if not self._batches:
            self._timers.cancel(TimerKind.HEARTBEAT, TimerKind.BATCH_DEADLINE)
            return
        now = self._clock()
        self._timers.arm(TimerKind.HEARTBEAT,
                         self._last_beat + self.cfg.heartbeat_timeout_s - now)
        self._timers.arm(TimerKind.BATCH_DEADLINE,
                         min(b.deadline for b in self._batches.values()) - now)

    def _kill_stuck(self, kind: ExitKind, what: str, why: str) -> None:
        """SIGKILL a hung or stuck worker; its exit fails the batch as a crash (retried)."""
        proc = self._proc
        self._timers.cancel(TimerKind.HEARTBEAT, TimerKind.BATCH_DEADLINE)
        if proc is None:
            return
        log.warning("worker pid=%d %s: %s %s; SIGKILL%s", proc.pid, kind, what, why,
                    ", its jobs are retried" if self._batches else "")
        proc.kill(kind, why)
        if self.state is not S.STOPPING:
            self._set_state(S.STOPPING, kind)

    # worker events -----------------------------------------------------------------------
    async def _on_event(self, msg: _FromWorker) -> None:
        proc = self._proc
        if proc is None or msg.pid != proc.pid:
            return  # from a process we already gave up on
        match msg.event:
            case protocol.Hello() if self.state is S.STARTING:
                self._hello_s = self._clock() - self._load_started
                self._set_state(S.LOADING, "spawned")
                await self._send_load(proc)
            case protocol.Hello():
                self._hello_s = self._clock() - self._load_started  # a standby: prepare is sent
            case protocol.Prepared() as ev if not self._prepared:
                await self._on_prepared(proc, ev)
            case protocol.Loaded() as ev if self.state is S.LOADING:
                self._on_loaded(ev)
            case protocol.LoadFailed(code=code, message=message) if (
                    self.state is S.LOADING or self._preparing()):
                self._load_failed(code, message)
                await self._stop(force=False, reason=ExitKind.LOAD_FAILED)
            case protocol.Unloaded() if self.state is S.UNLOADING:
                self._timers.cancel(TimerKind.HEARTBEAT)
                self._set_state(S.UNLOADED, self._unload_reason)
                if self._waiters:
                    await self._begin_load(self._waiters[0].trigger)
                else:
                    self._arm_idle()
            case protocol.Heartbeat(batch=batch) if batch in self._batches:
                self._last_beat = self._clock()
                self._arm_liveness()
            case protocol.Heartbeat():
                pass  # a beat that crossed its batch's answer
            case protocol.Progress(batch=batch) as ev:  # issue 12: a segmented job's progress
                if batch in self._batches:
                    self.bus.publish(JobProgress(job=ev.job, done_s=ev.done_s,
                                                 total_s=ev.total_s))
            case protocol.Result() | protocol.BatchFailed() as ev:
                running = self._batches.pop(ev.batch, None)
                self._last_beat = self._clock()
                self._arm_liveness()
                if running is None:
                    return
                if isinstance(ev, protocol.Result) and running.audio_s > 0 and ev.seconds > 0:
                    self._speeds.append(running.audio_s / ev.seconds)
                fut = running.fut
                if fut.done():
                    return  # its caller was cancelled
                if isinstance(ev, protocol.Result):
                    fut.set_result(ev)
                else:
                    fut.set_exception(from_code(ev.code, ev.message))
            case ev:  # valid, but late: e.g. `loaded` after the load deadline stopped it
                log.warning("worker pid=%d %s in state %s: ignored", proc.pid, ev.TAG,
                            self.state)

    async def _on_prepared(self, proc: WorkerProcess, ev: protocol.Prepared) -> None:
        """A standby is ready: weights in host memory, CUDA untouched (the guard checks both
        the worker's own word and, with NVML, the GPU's)."""
        self._prepared = True
        self._weights_mb = ev.weights_mb
        held = proc.held_gpu_mb(self._gpu, self.cfg.device)
        self._standby = StandbyRecord(
            pid=proc.pid, prepared=True, seconds=self._clock() - self._standby_started,
            weights_mb=ev.weights_mb, host_mb=ev.host_mb, cuda_initialized=ev.cuda_initialized,
            gpu_memory_mb=held, timings=dict(ev.timings))
        if ev.cuda_initialized or held:
            log.error("standby worker pid=%d holds GPU state (cuda_initialized=%s, %s MiB): a "
                      "bug; standby must never initialise CUDA", proc.pid, ev.cuda_initialized,
                      held)
        log.info("standby worker pid=%d prepared in %.2fs: %.0f MiB of weights, %.0f MiB RSS",
                 proc.pid, self._standby.seconds or 0.0, ev.weights_mb, ev.host_mb)
        if self.state is not S.PREPARING:
            return  # a load was sent behind the prepare (loading), or we are aside (yielded)
        self._timers.cancel(TimerKind.LOAD_DEADLINE)
        if self._policy is not None and self._policy.yielded:
            self._set_state(S.YIELDED, "prepared")
            return
        self._set_state(S.STANDBY, "prepared")
        if self._waiters:
            await self._begin_load(self._waiters[0].trigger)

    def _preparing(self) -> bool:
        """A standby process that has not answered `prepared` yet."""
        return self._proc is not None and not self._prepared and self.state in (
            S.PREPARING, S.YIELDED)

    def _on_loaded(self, ev: protocol.Loaded) -> None:
        self._timers.cancel(TimerKind.LOAD_DEADLINE)
        seconds = self._clock() - self._load_started
        self.last_load_s = seconds
        self.last_load = LoadRecord(
            seconds=seconds, fresh_process=self._load_fresh, trigger=self._trigger,
            interpreter_s=self._hello_s if self._load_fresh else 0.0, worker_s=ev.seconds,
            timings=ev.timings, kind=self._load_kind)
        if ev.weights_mb is not None:
            self._weights_mb = ev.weights_mb
        self.loads += 1
        self._failures = 0
        self._last_error = None
        self.device, self.dtype = ev.device, ev.dtype
        self._set_state(S.READY, "loaded")
        pid = self._proc.pid if self._proc else None
        self.bus.publish(ModelLoaded(seconds=seconds, trigger=self._trigger, pid=pid,
                                     device=self.device, fresh_process=self._load_fresh,
                                     timings=dict(ev.timings), kind=self._load_kind))
        self._last_used = self._clock()
        self._grant_waiters()

    def _grant_waiters(self) -> None:
        """The model is ready: every waiting lease and load gets it."""
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
        kind, detail = proc.classify(rc)
        log.log(logging.INFO if kind is ExitKind.EXITED else logging.WARNING,
                "worker pid=%d exit kind=%s rc=%s %s", proc.pid, kind, rc, detail)
        self.bus.publish(WorkerExited(pid=proc.pid, returncode=rc, kind=kind, detail=detail))
        if kind is not ExitKind.EXITED:
            self.last_exit = ExitRecord(pid=proc.pid, kind=kind.value, detail=detail)
        proc.close()
        self._timers.cancel(TimerKind.STOP_DEADLINE, TimerKind.LOAD_DEADLINE, TimerKind.IDLE,
                            TimerKind.HEARTBEAT, TimerKind.BATCH_DEADLINE)
        crash = WorkerCrashed(f"the worker {kind} ({detail})")
        for running in self._batches.values():
            if not running.fut.done():
                running.fut.set_exception(crash)
        self._batches.clear()
        if self.state in (S.STARTING, S.LOADING) or self._preparing():
            self._load_failed("exited_during_load" if kind is ExitKind.CRASHED else kind,
                              f"the worker exited during load ({detail})")
        if self.state is not S.STOPPING:
            self._set_state(S.STOPPING, kind)
        # Wait for the GPU memory to come back before calling the worker cold (Ollama sched.go).
        self._release_deadline = self._clock() + self.cfg.release_timeout_s
        self._poll_release()

    def _poll_release(self) -> None:
        proc = self._proc
        assert proc is not None
        held = proc.held_gpu_mb(self._gpu, self.device)
        if held and self._clock() < self._release_deadline:
            self._timers.arm(TimerKind.RELEASE_POLL, RELEASE_POLL_S)
            return
        if held:
            log.warning("worker pid=%d: %.0f MiB still held %.1fs after exit", proc.pid, held,
                        self.cfg.release_timeout_s)
        self._proc = None
        self._after_exit()

    def _after_exit(self) -> None:
        """The process is gone: cold, or backoff after too many load failures; then a new
        standby (or `yielded` while stepped aside without one)."""
        self._prepared = False
        self._standby = None
        self._revoked = None
        self._yield_pending = False
        if self._failures >= self.cfg.max_load_failures and self._shutdown is None:
            over = self._failures - self.cfg.max_load_failures
            self._timers.arm(TimerKind.BACKOFF_END,
                             min(self.cfg.load_backoff_s * (2**over), 3600.0))
            self._set_state(S.BACKOFF, "load_failures")
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                self._refuse(w)
            return
        self._set_state(S.COLD, "exited")
        if self._shutdown is not None:
            return
        if self._waiters:
            self._post(_Load(self._waiters[0].trigger, 0.0, None))
        elif self.cfg.standby:
            self._post(_Standby())
        elif self._policy is not None and self._policy.yielded:
            self._set_state(S.YIELDED, "exited")

    def _fail_waiters(self, err: Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.fut is not None and not w.fut.done():
                w.fut.set_exception(err)

    def _load_failed(self, code: str, message: str) -> None:
        self._failures += 1
        self._last_error = protocol.ErrorInfo(code, message)
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
        if await self._held_back():
            return
        self._trigger = trigger
        self._load_started = self._clock()
        self._timers.arm(TimerKind.LOAD_DEADLINE, self.cfg.load_timeout_s)
        proc = self._proc
        if self.state is S.UNLOADED and proc is not None:
            self._load_fresh, self._load_kind = False, "reload"
            self._set_state(S.LOADING, "reload", trigger)
            await self._send_load(proc)
            return
        if self.state in (S.STANDBY, S.PREPARING) and proc is not None:
            # Activation: the standby's weights go to the device.  While it still prepares, the
            # load waits behind the prepare in its pipe (no round trip lost).
            self._load_fresh, self._load_kind = False, "activate"
            self._set_state(S.LOADING, "activate", trigger)
            await self._send_load(proc)
            return
        self._load_fresh, self._load_kind = True, "spawn"
        if await self._spawn_worker() is None:
            self._timers.cancel(TimerKind.LOAD_DEADLINE)
            self._fail_waiters(LoadFailed(f"cannot start the worker: {self._last_error_text()}"))
            return
        self._set_state(S.STARTING, "job" if trigger.startswith("job") else "load", trigger)

    async def _spawn_worker(self) -> WorkerProcess | None:
        """A fresh worker process (None, failure counted, when it cannot be started)."""
        try:
            proc = await self._spawn()
        except OSError as e:
            self._failures += 1
            self._last_error = protocol.ErrorInfo("spawn_failed", str(e))
            log.warning("cannot start the worker: %s", e)
            return None
        self.spawns += 1
        self._prepared = False
        self._standby = None
        self._proc = WorkerProcess(
            proc,
            on_event=lambda wp, event: self._post(_FromWorker(wp.pid, event)),
            on_exit=lambda wp, rc: self._post(_Exited(wp.pid, rc)),
        )
        return self._proc

    def _last_error_text(self) -> str:
        return self._last_error.message if self._last_error else "unknown error"

    async def _on_standby(self, msg: _Standby) -> None:
        if self.state is S.COLD and not self._waiters:
            await self._begin_standby()

    async def _begin_standby(self) -> None:
        """Spawn a standby process and send it `prepare` at once (it reads ops after hello)."""
        if (not self.cfg.standby or self._standby_declined or self._shutdown is not None
                or self.state is not S.COLD):
            return
        self._standby_started = self._load_started = self._clock()
        self._timers.arm(TimerKind.LOAD_DEADLINE, self.cfg.load_timeout_s)
        proc = await self._spawn_worker()
        if proc is None:
            self._timers.cancel(TimerKind.LOAD_DEADLINE)
            return  # stays cold; the next load tries a fresh process
        aside = self._policy is not None and self._policy.yielded
        self._set_state(S.PREPARING, "yielded" if aside else "standby", "standby")
        m = self.model
        await proc.send(protocol.Prepare(model=m.spec, revision=m.revision,
                                         cache_dir=m.cache_dir, device=self.cfg.device,
                                         dtype=self.cfg.dtype))

    async def _send_load(self, proc: WorkerProcess) -> None:
        m = self.model
        await proc.send(protocol.Load(model=m.spec, revision=m.revision, cache_dir=m.cache_dir,
                                      device=self.cfg.device, dtype=self.cfg.dtype))

    async def _send_unload(self, trigger: str) -> None:
        assert self._proc is not None
        self._unload_reason = "idle_unload" if trigger == "idle" else "unload"
        self._set_state(S.UNLOADING, self._unload_reason, trigger)
        # The same liveness rule as a batch: a worker that does not answer is hung (without it a
        # stopped worker left the daemon `unloading`, and every job waiting, forever).
        self._timers.arm(TimerKind.HEARTBEAT, self.cfg.heartbeat_timeout_s)
        await self._proc.send(protocol.Unload())

    async def _stop(self, *, force: bool, reason: str, trigger: str | None = None) -> None:
        """Ask the worker to exit (force: SIGTERM as well), SIGKILL at the stop deadline;
        its reader reaps it and posts _Exited."""
        proc = self._proc
        if proc is None:
            return
        if self.state is not S.STOPPING:
            self._set_state(S.STOPPING, reason, trigger)
        self._timers.cancel(TimerKind.IDLE)
        if await proc.stop(reason, force=force):
            self._timers.arm(TimerKind.STOP_DEADLINE, self.cfg.stop_timeout_s)

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
            self._timers.cancel(TimerKind.IDLE)
            return
        unload_at, exit_at = self._idle_deadlines()
        if self.state is S.UNLOADED:
            unload_at = None
        nxt = min((t for t in (unload_at, exit_at) if t is not None), default=None)
        if nxt is None:
            self._timers.cancel(TimerKind.IDLE)
            return
        self._timers.arm(TimerKind.IDLE, nxt - self._clock())

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
            # A load (or prepare) in progress is not worth waiting for: SIGTERM it as well.
            await self._stop(force=self.state in (S.STARTING, S.LOADING) or self._preparing(),
                             reason="shutdown", trigger="shutdown")
        elif self.state is S.BACKOFF:
            self._timers.cancel(TimerKind.BACKOFF_END)
        elif self.state is S.YIELDED:
            self._set_state(S.COLD, "shutdown", "shutdown")

    # stepping aside ----------------------------------------------------------------------------
    def _need_mb(self) -> float:
        """The model's need on the GPU: its weights (as the worker reported them; 0 before any
        prepare or load) + worker.yield_need_margin_mb."""
        return (self._weights_mb or 0.0) + self.cfg.yield_need_margin_mb

    def _read_gpu(self) -> GpuReading | None:
        assert self._gpu is not None
        pids = [self._proc.pid] if self._proc is not None else []
        sample = self._gpu.sample(pids, self._gpu_index)
        return GpuReading.from_sample(sample, self._clock(), pids)

    def _arm_gpu_poll(self) -> None:
        """GPU_POLL runs while our worker may hold the GPU and while we are aside; never in
        cold or standby (a load asks the policy itself), so an idle daemon does not poll."""
        pol = self._policy
        wanted = pol is not None and self._shutdown is None and (
            pol.yielded or self.state in HOLDING)
        if not wanted:
            self._timers.cancel(TimerKind.GPU_POLL)
        elif self._timers.left(TimerKind.GPU_POLL) is None:
            self._timers.arm(TimerKind.GPU_POLL, self.cfg.yield_poll_s)

    async def _gpu_poll(self) -> None:
        pol = self._policy
        if pol is None:
            return
        reading = self._read_gpu()
        if reading is not None:
            was_yielded = pol.yielded
            verdict = pol.watch(reading, holding=self.state in HOLDING and not was_yielded,
                                need_mb=self._need_mb())
            if verdict is Verdict.YIELD:
                await self._step_aside(reading, "other_processes")
            elif verdict is Verdict.RESUME:
                await self._come_back()
        self._arm_gpu_poll()

    async def _held_back(self) -> bool:
        """Whether a load must wait because we are aside, or because the model's need does not
        fit in the free GPU memory now (then we step aside: the jobs wait, none dies of OOM)."""
        pol = self._policy
        if pol is None:
            return False
        if not pol.yielded:
            reading = self._read_gpu()
            if reading is None or pol.admit(reading, self._need_mb()):
                return False
            await self._step_aside(reading, "insufficient_memory")
        if self.state is S.COLD and self.cfg.standby and not self._standby_declined:
            await self._begin_standby()  # ready for when the GPU comes back; it holds none
        elif self.state in (S.COLD, S.STANDBY):
            self._set_state(S.YIELDED, pol.reason)
        return True

    async def _step_aside(self, reading: GpuReading, reason: str) -> None:
        """Other work needs the GPU: leases end after the running batch, the worker exits (the
        only way to give its CUDA context back), loads wait in `yielded`."""
        pol = self._policy
        assert pol is not None
        pol.step_aside(reading, reason)
        others = ", ".join(f"pid {p.pid} {p.to_json()['memory_mb']} MiB" for p in reading.others)
        log.warning("worker steps aside reason=%s free=%.0f MiB need=%.0f MiB others=%.0f MiB "
                    "(%s); loads wait until %.0f MiB are free for %gs", reason,
                    reading.free_mb, pol.need_mb, reading.others_mb, others or "not listed",
                    pol.resume_at_free_mb(), pol.settle_s)
        self.bus.publish(SteppedAside(reason=reason, free_mb=reading.free_mb,
                                      need_mb=pol.need_mb, others_mb=reading.others_mb))
        self._timers.cancel(TimerKind.IDLE)
        if self.state is S.READY and self._inflight > 0:
            self._revoked = "yield"  # the dispatcher starts no new batch; the last one ends
            self._yield_pending = True
            return
        await self._stop_for_yield()

    async def _stop_for_yield(self) -> None:
        self._yield_pending = False
        if self.state in HOLDING:
            self._revoked = "yield"  # until the process is gone (_after_exit)
            await self._stop(force=self.state in (S.STARTING, S.LOADING), reason="yield",
                             trigger="gpu")
        elif self.state is S.STANDBY:
            self._set_state(S.YIELDED, self._policy.reason if self._policy else "yield")
        self._arm_gpu_poll()

    async def _come_back(self) -> None:
        pol = self._policy
        assert pol is not None
        log.info("worker comes back: GPU memory free again for %gs", pol.settle_s)
        if self._yield_pending:  # the batch has not even finished: stay, as if nothing happened
            self._yield_pending = False
            self._revoked = None
            self._grant_waiters()
            return
        if self.state is S.YIELDED:
            if self._proc is None:
                self._set_state(S.COLD, "gpu_free")
            else:
                self._set_state(S.STANDBY if self._prepared else S.PREPARING, "gpu_free")
        if self._waiters and self.state in LOADABLE:
            await self._begin_load(self._waiters[0].trigger)
        elif self.state is S.COLD:
            await self._begin_standby()

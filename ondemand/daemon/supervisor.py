"""The worker supervisor: the one owner of the GPU worker process and its state.

A single task (`_run`) owns every piece of worker state.  Everyone else sends it a message and
awaits the outcome: `async with supervisor.lease(trigger) as lease: await lease.infer(op)`,
`await supervisor.load(trigger, hold_s=...)`, `await supervisor.unload(...)`.  Worker events,
process exits and timers arrive as messages in the same queue, so no state is ever changed from
two places (llama-swap raced until it moved to exactly this).  This module is the state machine
and its message handlers.  What they consult lives beside it and changes no state itself:

    process.py       WorkerProcess: spawn, pipes, the steps of a stop, exit classes (protocol.py
                     is what crosses its pipe)
    timers.py        one-shot timers that come back as messages (TimerKind below)
    loads.py         LoadBook: the load in progress, the last one, the failure streak, backoff
    idle.py          IdleLadder: last use, holds, the idle ladder's deadlines (pure)
    liveness.py      Liveness: batches in flight, heartbeats, batch deadlines (issue 10)
    gpu_watch.py     GpuWatch: GPU readings for yielding.YieldPolicy (stepping aside)
    worker_status.py the states and the records of the status() snapshot

States and transitions (TRANSITIONS below is checked by `_set_state`):

    cold ──spawn──> starting ──hello──> loading ──loaded──> ready <──load── unloaded
      ^                │                   │                 │  ──idle unload──> unloading ──┘
      │                └──────── any failure / idle exit / shutdown ─────> stopping ──exit──┘
      └── backoff <── (load failed max_load_failures times in a row; refuses loads until a deadline)

    cold ──standby spawn──> preparing ──prepared──> standby ──job / load (activate)──> loading
                                └──── job / load: `load` sent behind `prepare` ────────────┘

    cold, standby ──a load does not fit──> yielded ──GPU free again──> cold, preparing, standby
    starting .. unloaded ──others need the room (the batch ends first)──> stopping ──exit──> cold
    cold (aside) ──> yielded, or with standby: preparing ──prepared──> yielded

Standby (`worker.standby`, docs/ladder.md): after every exit, and at start-up, one worker process
is spawned with `prepare`: it imports torch and the engine and reads the weights into host
memory, never initialising CUDA, so it holds no GPU memory; a job or a load then only pays CUDA
initialisation, the copy to the device and the warm-up.  `unload(exit=True)` on a standby ends it
and none is prepared until the next load has come and gone.

Stepping aside (`worker.yield_gpu`): while the worker may hold the GPU, and while aside, GPU_POLL
reads the GPU every `yield_poll_s`.  When other processes need the room the supervisor revokes
the leases (the dispatcher starts no new batch), lets the running batch finish, stops the worker
and goes to `yielded` (a standby is prepared meanwhile: it holds no GPU).  A load whose need does
not fit goes to `yielded` instead of dying of out-of-memory.  Loads wait there, jobs stay queued,
until the policy lets us back; then standby (or cold) and the waiting loads run.

In-flight work is counted by leases; the idle timer is armed only when the count is zero and is
re-checked when it fires (LocalAI #5221, llama.cpp #28698: never unload under a running job).
Idle ladder: `unload_after_s` drops the model but keeps the process, `exit_after_s` ends it;
holds (`load(hold_s=...)`) suspend both while active.

Liveness of a busy worker (issue 10: a SIGSTOPped worker held a batch for minutes, unnoticed):
while a batch is in flight HEARTBEAT (silent for `heartbeat_timeout_s` = hung) and BATCH_DEADLINE
(past the batch's deadline = stuck) run; HEARTBEAT also bounds the wait for `unloaded`.  Either
SIGKILLs the worker (a stopped process cannot handle SIGTERM), so its batch fails as a crash (the
dispatcher retries it) and the next lease starts a fresh worker.  `status().stalled_s` shows
missed beats while they last; `unready_reason()` turns /readyz 503.
"""
from __future__ import annotations

import asyncio
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
    StateChanged,
    WorkerActivity,
    WorkerExited,
)
from ondemand.daemon.gpu_watch import GpuWatch
from ondemand.daemon.idle import IdleLadder
from ondemand.daemon.liveness import Batch, Liveness
from ondemand.daemon.loads import LoadBook, LoadKind
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
    WorkerState,
    WorkerStatus,
)
from ondemand.daemon.yielding import GpuReading, Verdict
from ondemand.errors import LoadFailed, WorkerCrashed, WorkerUnavailable
from ondemand.gpu import GpuProbe, host_usage

# Also the import path of WorkerState, Spawn, make_spawn and worker_env for app.py, tests, bench.
__all__ = ["TRANSITIONS", "Lease", "Spawn", "Supervisor", "TimerKind", "WorkerState",
           "WorkerStatus", "make_spawn", "worker_env"]

log = logging.getLogger(__name__)

RELEASE_POLL_S = 0.25  # NVML poll period while waiting for GPU memory to come back (Ollama)


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
# States with a standby process (or none yet): `status().standby` reports it.
STANDING_BY = frozenset({S.PREPARING, S.STANDBY, S.YIELDED})


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
        self._book = LoadBook(worker)
        self._idle = IdleLadder(unload_after_s=worker.unload_after_s,
                                exit_after_s=worker.exit_after_s, now=clock())
        self._live = Liveness(worker)
        self._watch = GpuWatch.create(worker, gpu, clock)  # None: stepping aside is off
        self.device = worker.device
        self.dtype = worker.dtype
        self.last_exit: ExitRecord | None = None  # the last exit we did not ask for

        self.state = S.COLD
        self._proc: WorkerProcess | None = None
        self._inflight = 0
        self._waiters: list[_Acquire | _Load] = []
        self._pending_unload: _Unload | None = None
        self._shutdown: _Shutdown | None = None
        self._release_deadline = 0.0
        self._unload_reason = ""
        self._prepared = False  # the current process answered `prepared` (a standby)
        self._standby_declined = False  # unload(exit) ended a standby: none until the next load
        self._revoked: str | None = None  # leases asked to end (Lease.revoked)
        self._yield_pending = False  # aside, but the running batch finishes first

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

    @property
    def loads(self) -> int:
        return self._book.loads

    @property
    def spawns(self) -> int:
        return self._book.spawns

    @property
    def last_load(self) -> LoadRecord | None:
        return self._book.last

    @property
    def last_load_s(self) -> float | None:
        return self._book.last.seconds if self._book.last else None

    def status(self) -> WorkerStatus:
        """A snapshot for reporting (never branch on it to drive the worker)."""
        now, proc, ready = self._clock(), self._proc, self.state is S.READY
        unload_in = exit_in = None
        if self._inflight == 0 and self.state in (S.READY, S.UNLOADED):
            unload_in, exit_in = self._idle.countdown(now, loaded=ready)
        hold, book = self._idle.hold_left(now), self._book
        return WorkerStatus(
            state=self.state, pid=proc.pid if proc else None, device=self.device,
            dtype=self.dtype, model=self.model.spec, trigger=book.trigger or None,
            in_flight=self._inflight, last_load_s=self.last_load_s, last_load=book.last,
            loads=book.loads, spawns=book.spawns, unload_in_s=unload_in, exit_in_s=exit_in,
            hold_s=hold or None, hold_trigger=(self._idle.hold_trigger or None) if hold else None,
            warm_because=self._idle.warm_because(now, in_flight=self._inflight) if ready else None,
            load_failures=book.failures, last_error=book.last_error,
            backoff_s=self._timers.left(TimerKind.BACKOFF_END) if self.state is S.BACKOFF else None,
            gpu_memory_mb=proc.held_gpu_mb(self._gpu, self.device) if proc else None,
            batch_s=self._live.batch_s(now), batch_deadline_s=self._live.deadline_in_s(now),
            stalled_s=self._live.stalled_s(now) if ready else None, last_exit=self.last_exit,
            standby=self._standby_status(),
            yielded=self._watch.record(now, pending=self._yield_pending) if self._watch else None,
        )

    def _standby_status(self) -> StandbyRecord | None:
        proc = self._proc
        if proc is None or self.state not in STANDING_BY:
            return None
        _, rss, _ = host_usage([proc.pid])
        return (self._book.standby or StandbyRecord.preparing(proc.pid)).now(
            host_mb=None if rss is None else rss / 2**20,
            gpu_memory_mb=proc.held_gpu_mb(self._gpu, self.cfg.device))

    def unready_reason(self) -> str | None:
        """Why the worker cannot take work now although it is up (for /readyz), else None."""
        proc = self._proc
        stalled = self._live.stalled_s(self._clock()) if self.state is S.READY else None
        if stalled is not None:
            return (f"worker stalled: no heartbeat for {stalled:.1f}s on a batch "
                    f"(pid {proc.pid if proc else '-'}); it is killed after "
                    f"worker.heartbeat_timeout_s={self.cfg.heartbeat_timeout_s:g}s")
        if proc is not None and proc.killed is not None and proc.killed[0] in (
                ExitKind.HUNG, ExitKind.BATCH_TIMEOUT):
            return f"worker {proc.killed[0]} (pid {proc.pid}): killed, a new one follows"
        return None

    def retry_after_s(self) -> float:
        left = self._timers.left(TimerKind.BACKOFF_END) if self.state is S.BACKOFF else None
        return max(1.0, left or 0.0)

    @property
    def _batches(self) -> dict[str, Batch]:
        """The batches in flight (tests wait on them)."""
        return self._live.batches

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
        trig = trigger if trigger is not None else self._book.trigger
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
                if not await self._serve_waiters():
                    await self._begin_standby()
            case TimerKind.RELEASE_POLL:
                self._poll_release()
            case TimerKind.HEARTBEAT if self._live.batches:
                self._kill_stuck(ExitKind.HUNG, *self._live.hung(self._clock()))
            case TimerKind.HEARTBEAT if self.state is S.UNLOADING:
                self._kill_stuck(ExitKind.HUNG, "unload",
                                 f"no answer for {self.cfg.heartbeat_timeout_s:g}s "
                                 "(worker.heartbeat_timeout_s)")
            case TimerKind.BATCH_DEADLINE if self._live.batches:
                late = self._live.overdue(self._clock())
                if late is None:
                    self._arm_liveness()  # a batch ended meanwhile
                else:
                    self._kill_stuck(ExitKind.BATCH_TIMEOUT, *late)

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
        hold = self._idle.hold_left(self._clock())
        self.bus.publish(WorkerActivity(inflight=self._inflight, hold_s=hold,
                                        hold_trigger=self._idle.hold_trigger if hold else ""))

    def _refuse(self, msg: _Acquire | _Load) -> bool:
        """Fail the request at once when the worker is backing off or shutting down."""
        err: WorkerUnavailable | None = None
        if self._shutdown is not None:
            err = WorkerUnavailable("the daemon is shutting down", retry_after_s=5)
        elif self.state is S.BACKOFF:
            err = self._book.backoff_error(self.retry_after_s())
        if err is None:
            return False
        if msg.fut is not None and not msg.fut.done():
            msg.fut.set_exception(err)
        return True

    async def _on_release(self, msg: _Release) -> None:
        self._inflight -= 1
        assert self._inflight >= 0, "lease released twice"
        if self._inflight == 0:
            self._idle.used(self._clock())
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
            self._idle.hold(self._clock() + msg.hold_s, msg.trigger)
            log.info("worker hold %.0fs trigger=%s", msg.hold_s, msg.trigger)
            self._activity()
        self._pending_unload = None
        self._standby_declined = False
        if self.state is S.READY and self._revoked is None:
            self._idle.used(self._clock())
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
        if self._idle.clear_hold():
            self._activity()
        if self._inflight > 0:
            self._pending_unload = msg  # never under a running batch
            log.info("worker unload requested trigger=%s: after %d in-flight", msg.trigger,
                     self._inflight)
            return
        self._timers.cancel(TimerKind.IDLE)
        if msg.exit and self.state in STANDING_BY and self._proc:
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
        op = dataclasses.replace(msg.op, heartbeat_s=self.cfg.heartbeat_s)
        self._live.start(op, msg.fut, msg.audio_s, self._clock())
        self._arm_liveness()
        await proc.send(op)

    def _arm_liveness(self) -> None:
        """HEARTBEAT and BATCH_DEADLINE while a batch is in flight; neither when none is."""
        delays = self._live.timers(self._clock())
        if delays is None:
            self._timers.cancel(TimerKind.HEARTBEAT, TimerKind.BATCH_DEADLINE)
            return
        self._timers.arm(TimerKind.HEARTBEAT, delays[0])
        self._timers.arm(TimerKind.BATCH_DEADLINE, delays[1])

    def _kill_stuck(self, kind: ExitKind, what: str, why: str) -> None:
        """SIGKILL a hung or stuck worker; its exit fails the batch as a crash (retried)."""
        proc = self._proc
        self._timers.cancel(TimerKind.HEARTBEAT, TimerKind.BATCH_DEADLINE)
        if proc is None:
            return
        log.warning("worker pid=%d %s: %s %s; SIGKILL%s", proc.pid, kind, what, why,
                    ", its jobs are retried" if self._live.batches else "")
        proc.kill(kind, why)
        if self.state is not S.STOPPING:
            self._set_state(S.STOPPING, kind)

    # worker events -----------------------------------------------------------------------
    async def _on_event(self, msg: _FromWorker) -> None:
        proc = self._proc
        if proc is None or msg.pid != proc.pid:
            return  # from a process we already gave up on
        match msg.event:
            case protocol.Hello():
                self._book.hello(self._clock())
                if self.state is S.STARTING:  # else a standby: its prepare is sent
                    self._set_state(S.LOADING, "spawned")
                    await self._send_load(proc)
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
                if not await self._serve_waiters():
                    self._arm_idle()
            case protocol.Heartbeat(batch=batch):  # else it crossed its batch's answer
                if self._live.beat(batch, self._clock()):
                    self._arm_liveness()
            case protocol.Progress(batch=batch) as ev:  # issue 12: a segmented job's progress
                if batch in self._live.batches:
                    self.bus.publish(JobProgress(job=ev.job, done_s=ev.done_s,
                                                 total_s=ev.total_s))
            case protocol.Result() | protocol.BatchFailed() as ev:
                running = self._live.finish(ev, self._clock())
                self._arm_liveness()
                if running is not None:
                    running.answer(ev)
            case ev:  # valid, but late: e.g. `loaded` after the load deadline stopped it
                log.warning("worker pid=%d %s in state %s: ignored", proc.pid, ev.TAG,
                            self.state)

    async def _on_prepared(self, proc: WorkerProcess, ev: protocol.Prepared) -> None:
        """A standby is ready: weights in host memory, CUDA untouched (the guard checks both
        the worker's own word and, with NVML, the GPU's)."""
        self._prepared = True
        self._note_weights(ev.weights_mb)
        held = proc.held_gpu_mb(self._gpu, self.cfg.device)
        rec = self._book.prepared(proc.pid, ev, self._clock(), held)
        if ev.cuda_initialized or held:
            log.error("standby worker pid=%d holds GPU state (cuda_initialized=%s, %s MiB): a "
                      "bug; standby must never initialise CUDA", proc.pid, ev.cuda_initialized,
                      held)
        log.info("standby worker pid=%d prepared in %.2fs: %.0f MiB of weights, %.0f MiB RSS",
                 proc.pid, rec.seconds or 0.0, ev.weights_mb, ev.host_mb)
        if self.state is not S.PREPARING:
            return  # a load was sent behind the prepare (loading), or we are aside (yielded)
        self._timers.cancel(TimerKind.LOAD_DEADLINE)
        if self._aside():
            self._set_state(S.YIELDED, "prepared")
            return
        self._set_state(S.STANDBY, "prepared")
        await self._serve_waiters()

    def _preparing(self) -> bool:
        """A standby process that has not answered `prepared` yet."""
        return self._proc is not None and not self._prepared and self.state in (
            S.PREPARING, S.YIELDED)

    def _on_loaded(self, ev: protocol.Loaded) -> None:
        self._timers.cancel(TimerKind.LOAD_DEADLINE)
        self._book.loaded(ev, self._clock())
        if ev.weights_mb is not None:
            self._note_weights(ev.weights_mb)
        self.device, self.dtype = ev.device, ev.dtype
        self._set_state(S.READY, "loaded")
        self.bus.publish(self._book.event(self._proc.pid if self._proc else None, self.device))
        self._idle.used(self._clock())
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
        self._live.fail_all(WorkerCrashed(f"the worker {kind} ({detail})"))
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
        self._book.standby = None
        self._revoked = None
        self._yield_pending = False
        if not self._book.retry and self._shutdown is None:
            self._timers.arm(TimerKind.BACKOFF_END, self._book.backoff_s())
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
        elif self._aside():
            self._set_state(S.YIELDED, "exited")

    def _fail_waiters(self, err: Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.fut is not None and not w.fut.done():
                w.fut.set_exception(err)

    def _load_failed(self, code: str, message: str) -> None:
        err = self._book.failed(code, message)
        log.warning("worker load failed (%d in a row) code=%s: %s", self._book.failures, code,
                    message)
        # Job leases wait for the retry (a fresh process); manual loads learn about it now.
        keep: list[_Acquire | _Load] = []
        for w in self._waiters:
            if isinstance(w, _Acquire) and self._book.retry:
                keep.append(w)
            elif w.fut is not None and not w.fut.done():
                w.fut.set_exception(err)
        self._waiters = keep

    # process control ---------------------------------------------------------------------
    async def _begin_load(self, trigger: str) -> None:
        if await self._held_back():
            return
        proc = self._proc
        kind: LoadKind = "spawn"
        if proc is not None and self.state is S.UNLOADED:
            kind = "reload"  # the process kept its CUDA context
        elif proc is not None and self.state in (S.STANDBY, S.PREPARING):
            # Activation: the standby's weights go to the device.  While it still prepares, the
            # load waits behind the prepare in its pipe (no round trip lost).
            kind = "activate"
        self._book.begin(kind, trigger, self._clock())
        self._timers.arm(TimerKind.LOAD_DEADLINE, self.cfg.load_timeout_s)
        if proc is not None and kind != "spawn":
            self._set_state(S.LOADING, kind, trigger)
            await self._send_load(proc)
            return
        if await self._spawn_worker() is None:
            self._timers.cancel(TimerKind.LOAD_DEADLINE)
            self._fail_waiters(LoadFailed(
                f"cannot start the worker: {self._book.last_error_text()}"))
            return
        self._set_state(S.STARTING, "job" if trigger.startswith("job") else "load", trigger)

    async def _serve_waiters(self) -> bool:
        """Begin the load the first waiting lease or load asked for; False when none waits."""
        if not self._waiters:
            return False
        await self._begin_load(self._waiters[0].trigger)
        return True

    async def _spawn_worker(self) -> WorkerProcess | None:
        """A fresh worker process (None, failure counted, when it cannot be started)."""
        try:
            proc = await self._spawn()
        except OSError as e:
            self._book.spawn_failed(e)
            log.warning("cannot start the worker: %s", e)
            return None
        self._book.spawned()
        self._prepared = False
        self._proc = WorkerProcess(
            proc,
            on_event=lambda wp, event: self._post(_FromWorker(wp.pid, event)),
            on_exit=lambda wp, rc: self._post(_Exited(wp.pid, rc)),
        )
        return self._proc

    async def _on_standby(self, msg: _Standby) -> None:
        if self.state is S.COLD and not self._waiters:
            await self._begin_standby()

    async def _begin_standby(self) -> None:
        """Spawn a standby process and send it `prepare` at once (it reads ops after hello)."""
        if (not self.cfg.standby or self._standby_declined or self._shutdown is not None
                or self.state is not S.COLD):
            return
        self._book.begin_standby(self._clock())
        self._timers.arm(TimerKind.LOAD_DEADLINE, self.cfg.load_timeout_s)
        proc = await self._spawn_worker()
        if proc is None:
            self._timers.cancel(TimerKind.LOAD_DEADLINE)
            return  # stays cold; the next load tries a fresh process
        self._set_state(S.PREPARING, "yielded" if self._aside() else "standby", "standby")
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

    # idle ladder ---------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        """IDLE at the next rung while no lease is held and the worker is loaded or unloaded."""
        nxt = None
        if self._inflight == 0 and self.state in (S.READY, S.UNLOADED):
            nxt = self._idle.next_step_at(loaded=self.state is S.READY)
        if nxt is None:
            self._timers.cancel(TimerKind.IDLE)
        else:
            self._timers.arm(TimerKind.IDLE, nxt - self._clock())

    async def _idle_expired(self) -> None:
        if self._inflight > 0 or self.state not in (S.READY, S.UNLOADED):
            return
        match self._idle.due(self._clock(), loaded=self.state is S.READY):
            case "exit":
                await self._stop(force=False, reason="idle_exit", trigger="idle")
            case "unload":
                await self._send_unload("idle")
            case None:
                self._arm_idle()  # a hold or new use moved the deadline

    # stepping aside ----------------------------------------------------------------------------
    def _aside(self) -> bool:
        """Stepped aside for other GPU work (loads wait)."""
        return self._watch is not None and self._watch.yielded

    def _note_weights(self, mb: float) -> None:
        """The model's weights as the worker reported them: the base of its need on the GPU."""
        if self._watch is not None:
            self._watch.weights_mb = mb

    def _read_gpu(self) -> GpuReading | None:
        assert self._watch is not None
        return self._watch.read([self._proc.pid] if self._proc is not None else [])

    def _arm_gpu_poll(self) -> None:
        """GPU_POLL runs while our worker may hold the GPU and while we are aside; never in
        cold or standby (a load asks the policy itself), so an idle daemon does not poll."""
        wanted = self._watch is not None and self._shutdown is None and (
            self._watch.yielded or self.state in HOLDING)
        if not wanted:
            self._timers.cancel(TimerKind.GPU_POLL)
        elif self._timers.left(TimerKind.GPU_POLL) is None:
            self._timers.arm(TimerKind.GPU_POLL, self.cfg.yield_poll_s)

    async def _gpu_poll(self) -> None:
        if self._watch is None:
            return
        reading = self._read_gpu()
        if reading is not None:
            verdict = self._watch.watch(reading, holding=self.state in HOLDING
                                        and not self._watch.yielded)
            if verdict is Verdict.YIELD:
                await self._step_aside(reading, "other_processes")
            elif verdict is Verdict.RESUME:
                await self._come_back()
        self._arm_gpu_poll()

    async def _held_back(self) -> bool:
        """Whether a load must wait because we are aside, or because the model's need does not
        fit in the free GPU memory now (then we step aside: the jobs wait, none dies of OOM)."""
        watch = self._watch
        if watch is None:
            return False
        if not watch.yielded:
            reading = self._read_gpu()
            if reading is None or watch.admit(reading):
                return False
            await self._step_aside(reading, "insufficient_memory")
        if self.state is S.COLD and self.cfg.standby and not self._standby_declined:
            await self._begin_standby()  # ready for when the GPU comes back; it holds none
        elif self.state in (S.COLD, S.STANDBY):
            self._set_state(S.YIELDED, watch.reason)
        return True

    async def _step_aside(self, reading: GpuReading, reason: str) -> None:
        """Other work needs the GPU: leases end after the running batch, the worker exits (the
        only way to give its CUDA context back), loads wait in `yielded`."""
        assert self._watch is not None
        line, event = self._watch.step_aside(reading, reason)
        log.warning("worker steps aside %s", line)
        self.bus.publish(event)
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
            self._set_state(S.YIELDED, self._watch.reason if self._watch else "yield")
        self._arm_gpu_poll()

    async def _come_back(self) -> None:
        assert self._watch is not None
        log.info("worker comes back: GPU memory free again for %gs", self._watch.policy.settle_s)
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
        if self.state in LOADABLE and not await self._serve_waiters():
            await self._begin_standby()  # none waits: a standby, if cold (it checks)

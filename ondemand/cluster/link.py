"""The front end's end of the Ray cluster: the one owner of the cluster's state as the daemon
knows it (`cluster.backend = "ray"`, docs/cluster.md).

A single task (`_run`) owns: the agent process (cluster/agent.py, spawned here, restarted after
`cluster.retry_s` when it exits), the cluster state, the table of live replicas (fed by the
agent's `replica` events) and the holds (the minimum replica count).  Everyone else calls a
public method, which posts a message and awaits the outcome, as with the supervisor.

States (TRANSITIONS is checked by `_set_state`):

    starting ──deployed──> ready
       │                     │
       └──── agent exit / unreachable / connect deadline ────> unreachable ──retry_s──> starting
    any ──close()──> stopped

Only `ready` takes batches (`check_ready`); the dispatcher is woken on every entry to ready, so
jobs queued while the cluster was away run as soon as it is back.  The agent is the only Ray
driver: this module never imports ray, so the front end's memory does not grow with Ray's.

Holds: `hold(trigger, hold_s)` keeps `cluster.hold_replicas` replicas until the hold ends
(overlapping holds merge, the longest wins), by raising the deployment's min_replicas through the
agent (a lightweight Serve update: no replica restarts); at the end it returns to
`cluster.min_replicas` and Serve's idle delays take the replicas back to zero.

Replica lifecycle: every change is published on the bus as `ReplicaChanged` (the cost ledger
records each replica's loading, busy and idle time with its node and device; /metrics counts
them) and a replica's first `idle` as `ModelLoaded` (metrics, the prewarm lead).  When the agent
is lost, every replica it reported is taken as exited at that moment: a cluster that is gone took
them along, and a new agent reports the survivors again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ondemand.cluster import messages as m
from ondemand.config import Config
from ondemand.daemon.events import Event, EventBus, ModelLoaded
from ondemand.daemon.timers import Fired, Timers
from ondemand.errors import ClusterUnavailable, ProtocolError

log = logging.getLogger(__name__)

STDERR_TAIL = 20
STREAM_LIMIT = 1024 * 1024


class ClusterState(enum.StrEnum):
    STARTING = "starting"  # agent spawned: connecting, deploying
    READY = "ready"  # the application is deployed: batches go to it
    UNREACHABLE = "unreachable"  # no agent (it failed or exited); the next try after retry_s
    STOPPED = "stopped"  # the daemon is shutting down


S = ClusterState
TRANSITIONS: dict[ClusterState, frozenset[ClusterState]] = {
    S.STARTING: frozenset({S.READY, S.UNREACHABLE, S.STOPPED}),
    S.READY: frozenset({S.UNREACHABLE, S.STOPPED}),
    S.UNREACHABLE: frozenset({S.STARTING, S.STOPPED}),
    S.STOPPED: frozenset(),
}


class TimerKind(enum.Enum):
    RETRY = "retry"  # start a new agent
    CONNECT_DEADLINE = "connect_deadline"  # agent start -> deployed, cluster.connect_timeout_s
    HOLD_END = "hold_end"


@dataclass(frozen=True, kw_only=True)
class ReplicaChanged(Event):
    """A replica entered `new` (messages.REPLICA_STATES) at wall time `at` (its own clock; the
    event's `time` is when the front end heard of it)."""

    replica: str
    node: str
    node_ip: str
    pid: int
    device: str
    old: str | None  # None: a replica we had not seen
    new: str
    at: float
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ClusterHold(Event):
    """A hold began, was extended or ended: replicas idle until `until` (wall time; 0 = none)
    are kept for `trigger` (schedule:<name>, manual)."""

    until: float
    trigger: str


@dataclass
class Replica:
    """One live replica as the front end knows it (`/v1/status` `cluster.replicas[]`)."""

    id: str
    node: str
    node_ip: str
    pid: int
    device: str
    state: str
    since: float  # wall time the state began
    started: float  # wall time the replica began loading
    loaded_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "node_ip": self.node_ip, "pid": self.pid,
                "state": self.state, "device": self.device, "since": round(self.since, 3),
                "started": round(self.started, 3),
                "loaded_since": None if self.loaded_since is None
                else round(self.loaded_since, 3)}


# -- messages to the owner task ----------------------------------------------------------------
@dataclass
class _FromAgent:
    gen: int
    event: m.Event


@dataclass
class _AgentExited:
    gen: int
    returncode: int | None


@dataclass
class _Hold:
    trigger: str
    hold_s: float
    fut: asyncio.Future[None] | None


@dataclass
class _Release:
    trigger: str
    fut: asyncio.Future[None]


@dataclass
class _Shutdown:
    fut: asyncio.Future[None]


@dataclass
class _Agent:
    gen: int
    proc: asyncio.subprocess.Process
    pid: int
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stderr: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))


class Cluster:
    def __init__(
        self,
        cfg: Config,
        bus: EventBus,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        replica_backend: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg.cluster
        self.bus = bus
        self._full = cfg
        self._command = command or [sys.executable, "-m", "ondemand.cluster.agent"]
        self._env = env  # the replicas' extra environment (tests: a gate, PYTHONPATH)
        self._backend = replica_backend
        self._clock = clock
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._timers: Timers[TimerKind] = Timers(self._inbox.put_nowait, clock)
        self._task: asyncio.Task[None] | None = None
        self._gen = 0
        self._agent: _Agent | None = None
        self.state = S.STARTING
        self.reason = "connecting"
        self.connected: m.Connected | None = None
        self.app_status: m.AppStatus | None = None
        self.replicas: dict[str, Replica] = {}
        self._hold_until = 0.0
        self._hold_trigger = ""
        self._applied_min: int | None = None  # what the agent last confirmed
        self._waiting: list[asyncio.Future[None]] = []  # holds waiting for Applied
        # Holds awaited while the agent is still connecting: their replicas are asked for once
        # deployed.  (Failing them at once made every catch-up prewarm at daemon start-up, which
        # runs before the agent has deployed, record "load failed" while its replicas came up.)
        self._deferred: list[asyncio.Future[None]] = []
        self._on_ready: list[Callable[[], None]] = []
        self._shutdown: _Shutdown | None = None
        self.starts = 0
        self.last_load_s: float | None = None

    # -- public API --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` on every entry to ready (the dispatcher's wake)."""
        self._on_ready.append(callback)

    def check_ready(self) -> None:
        """Raise ClusterUnavailable (with the reason) unless batches can be sent now."""
        if self.state is not S.READY:
            raise ClusterUnavailable(
                f"the Ray cluster is {self.state}: {self.reason}; jobs stay queued",
                retry_after_s=self.cfg.retry_s)

    def unready_reason(self) -> str | None:
        """Why /readyz says no, or None.  Connecting at start-up is not a failure."""
        if self.state is S.UNREACHABLE:
            return f"ray cluster unreachable: {self.reason}"
        return None

    async def hold(self, trigger: str, hold_s: float, *, wait: bool = True) -> None:
        """Keep `cluster.hold_replicas` replicas for `hold_s` seconds (a prewarm window, a manual
        load); with `wait`, return once they run (ClusterUnavailable if they cannot: the cluster
        is unreachable, or its agent is lost while connecting; a hold asked while the agent
        connects waits for the deployment, as a catch-up prewarm at start-up does)."""
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._inbox.put_nowait(_Hold(trigger, hold_s, fut))
        if fut is not None:
            await fut

    async def release(self, trigger: str = "manual") -> None:
        """End every hold (`POST /v1/worker/unload`); Serve's idle delays do the rest."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Release(trigger, fut))
        await fut

    async def close(self) -> None:
        if self._task is None or self._task.done():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Shutdown(fut))
        await fut
        await self._task

    def target_min(self) -> int:
        held = self._hold_until > self._clock()
        return max(self.cfg.min_replicas, self.cfg.hold_replicas if held else 0)

    def hold_left_s(self) -> float | None:
        left = self._hold_until - self._clock()
        return left if left > 0 else None

    def status(self) -> dict[str, Any]:
        """`/v1/status` `cluster` (docs/api.md): reporting only."""
        c, a = self.connected, self.app_status
        hold = self.hold_left_s()
        return {
            "backend": "ray",
            "state": self.state.value,
            "reason": None if self.state is S.READY else self.reason,
            "address": c.address if c else self.cfg.address,
            "ray_version": c.ray_version if c else None,
            "nodes": c.nodes if c else None,
            "app": self.cfg.app,
            "url": self.cfg.url,
            "app_status": a.status if a else None,
            "app_message": (a.message or None) if a else None,
            "min_replicas": self.cfg.min_replicas,
            "max_replicas": self.cfg.max_replicas,
            "target_min_replicas": self.target_min(),
            "hold_s": hold,
            "hold_trigger": (self._hold_trigger or None) if hold else None,
            "agent_pid": self._agent.pid if self._agent else None,
            "agent_starts": self.starts,
            "replicas": [r.to_json() for r in sorted(self.replicas.values(),
                                                     key=lambda r: r.started)],
        }

    # -- owner task --------------------------------------------------------------------------
    async def _run(self) -> None:
        await self._spawn()
        while True:
            msg = await self._inbox.get()
            try:
                await self._handle(msg)
            except Exception:
                log.exception("cluster: failed handling %s", type(msg).__name__)
            if self.state is S.STOPPED and self._agent is None:
                self._timers.cancel()
                if self._shutdown is not None and not self._shutdown.fut.done():
                    self._shutdown.fut.set_result(None)
                return

    async def _handle(self, msg: Any) -> None:
        match msg:
            case _FromAgent(gen=gen, event=event) if self._agent and gen == self._agent.gen:
                await self._on_event(event)
            case _AgentExited(gen=gen, returncode=rc) if self._agent and gen == self._agent.gen:
                self._on_agent_exit(rc)
            case Fired() if self._timers.fired(msg):
                await self._on_timer(msg.kind)
            case _Hold():
                await self._on_hold(msg)
            case _Release():
                if self._hold_trigger:
                    self.bus.publish(ClusterHold(until=0.0, trigger=msg.trigger))
                self._hold_until, self._hold_trigger = 0.0, ""
                self._timers.cancel(TimerKind.HOLD_END)
                msg.fut.set_result(None)
                await self._apply_min(wait=[])
            case _Shutdown():
                self._shutdown = msg
                self._set_state(S.STOPPED, "shutdown")
                self._fail_waiting("the daemon is shutting down")
                await self._stop_agent()

    def _set_state(self, new: ClusterState, reason: str) -> None:
        old = self.state
        self.reason = reason
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"illegal cluster transition {old} -> {new} ({reason})")
        self.state = new
        log.info("cluster %s -> %s reason=%s", old, new, reason)
        if new is S.READY:
            for callback in self._on_ready:
                callback()

    async def _on_timer(self, kind: TimerKind) -> None:
        if kind is TimerKind.RETRY and self.state is S.UNREACHABLE:
            await self._spawn()
        elif kind is TimerKind.CONNECT_DEADLINE and self.state is S.STARTING:
            log.warning("cluster: not deployed within cluster.connect_timeout_s=%gs; stopping "
                        "the agent", self.cfg.connect_timeout_s)
            self.reason = (f"not connected and deployed within cluster.connect_timeout_s="
                           f"{self.cfg.connect_timeout_s:g}s (address {self.cfg.address!r})")
            if self._agent is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._agent.proc.kill()
        elif kind is TimerKind.HOLD_END:
            log.info("cluster hold ended trigger=%s", self._hold_trigger)
            self.bus.publish(ClusterHold(until=0.0, trigger=self._hold_trigger))
            self._hold_trigger = ""
            await self._apply_min(wait=[])

    # -- the agent process ---------------------------------------------------------------------
    def _start_message(self) -> m.Start:
        cfg, w, model = self.cfg, self._full.worker, self._full.model
        spec = m.ReplicaSpec(model=model.spec, revision=model.revision, cache_dir=model.cache_dir,
                             device=w.device, dtype=w.dtype)
        if self._backend:
            spec = m.ReplicaSpec(**{**spec.__dict__, "backend": self._backend})
        scaling = m.Scaling(
            min_replicas=self.target_min(), max_replicas=cfg.max_replicas,
            gpus_per_replica=cfg.gpus_per_replica, cpus_per_replica=cfg.cpus_per_replica,
            batches_per_replica=cfg.batches_per_replica, upscale_delay_s=cfg.upscale_delay_s,
            downscale_delay_s=cfg.downscale_delay_s,
            downscale_to_zero_delay_s=w.exit_after_s, metrics_interval_s=cfg.metrics_interval_s,
            look_back_period_s=cfg.look_back_period_s)
        return m.Start(address=cfg.address, app=cfg.app, serve_host=cfg.serve_host,
                       serve_port=cfg.serve_port, replica=spec, scaling=scaling,
                       poll_s=cfg.poll_s, connect_timeout_s=cfg.connect_timeout_s,
                       env=dict(self._env or {}))

    async def _spawn(self) -> None:
        self._gen += 1
        self._set_state(S.STARTING, "connecting")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=STREAM_LIMIT, start_new_session=True)
        except OSError as e:
            self._set_state(S.UNREACHABLE, f"cannot start the cluster agent: {e}")
            self._timers.arm(TimerKind.RETRY, self.cfg.retry_s)
            return
        self.starts += 1
        agent = _Agent(self._gen, proc, proc.pid)
        self._agent = agent
        agent.tasks = [
            asyncio.create_task(self._read_stdout(agent), name=f"cluster-agent-{agent.pid}-out"),
            asyncio.create_task(self._read_stderr(agent), name=f"cluster-agent-{agent.pid}-err"),
        ]
        self._timers.arm(TimerKind.CONNECT_DEADLINE, self.cfg.connect_timeout_s)
        log.info("cluster agent pid=%d started address=%s", agent.pid, self.cfg.address)
        await self._send(m.encode(self._start_message()))

    async def _send(self, line: str) -> None:
        agent = self._agent
        if agent is None or agent.proc.stdin is None:
            return
        try:
            agent.proc.stdin.write(line.encode("utf-8"))
            await agent.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as e:  # it is exiting: its exit is handled
            log.debug("cluster agent pid=%d: write failed: %s", agent.pid, e)

    async def _read_stdout(self, agent: _Agent) -> None:
        assert agent.proc.stdout is not None
        try:
            async for raw in agent.proc.stdout:
                if not raw.strip():
                    continue
                try:
                    event = m.decode_event(raw)
                except ProtocolError as e:
                    log.warning("cluster agent pid=%d wrote a line that is not the protocol (%s);"
                                " stopping it", agent.pid, e)
                    with contextlib.suppress(ProcessLookupError):
                        agent.proc.kill()
                    break
                self._inbox.put_nowait(_FromAgent(agent.gen, event))
        except (ValueError, asyncio.LimitOverrunError) as e:
            log.warning("cluster agent pid=%d: unreadable output (%s); stopping it", agent.pid, e)
            with contextlib.suppress(ProcessLookupError):
                agent.proc.kill()
        rc = await agent.proc.wait()
        self._inbox.put_nowait(_AgentExited(agent.gen, rc))

    async def _read_stderr(self, agent: _Agent) -> None:
        assert agent.proc.stderr is not None
        with contextlib.suppress(ValueError, asyncio.LimitOverrunError):
            async for raw in agent.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    agent.stderr.append(line)
                    log.debug("cluster agent pid=%d: %s", agent.pid, line)

    def _on_agent_exit(self, rc: int | None) -> None:
        agent = self._agent
        assert agent is not None
        self._agent = None
        self._timers.cancel(TimerKind.CONNECT_DEADLINE)
        why = self.reason if self.state is S.UNREACHABLE else None
        if why is None:
            tail = next((ln for ln in reversed(agent.stderr) if "Error" in ln), "")
            why = f"the cluster agent (pid {agent.pid}) exited with status {rc}" + (
                f": {tail[-300:]}" if tail else "")
        log.log(logging.INFO if self.state is S.STOPPED else logging.WARNING,
                "cluster agent pid=%d exited rc=%s", agent.pid, rc)
        self._fail_waiting(why)
        self._applied_min = None
        self._forget_replicas(f"cluster unreachable: {why}")
        if self.state is S.STOPPED:
            return
        if self.state is not S.UNREACHABLE:
            self._set_state(S.UNREACHABLE, why)
        self._timers.arm(TimerKind.RETRY, self.cfg.retry_s)

    async def _stop_agent(self) -> None:
        agent = self._agent
        if agent is None:
            return
        await self._send(m.encode(m.Exit()))
        if agent.proc.stdin is not None:
            agent.proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(agent.proc.wait()),
                                   self._full.worker.stop_timeout_s)
        except TimeoutError:
            log.warning("cluster agent pid=%d did not exit within %gs: SIGKILL", agent.pid,
                        self._full.worker.stop_timeout_s)
            with contextlib.suppress(ProcessLookupError):
                agent.proc.kill()
        # its reader posts _AgentExited, handled in the loop: that ends the task

    # -- agent events --------------------------------------------------------------------------
    async def _on_event(self, event: m.Event) -> None:
        match event:
            case m.Hello(pid=pid):
                log.debug("cluster agent pid=%d says hello", pid)
            case m.Connected():
                self.connected = event
                log.info("cluster connected address=%s ray=%s nodes=%d", event.address,
                         event.ray_version, event.nodes)
            case m.Deployed(min_replicas=n):
                self._timers.cancel(TimerKind.CONNECT_DEADLINE)
                self._applied_min = n
                self._set_state(S.READY, "deployed")
                deferred, self._deferred = self._deferred, []
                if deferred or n != self.target_min():  # a hold began or ended while connecting
                    await self._apply_min(wait=deferred)
            case m.Unreachable(reason=reason):
                if self.state is not S.STOPPED:
                    self._set_state(S.UNREACHABLE, reason)
            case m.AppStatus():
                if self.app_status is None or event.status != self.app_status.status:
                    log.info("cluster app=%s status=%s %s", self.cfg.app, event.status,
                             event.message[:300])
                self.app_status = event
            case m.ReplicaEvent():
                self._on_replica(event)
            case m.Applied(min_replicas=n, error=error):
                self._applied_min = n
                waiting, self._waiting = self._waiting, []
                for fut in waiting:
                    if fut.done():
                        continue
                    if error:
                        fut.set_exception(ClusterUnavailable(
                            f"the hold's replicas did not start: {error}",
                            retry_after_s=self.cfg.retry_s))
                    else:
                        fut.set_result(None)

    def _on_replica(self, ev: m.ReplicaEvent) -> None:
        cur = self.replicas.get(ev.replica)
        old = cur.state if cur else None
        if ev.state == "exited":
            if cur is None:
                return
            del self.replicas[ev.replica]
            log.info("replica %s exited node=%s pid=%d %s", ev.replica, ev.node[:8], ev.pid,
                     ev.reason)
        elif cur is None:
            cur = Replica(id=ev.replica, node=ev.node, node_ip=ev.node_ip, pid=ev.pid,
                          device=ev.device, state=ev.state, since=ev.at, started=ev.at)
            self.replicas[ev.replica] = cur
            log.info("replica %s %s node=%s pid=%d device=%s", ev.replica, ev.state,
                     ev.node[:8], ev.pid, ev.device)
        else:
            learned = bool(ev.node and not cur.node)  # the controller's first sight lacks it
            if learned:
                cur.node, cur.node_ip, cur.pid = ev.node, ev.node_ip, ev.pid or cur.pid
            if ev.state == old and ev.device == cur.device and not learned:
                return
            cur.state, cur.since, cur.device = ev.state, ev.at, ev.device
            cur.pid = ev.pid or cur.pid
        if cur is not None and ev.state in ("idle", "busy") and cur.loaded_since is None:
            cur.loaded_since = ev.at
            if ev.load_s is not None:
                self.last_load_s = ev.load_s
                log.info("replica %s loaded in %.2fs on %s", ev.replica, ev.load_s, ev.device)
                self.bus.publish(ModelLoaded(seconds=ev.load_s, trigger="cluster",
                                             pid=ev.pid, device=ev.device, fresh_process=True))
        node, node_ip = (cur.node, cur.node_ip) if cur is not None else (ev.node, ev.node_ip)
        self.bus.publish(ReplicaChanged(replica=ev.replica, node=node, node_ip=node_ip,
                                        pid=ev.pid, device=ev.device, old=old, new=ev.state,
                                        at=ev.at, reason=ev.reason))

    def _forget_replicas(self, reason: str) -> None:
        now = time.time()
        for r in list(self.replicas.values()):
            self._on_replica(m.ReplicaEvent(replica=r.id, node=r.node, node_ip=r.node_ip,
                                            pid=r.pid, device=r.device, state="exited", at=now,
                                            reason=reason))

    # -- holds ---------------------------------------------------------------------------------
    async def _on_hold(self, msg: _Hold) -> None:
        if msg.hold_s > 0:
            until = self._clock() + msg.hold_s
            if until > self._hold_until:
                self._hold_until, self._hold_trigger = until, msg.trigger
                self._timers.arm(TimerKind.HOLD_END, msg.hold_s)
                self.bus.publish(ClusterHold(until=time.time() + msg.hold_s,
                                             trigger=msg.trigger))
            log.info("cluster hold %.0fs trigger=%s: keeping %d replica(s)", msg.hold_s,
                     msg.trigger, self.target_min())
        if msg.fut is not None and self.state is S.STARTING:
            self._deferred.append(msg.fut)  # answered once deployed (Deployed), or failed
            msg.fut = None
        elif msg.fut is not None and self.state is not S.READY:
            msg.fut.set_exception(ClusterUnavailable(
                f"the Ray cluster is {self.state}: {self.reason}",
                retry_after_s=self.cfg.retry_s))
            msg.fut = None
        await self._apply_min(wait=[msg.fut] if msg.fut is not None else [])

    async def _apply_min(self, wait: list[asyncio.Future[None]]) -> None:
        """Tell the agent the current minimum (when ready); the `wait` futures resolve on its
        answer, once that many replicas run."""
        target = self.target_min()
        if self.state is not S.READY:
            return  # the next agent starts with target_min()
        if wait and target == 0:  # the hold ended meanwhile: nothing to wait for
            for fut in wait:
                if not fut.done():
                    fut.set_result(None)
            wait = []
        if target == self._applied_min and not wait:
            return
        self._waiting.extend(wait)
        await self._send(m.encode(m.SetMin(min_replicas=target, wait=bool(wait),
                                           timeout_s=self._full.worker.load_timeout_s)))

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = [*self._waiting, *self._deferred], []
        self._deferred = []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(ClusterUnavailable(why, retry_after_s=self.cfg.retry_s))

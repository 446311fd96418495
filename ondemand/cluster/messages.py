"""The cluster agent's protocol: every message between the front end and the agent process.

The agent (`python -m ondemand.cluster.agent`, cluster/agent.py) is the only process of ours
that talks to Ray as a driver; the front end (cluster/link.py) speaks to it on its stdin/stdout,
one JSON object per line, exactly like the worker protocol (ondemand/protocol.py): ops carry
`"op": <tag>`, events `"event": <tag>`, the other keys are the dataclass fields, nested
dataclasses as objects.  Replicas report their lifecycle (`ReplicaEvent`) to the agent through
the registry actor as encoded lines too (worker/ray_replica.py), so one codec serves all three.

Pure: no ray, no numpy; the front end, the agent and the replica import it.

Invariants (as protocol.py): `decode(encode(m)) == m`; `decode` accepts exactly what `encode`
writes (a missing, mistyped or unknown field, an unknown tag, an op where an event belongs raise
one ProtocolError naming the message and the field).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from ondemand.errors import ProtocolError

# Replica lifecycle states, in the order a replica lives them (ReplicaEvent.state).
REPLICA_STATES = ("loading", "idle", "busy", "exited")


# -- parts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads (protocol.Load's fields) and with which backend."""

    model: str
    revision: str
    cache_dir: str
    device: str
    dtype: str
    # "module:Class" of the engine backend; tests inject a gated one, operators never need to.
    backend: str = "ondemand.worker.backend:TorchBackend"


@dataclass(frozen=True)
class Scaling:
    """The Serve deployment's autoscaling and resources (docs/cluster.md, "Settings")."""

    min_replicas: int
    max_replicas: int
    gpus_per_replica: float
    cpus_per_replica: float
    batches_per_replica: int
    upscale_delay_s: float
    downscale_delay_s: float
    downscale_to_zero_delay_s: float
    metrics_interval_s: float
    look_back_period_s: float


# -- front end -> agent (ops) ------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """The first line: connect to `address` and deploy the application."""

    TAG: ClassVar[str] = "start"
    address: str
    app: str
    serve_host: str
    serve_port: int
    replica: ReplicaSpec
    scaling: Scaling
    poll_s: float
    connect_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the replicas


@dataclass(frozen=True)
class SetMin:
    """Keep at least `min_replicas` (a hold began or ended); answered by Applied once that many
    replicas run (`wait`) or at once."""

    TAG: ClassVar[str] = "set_min"
    min_replicas: int
    wait: bool
    timeout_s: float


@dataclass(frozen=True)
class Exit:
    """Disconnect and end (EOF on stdin does the same).  The replicas stay Ray's."""

    TAG: ClassVar[str] = "exit"


# -- agent -> front end (events) ---------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    TAG: ClassVar[str] = "hello"
    pid: int


@dataclass(frozen=True)
class Connected:
    TAG: ClassVar[str] = "connected"
    address: str  # the cluster's GCS address as Ray resolved it
    ray_version: str
    nodes: int


@dataclass(frozen=True)
class Deployed:
    """The application is deployed (or found deployed) and routes batches."""

    TAG: ClassVar[str] = "deployed"
    app: str
    min_replicas: int


@dataclass(frozen=True)
class Unreachable:
    """The cluster cannot be used: the agent says why and exits; the front end tries again."""

    TAG: ClassVar[str] = "unreachable"
    reason: str


@dataclass(frozen=True)
class AppStatus:
    """The Serve application's status when it changes (RUNNING, DEPLOYING, DEPLOY_FAILED, ...)
    with Serve's message (a replica that fails to load says why here)."""

    TAG: ClassVar[str] = "app_status"
    status: str
    message: str


@dataclass(frozen=True)
class ReplicaEvent:
    """A replica entered `state` (REPLICA_STATES) at wall time `at`.  Sent by the replica itself
    (loading, idle, busy, exited on a graceful stop) or by the agent (exited: the controller no
    longer lists it, e.g. killed)."""

    TAG: ClassVar[str] = "replica"
    replica: str
    node: str  # Ray node id
    node_ip: str
    pid: int
    device: str  # resolved once loaded (cuda:0, cpu); the requested one while loading
    state: str
    at: float
    load_s: float | None = None  # with the first `idle`: seconds from replica start to loaded
    reason: str = ""
    # The Serve application of the replica: the registry is one per cluster, so the agent of
    # one daemon must not take another daemon's (another app's) replicas for its own.
    app: str = ""


@dataclass(frozen=True)
class Applied:
    """The answer to SetMin: `error` is "" when that many replicas run (or `wait` was false)."""

    TAG: ClassVar[str] = "applied"
    min_replicas: int
    error: str = ""


Op: TypeAlias = Start | SetMin | Exit
Event: TypeAlias = Hello | Connected | Deployed | Unreachable | AppStatus | ReplicaEvent | Applied
Message: TypeAlias = Op | Event

_OP_TYPES: tuple[type[Op], ...] = (Start, SetMin, Exit)
_EVENT_TYPES: tuple[type[Event], ...] = (Hello, Connected, Deployed, Unreachable, AppStatus,
                                         ReplicaEvent, Applied)
OPS: dict[str, type[Op]] = {c.TAG: c for c in _OP_TYPES}
EVENTS: dict[str, type[Event]] = {c.TAG: c for c in _EVENT_TYPES}


# -- encoding ----------------------------------------------------------------------------------
def encode(msg: Message) -> str:
    """`msg` as one line, newline included."""
    tag_key = "op" if isinstance(msg, _OP_TYPES) else "event"
    return json.dumps({tag_key: msg.TAG, **dataclasses.asdict(msg)}) + "\n"


# -- decoding ----------------------------------------------------------------------------------
def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _value(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against the field type `tp` (the few types these messages use)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, where)
    if origin is dict:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ProtocolError(f"{where}: expected an object of strings, got {_kind(value)}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{where}: expected a number, got {_kind(value)}")
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            raise ProtocolError(f"{where}: expected {tp.__name__}, got {_kind(value)}")
        return value
    raise AssertionError(f"unsupported field type {tp!r} at {where}")  # a bug in this module


def _build(cls: type, obj: Any, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {_kind(obj)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(obj) - set(known))
    if extra:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}")
    kwargs = {}
    for name, f in known.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _value(hints[name], obj[name], f"{where}.{name}")
    return cls(**kwargs)


def decode(line: str | bytes) -> Message:
    """One line (either direction) back to its message; ProtocolError for anything `encode`
    could not have written."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"cluster agent: not JSON ({e}): {line[:120]!r}") from None
    if not isinstance(obj, dict) or ("op" in obj) == ("event" in obj):
        raise ProtocolError(f"cluster agent: expected an object with one of 'op' and 'event': "
                            f"{line[:120]!r}")
    tag_key = "op" if "op" in obj else "event"
    table: dict[str, Any] = OPS if tag_key == "op" else EVENTS
    tag = obj.pop(tag_key)
    cls = table.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"cluster agent: unknown {tag_key} {tag!r}")
    return typing.cast(Message, _build(cls, obj, str(tag)))


def decode_op(line: str | bytes) -> Op:
    msg = decode(line)
    if not isinstance(msg, _OP_TYPES):
        raise ProtocolError(f"cluster agent: expected an op, got the event {msg.TAG!r}")
    return msg


def decode_event(line: str | bytes) -> Event:
    msg = decode(line)
    if not isinstance(msg, _EVENT_TYPES):
        raise ProtocolError(f"cluster agent: expected an event, got the op {msg.TAG!r}")
    return msg


def encode_spec(spec: ReplicaSpec) -> str:
    """The replica's part of Start alone: the Serve application's `args` (only what changes
    the code a replica runs, so a hold's new min_replicas never restarts replicas)."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def decode_spec(text: str) -> ReplicaSpec:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"replica spec: not JSON ({e})") from None
    return typing.cast(ReplicaSpec, _build(ReplicaSpec, obj, "replica_spec"))

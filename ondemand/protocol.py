"""The worker protocol: every message that crosses the pipe between the daemon and the worker.

The source of truth for docs/design.md, "Worker protocol".  One frozen dataclass per message; one
encoder (`encode`) and one decoder (`decode`, with `decode_op` / `decode_event` for the side that
reads) shared by the daemon (`daemon/supervisor.py`, `daemon/process.py`), the worker loop
(`worker/main.py`) and the tests' fake worker.  No torch, no numpy: both processes import it.

Wire format: one JSON object per line.  Parent -> worker messages (ops) carry `"op": <tag>`,
worker -> parent messages (events) carry `"event": <tag>`; the other keys are the dataclass
fields, nested dataclasses as objects, tuples as arrays, None as null.

Invariants:
- `decode(encode(m)) == m` for every message (tests/test_protocol.py).
- `decode` accepts exactly what `encode` can produce: a required field that is missing, a value of
  the wrong type, an unknown tag or a line that is not a JSON object raises one `ProtocolError`
  whose message names the message and the field.  Unknown extra keys are rejected too: a worker
  and daemon that disagree on the protocol should fail loudly at the first line, not drop data.
- The job's prediction (`ItemResult.result`) stays a JSON object: it is stored in the database
  as-is; only the envelope around it is typed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal, TypeAlias

from ondemand.errors import ProtocolError

Granularity = Literal["utterance", "frame"]
GRANULARITIES: tuple[Granularity, ...] = ("utterance", "frame")


def as_granularity(value: object) -> Granularity:
    """`value` as a Granularity; ProtocolError when it is not one."""
    for g in GRANULARITIES:
        if value == g:
            return g
    raise ProtocolError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {value!r}")


# -- parts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorInfo:
    """An error as data: `code` is an errors.py code (errors.from_code rebuilds the class)."""

    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


SegmentMode = Literal["vad", "fixed"]
SEGMENT_MODES: tuple[SegmentMode, ...] = ("vad", "fixed")


@dataclass(frozen=True)
class Segmenting:
    """How a segmented job's recording is cut (ondemand/segments.py): `vad` (speech found by
    Silero VAD, merged across pauses shorter than `merge_pause_s`, split above `max_segment_s`)
    or `fixed` (windows of `window_s` every `hop_s`).  The daemon's [segments] settings travel
    with the job, so the worker needs no configuration."""

    mode: SegmentMode
    window_s: float = 3.0
    hop_s: float = 1.0
    vad_threshold: float = 0.5
    min_speech_s: float = 0.25
    merge_pause_s: float = 0.5
    max_segment_s: float = 15.0
    pad_s: float = 0.05


@dataclass(frozen=True)
class InferItem:
    """One job of a batch: its spooled audio (16 kHz float32 .npy) and, when the client asked
    for one, where to write its embedding; `segments` when the job wants a timeline."""

    job: str
    key: str
    audio: str
    embedding: str | None = None
    segments: Segmenting | None = None


@dataclass(frozen=True)
class ItemResult:
    """One job's outcome: exactly one of `result` (the prediction JSON) and `error`."""

    job: str
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    def __post_init__(self) -> None:
        if (self.result is None) == (self.error is None):
            raise ProtocolError(f"item result of job {self.job!r}: needs exactly one of "
                                "result and error")


# -- parent -> worker (ops) --------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """Load the model and warm it up; answered by Loaded or LoadFailed."""

    TAG: ClassVar[str] = "load"
    model: str  # a local directory or a ModelScope id
    revision: str
    cache_dir: str  # "" = ModelScope's default
    device: str
    dtype: str


@dataclass(frozen=True)
class Infer:
    """Run one batch; answered by exactly one Result or BatchFailed with the same `batch`."""

    TAG: ClassVar[str] = "infer"
    batch: str
    granularity: Granularity
    items: tuple[InferItem, ...]
    batch_audio_s: float | None = None  # padded-audio budget; None = the device default
    heartbeat_s: float | None = None  # send Heartbeat this often while on the batch; None = never


@dataclass(frozen=True)
class Unload:
    """Drop the model, keep the process (and its CUDA context); answered by Unloaded."""

    TAG: ClassVar[str] = "unload"


@dataclass(frozen=True)
class Exit:
    """End the process (exit status 0); EOF on stdin does the same.  No answer."""

    TAG: ClassVar[str] = "exit"


# -- worker -> parent (events) -----------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """The first line after start: the interpreter is up and reads ops."""

    TAG: ClassVar[str] = "hello"
    pid: int


@dataclass(frozen=True)
class Loaded:
    TAG: ClassVar[str] = "loaded"
    seconds: float  # the worker's own time for the load
    device: str  # the device it landed on (`auto` resolved), e.g. cuda:0
    dtype: str
    timings: dict[str, float] = field(default_factory=dict)  # import_s, resolve_s, weights_s...


@dataclass(frozen=True)
class LoadFailed:
    """The load failed; the worker stays alive.  `code` is an errors.py code."""

    TAG: ClassVar[str] = "load_failed"
    code: str
    message: str


@dataclass(frozen=True)
class Result:
    TAG: ClassVar[str] = "result"
    batch: str
    seconds: float  # time the worker spent on the batch (audio, inference, embeddings)
    results: tuple[ItemResult, ...]


@dataclass(frozen=True)
class Heartbeat:
    """Sent every `Infer.heartbeat_s` while the worker is on `batch`, from a thread of its own,
    so a long batch still beats and only a stopped or hung process falls silent (the daemon
    kills it after worker.heartbeat_timeout_s)."""

    TAG: ClassVar[str] = "heartbeat"
    batch: str
    seconds: float  # time on the batch so far


@dataclass(frozen=True)
class Progress:
    """How much of a segmented job's recording is done: every segment ending before `done_s`
    is classified (sent between the worker's model batches, at most every few seconds)."""

    TAG: ClassVar[str] = "progress"
    batch: str
    job: str
    done_s: float
    total_s: float


@dataclass(frozen=True)
class BatchFailed:
    """The whole batch failed (out_of_memory: retry it smaller; not_loaded; internal)."""

    TAG: ClassVar[str] = "batch_failed"
    batch: str
    code: str
    message: str


@dataclass(frozen=True)
class Unloaded:
    TAG: ClassVar[str] = "unloaded"


Op: TypeAlias = Load | Infer | Unload | Exit
Event: TypeAlias = (Hello | Loaded | LoadFailed | Heartbeat | Progress | Result | BatchFailed
                    | Unloaded)
Message: TypeAlias = Op | Event

_OP_TYPES = (Load, Infer, Unload, Exit)
OPS: dict[str, type[Op]] = {c.TAG: c for c in _OP_TYPES}
EVENTS: dict[str, type[Event]] = {
    c.TAG: c for c in (Hello, Loaded, LoadFailed, Heartbeat, Progress, Result, BatchFailed,
                       Unloaded)
}


# -- encoding ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    # Shallow on purpose (not dataclasses.asdict): a frame-level result holds large lists that
    # need no copying.
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def encode(msg: Message) -> str:
    """`msg` as one protocol line, newline included."""
    tag_key = "op" if isinstance(msg, _OP_TYPES) else "event"
    return json.dumps({tag_key: msg.TAG, **_plain(msg)}) + "\n"


# -- decoding ----------------------------------------------------------------------------------
class _Fields:
    """Typed reads from one JSON object; every failure names where (`infer.items[2].audio`)."""

    def __init__(self, obj: object, where: str, known: set[str]) -> None:
        if not isinstance(obj, dict):
            raise ProtocolError(f"{where}: expected a JSON object, got {_kind(obj)}")
        extra = sorted(set(obj) - known)
        if extra:
            raise ProtocolError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}")
        self.obj: dict[str, Any] = obj
        self.where = where

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.obj:
            if optional:
                return None
            raise ProtocolError(f"{self.where}: missing field {key!r}")
        return self.obj[key]

    def _bad(self, key: str, want: str) -> ProtocolError:
        return ProtocolError(f"{self.where}.{key}: expected {want}, got {_kind(self.obj[key])}")

    def string(self, key: str) -> str:
        value = self._get(key, False)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def opt_string(self, key: str) -> str | None:
        value = self._get(key, True)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or null")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def number(self, key: str) -> float:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        return float(value)

    def opt_number(self, key: str) -> float | None:
        return None if self._get(key, True) is None else self.number(key)

    def mapping(self, key: str, *, optional: bool = False) -> dict[str, Any] | None:
        value = self._get(key, optional)
        if value is not None and not isinstance(value, dict):
            raise self._bad(key, "an object" + (" or null" if optional else ""))
        return value

    def numbers(self, key: str) -> dict[str, float]:
        obj = self.mapping(key) or {}
        out: dict[str, float] = {}
        for k, v in obj.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ProtocolError(f"{self.where}.{key}.{k}: expected a number, got {_kind(v)}")
            out[k] = float(v)
        return out

    def array(self, key: str) -> list[Any]:
        value = self._get(key, False)
        if not isinstance(value, list):
            raise self._bad(key, "an array")
        return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
    return f"{name} {json.dumps(value)[:40]}" if isinstance(value, str | int | float) else name


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _item(obj: object, where: str) -> InferItem:
    f = _Fields(obj, where, _names(InferItem))
    raw = f.mapping("segments", optional=True)
    segments = None if raw is None else _segmenting(raw, f"{where}.segments")
    return InferItem(job=f.string("job"), key=f.string("key"), audio=f.string("audio"),
                     embedding=f.opt_string("embedding"), segments=segments)


def _segmenting(obj: object, where: str) -> Segmenting:
    f = _Fields(obj, where, _names(Segmenting))
    mode = f.string("mode")
    for m in SEGMENT_MODES:
        if mode == m:
            return Segmenting(mode=m, **{k: f.number(k) for k in _names(Segmenting) - {"mode"}})
    raise ProtocolError(f"{where}.mode: expected one of {', '.join(SEGMENT_MODES)}, got "
                        f"{_kind(mode)}")


def _item_result(obj: object, where: str) -> ItemResult:
    f = _Fields(obj, where, _names(ItemResult))
    raw_error = f.mapping("error", optional=True)
    error = None
    if raw_error is not None:
        e = _Fields(raw_error, f"{where}.error", _names(ErrorInfo))
        error = ErrorInfo(code=e.string("code"), message=e.string("message"))
    result = f.mapping("result", optional=True)
    if (result is None) == (error is None):
        raise ProtocolError(f"{where}: needs exactly one of 'result' and 'error'")
    return ItemResult(job=f.string("job"), result=result, error=error)


def _message(cls: type[Message], f: _Fields) -> Message:
    w = f.where
    if cls is Load:
        return Load(model=f.string("model"), revision=f.string("revision"),
                    cache_dir=f.string("cache_dir"), device=f.string("device"),
                    dtype=f.string("dtype"))
    if cls is Infer:
        try:
            granularity = as_granularity(f.string("granularity"))
        except ProtocolError as e:
            raise ProtocolError(f"{w}: {e}") from None
        items = tuple(_item(x, f"{w}.items[{i}]") for i, x in enumerate(f.array("items")))
        return Infer(batch=f.string("batch"), granularity=granularity, items=items,
                     batch_audio_s=f.opt_number("batch_audio_s"),
                     heartbeat_s=f.opt_number("heartbeat_s"))
    if cls is Hello:
        return Hello(pid=f.integer("pid"))
    if cls is Loaded:
        return Loaded(seconds=f.number("seconds"), device=f.string("device"),
                      dtype=f.string("dtype"), timings=f.numbers("timings"))
    if cls is LoadFailed:
        return LoadFailed(code=f.string("code"), message=f.string("message"))
    if cls is Heartbeat:
        return Heartbeat(batch=f.string("batch"), seconds=f.number("seconds"))
    if cls is Progress:
        return Progress(batch=f.string("batch"), job=f.string("job"), done_s=f.number("done_s"),
                        total_s=f.number("total_s"))
    if cls is Result:
        results = tuple(_item_result(x, f"{w}.results[{i}]")
                        for i, x in enumerate(f.array("results")))
        return Result(batch=f.string("batch"), seconds=f.number("seconds"), results=results)
    if cls is BatchFailed:
        return BatchFailed(batch=f.string("batch"), code=f.string("code"),
                           message=f.string("message"))
    if cls is Unload:
        return Unload()
    if cls is Exit:
        return Exit()
    assert cls is Unloaded, cls
    return Unloaded()


def decode(line: str | bytes) -> Message:
    """One protocol line (either direction) back to its message.  Raises ProtocolError, with a
    message naming what was wrong, for anything `encode` could not have written."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON ({e}): {_excerpt(line)}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {_kind(obj)}: {_excerpt(line)}")
    if "op" in obj and "event" in obj:
        raise ProtocolError(f"both 'op' and 'event' set: {_excerpt(line)}")
    tag_key, table = ("op", OPS) if "op" in obj else ("event", EVENTS)
    tag = obj.pop(tag_key, None)
    if tag is None:
        raise ProtocolError(f"neither 'op' nor 'event' set: {_excerpt(line)}")
    cls: type[Message] | None = table.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown {tag_key} {tag!r}")
    return _message(cls, _Fields(obj, str(tag), _names(cls)))


def decode_op(line: str | bytes) -> Op:
    """A line the worker reads: an op, else ProtocolError."""
    msg = decode(line)
    if not isinstance(msg, _OP_TYPES):
        raise ProtocolError(f"expected an op, got the event {msg.TAG!r}")
    return msg


def decode_event(line: str | bytes) -> Event:
    """A line the daemon reads: an event, else ProtocolError."""
    msg = decode(line)
    if isinstance(msg, _OP_TYPES):
        raise ProtocolError(f"expected an event, got the op {msg.TAG!r}")
    return msg


def _excerpt(line: str | bytes) -> str:
    return repr(line[:120]) + ("..." if len(line) > 120 else "")

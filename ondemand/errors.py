"""The one error table.  Every error we raise on purpose is a class here; the class *is* the code.

Each class carries its stable machine-readable `code` and its HTTP `status` as class attributes;
no raise site chooses a code (a new code is a new subclass).  The HTTP layer
(`ondemand/daemon/http.py`) renders `{"error": {"code", "message"}}` with `status` and, for 503s,
`Retry-After` from the typed `retry_after_s`.  Codes that cross the worker pipe are turned back
into their class with `from_code`.  `docs/api.md` lists every code; tests/test_errors.py checks
that the list and the classes agree.
"""

from __future__ import annotations

from typing import ClassVar


class OndemandError(Exception):
    """Base of every error we raise on purpose.  Messages say what to do next."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    default_retry_after_s: ClassVar[float | None] = None

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s: float | None = (
            retry_after_s if retry_after_s is not None else self.default_retry_after_s
        )

    def __str__(self) -> str:
        return self.message


class InternalError(OndemandError):
    """A bug or an unexpected library error; details go to the log, not to the client."""


# -- configuration and model (start-up / worker load) ------------------------------------------
class ConfigError(OndemandError):
    """A bad configuration value; the message starts with the key path (`worker.dtype: ...`)."""

    code = "config"


class StorageError(OndemandError):
    """`storage.dir` cannot be used at start: not a directory, not writable, or a job database
    that is corrupt or not ours.  The message names the path and says what to do."""

    code = "storage"


class StorageLocked(StorageError):
    """Another daemon holds `storage.dir` (its lock file names the PID)."""

    code = "storage_locked"


class ListenFailed(OndemandError):
    """The daemon cannot listen on `server.host:server.port` (in use, not permitted)."""

    code = "listen_failed"


class ModelError(OndemandError):
    """A model that cannot be loaded or validated.  The message says how to fix it."""

    code = "model"


class ModelNotFoundError(ModelError):
    code = "model_not_found"


class CheckpointError(ModelError):
    """Missing, mis-shaped or unreadable tensors; truncated or corrupt files."""

    code = "checkpoint"


class DeviceError(OndemandError):
    """A device or dtype that is not available here (e.g. `cuda` without a GPU, float16 on CPU)."""

    code = "device"


class OutOfMemory(OndemandError):
    """A batch did not fit in (GPU) memory; the caller may retry it smaller."""

    code = "out_of_memory"


# -- requests ----------------------------------------------------------------------------------
class BadRequest(OndemandError):
    code = "bad_request"
    status = 400


class AudioError(BadRequest):
    """Input audio we refuse (the subclasses say why)."""

    code = "bad_audio"


class AudioEmpty(AudioError):
    code = "empty"


class AudioTooShort(AudioError):
    code = "too_short"


class AudioTooLong(AudioError):
    code = "too_long"


class AudioNonFinite(AudioError):
    code = "non_finite"


class AudioUndecodable(AudioError):
    code = "undecodable"


class AudioOutOfRange(AudioError):
    """Float samples of absurd magnitude (e.g. 3e38): finite, but no microphone records them, and
    they overflow the model's float32 arithmetic into NaN scores (issue 10)."""

    code = "out_of_range"


class AudioBadSampleRate(AudioError):
    """A sample rate above what any audio interface records (FLAC allows 655,350 Hz)."""

    code = "bad_sample_rate"


class AudioTooManySamples(AudioError):
    """More source samples (rate x channels x duration) than `audio.max_decode_mb` allows: the
    decode's cost follows the source, not the 16 kHz result (issue 10)."""

    code = "too_many_samples"


class AudioNoStream(AudioError):
    """A media file without an audio stream (a video without sound, a subtitle file); the
    message names the streams it holds."""

    code = "no_audio_stream"


class AudioUnsupportedFormat(AudioError):
    """A container or audio codec FFmpeg knows but we do not decode (ondemand/decoders.py);
    the message names it."""

    code = "unsupported_format"


class UploadTooLarge(AudioError):
    code = "too_large"
    status = 413


class UnsupportedMediaType(AudioError):
    code = "unsupported_media_type"
    status = 415


class RequestTimeout(BadRequest):
    """The request body stalled for longer than `server.read_timeout_s`."""

    code = "request_timeout"
    status = 408


class RequestTooLarge(BadRequest):
    """The request line or a header line is longer than the HTTP parser accepts, or there are
    too many headers (aiohttp refuses these before any handler runs)."""

    code = "request_too_large"


class Unauthorized(OndemandError):
    code = "unauthorized"
    status = 401


class Forbidden(OndemandError):
    """A valid token whose scopes do not cover the route (daemon/auth.py: jobs, read, admin)."""

    code = "forbidden"
    status = 403


class CallbackRefused(BadRequest):
    """A `callback_url` the daemon will not call: webhooks off, a scheme other than http(s),
    userinfo, or a host outside `webhooks.allowed_hosts` (daemon/webhooks.py)."""

    code = "callback_refused"


class TooManyRequests(OndemandError):
    """A token's `submits_per_minute` is used up; `retry_after_s` says when the next one fits."""

    code = "rate_limited"
    status = 429
    default_retry_after_s = 5.0


class TooManyPending(TooManyRequests):
    """A token already has its `max_pending` jobs queued or running."""

    code = "too_many_pending"


class NotFound(OndemandError):
    code = "not_found"
    status = 404


class JobNotFound(NotFound):
    """No such job (or it was purged after queue.retain_results_h)."""


class MethodNotAllowed(OndemandError):
    code = "method_not_allowed"
    status = 405


class JobConflict(OndemandError):
    """The job is not in a state that allows the request (e.g. cancelling a finished job)."""

    code = "conflict"
    status = 409


# -- the service cannot take it now ------------------------------------------------------------
class Unavailable(OndemandError):
    """Base of the 503s: retry after `retry_after_s`."""

    code = "unavailable"
    status = 503
    default_retry_after_s = 5.0


class QueueFull(Unavailable):
    code = "queue_full"


class ShuttingDown(Unavailable):
    code = "shutting_down"
    default_retry_after_s = 10.0


class WorkerUnavailable(Unavailable):
    """The worker cannot take work now (backing off after load failures, shutting down)."""

    code = "worker_unavailable"


class LoadFailed(WorkerUnavailable):
    code = "load_failed"


class ClusterUnavailable(WorkerUnavailable):
    """`cluster.backend = "ray"`: the Ray cluster cannot take work now (unreachable, or its
    Serve application not deployed yet); jobs stay queued (docs/cluster.md)."""

    code = "cluster_unavailable"


class StorageFull(OndemandError):
    """Spooling hit a full disk: nothing was queued."""

    code = "insufficient_storage"
    status = 507


class StorageUnavailable(Unavailable):
    """The job database fails while the daemon runs (corrupt, I/O error, read-only): nothing
    was changed; `/readyz` is 503 until it works again.  Details go to the log only."""

    code = "storage_unavailable"


# -- job failures (recorded on the job, never raised at a client) ------------------------------
class WorkerCrashed(OndemandError):
    """The worker process ended while a batch was in flight; its jobs may be retried."""

    code = "worker_crashed"


class NotLoaded(OndemandError):
    """The worker got a batch without a loaded model."""

    code = "not_loaded"


class AudioMissing(OndemandError):
    """The job's spooled audio is missing or unreadable in the worker."""

    code = "audio_missing"


class NonFiniteOutput(OndemandError):
    """The model's output for a clip holds NaN or infinite numbers (the worker checks every score
    and embedding before it answers): a result like that is never stored as `done` (issue 10)."""

    code = "non_finite_output"


class ProtocolError(InternalError):
    """A line on the worker pipe that is not the protocol (ondemand/protocol.py): malformed JSON,
    an unknown op or event, a missing or mistyped field.  A bug, or a `worker.command` that speaks
    another version; the daemon stops such a worker (`last_error` when it happens during load)."""

    code = "protocol_error"


def all_errors() -> list[type[OndemandError]]:
    """Every error class, base first (depth-first over subclasses)."""
    out: list[type[OndemandError]] = []

    def walk(cls: type[OndemandError]) -> None:
        out.append(cls)
        for sub in cls.__subclasses__():
            walk(sub)

    walk(OndemandError)
    return out


def by_code() -> dict[str, type[OndemandError]]:
    """code -> class; the most general class wins when subclasses share a code."""
    table: dict[str, type[OndemandError]] = {}
    for cls in all_errors()[1:]:  # InternalError, not the base, answers for "internal"
        table.setdefault(cls.code, cls)
    return table


def from_code(code: str, message: str) -> OndemandError:
    """Rebuild an error that crossed a process boundary as its code; unknown codes are internal."""
    cls = by_code().get(code, InternalError)
    return cls(message)


def for_status(status: int) -> type[OndemandError]:
    """The canonical class for an HTTP status (for errors aiohttp raises itself)."""
    for cls in all_errors():
        if cls.status == status:
            return cls
    return InternalError


# -- client side -------------------------------------------------------------------------------
class DaemonUnreachable(OndemandError):
    """A client could not reach the daemon at all."""

    code = "unreachable"


class RemoteError(OndemandError):
    """An error answer from the daemon, as a client sees it: the server's code and HTTP status
    travel as data (`remote_code`, `http_status`), the class stays one code."""

    code = "remote"

    def __init__(self, message: str, *, remote_code: str, http_status: int) -> None:
        super().__init__(message)
        self.remote_code = remote_code
        self.http_status = http_status

"""Configuration: one frozen dataclass tree, loaded from TOML once and validated with key paths.

Every section is a frozen dataclass; a field's `metadata["check"]` validates its value and returns
an error text (or None).  Unknown keys and wrong types are errors that name the key path, e.g.
`worker.unload_after_s: must be -1 (never) or >= 0, got -3`.  No side effects while loading.
Documentation for every key lives next to it in the repository's `config.toml`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ondemand.errors import ConfigError
from ondemand.prewarm.rules import PrewarmRule, build_rules

Check = Callable[[Any], str | None]
T = TypeVar("T")

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
DTYPES = ("float32", "bfloat16", "float16", "int8")
# ondemand.audio's MAX_DECODE_MB and SAMPLE_RATE, without importing soundfile into every command
# (tests/test_config_validation.py checks they agree).
MAX_DECODE_MB = 512.0
SAMPLE_RATE = 16000
WEBHOOK_SECRET_ENV = "ONDEMAND_WEBHOOK_SECRET"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


def _setting(default: Any, check: Check | None = None) -> Any:
    return field(default=default, metadata={"check": check} if check else {})


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def sentinel_seconds(v: float) -> str | None:
    """0 = at once, -1 = never, otherwise a positive number of seconds."""
    return None if v == -1 or v >= 0 else f"must be -1 (never) or >= 0, got {v}"


def percent(v: float) -> str | None:
    return None if 0 < v <= 100 else f"must be in (0, 100], got {v}"


def at_least_one(v: float) -> str | None:
    return None if v >= 1 else f"must be >= 1, got {v}"


def port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a TCP port 0..65535, got {v}"


def device(v: str) -> str | None:
    if v in ("auto", "cpu", "cuda"):
        return None
    if v.startswith("cuda:") and v[5:].isdigit():
        return None
    return f"must be one of {DEVICES_HELP}, got {v!r}"


def dtype(v: str) -> str | None:
    return None if v in DTYPES else f"must be one of {', '.join(DTYPES)}, got {v!r}"


def one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"

    return check


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _setting(8321, port)
    token: str = ""  # empty: ONDEMAND_TOKEN from the environment, else no auth
    # Largest upload, MiB; the body is streamed to storage.dir/incoming, never held in memory.
    # 640 fits an hour of CD-quality WAV (44.1 kHz, 16-bit stereo: 606 MiB).
    max_upload_mb: float = _setting(640.0, positive)
    allow_insecure_bind: bool = False
    stop_timeout_s: float = _setting(60.0, positive)
    max_wait_s: float = _setting(60.0, non_negative)  # cap for ?wait= long-polls and /recognize
    # Seconds an upload's body may stall (no bytes arriving) before 408 and a closed connection;
    # also how long an idle or half-sent connection is kept (aiohttp's keep-alive timeout).
    read_timeout_s: float = _setting(30.0, positive)
    # Uploads decoded at once; the rest wait their turn.  Bounds the front end's decode memory.
    max_concurrent_decodes: int = _setting(2, positive)
    # Upload bodies held at once (being received into storage.dir/incoming, or waiting for their
    # decode), MiB: a disk budget; each body in memory is one 1 MiB write buffer at most.
    max_buffered_uploads_mb: float = _setting(1280.0, positive)

    def cross_check(self) -> tuple[str, str] | None:
        if self.max_buffered_uploads_mb < self.max_upload_mb:
            return "max_buffered_uploads_mb", (
                f"must be >= server.max_upload_mb ({self.max_upload_mb:g}), "
                f"got {self.max_buffered_uploads_mb:g}")
        return None


@dataclass(frozen=True)
class ModelConfig:
    id: str = "iic/emotion2vec_plus_large"
    revision: str = "master"
    path: str = ""  # a local model directory; wins over id
    cache_dir: str = ""  # empty: ModelScope's default (MODELSCOPE_CACHE or ~/.cache/modelscope)

    @property
    def spec(self) -> str:
        """What to resolve: the local path when set, else the ModelScope id."""
        return self.path or self.id


@dataclass(frozen=True)
class AudioConfig:
    # Longest recording classified whole (segments=none): attention over a clip grows
    # quadratically with its length.
    max_seconds: float = _setting(120.0, positive)
    min_seconds: float = _setting(0.025, non_negative)  # 400 samples at 16 kHz
    # Source samples x channels x 8 bytes (float64) an upload of max_seconds may hold: the
    # decode's cost.  A segmented upload gets the same per second: x max_segmented_seconds /
    # max_seconds.
    max_decode_mb: float = _setting(MAX_DECODE_MB, positive)
    # Longest recording with segments=vad or fixed (a timeline; memory follows the batch).
    max_segmented_seconds: float = _setting(4 * 3600.0, positive)

    def decode_mb(self, segmented: bool) -> float:
        """The source-sample budget of one upload (max_decode_mb, scaled for segmented ones)."""
        if not segmented:
            return self.max_decode_mb
        return self.max_decode_mb * self.max_segmented_seconds / self.max_seconds

    def cross_check(self) -> tuple[str, str] | None:
        if self.min_seconds >= self.max_seconds:
            return "min_seconds", (f"must be < audio.max_seconds ({self.max_seconds:g}), "
                                   f"got {self.min_seconds:g}")
        if self.max_segmented_seconds < self.max_seconds:
            return "max_segmented_seconds", (
                f"must be >= audio.max_seconds ({self.max_seconds:g}), "
                f"got {self.max_segmented_seconds:g}")
        floor_mb = self.max_seconds * SAMPLE_RATE * 8 / 2**20
        if self.max_decode_mb < floor_mb:
            return "max_decode_mb", (
                f"must be >= {floor_mb:.3g} (a 16 kHz mono clip of audio.max_seconds), "
                f"got {self.max_decode_mb:g}")
        return None


def unit_interval(v: float) -> str | None:
    return None if 0 < v < 1 else f"must be in (0, 1), got {v}"


@dataclass(frozen=True)
class SegmentsConfig:
    """Timelines of long recordings: segments=vad and segments=fixed (ondemand/segments.py,
    docs/recordings.md)."""

    # Silero VAD speech probability at which speech starts (it ends below this - 0.15).
    vad_threshold: float = _setting(0.5, unit_interval)
    # Speech bursts shorter than this (after merging) are dropped, seconds.
    min_speech_s: float = _setting(0.25, non_negative)
    # Pauses shorter than this join the speech around them into one segment, seconds.
    merge_pause_s: float = _setting(0.5, non_negative)
    # Longest segment (VAD segments are split at their quietest point; fixed windows may not
    # exceed it), seconds; also bounds the attention cost per segment.
    max_segment_s: float = _setting(15.0, positive)
    # Speech padding added at each side of a VAD segment (never across into the next), seconds.
    pad_s: float = _setting(0.05, non_negative)
    # segments=fixed defaults: windows of window_s every hop_s seconds.
    window_s: float = _setting(3.0, positive)
    hop_s: float = _setting(1.0, positive)

    def cross_check(self) -> tuple[str, str] | None:
        if self.max_segment_s < 0.5:
            return "max_segment_s", f"must be >= 0.5, got {self.max_segment_s:g}"
        if self.window_s > self.max_segment_s:
            return "window_s", (f"must be <= segments.max_segment_s ({self.max_segment_s:g}), "
                                f"got {self.window_s:g}")
        return None


@dataclass(frozen=True)
class WorkerConfig:
    device: str = _setting("auto", device)
    dtype: str = _setting("float32", dtype)
    load_timeout_s: float = _setting(300.0, positive)
    # The idle ladder (docs/ladder.md).  With standby on, the exit rung costs a sub-second
    # activation and no GPU memory, so the in-process unload (CUDA context kept) is skipped by
    # default: it holds the GPU for a reload that is no faster than an activation.
    unload_after_s: float = _setting(-1.0, sentinel_seconds)
    exit_after_s: float = _setting(120.0, sentinel_seconds)
    stop_timeout_s: float = _setting(10.0, positive)
    batch_audio_s: float = _setting(
        0.0, non_negative
    )  # padded-audio budget; 0 = per-device default
    max_load_failures: int = _setting(3, positive)
    load_backoff_s: float = _setting(30.0, non_negative)
    command: str = ""  # empty: `<this python> -m ondemand.worker`; else a shell-style command line
    release_timeout_s: float = _setting(5.0, non_negative)  # wait for GPU memory after exit
    # Liveness of a busy worker (daemon/supervisor.py): it beats every heartbeat_s while on a
    # batch, from a thread; silent for heartbeat_timeout_s = hung, SIGKILLed, batch retried.
    heartbeat_s: float = _setting(2.0, positive)
    heartbeat_timeout_s: float = _setting(30.0, positive)
    # A batch may run max(batch_deadline_min_s, batch_deadline_factor x its audio seconds /
    # the measured speed); past that it is stuck: SIGKILLed, batch retried.
    batch_deadline_min_s: float = _setting(120.0, positive)
    batch_deadline_factor: float = _setting(10.0, at_least_one)
    batch_default_speed: float = _setting(1.0, positive)  # audio s per s before any measurement
    # Standby (docs/ladder.md): after an exit (and at start-up) keep one worker process that has
    # imported torch and read the weights into host memory but never initialised CUDA: no GPU
    # memory at all, and the next load skips the interpreter, the imports and the weights.
    standby: bool = True
    # Stepping aside (docs/ladder.md, "Stepping aside"): watch the GPU through NVML; when other
    # processes leave less than yield_free_below_mb free, finish the batch and go to standby;
    # loads wait (state `yielded`) until free memory minus the model's need has stayed at least
    # yield_resume_free_mb for yield_settle_s.  No effect without NVML or on device cpu.
    yield_gpu: bool = False
    yield_free_below_mb: float = _setting(1024.0, non_negative)
    yield_resume_free_mb: float = _setting(2048.0, non_negative)
    yield_settle_s: float = _setting(10.0, non_negative)
    yield_poll_s: float = _setting(0.5, positive)
    # Added to the weights' bytes for the model's need on the GPU (CUDA context, workspace,
    # activations of a batch).
    yield_need_margin_mb: float = _setting(2048.0, non_negative)

    def cross_check(self) -> tuple[str, str] | None:
        if self.heartbeat_timeout_s < 2 * self.heartbeat_s:
            return "heartbeat_timeout_s", (
                f"must be >= 2 x worker.heartbeat_s ({2 * self.heartbeat_s:g}): one late beat "
                f"must not kill a busy worker, got {self.heartbeat_timeout_s:g}")
        if self.yield_resume_free_mb <= self.yield_free_below_mb:
            return "yield_resume_free_mb", (
                f"must be > worker.yield_free_below_mb ({self.yield_free_below_mb:g}): the gap "
                f"is the hysteresis that stops flapping, got {self.yield_resume_free_mb:g}")
        return None


@dataclass(frozen=True)
class QueueConfig:
    max_pending: int = _setting(1000, positive)
    max_attempts: int = _setting(3, positive)
    retain_results_h: float = _setting(24.0, non_negative)
    purge_interval_s: float = _setting(600.0, positive)


@dataclass(frozen=True)
class StorageConfig:
    dir: str = "var"
    # A write to storage.dir that fails (full disk, I/O error) is retried after retry_min_s,
    # doubling up to retry_max_s, until it succeeds: nothing is acknowledged before it is durable.
    retry_min_s: float = _setting(0.5, positive)
    retry_max_s: float = _setting(30.0, positive)

    def cross_check(self) -> tuple[str, str] | None:
        if self.retry_max_s < self.retry_min_s:
            return "retry_max_s", (f"must be >= storage.retry_min_s ({self.retry_min_s:g}), "
                                   f"got {self.retry_max_s:g}")
        return None


@dataclass(frozen=True)
class CostConfig:
    """Idle-cost accounting (ondemand/ledger.py, cost.py, sampler.py; docs/cost.md)."""

    # Price of one GPU-hour, charged for every second a worker process of ours exists (its CUDA
    # context pins the GPU).  The default 1.0 makes every dollar figure read as GPU-hours.
    gpu_hour_usd: float = _setting(1.0, non_negative)
    energy_kwh_usd: float = _setting(0.0, non_negative)  # 0 = not set: no energy cost
    # Value you put on one cold start's wait (added to its GPU cost in the recommendation).
    cold_start_penalty_usd: float = _setting(0.0, non_negative)
    probe: str = _setting("auto", one_of("auto", "nvml", "psutil"))  # auto: NVML, else psutil
    sample_interval_s: float = _setting(5.0, positive)  # while a worker process is alive
    baseline_interval_s: float = _setting(300.0, non_negative)  # none alive; 0 = once per exit
    retain_days: float = _setting(400.0, non_negative)  # ledger rows kept; 0 = forever


@dataclass(frozen=True)
class PrewarmLeadConfig:
    """How early a `[[prewarm]]` fire starts loading so the model is ready *by* the fire time
    (ondemand/prewarm.py, prewarm_scheduler.py; docs/prewarm.md).
    lead = max(floor_s, factor x the `percentile` of the last `samples` load durations)."""

    floor_s: float = _setting(60.0, non_negative)  # also the lead while no load was measured
    samples: int = _setting(20, positive)  # recent loads (fresh and in-process) considered
    percentile: float = _setting(95.0, percent)  # nearest rank: the max until 20 samples
    factor: float = _setting(1.25, at_least_one)  # margin over the percentile


def _list_of_str(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings, got {value!r}")
    return tuple(value)


def build_allowed_hosts(value: Any, key: str) -> tuple[str, ...]:
    """`webhooks.allowed_hosts`: host names (`hooks.example.com`, `*.example.com`: its
    subdomains) or CIDR blocks (`10.20.0.0/16`, `192.0.2.7`, `2001:db8::/32`)."""
    hosts = _list_of_str(value, key)
    for i, h in enumerate(hosts, start=1):
        if not (_is_cidr(h) or HOST_NAME.fullmatch(h)):
            raise ConfigError(f"{key}[{i}]: must be a host name (hooks.example.com, "
                              f"*.example.com) or a CIDR block (10.0.0.0/8), got {h!r}")
    return hosts


def _is_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class WebhooksConfig:
    """Job callbacks (daemon/webhooks.py, docs/webhooks.md).  Off until both `secret` (or
    ONDEMAND_WEBHOOK_SECRET) and `allowed_hosts` are set."""

    secret: str = ""  # HMAC-SHA256 key; "" = $ONDEMAND_WEBHOOK_SECRET, else webhooks off
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={"build": build_allowed_hosts})
    max_attempts: int = _setting(12, positive)
    timeout_s: float = _setting(10.0, positive)  # one attempt, connect to last byte
    backoff_min_s: float = _setting(10.0, positive)  # doubling per failed attempt, jittered
    backoff_max_s: float = _setting(3600.0, positive)
    concurrency: int = _setting(4, positive)  # attempts in flight at once

    def cross_check(self) -> tuple[str, str] | None:
        if self.backoff_max_s < self.backoff_min_s:
            return "backoff_max_s", (f"must be >= webhooks.backoff_min_s "
                                     f"({self.backoff_min_s:g}), got {self.backoff_max_s:g}")
        return None

    def key(self) -> str:
        return self.secret or os.environ.get(WEBHOOK_SECRET_ENV, "")

    @property
    def enabled(self) -> bool:
        return bool(self.key() and self.allowed_hosts)


CLUSTER_BACKENDS = ("local", "ray")
AUDIO_TRANSPORTS = ("body", "path")


def non_negative_int(v: int) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


@dataclass(frozen=True)
class ClusterConfig:
    """Where batches run (ondemand/cluster/, docs/cluster.md): `local` = the one worker process
    the supervisor owns (the default); `ray` = a Ray Serve application whose replicas run the
    engine, scaled by Ray between min_replicas and max_replicas.  Read only when backend = "ray"
    (nothing imports ray otherwise)."""

    backend: str = _setting("local", one_of(*CLUSTER_BACKENDS))
    # The Ray cluster: "auto" (the one `ray start` runs on this machine), "HOST:PORT" of the head
    # (this machine must be a node of it), or "ray://HOST:10001" (Ray Client, from outside).
    address: str = "auto"
    app: str = _setting("ondemand", lambda v: None if v.replace("-", "").replace("_", "").isalnum()
                        else f"must be letters, digits, - and _, got {v!r}")
    serve_host: str = "127.0.0.1"  # where Ray Serve's HTTP proxy listens (first deploy wins)
    serve_port: int = _setting(8000, port)
    serve_url: str = ""  # where the front end posts batches; "" = http://127.0.0.1:serve_port
    min_replicas: int = _setting(0, non_negative_int)  # 0 = every GPU returns to zero when idle
    max_replicas: int = _setting(1, at_least_one)
    gpus_per_replica: float = _setting(1.0, non_negative)  # 0 = CPU-only replicas
    cpus_per_replica: float = _setting(1.0, non_negative)
    # Batches a replica takes at once (Serve's max_ongoing_requests and target_ongoing_requests);
    # the dispatcher keeps up to max_replicas x this many batches in flight.
    batches_per_replica: int = _setting(1, at_least_one)
    hold_replicas: int = _setting(1, at_least_one)  # replicas a prewarm or manual hold keeps
    audio_transport: str = _setting("body", one_of(*AUDIO_TRANSPORTS))  # path: shared storage.dir
    upscale_delay_s: float = _setting(2.0, non_negative)  # Serve's, beyond the 0 -> 1 fast path
    downscale_delay_s: float = _setting(60.0, non_negative)  # n -> n-1; 1 -> 0 is exit_after_s
    metrics_interval_s: float = _setting(1.0, positive)  # how often Serve's autoscaler hears load
    look_back_period_s: float = _setting(5.0, positive)  # the window it averages load over
    poll_s: float = _setting(1.0, positive)  # the agent's look at replicas and the deployment
    retry_s: float = _setting(5.0, positive)  # an unreachable cluster is tried again this often
    connect_timeout_s: float = _setting(60.0, positive)  # agent start -> application deployed

    def cross_check(self) -> tuple[str, str] | None:
        if self.max_replicas < self.min_replicas:
            return "max_replicas", (f"must be >= cluster.min_replicas ({self.min_replicas}), "
                                    f"got {self.max_replicas}")
        if self.look_back_period_s <= self.metrics_interval_s:
            return "look_back_period_s", (
                f"must be > cluster.metrics_interval_s ({self.metrics_interval_s:g}), "
                f"got {self.look_back_period_s:g}")
        return None

    @property
    def url(self) -> str:
        """The Serve application's route for batches."""
        base = self.serve_url.rstrip("/") or f"http://127.0.0.1:{self.serve_port}"
        return f"{base}/{self.app}"

    @property
    def device_type(self) -> str:
        """What the replicas run on: cuda with GPUs per replica, else cpu."""
        return "cuda" if self.gpus_per_replica > 0 else "cpu"


SCOPES = ("jobs", "read", "admin")
SERVER_TOKEN_NAME = "server"  # the owner name of jobs submitted with server.token
TOKEN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def token_name(v: str) -> str | None:
    if not v or len(v) > 64 or not set(v) <= TOKEN_NAME_CHARS:
        return f"must be 1-64 characters of A-Z a-z 0-9 _ . -, got {v!r}"
    if v == SERVER_TOKEN_NAME:
        return f"{v!r} is reserved for server.token"
    return None


def sha256_hex(v: str) -> str | None:
    if len(v) == 64 and set(v) <= set("0123456789abcdef"):
        return None
    return ("must be the 64 lowercase hex digits of the token's SHA-256 (`ondemand token create` "
            f"prints it), got {v!r}")


def build_scopes(value: Any, key: str) -> tuple[str, ...]:
    scopes = _list_of_str(value, key)
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError(f"{key}: must be a non-empty list of {', '.join(SCOPES)}, got {value!r}")
    return scopes


@dataclass(frozen=True)
class TokenConfig:
    """One `[[tokens]]` table (daemon/auth.py): a named bearer token, stored as its SHA-256."""

    name: str = _setting("", token_name)
    sha256: str = _setting("", sha256_hex)
    scopes: tuple[str, ...] = field(default=("jobs",), metadata={"build": build_scopes})
    max_pending: int = _setting(0, non_negative)  # jobs queued or running at once; 0 = no limit
    submits_per_minute: int = _setting(0, non_negative)  # 0 = no limit


def build_tokens(value: Any, key: str) -> tuple[TokenConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables ([[tokens]]), got {value!r}")
    out: list[TokenConfig] = []
    for i, item in enumerate(value, start=1):
        path = f"{key}[{i}]."
        if isinstance(item, Mapping):
            for required in ("name", "sha256"):
                if required not in item:
                    raise ConfigError(f"{path}{required}: missing")
        tok = build(TokenConfig, item, path)
        for earlier in out:
            if earlier.name == tok.name:
                raise ConfigError(f"{path}name: {tok.name!r} is used by another token")
            if earlier.sha256 == tok.sha256:
                raise ConfigError(f"{path}sha256: the same token as {earlier.name!r}")
        out.append(tok)
    return tuple(out)


@dataclass(frozen=True)
class ConsoleConfig:
    """The web console at `/` and its event stream `GET /v1/events` (docs/console.md)."""

    enabled: bool = True  # false: `/` answers 404 as before; the API (and /v1/events) stay
    events_heartbeat_s: float = _setting(15.0, positive)  # comment line on an idle stream
    events_buffer: int = _setting(1000, positive)  # recent events kept for Last-Event-ID resume


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    segments: SegmentsConfig = field(default_factory=SegmentsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    # `[[prewarm]]` tables, in file order; key paths count from 1 (`prewarm[1].cron`).
    prewarm: tuple[PrewarmRule, ...] = field(default=(), metadata={"build": build_rules})
    prewarm_lead: PrewarmLeadConfig = field(default_factory=PrewarmLeadConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    # `[[tokens]]` tables: named, scoped tokens (daemon/auth.py); `tokens[1].name` is the first.
    tokens: tuple[TokenConfig, ...] = field(default=(), metadata={"build": build_tokens})
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # docs/cluster.md

    def auth_token(self) -> str:
        return self.server.token or os.environ.get("ONDEMAND_TOKEN", "")

    def auth_required(self) -> bool:
        """Whether requests need a bearer token: server.token (or ONDEMAND_TOKEN) or any
        [[tokens]] is set."""
        return bool(self.auth_token() or self.tokens)


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def build(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`, validating every key; errors name the key path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or '<root>'}: must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{path}{key}: unknown key (known here: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, key = data[name], hints[name], f"{path}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(typing.cast(type, tp), value, f"{key}.")
            continue
        builder = f.metadata.get("build")
        if builder is not None:
            kwargs[name] = builder(value, key)
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{key}: must be {tp.__name__}, got {value!r}")
        if tp is float:
            value = float(value)
            if not math.isfinite(value):  # TOML has inf and nan; no setting means them
                raise ConfigError(f"{key}: must be a finite number, got {value} (where a key "
                                  "allows it, -1 means never)")
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
        kwargs[name] = value
    obj = cls(**kwargs)
    cross_check = getattr(obj, "cross_check", None)  # checks between a section's keys
    problem = cross_check() if cross_check is not None else None
    if problem is not None:
        raise ConfigError(f"{path}{problem[0]}: {problem[1]}")
    return obj


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate `path` (None: all defaults).  Raises ConfigError with the key path."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    return build(Config, data)


def default_config_path() -> Path | None:
    """ONDEMAND_CONFIG, else ./config.toml when present, else None (defaults)."""
    env = os.environ.get("ONDEMAND_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.is_file() else None


def with_model(cfg: Config, spec: str) -> Config:
    """`--model SPEC`: an existing directory sets model.path, anything else model.id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        model = dataclasses.replace(cfg.model, path=str(path.resolve()))
    else:
        model = dataclasses.replace(cfg.model, id=spec, path="")
    return dataclasses.replace(cfg, model=model)

"""Configuration: one frozen dataclass tree, loaded from TOML once and validated with key paths.

Every section is a frozen dataclass; a field's `metadata["check"]` validates its value and returns
an error text (or None).  Unknown keys and wrong types are errors that name the key path, e.g.
`worker.unload_after_s: must be -1 (never) or >= 0, got -3`.  No side effects while loading.
Documentation for every key lives next to it in the repository's `config.toml`.
"""

from __future__ import annotations

import dataclasses
import os
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
    max_upload_mb: float = _setting(50.0, positive)
    allow_insecure_bind: bool = False
    stop_timeout_s: float = _setting(60.0, positive)
    max_wait_s: float = _setting(60.0, non_negative)  # cap for ?wait= long-polls and /recognize


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
    max_seconds: float = _setting(120.0, positive)
    min_seconds: float = _setting(0.025, non_negative)  # 400 samples at 16 kHz


@dataclass(frozen=True)
class WorkerConfig:
    device: str = _setting("auto", device)
    dtype: str = _setting("float32", dtype)
    load_timeout_s: float = _setting(300.0, positive)
    unload_after_s: float = _setting(300.0, sentinel_seconds)
    exit_after_s: float = _setting(900.0, sentinel_seconds)
    stop_timeout_s: float = _setting(10.0, positive)
    batch_audio_s: float = _setting(
        0.0, non_negative
    )  # padded-audio budget; 0 = per-device default
    max_load_failures: int = _setting(3, positive)
    load_backoff_s: float = _setting(30.0, non_negative)
    command: str = ""  # empty: `<this python> -m ondemand.worker`; else a shell-style command line
    release_timeout_s: float = _setting(5.0, non_negative)  # wait for GPU memory after exit


@dataclass(frozen=True)
class QueueConfig:
    max_pending: int = _setting(1000, positive)
    max_attempts: int = _setting(3, positive)
    retain_results_h: float = _setting(24.0, non_negative)
    purge_interval_s: float = _setting(600.0, positive)


@dataclass(frozen=True)
class StorageConfig:
    dir: str = "var"


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
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    # `[[prewarm]]` tables, in file order; key paths count from 1 (`prewarm[1].cron`).
    prewarm: tuple[PrewarmRule, ...] = field(default=(), metadata={"build": build_rules})
    prewarm_lead: PrewarmLeadConfig = field(default_factory=PrewarmLeadConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)

    def auth_token(self) -> str:
        return self.server.token or os.environ.get("ONDEMAND_TOKEN", "")


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
        raise ConfigError(f"{path or '<root>'}: must be a table, got {type(data).__name__}")
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
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


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

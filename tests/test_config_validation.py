"""Configuration values a hostile or careless config.toml can hold (issue 10): non-finite numbers,
pairs that contradict each other, a section that is not a table.  Each error names its key path
and comes out of `ondemand serve` as one line, never a traceback."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from ondemand import audio
from ondemand import config as config_mod
from ondemand.errors import ConfigError
from tests.conftest import fake_env


def build(data: dict[str, Any]) -> config_mod.Config:
    return config_mod.build(config_mod.Config, data)


def float_keys() -> list[str]:
    """Every float setting of every section: each must refuse inf and nan."""
    keys = []
    for section in dataclasses.fields(config_mod.Config):
        cls = typing.get_type_hints(config_mod.Config)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                 if hints[f.name] is float]
    return keys


def test_every_section_has_float_keys_covered() -> None:
    keys = float_keys()
    for key in ("server.max_upload_mb", "server.read_timeout_s", "worker.unload_after_s",
                "worker.load_timeout_s", "audio.max_decode_mb", "cost.sample_interval_s",
                "prewarm_lead.factor"):
        assert key in keys


@pytest.mark.parametrize("key", float_keys())
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_everywhere(key: str, value: float) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        build({section: {name: value}})
    assert str(info.value).startswith(f"{key}: must be a finite number"), info.value


TABLE: list[tuple[dict[str, Any], str]] = [
    ({"server": 5}, r"^server: must be a table, got 5$"),
    ({"audio": "fast"}, r"^audio: must be a table, got 'fast'$"),
    ({"worker": [1, 2]}, r"^worker: must be a table, got \[1, 2\]$"),
    ({"audio": {"min_seconds": 500}},
     r"^audio\.min_seconds: must be < audio\.max_seconds \(120\), got 500$"),
    ({"audio": {"min_seconds": 5, "max_seconds": 5}}, r"^audio\.min_seconds: must be <"),
    ({"audio": {"max_seconds": 600, "max_decode_mb": 50}},
     r"^audio\.max_decode_mb: must be >= 73\.2 .*got 50$"),
    ({"audio": {"max_decode_mb": 0}}, r"^audio\.max_decode_mb: must be > 0"),
    ({"server": {"max_upload_mb": 0}}, r"^server\.max_upload_mb: must be > 0"),
    ({"server": {"max_upload_mb": -1}}, r"^server\.max_upload_mb: must be > 0"),
    ({"server": {"read_timeout_s": 0}}, r"^server\.read_timeout_s: must be > 0"),
    ({"server": {"read_timeout_s": -1}}, r"^server\.read_timeout_s: must be > 0"),
    ({"server": {"max_concurrent_decodes": 0}}, r"^server\.max_concurrent_decodes: must be > 0"),
    ({"server": {"max_upload_mb": 2000}},
     r"^server\.max_buffered_uploads_mb: must be >= server\.max_upload_mb \(2000\), got 1280$"),
    ({"audio": {"max_segmented_seconds": 60}},
     r"^audio\.max_segmented_seconds: must be >= audio\.max_seconds \(120\), got 60$"),
    ({"segments": {"vad_threshold": 1.0}}, r"^segments\.vad_threshold: must be in \(0, 1\)"),
    ({"segments": {"window_s": 20}},
     r"^segments\.window_s: must be <= segments\.max_segment_s \(15\), got 20$"),
    ({"segments": {"max_segment_s": 0.2}}, r"^segments\.max_segment_s: must be >= 0\.5"),
    ({"server": {"max_concurrent_decodes": 1.5}},
     r"^server\.max_concurrent_decodes: must be int"),
    ({"server": {"max_concurrent_decodes": True}},
     r"^server\.max_concurrent_decodes: must be int"),
]


@pytest.mark.parametrize(("data", "message"), TABLE)
def test_bad_values_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(data)


@pytest.mark.parametrize("data", [
    {"audio": {"min_seconds": 0, "max_seconds": 0.5}},
    {"audio": {"max_seconds": 600, "max_decode_mb": 73.3}},
    {"worker": {"unload_after_s": -1, "exit_after_s": 0}},  # exit first: documented, not an error
    {"server": {"read_timeout_s": 0.5, "max_concurrent_decodes": 64}},
])
def test_sensible_values_pass(data: dict[str, Any]) -> None:
    build(data)


def test_defaults_agree_with_the_audio_module() -> None:
    """config.py repeats two audio constants to keep soundfile out of every command's imports."""
    assert config_mod.MAX_DECODE_MB == audio.MAX_DECODE_MB
    assert config_mod.AudioConfig().max_decode_mb == audio.MAX_DECODE_MB
    assert config_mod.SAMPLE_RATE == audio.SAMPLE_RATE


@pytest.mark.parametrize(("toml", "key"), [
    ("[server]\nmax_upload_mb = inf\n", "server.max_upload_mb"),
    ("[worker]\nload_timeout_s = nan\n", "worker.load_timeout_s"),
    ("[audio]\nmin_seconds = 500.0\n", "audio.min_seconds"),
    ("server = 5\n", "server"),
])
def test_serve_reports_a_bad_config_in_one_line(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml + f'[storage]\ndir = "{tmp_path / "var"}"\n')
    out = subprocess.run([sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=fake_env())
    assert out.returncode == 2, out.stderr
    assert f"{key}:" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "serving on" not in out.stderr

"""config.toml documents every daemon key with its default; the daemon's keys validate."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from ondemand import config as config_mod
from ondemand.durations import parse_duration
from ondemand.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"server": config_mod.ServerConfig, "model": config_mod.ModelConfig,
            "audio": config_mod.AudioConfig, "worker": config_mod.WorkerConfig,
            "queue": config_mod.QueueConfig, "storage": config_mod.StorageConfig}


def test_config_toml_lists_every_daemon_key_with_its_default() -> None:
    data = tomllib.loads((ROOT / "config.toml").read_text())
    config_mod.build(config_mod.Config, data)  # valid as shipped
    for name, cls in SECTIONS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert data[name] == defaults, name


@pytest.mark.parametrize(("key", "value"), [
    ("worker.unload_after_s", -3), ("worker.exit_after_s", -2), ("queue.max_pending", 0),
    ("worker.command", 3), ("queue.purge_interval_s", 0), ("server.max_wait_s", -1),
])
def test_bad_values_name_the_key(key: str, value: object) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_mod.build(config_mod.Config, {section: {name: value}})


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert parse_duration("9h") == 32400 and parse_duration("1h30m") == 5400
    with pytest.raises(ValueError):
        parse_duration("soon")

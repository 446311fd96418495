"""One duration grammar everywhere: config holds, `load --hold`, `cost --since`, `/v1/cost`."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from ondemand.cost import report
from ondemand.cost.ledger import Ledger
from ondemand.durations import parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("9h", 32400), ("1h30m", 5400), ("1d2h", 93600),
    ("2w", 14 * 86400), ("1.5h", 5400), (600, 600),
])
def test_forms(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "9", "h", "9 hours", "0s", "-1h", 0, True, "1m1h",
                                 float("inf"), float("nan")])
def test_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_cost_since_takes_the_same_grammar() -> None:
    now = 1_700_000_000.0
    assert report.parse_when("1h30m", now) == now - 5400
    assert report.parse_when("3600", now) == 3600.0  # a bare number is a Unix time here


def test_cost_cli_since_compound_duration(tmp_path: Path) -> None:
    Ledger.in_dir(tmp_path).close_db()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path}"\n')
    out = subprocess.run([sys.executable, "-m", "ondemand", "cost", "--config", str(cfg),
                          "--since", "1h30m", "--format", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    period = doc["periods"][0]
    since = datetime.fromisoformat(period["since"].replace("Z", "+00:00"))
    until = datetime.fromisoformat(period["until"].replace("Z", "+00:00"))
    assert (until - since).total_seconds() == pytest.approx(5400, abs=1)

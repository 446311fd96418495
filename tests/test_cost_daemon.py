"""Cost accounting end to end: the real front end, a real worker subprocess, /v1/cost, /metrics,
`ondemand cost`; the ledger survives a restart; scrapes and health checks are never activity."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ondemand.daemon.events import StateChanged, WorkerActivity
from tests import golden
from tests.conftest import Daemon, daemon_config, fake_env, wait_for, wav_bytes

RATE = 3600.0  # $ per GPU-hour: one dollar per second keeps the arithmetic readable


def metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError((name, labels))


def times(d: Daemon) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for e in d.events:
        if isinstance(e, StateChanged):
            out.setdefault(e.new, []).append(e.time)
    return out


async def get_json(d: Daemon, path: str, **params: str) -> Any:
    async with d.http.get(path, params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_cold_start_idle_ladder_cost_and_metrics(tmp_path: Path) -> None:
    cfg = daemon_config(
        tmp_path,
        worker={"unload_after_s": 0.4, "exit_after_s": 0.8},
        cost={"gpu_hour_usd": RATE, "sample_interval_s": 0.05, "baseline_interval_s": 0},
    )

    async def main() -> tuple[dict[str, list[float]], dict[int, list[float]], Any, str]:
        async with Daemon(cfg, env=fake_env(load_s="0.3")) as d:
            job = await d.final((await d.submit(wav_bytes(1.0), key="a"))["id"])
            assert job["status"] == "done"
            # Scrape and health-check hard while the idle ladder runs: the worker must still
            # unload and exit on time (scrapes and health checks are not activity).
            async def scraped_until_cold() -> bool:
                async with d.http.get("/metrics") as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                async with d.http.get("/healthz") as r:
                    assert r.status == 200
                return d.sup.state.value == "cold"

            await wait_for(scraped_until_cold, 20, "the worker back to zero under scrapes")
            t = times(d)
            activity: dict[int, list[float]] = {}  # in-flight count -> times it was reached
            for e in d.events:
                if isinstance(e, WorkerActivity):
                    activity.setdefault(e.inflight, []).append(e.time)
            doc = await get_json(d, "/v1/cost", since="1h")
            async with d.http.get("/metrics") as r:
                text = await r.text()
            async with d.http.get("/v1/cost", params={"since": "yesterday-ish"}) as r:
                assert r.status == 400
                assert "duration" in (await r.json())["error"]["message"]
        return t, activity, doc, text

    t, activity, doc, text = asyncio.run(main())
    (p,) = doc["periods"]
    hours = p["hours"]
    # The ledger's seconds are the supervisor's transition times, exactly.
    loaded = t["unloading"][0] - t["starting"][0]
    alive = t["cold"][0] - t["starting"][0]
    loading = t["ready"][0] - t["starting"][0]
    unloaded = t["cold"][0] - t["unloading"][0]
    assert hours["loaded"] * 3600 == pytest.approx(loaded, abs=1e-6)
    assert hours["gpu_held"] * 3600 == pytest.approx(alive, abs=1e-6)
    assert hours["loading"] * 3600 == pytest.approx(loading, abs=1e-6)
    assert hours["unloaded_alive"] * 3600 == pytest.approx(unloaded, abs=1e-6)
    assert loading >= 0.3  # the fake load time
    # Idle-warm, exactly: ready until the job's batch began, and the job's end to the unload,
    # which came no sooner than unload_after_s after it.
    (busy_from,), (idle_from,) = activity[1], activity[0]
    idle_tail = t["unloading"][0] - idle_from
    assert p["idle_warm_hours"]["idle_timeout"] * 3600 == pytest.approx(
        busy_from - t["ready"][0] + idle_tail, abs=1e-6)
    assert idle_tail >= 0.4 - 2e-3  # (1 ms: the supervisor's timer tolerance; wall vs monotonic)
    assert p["idle_warm_hours"]["idle_timeout"] == p["idle_warm_hours"]["total"]
    assert hours["ready_busy"] > 0
    assert p["cold_starts"]["by_trigger"]["job"]["count"] == 1
    assert p["cold_starts"]["by_kind"]["spawn"]["seconds"] == pytest.approx(loading, abs=1e-6)
    # Money: on-demand bills the alive seconds; always-on every covered second.
    c = p["cost"]
    assert c["on_demand_usd"] == pytest.approx(alive, abs=1e-6)
    assert c["always_on_usd"] == pytest.approx(p["covered_hours"] * RATE, rel=1e-9)
    assert c["savings_usd"] == pytest.approx(c["always_on_usd"] - c["on_demand_usd"])
    assert 0 < c["savings_pct"] < 100
    idle_s = p["idle_warm_hours"]["total"] * 3600 + unloaded
    assert c["idle_usd"] == pytest.approx(idle_s, abs=1e-6)
    assert doc["probe"] == {"name": "psutil", "fallback": True, "reason": None}
    assert doc["recommendation"]["status"] == "insufficient_data"  # one job: no gaps yet

    assert metric(text, "ondemand_cold_starts_total", trigger="job") == 1
    assert metric(text, "ondemand_jobs_total", status="done") == 1
    assert metric(text, "ondemand_model_load_seconds_count") == 1
    assert metric(text, "ondemand_worker_state", state="cold") == 1
    assert metric(text, "ondemand_worker_state", state="ready") == 0
    assert metric(text, "ondemand_jobs_queued") == 0
    assert metric(text, "ondemand_idle_cost_dollars_total") == pytest.approx(idle_s, abs=1e-6)
    assert "ondemand_gpu_power_watts{" not in text  # psutil fallback: no GPU figures


def test_ledger_survives_restart_and_cli_reads_it(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, worker={"unload_after_s": -1, "exit_after_s": 0.2},
                        cost={"gpu_hour_usd": RATE})

    async def session() -> float:
        async with Daemon(cfg) as d:
            assert (await d.final((await d.submit(wav_bytes(0.5)))["id"]))["status"] == "done"
            await d.wait_state("cold")
            t = times(d)
            return t["cold"][0] - t["starting"][0]

    alive = asyncio.run(session()) + asyncio.run(session())
    (tmp_path / "config.toml").write_text(
        f'[storage]\ndir = "{tmp_path}"\n[cost]\ngpu_hour_usd = {RATE}\n'
    )
    run = [sys.executable, "-m", "ondemand", "cost", "--config", str(tmp_path / "config.toml")]
    out = subprocess.run([*run, "--format", "json", "--since", "1h"], capture_output=True,
                         text=True, timeout=60, check=True)
    (p,) = json.loads(out.stdout)["periods"]
    assert p["cold_starts"]["count"] == 2
    assert p["hours"]["gpu_held"] * 3600 == pytest.approx(alive, abs=1e-6)
    assert p["cost"]["on_demand_usd"] == pytest.approx(alive, abs=1e-6)
    table = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "last 24 h" in table and "always-on cost" in table and "savings" in table
    csv_out = subprocess.run([*run, "--format", "csv", "--since", "2d"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
    assert csv_out[0].startswith("period,day,covered_h") and len(csv_out) in (3, 4)


def test_tiny_model_real_worker_loaded_seconds(tmp_path: Path) -> None:
    """The real worker on the golden tiny model (CPU): the report's loaded seconds are the
    worker's, and the savings are what was not spent keeping it loaded."""
    cfg = daemon_config(
        tmp_path,
        model={"path": str(golden.MODEL)},
        worker={"device": "cpu", "load_timeout_s": 60.0, "unload_after_s": 0.3,
                "exit_after_s": 0.6},
        cost={"gpu_hour_usd": RATE, "sample_interval_s": 0.1},
    )

    async def main() -> tuple[dict[str, list[float]], Any]:
        async with Daemon(cfg, worker_cmd=[sys.executable, "-m", "ondemand.worker"],
                          env=fake_env()) as d:
            audio = (golden.AUDIO / "short_16k.wav").read_bytes()
            assert (await d.final((await d.submit(audio))["id"], timeout=60))["status"] == "done"
            await wait_for(lambda: d.sup.state.value == "cold", 20, "worker exit")
            return times(d), await get_json(d, "/v1/cost", since="1h")

    t, doc = asyncio.run(main())
    (p,) = doc["periods"]
    loaded = t["unloading"][0] - t["starting"][0]
    alive = t["cold"][0] - t["starting"][0]
    assert p["hours"]["loaded"] * 3600 == pytest.approx(loaded, abs=1e-6)
    assert p["cost"]["on_demand_usd"] == pytest.approx(alive, abs=1e-6)
    assert p["cost"]["savings_usd"] == pytest.approx(p["covered_hours"] * RATE - alive, abs=1e-6)
    assert p["cold_starts"]["by_trigger"]["job"]["seconds"] == pytest.approx(
        t["ready"][0] - t["starting"][0], abs=1e-6
    )

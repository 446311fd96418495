"""Cost sampler overhead: what the front end pays for sampling the worker (and the reports).

    .venv/bin/python bench/sampler_bench.py [--seconds 20] [--interval 0.05] [--probe auto]

Measures, in this process (the front end's role):
1. per-sample cost: the probe alone, and the whole reading path (probe + ledger UPDATE/commit in
   SQLite WAL + metrics), over many samples of a live "worker" child process;
2. front-end CPU while sampling on the real timer at `--interval` for `--seconds`, minus the same
   event loop idling without the sampler; then the CPU share at the default interval (5 s)
   extrapolated from the per-sample cost;
3. `/metrics` exposition and a `/v1/cost` document over 30 days of synthetic intervals.

Without NVML (no GPU) the probe is the psutil fallback (RSS + CPU time); with NVML it reads GPU
memory, power, energy, utilisation and P-state as well.  Writes bench/out/sampler_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ondemand.config import CostConfig, WorkerConfig
from ondemand.cost import report as cost
from ondemand.cost.ledger import IdleCause, Ledger, Phase, Trigger, connect, read_intervals
from ondemand.cost.metrics import Metrics
from ondemand.cost.sampler import Reading, Sampler
from ondemand.gpu import open_probe

STATES = ["cold", "starting", "loading", "ready", "unloading", "unloaded", "stopping", "backoff"]


def cpu() -> float:
    return time.process_time()


def per_sample(probe: Any, pid: int, ledger: Ledger, metrics: Metrics, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    for _ in range(n):
        probe.sample([pid], 0)
    probe_us = (time.perf_counter() - t0) / n * 1e6

    def sink(r: Reading) -> None:
        ledger.add_sample(r.at, energy_j=r.energy_j, power_s=r.power_s,
                          rss=r.sample.rss_bytes, cpu_s=r.cpu_s)
        metrics.reading(r)

    s = Sampler(probe, sink, interval_s=3600, baseline_interval_s=0)
    s._phase, s._pids, s._gpu = Phase.READY_IDLE, (pid,), 0  # no loop needed for sample_now
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(n):
        s.sample_now()
    wall = (time.perf_counter() - t0) / n * 1e6
    return {"probe_us": probe_us, "reading_us": wall, "reading_cpu_us": (cpu() - c0) / n * 1e6}


async def timed_loop(seconds: float, sampler: Sampler | None, pid: int) -> tuple[float, int]:
    """CPU seconds this process used over `seconds` of an event loop, with or without sampling."""
    if sampler is not None:
        sampler.start(Phase.READY_IDLE, (pid,), 0)
    c0 = cpu()
    await asyncio.sleep(seconds)
    used = cpu() - c0
    n = 0
    if sampler is not None:
        sampler.stop()
        n = sampler.samples
    return used, n


def synthetic_month(path: Path, now: float) -> int:
    random.seed(7)
    lg = Ledger(path, clock=lambda: now)
    t = now - 30 * cost.DAY_S
    lg.record(Phase.EXITED, at=t)
    n = 1
    while t < now - 7200:
        t += random.expovariate(1 / 600)
        lg.record(Phase.LOADING, at=t, trigger=Trigger.JOB, gpu=0, pid=1)
        lg.record(Phase.READY_BUSY, at=t + 6, trigger=Trigger.JOB, gpu=0, pid=1)
        lg.record(Phase.READY_IDLE, at=t + 30, trigger=Trigger.JOB, gpu=0, pid=1,
                  idle_cause=IdleCause.IDLE_TIMEOUT)
        lg.record(Phase.EXITED, at=t + 330, gpu=0)
        t += 330
        n += 4
    lg.close(now)
    lg.close_db()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each timed loop")
    ap.add_argument("--interval", type=float, default=0.05, help="sampling interval measured")
    ap.add_argument("--samples", type=int, default=2000, help="samples for the per-sample cost")
    ap.add_argument("--probe", default="auto", choices=["auto", "nvml", "psutil"])
    ap.add_argument("--out", type=Path, default=Path("bench/out/sampler_bench.json"))
    args = ap.parse_args()

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    probe = open_probe(args.probe)
    tmp = Path(tempfile.mkdtemp(prefix="sampler-bench-"))
    try:
        ledger = Ledger(tmp / "cost.sqlite3")
        ledger.record(Phase.READY_IDLE, trigger=Trigger.JOB, gpu=0, pid=child.pid,
                      idle_cause=IdleCause.IDLE_TIMEOUT)
        metrics = Metrics(STATES, gpu_hour_usd=1.0)
        costs = per_sample(probe, child.pid, ledger, metrics, args.samples)

        def sink(r: Reading) -> None:
            ledger.add_sample(r.at, energy_j=r.energy_j, power_s=r.power_s,
                              rss=r.sample.rss_bytes, cpu_s=r.cpu_s)
            metrics.reading(r)

        idle_cpu, _ = asyncio.run(timed_loop(args.seconds, None, child.pid))
        sampler = Sampler(probe, sink, interval_s=args.interval, baseline_interval_s=0)
        busy_cpu, n = asyncio.run(timed_loop(args.seconds, sampler, child.pid))
        extra = max(0.0, busy_cpu - idle_cpu)
        per = extra / max(1, n)
        default = CostConfig().sample_interval_s

        t0 = time.perf_counter()
        for _ in range(200):
            metrics.exposition()
        expo_ms = (time.perf_counter() - t0) / 200 * 1e3

        now = time.time()
        n_iv = synthetic_month(tmp / "month.sqlite3", now)
        conn = connect(tmp / "month.sqlite3", readonly=True)
        t0 = time.perf_counter()
        doc = cost.document(lambda lo, hi: read_intervals(conn, lo, hi), now, CostConfig(),
                            WorkerConfig())
        doc_ms = (time.perf_counter() - t0) * 1e3
        conn.close()
        ledger.close_db()
    finally:
        child.kill()
        child.wait()
        probe.close()

    result = {
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": os.cpu_count()},
        "probe": probe.name,
        "probe_fallback": probe.fallback,
        "per_sample": costs,
        "timed": {"seconds": args.seconds, "interval_s": args.interval, "samples": n,
                  "cpu_idle_loop_s": idle_cpu, "cpu_sampling_s": busy_cpu,
                  "cpu_per_sample_us": per * 1e6,
                  "cpu_pct_at_interval": 100 * extra / args.seconds},
        # From the timed loop's per-sample CPU (timer wake-up, cold caches and the SQLite
        # commit included), not the tight loop's, which flatters it ~10x.
        "cpu_pct_at_default_interval": 100 * per / default,
        "default_interval_s": default,
        "metrics_exposition_ms": expo_ms,
        "cost_document_30d": {"intervals": n_iv, "ms": doc_ms,
                              "recommendation": doc["recommendation"]["status"]},
        "ledger_bytes_per_interval": (tmp / "month.sqlite3").stat().st_size / n_iv,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\nsummary: probe={probe.name} reading={costs['reading_us']:.0f} us "
          f"(probe {costs['probe_us']:.0f} us); sampling every {args.interval}s "
          f"cost {result['timed']['cpu_pct_at_interval']:.2f}% CPU; at the default "
          f"{default}s: {result['cpu_pct_at_default_interval']:.4f}% CPU", file=sys.stderr)


if __name__ == "__main__":
    main()

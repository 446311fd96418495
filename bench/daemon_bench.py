"""Daemon benchmark: cold start (broken down), reactivation, warm latency, throughput,
submissions per second and front-end RSS, against `ondemand serve` subprocesses.

    .venv/bin/python bench/daemon_bench.py [--model bench/models/plus_large] [--clips 200]
        [--submissions 2000] [--out bench/out/daemon.json]

The model directory is created with `ondemand make-test-model DIR --preset plus_large` when it
does not exist (random weights: the timings are real, the predictions meaningless).
Submissions/s is measured against a second daemon whose worker never finishes loading (the fake
worker from tests/), so it counts only what the front end does: upload, decode, spool with fsync,
group-committed insert, 202.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import soundfile as sf
from harness import start_serve  # bench/harness.py

from ondemand.client import Client

ROOT = Path(__file__).resolve().parents[1]
ENGINE_CHILD = r"""
import sys, time
t0 = float(sys.argv[3])
from ondemand.audio import decode
from ondemand.model.engine import Clip, Engine
eng = Engine.load(sys.argv[1], device="cpu")
d = decode(sys.argv[2], max_seconds=600)
eng.infer([Clip("c", d.samples)])
print(time.time() - t0)
"""


def wav(seconds: float, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    freq = 150 + 100 * rng.random()
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def recognize(client: Client, data: bytes) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    job = client.request("POST", "/v1/recognize", body=data, content_type="audio/wav",
                         timeout_s=600)
    wall = time.perf_counter() - t0
    assert job["status"] == "done", job
    return wall, job


def wait_state(client: Client, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.status()["worker"]["state"] != state:
        if time.monotonic() > deadline:
            raise SystemExit(f"worker never reached {state}")
        time.sleep(0.05)


def engine_fresh_process(model: Path, clip: Path) -> float:
    out = subprocess.run([sys.executable, "-c", ENGINE_CHILD, str(model), str(clip),
                          repr(time.time())], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


async def submit_many(url: str, blobs: list[bytes], concurrency: int) -> tuple[float, list[float],
                                                                            list[str]]:
    latencies: list[float] = []
    ids: list[str] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in blobs:
        queue.put_nowait(b)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=conn) as http:

        async def runner() -> None:
            while not queue.empty():
                data = queue.get_nowait()
                t0 = time.perf_counter()
                async with http.post("/v1/jobs", data=data,
                                     headers={"Content-Type": "audio/wav"}) as r:
                    body = await r.json()
                    assert r.status == 202, body
                latencies.append(time.perf_counter() - t0)
                ids.append(body["id"])

        t0 = time.perf_counter()
        await asyncio.gather(*(runner() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, ids


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "bench/models/plus_large")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--submissions", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warm-runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/daemon.json")
    args = ap.parse_args()
    if not (args.model / "model.pt").exists():
        subprocess.run([sys.executable, "-m", "ondemand", "make-test-model", str(args.model),
                        "--preset", "plus_large"], check=True)
    res: dict[str, Any] = {"model": str(args.model), "cpu_count": os.cpu_count(),
                           "device": "cpu"}
    tmp = Path(tempfile.mkdtemp(prefix="ondemand-bench-"))
    clip5 = wav(5.0)
    (tmp / "c5.wav").write_bytes(clip5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # -- the engine's own fresh-process load-to-first-result (the cold-start reference) -------
    subprocess.run([sys.executable, "-c", "import torch"], check=True)  # warm the page cache
    fresh = [engine_fresh_process(args.model, tmp / "c5.wav") for _ in range(3)]
    res["engine_fresh_process_s"] = {"runs": fresh, "median": statistics.median(fresh)}
    print("engine fresh process:", res["engine_fresh_process_s"], flush=True)

    # -- the real daemon ------------------------------------------------------------------------
    cfg = tmp / "real.toml"
    cfg.write_text(
        f"[server]\nport = 0\nmax_wait_s = 600\n[model]\npath = \"{args.model}\"\n"
        "[worker]\ndevice = \"cpu\"\nunload_after_s = -1\nexit_after_s = -1\nstandby = false\n"
        f"[queue]\nmax_pending = 100000\n[storage]\ndir = \"{tmp / 'var-real'}\"\n")
    proc, url = start_serve(cfg, env)
    client = Client(url)
    try:
        time.sleep(1.0)
        res["front_end_idle_rss_mb"] = rss_mb(proc.pid)
        colds = []
        for i in range(2):
            wall, job = recognize(client, clip5)
            st = client.status()["worker"]
            colds.append({"wall_s": wall, "timings": job["timings"], "load": st["last_load"],
                          "worker_rss_mb": rss_mb(st["pid"])})
            print("cold start:", colds[-1], flush=True)
            if i == 0:
                client.unload(exit=True)
                wait_state(client, "cold")
        res["cold_start"] = colds

        walls, overheads = [], []
        for _ in range(args.warm_runs):
            wall, job = recognize(client, clip5)
            walls.append(wall)
            overheads.append(wall - job["timings"]["compute_s"])
        res["warm_5s"] = {"median_s": statistics.median(walls), "p90_s": pct(walls, 90),
                          "front_end_overhead_median_s": statistics.median(overheads),
                          "front_end_overhead_max_s": max(overheads)}
        print("warm:", res["warm_5s"], flush=True)

        reacts = []
        for _ in range(2):
            client.unload()
            wait_state(client, "unloaded")
            wall, job = recognize(client, clip5)
            reacts.append({"wall_s": wall, "timings": job["timings"],
                           "load": client.status()["worker"]["last_load"]})
        res["reactivation"] = reacts
        print("reactivation:", reacts, flush=True)

        rng = np.random.default_rng(1)
        durations = [float(d) for d in rng.uniform(1.0, 6.0, args.clips).round(2)]
        blobs = [wav(d, i) for i, d in enumerate(durations)]
        t0 = time.perf_counter()
        _, _, ids = asyncio.run(submit_many(url, blobs, 8))
        jobs = [client.wait(i) for i in ids]
        wall = time.perf_counter() - t0
        assert all(j["status"] == "done" for j in jobs)
        res["throughput"] = {"clips": args.clips, "audio_s": sum(durations), "wall_s": wall,
                             "clips_per_s": args.clips / wall,
                             "audio_s_per_s": sum(durations) / wall}
        res["front_end_rss_after_throughput_mb"] = rss_mb(proc.pid)
        print("throughput:", res["throughput"], flush=True)
    finally:
        stop(proc)

    # -- submissions per second (the worker never becomes ready: front end only) ---------------
    cfg = tmp / "fake.toml"
    fake = ROOT / "tests" / "fake_worker.py"
    cfg.write_text(
        f"[server]\nport = 0\n[worker]\nstandby = false\ncommand = \"{sys.executable} {fake}\"\n"
        "load_timeout_s = 3600\n"
        f"[queue]\nmax_pending = 1000000\n[storage]\ndir = \"{tmp / 'var-fake'}\"\n")
    proc, url = start_serve(cfg, {**env, "FAKE_HANG_LOAD": "1"})
    try:
        blob = wav(1.0)
        asyncio.run(submit_many(url, [blob] * 100, args.concurrency))  # warm-up
        wall, lat, _ = asyncio.run(submit_many(url, [blob] * args.submissions, args.concurrency))
        res["submissions"] = {"n": args.submissions, "concurrency": args.concurrency,
                              "clip_s": 1.0, "per_s": args.submissions / wall,
                              "latency_p50_ms": 1000 * pct(lat, 50),
                              "latency_p99_ms": 1000 * pct(lat, 99)}
        res["front_end_rss_after_submissions_mb"] = rss_mb(proc.pid)
        print("submissions:", res["submissions"], flush=True)
    finally:
        stop(proc)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

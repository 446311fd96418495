"""Local backend vs the Ray backend on the golden tiny model (docs/cluster.md, docs/benchmarks.md):
scale-from-zero time (job submitted -> result, no worker / no replica running), throughput with
one and two replicas, and the front end's memory (and the cluster agent's) in each mode.

    .venv/bin/python bench/cluster_bench.py [--jobs 40] [--out bench/out/cluster.json]

Starts its own one-node Ray cluster (`ray start --head`, 2 CPUs, CPU-only replicas) on free
ports and stops it (`ray stop --force`) at the end.  Runs `ondemand serve` as an operator would.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "emotion2vec-tiny" / "model"
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wav(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def get(url: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + path, timeout=120) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def submit(url: str, data: bytes) -> str:
    req = urllib.request.Request(url + "/v1/jobs", data=data,
                                 headers={"Content-Type": "audio/wav"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return str(json.loads(r.read())["id"])


def final(url: str, job: str) -> dict[str, Any]:
    while True:
        doc = get(url, f"/v1/jobs/{job}?wait=20")
        if doc["status"] in ("done", "failed", "cancelled"):
            return doc


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve(tmp: Path, sections: dict[str, dict[str, Any]]) -> tuple[subprocess.Popen[str], str]:
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                   for name, vals in sections.items())
    cfg = tmp / "config.toml"
    cfg.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "serving on" in line:
            import threading
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split("serving on ")[1].split()[0]
    raise RuntimeError("ondemand serve did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(url: str, jobs: int, ray_mode: bool, pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ray_mode:
        while get(url, "/v1/status")["cluster"]["state"] != "ready":
            time.sleep(0.5)
    out["front_end_rss_mb_idle"] = round(rss_mb(pid), 1)
    t0 = time.monotonic()
    first = final(url, submit(url, wav(2.0, 220)))
    out["scale_from_zero_s"] = round(time.monotonic() - t0, 3)
    out["cold_start_s"] = first["timings"]["cold_start_s"]
    clips = [wav(2.0, 200 + 7 * i) for i in range(jobs)]
    t0 = time.monotonic()
    ids = [submit(url, c) for c in clips]
    for i in ids:
        assert final(url, i)["status"] == "done"
    out["throughput_jobs_per_s"] = round(jobs / (time.monotonic() - t0), 2)
    status = get(url, "/v1/status")
    out["front_end_rss_mb_after"] = round(rss_mb(pid), 1)
    agent = (status.get("cluster") or {}).get("agent_pid")
    if agent:
        out["agent_rss_mb"] = round(rss_mb(agent), 1)
        out["replicas_seen"] = len(status["cluster"]["replicas"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    base: dict[str, dict[str, Any]] = {
        "server": {"port": 0},
        "model": {"path": str(MODEL)},
        "worker": {"device": "cpu", "exit_after_s": 120.0, "unload_after_s": -1,
                   "batch_audio_s": 1.0},
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "local").mkdir()
        proc, url = serve(tmp / "local", {**base, "storage": {"dir": str(tmp / "local/var")}})
        try:
            results["local"] = measure(url, args.jobs, False, proc.pid)
        finally:
            stop(proc)
        port, serve_port = free_port(), free_port()
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2",
                        "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                        "--object-store-memory=200000000"], env=env, check=True,
                       capture_output=True)
        try:
            for n in (1, 2):
                name = f"ray_{n}_replica{'s' if n > 1 else ''}"
                (tmp / name).mkdir()
                cluster = {"backend": "ray", "address": f"127.0.0.1:{port}",
                           "serve_port": serve_port, "app": f"bench{n}", "max_replicas": n,
                           "gpus_per_replica": 0.0, "upscale_delay_s": 0.5,
                           "metrics_interval_s": 0.5, "look_back_period_s": 2.0}
                proc, url = serve(tmp / name, {**base, "cluster": cluster,
                                               "storage": {"dir": str(tmp / name / "var")}})
                try:
                    results[name] = measure(url, args.jobs, True, proc.pid)
                finally:
                    stop(proc)
        finally:
            subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Local backend vs the Ray backend on the golden tiny model (issue 13, "Measure"; the figures are
in docs/benchmarks.md, "Cluster (issue 13)"):

- scale from zero: one 2 s job, submitted -> its result, with no worker process (local) or no
  replica (ray) running; `--repeats` times, each after the idle exit took it back to zero;
  local mode twice: torch's default threads (every core), and one thread (OMP_NUM_THREADS=1),
  which is what Ray gives a replica of `cpus_per_replica = 1`;
- throughput: `--jobs` jobs of 2 s (front-end bound on the tiny model), then `--long-jobs` of
  `--long-clip-s` (compute bound), submitted at once, with the local worker, one replica or two
  replicas already loaded (held: POST /v1/worker/load), first submit -> last result;
- local mode's default since `worker.standby = true` (a prepared process waits between jobs),
  for reference: its "cold" job activates that process;
- memory: the front end's RSS (idle, and its peak VmHWM after everything), the cluster agent's,
  the worker's or replicas', and Ray's own processes (the sum of their PSS).

    .venv/bin/python bench/cluster_bench.py [--jobs 60] [--long-jobs 30] [--long-clip-s 20]
        [--repeats 3] [--budget-s 900] [--out bench/out/cluster.json]

Runs `ondemand serve` as an operator would, on 127.0.0.1, once per mode.  For ray mode it starts
its own one-node Ray cluster (tests/ray_head.py: `ray start --head --block` on free ports,
--node-ip-address=127.0.0.1, 2 CPUs, no GPU, no dashboard, a 200 MB object store; CPU-only
replicas of 1 CPU each) and always stops it, killing its processes by pid (never `ray stop
--force`, which would end every other Ray cluster on the machine too).  Every wait has a
deadline inside `--budget-s`; past it the bench stops what it started and fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.ray_head import RayHead  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "emotion2vec-tiny" / "model"
CLIP_S = 2.0
SERVING = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")
BATCH_ON = re.compile(r"batch \S+: (\d+) job\(s\) on replica (\S+)")


class Budget:
    """The bench's one deadline: every wait takes what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def wait(self, cond: Callable[[], bool], what: str, every: float = 0.25) -> None:
        while not cond():
            if time.monotonic() > self.end:
                raise TimeoutError(f"bench budget spent waiting for {what}")
            time.sleep(every)

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("bench budget spent")
        return left


def wav(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


def proc_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status (VmRSS, VmHWM) or of smaps_rollup (Pss), in kB; 0 if gone."""
    name = "smaps_rollup" if field == "Pss" else "status"
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_processes(head: RayHead) -> dict[str, list[int]]:
    """Our cluster's processes by role: the replicas, and the rest of Ray (GCS, raylet, Ray's
    agents, Serve's controller and proxy, idle workers, our registry actor); other clusters on
    the machine are not counted."""
    roles: dict[str, list[int]] = {}
    for pid in head.pids()[1:]:  # not `ray start --block` itself: an operator's exits
        try:
            p = psutil.Process(pid)
            text = p.name() + " " + " ".join(p.cmdline())
        except psutil.Error:
            continue
        roles.setdefault("replicas" if "ServeReplica" in text else "ray", []).append(pid)
    return roles


class Serve:
    """`ondemand serve` in a subprocess: its URL, its log lines, HTTP helpers."""

    def __init__(self, tmp: Path, sections: dict[str, dict[str, Any]], budget: Budget,
                 env: dict[str, str] | None = None) -> None:
        tmp.mkdir(parents=True)
        sections = {**sections, "storage": {"dir": str(tmp / "var")}}
        cfg = tmp / "config.toml"
        cfg.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
            for name, vals in sections.items()))
        self.budget = budget
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.pid = self.proc.pid
        self._url: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            budget.wait(lambda: bool(self._url) or self.proc.poll() is not None,
                        "ondemand serve to listen")
        except TimeoutError:
            self.stop()
            raise
        if not self._url:
            raise RuntimeError("ondemand serve exited before listening:\n"
                               + "".join(self.lines[-30:]))
        self.url = self._url[0]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = SERVING.search(line)
            if m and not self._url:
                self._url.append(m.group(1))

    def call(self, path: str, data: bytes | None = None, *, ctype: str = "application/json",
             timeout: float = 60.0) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": ctype} if data else {})
        with urllib.request.urlopen(req, timeout=min(timeout, self.budget.left())) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def status(self) -> dict[str, Any]:
        return self.call("/v1/status")

    def submit(self, data: bytes) -> str:
        return str(self.call("/v1/jobs", data, ctype="audio/wav")["id"])

    def final(self, job: str) -> dict[str, Any]:
        while True:
            self.budget.left()
            doc = self.call(f"/v1/jobs/{job}?wait=20")
            if doc["status"] in ("done", "failed", "cancelled"):
                if doc["status"] != "done":
                    raise RuntimeError(f"job {job} {doc['status']}: {doc.get('error')}")
                return doc

    def hold(self, seconds: float) -> None:
        """Load and keep the worker, or cluster.hold_replicas replicas (returns once running)."""
        self.call("/v1/worker/load", json.dumps({"hold_s": seconds}).encode(),
                  timeout=self.budget.left())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the measures ------------------------------------------------------------------------------
def scale_from_zero(d: Serve, at_zero: Callable[[], bool], repeats: int) -> dict[str, Any]:
    totals, colds = [], []
    for i in range(repeats):
        d.budget.wait(at_zero, "no worker / no replica before a cold job")
        t0 = time.monotonic()
        doc = d.final(d.submit(wav(CLIP_S, 220 + 10 * i)))
        totals.append(time.monotonic() - t0)
        colds.append(doc["timings"]["cold_start_s"] or 0.0)
    return {"runs_s": [round(t, 2) for t in totals],
            "median_s": round(statistics.median(totals), 2),
            "cold_start_s": [round(c, 2) for c in colds]}


def throughput(d: Serve, jobs: int, clip_s: float) -> dict[str, Any]:
    """`jobs` clips of `clip_s` seconds submitted at once (4 uploads at a time), first submit ->
    last result; and how the batches went (ray: which replica took each)."""
    clips = [wav(clip_s, 200 + 7 * i) for i in range(jobs)]
    before = len(d.lines)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(d.submit, clips))
        docs = list(pool.map(d.final, ids))
    wall = time.monotonic() - t0
    compute = [doc["timings"]["compute_s"] or 0.0 for doc in docs]
    out: dict[str, Any] = {
        "jobs": jobs, "clip_s": clip_s, "wall_s": round(wall, 2),
        "jobs_per_s": round(jobs / wall, 2), "audio_x_realtime": round(jobs * clip_s / wall, 1),
        "median_compute_s": round(statistics.median(compute), 4)}

    def batches() -> list[tuple[str, int]]:
        return [(m.group(2), int(m.group(1))) for line in d.lines[before:]
                if (m := BATCH_ON.search(line))]

    # ray: the daemon logs each batch; its last lines may still be on their way (another thread)
    logged = time.monotonic() + 5
    while batches() and sum(n for _, n in batches()) < jobs and time.monotonic() < logged:
        time.sleep(0.1)
    done = batches()
    if done:
        replicas = sorted({r for r, _ in done})
        out["batches_per_replica"] = sorted(
            (sum(1 for r, _ in done if r == rep) for rep in replicas), reverse=True)
        out["jobs_in_batches"] = sum(n for _, n in done)
    return out


def memory(d: Serve, worker: int | None = None, agent: int | None = None,
           head: RayHead | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"front_end_rss_mb": mb(proc_kb(d.pid, "VmRSS")),
                           "front_end_peak_rss_mb": mb(proc_kb(d.pid, "VmHWM"))}
    if worker:
        out["worker_rss_mb"] = mb(proc_kb(worker, "VmRSS"))
    if agent:
        out["agent_rss_mb"] = mb(proc_kb(agent, "VmRSS"))
    if head:
        roles = ray_processes(head)
        out["ray_processes"] = len(roles.get("ray", []))
        out["ray_pss_mb"] = mb(sum(proc_kb(p, "Pss") for p in roles.get("ray", [])))
        out["replica_rss_mb"] = [mb(proc_kb(p, "VmRSS")) for p in roles.get("replicas", [])]
    return out


# -- the modes ---------------------------------------------------------------------------------
BASE: dict[str, dict[str, Any]] = {
    "server": {"host": "127.0.0.1", "port": 0},
    "model": {"path": str(MODEL)},
    # exit_after_s: short, so that each cold repeat starts from zero soon after the last one
    "worker": {"device": "cpu", "exit_after_s": 3.0, "unload_after_s": -1,
               "load_timeout_s": 300.0},
}


def local_mode(tmp: Path, args: argparse.Namespace, budget: Budget,
               threads: int | None = None) -> dict[str, Any]:
    """The local worker from zero (`worker.standby = false`: no worker process between jobs);
    `threads`: its torch threads (OMP_NUM_THREADS), as Ray gives a 1-CPU replica; None: torch's
    default, every core."""
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    sections = {**BASE, "worker": {**BASE["worker"], "standby": False}}
    d = Serve(tmp / f"local{threads or ''}", sections, budget, env)
    try:
        idle = memory(d)
        out: dict[str, Any] = {"scale_from_zero": scale_from_zero(
            d, lambda: d.status()["worker"]["pid"] is None, args.repeats)}
        d.hold(600)
        out["throughput_1_worker"] = throughput(d, args.jobs, CLIP_S)
        out["throughput_1_worker_long"] = throughput(d, args.long_jobs, args.long_clip_s)
        mem = memory(d, worker=d.status()["worker"]["pid"])
        out["memory"] = {"front_end_idle_rss_mb": idle["front_end_rss_mb"], **mem}
        return out
    finally:
        d.stop()


def local_standby(tmp: Path, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """The local default since `worker.standby = true`: between jobs a prepared worker process
    waits (on CPU: imports done, engine built and warm), so a job activates it: not from zero."""
    sections = {**BASE, "worker": {**BASE["worker"], "standby": True}}
    d = Serve(tmp / "standby", sections, budget)
    try:
        def prepared() -> bool:
            w = d.status()["worker"]
            return bool(w["state"] == "standby" and (w.get("standby") or {}).get("prepared"))

        out = scale_from_zero(d, prepared, args.repeats)
        return {"activation_from_standby": out,
                "memory": memory(d, worker=d.status()["worker"]["pid"])}
    finally:
        d.stop()


@contextlib.contextmanager
def ray_head(budget: Budget) -> Iterator[RayHead]:
    """Our own one-node cluster (tests/ray_head.py), its processes killed by pid at the end."""
    head = RayHead()
    up = head.start(timeout_s=min(300.0, budget.left()))
    print(f"ray head up in {up:.1f}s at {head.address}", file=sys.stderr)
    try:
        yield head
    finally:
        head.close()


def ray_mode(tmp: Path, n: int, head: RayHead, args: argparse.Namespace, budget: Budget, *,
             cold: bool) -> dict[str, Any]:
    cluster = {"backend": "ray", "address": head.address, "serve_port": head.serve_port,
               "app": "bench",
               "max_replicas": n, "hold_replicas": n, "gpus_per_replica": 0.0,
               "cpus_per_replica": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
               "metrics_interval_s": 0.5, "look_back_period_s": 2.0, "poll_s": 0.5,
               "connect_timeout_s": 300.0}
    d = Serve(tmp / f"ray{n}", {**BASE, "cluster": cluster}, budget)
    try:
        budget.wait(lambda: d.status()["cluster"]["state"] == "ready", "cluster ready")
        agent = d.status()["cluster"]["agent_pid"]

        def at_zero() -> bool:
            return d.status()["cluster"]["replicas"] == []

        budget.wait(at_zero, "zero replicas")
        idle = memory(d, agent=agent, head=head)
        out: dict[str, Any] = {}
        if cold:
            out["scale_from_zero"] = scale_from_zero(d, at_zero, args.repeats)

            def loads() -> list[float]:  # each replica's own load time, as the daemon logs it
                return [float(m.group(1)) for line in d.lines
                        if (m := re.search(r"replica \S+ loaded in ([0-9.]+)s", line))]

            logged = time.monotonic() + 10  # the agent relays the last one within poll_s
            while len(loads()) < args.repeats and time.monotonic() < logged:
                time.sleep(0.1)
            out["scale_from_zero"]["replica_load_s"] = loads()
        d.hold(600)  # hold_replicas = n replicas, loaded before the burst
        budget.wait(lambda: sum(r["state"] in ("idle", "busy")
                                for r in d.status()["cluster"]["replicas"]) >= n,
                    f"{n} replica(s) loaded")
        name = f"throughput_{n}_replica{'s' if n > 1 else ''}"
        out[name] = throughput(d, args.jobs, CLIP_S)
        out[name + "_long"] = throughput(d, args.long_jobs, args.long_clip_s)
        mem = memory(d, agent=agent, head=head)
        out["memory"] = {"front_end_idle_rss_mb": idle["front_end_rss_mb"],
                         "ray_pss_mb_at_zero": idle["ray_pss_mb"], **mem}
        d.call("/v1/worker/unload", b"{}")  # the hold ends: Serve takes them back to zero
        budget.wait(at_zero, "back to zero replicas after the hold")
        return out
    finally:
        d.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-jobs", type=int, default=30)
    ap.add_argument("--long-clip-s", type=float, default=20.0)
    ap.add_argument("--budget-s", type=float, default=900.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    # `timeout` and Ctrl-C end the bench through its finally blocks: daemons and Ray stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    budget = Budget(args.budget_s)
    t0 = time.monotonic()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "load_avg_at_start": os.getloadavg()},
                               "clip_s": CLIP_S}
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as d:
        tmp = Path(d)
        results["local"] = local_mode(tmp, args, budget)
        print(json.dumps(results["local"]), file=sys.stderr)
        results["local_1_thread"] = local_mode(tmp, args, budget, threads=1)
        print(json.dumps(results["local_1_thread"]), file=sys.stderr)
        results["local_standby"] = local_standby(tmp, args, budget)
        print(json.dumps(results["local_standby"]), file=sys.stderr)
        with ray_head(budget) as head:
            results["ray_1"] = ray_mode(tmp, 1, head, args, budget, cold=True)
            print(json.dumps(results["ray_1"]), file=sys.stderr)
            results["ray_2"] = ray_mode(tmp, 2, head, args, budget, cold=False)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    results["bench_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A one-node Ray cluster owned by whoever starts it: tests/test_cluster_ray.py and
bench/cluster_bench.py.

`ray start --head --block` runs as our child, so every process of this cluster (GCS, raylet,
Ray's agents, Serve's controller and proxy, the replicas, idle workers) is one of its
descendants.  `stop()` kills exactly those, by pid, and waits until they are gone.  Never `ray
stop --force`: it kills every Ray process of the machine, and so the cluster of a test suite or
a bench running beside ours (seen on the shared 2-core machine: a suite's `ray stop --force`
took down a bench's cluster mid-run, and the other way round).

Small on purpose: 2 CPUs, no GPU, no dashboard, a 200 MB object store, the node's address on
loopback (`--node-ip-address=127.0.0.1`; Ray's own gRPC servers still listen on every interface:
its default, which `ray start` cannot change).  Every port with a fixed default (the GCS's 6379,
the client server's 10001, the dashboard agent's 52365, the metrics' 44217 and 44227) is a free
one instead, so two such clusters on one machine (a suite and a bench) both start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
READY_LINE = "will now block"  # `ray start --block`, once the node runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayHead:
    """`start()` (up within `timeout_s`, or RuntimeError with the log's tail) and `stop()`;
    `address` is the GCS's, `serve_port` a free port for Serve's HTTP proxy."""

    def __init__(self, *, num_cpus: int = 2, object_store_mb: int = 200) -> None:
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.port = free_port()
        self.serve_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
                    # metrics ports with fixed defaults (44217, 44227): free ones, as below
                    "AUTOSCALER_METRIC_PORT": str(free_port()),
                    "DASHBOARD_METRIC_PORT": str(free_port())}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="ray-head-", suffix=".log")[1])

    def start(self, timeout_s: float = 180.0) -> float:
        """Start the node; returns the seconds it took."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        t0 = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(RAY), "start", "--head", "--block", f"--port={self.port}",
                 # free ports for what listens on a fixed default (10001, 52365), so two
                 # clusters on one machine (suites, benches) do not collide
                 f"--ray-client-server-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}",
                 "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
                 "--include-dashboard=false", "--disable-usage-stats",
                 f"--object-store-memory={self.object_store_mb * 1_000_000}"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = t0 + timeout_s
        while READY_LINE not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start --head did not come up within {timeout_s:g}s:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        return time.monotonic() - t0

    def pids(self) -> list[int]:
        """This cluster's processes: `ray start` and its descendants."""
        if self.proc is None:
            return []
        try:
            leader = psutil.Process(self.proc.pid)
            return [leader.pid, *(p.pid for p in leader.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGKILL every process of this cluster (the rest of the machine's Ray is left alone),
        reap `ray start`, and wait until they are all gone."""
        if self.proc is None:
            return
        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if alive:
            raise RuntimeError(f"Ray processes left after SIGKILL: {[p.pid for p in alive]}")
        self.proc = None

    def close(self) -> None:
        """stop(), and remove the log."""
        try:
            self.stop()
        finally:
            self.log.unlink(missing_ok=True)

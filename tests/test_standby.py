"""Standby (issue 14, docs/ladder.md): a worker process with torch, the engine and the weights in
host memory that has never initialised CUDA.

- The guard: a real worker prepared in a subprocess reports `cuda_initialized` false and calls no
  torch.cuda entry point (a tripwire records every one) nor pins memory; where NVML exists its
  PID holds 0 MiB on the GPU.
- The engine: weights read for standby and moved later give exactly the cold load's outputs.
- The supervisor (fake worker, real protocol): standby at start-up and after every exit, a job
  activates it (no new process), a job during the prepare rides behind it, prepare failures back
  off, an operator's exit ends it, the ledger records it as its own unbilled phase.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ondemand import protocol as p
from ondemand.cost.ledger import Phase
from ondemand.daemon.supervisor import TRANSITIONS, WorkerState
from ondemand.spool import write_npy
from tests import golden
from tests.conftest import Daemon, daemon_config, fake_env, fake_log, run, wait_for, wav_bytes

S = WorkerState
ROOT = Path(__file__).resolve().parent.parent

# Runs the real worker with every torch.cuda entry point that could initialise CUDA (and pinning,
# which does) wrapped to append its name to a file first.  On a CPU build none of them would
# fail, so without the tripwire a standby that touched CUDA would pass unnoticed here.
TRIPWIRE = r"""
import sys
trips = sys.argv[1]
import torch

def tripwire(name, orig):
    def wrapped(*args, **kwargs):
        with open(trips, "a") as f:
            f.write(name + "\n")
        return orig(*args, **kwargs)
    return wrapped

for name in ("_lazy_init", "init", "is_available", "device_count", "current_device",
             "set_device", "synchronize", "empty_cache", "mem_get_info", "get_device_name"):
    setattr(torch.cuda, name, tripwire("torch.cuda." + name, getattr(torch.cuda, name)))
for name in ("_cuda_getDeviceCount", "_cuda_init"):  # a CUDA build's own hooks
    if hasattr(torch._C, name):
        setattr(torch._C, name, tripwire("torch._C." + name, getattr(torch._C, name)))
for name in ("pin_memory", "cuda"):
    setattr(torch.Tensor, name, tripwire("Tensor." + name, getattr(torch.Tensor, name)))

from ondemand.worker.main import main
sys.exit(main())
"""


class RealWorker:
    """`python -m ondemand.worker` (under the tripwire) driven line by line."""

    def __init__(self, tmp: Path) -> None:
        self.trips = tmp / "trips.txt"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", TRIPWIRE, str(self.trips)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)

    def send(self, op: p.Op) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(p.encode(op))
        self.proc.stdin.flush()

    def expect(self, kind: type[p.Event]) -> Any:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, "the worker ended"
            ev = p.decode_event(line)
            if isinstance(ev, kind):
                return ev
            assert not isinstance(ev, p.LoadFailed | p.BatchFailed), ev

    def tripped(self) -> list[str]:
        return self.trips.read_text().split() if self.trips.exists() else []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(p.Exit())
            self.proc.wait(timeout=20)


def op(kind: type[p.Prepare] | type[p.Load], device: str = "cpu", dtype: str = "float32") -> Any:
    return kind(model=str(golden.MODEL), revision="master", cache_dir="", device=device,
                dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda"])
def test_a_standby_worker_never_initialises_cuda(tmp_path: Path, device: str) -> None:
    w = RealWorker(tmp_path)
    try:
        w.send(op(p.Prepare, device))
        ready = w.expect(p.Prepared)
        assert ready.cuda_initialized is False
        assert w.tripped() == []  # no torch.cuda call at all, no pinned memory
        assert ready.weights_mb > 0 and ready.host_mb > ready.weights_mb
        assert {"import_s", "resolve_s", "parse_s", "weights_s"} <= set(ready.timings)
        import torch

        cpu_only = not torch.backends.cuda.is_built()
        w.send(op(p.Load, device))
        if device == "cuda" and cpu_only:  # no GPU here: the load says so, from torch.cuda
            failed = w.expect(p.LoadFailed)
            assert failed.code == "device"
            assert "torch.cuda.is_available" in w.tripped()  # the tripwire is live
            return
        loaded = w.expect(p.Loaded)
        if device == "cpu" or cpu_only:
            # The CPU is the device: the prepare built and warmed the engine, the load hands
            # it over.
            assert loaded.timings == {"standby": 1.0} and "warmup_s" in ready.timings
        else:  # a GPU: CUDA is initialised now, the weights copied, the warm-up run
            assert loaded.timings["standby"] == 1.0 and "to_device_s" in loaded.timings
        assert loaded.weights_mb == pytest.approx(ready.weights_mb, rel=1e-3)
        audio = tmp_path / "clip.npy"
        write_npy(audio, (0.1 * np.sin(np.arange(16000) / 8)).astype(np.float32), durable=False)
        w.send(p.Infer(batch="b1", granularity="utterance",
                       items=(p.InferItem(job="j1", key="clip", audio=str(audio)),)))
        (item,) = w.expect(p.Result).results
        assert item.error is None and item.result["labels"]
        if cpu_only:  # a CPU-only build resolves `auto` without asking torch.cuda
            assert w.tripped() == []
    finally:
        w.close()


def test_a_standby_pid_holds_no_gpu_memory_where_nvml_exists(tmp_path: Path) -> None:
    from ondemand.gpu import open_probe

    probe = open_probe("nvml")
    if probe.fallback:
        pytest.skip("no NVML on this machine (bench/gpu_check asserts it on a GPU)")
    w = RealWorker(tmp_path)
    try:
        w.send(op(p.Prepare, "auto"))
        assert w.expect(p.Prepared).cuda_initialized is False
        s = probe.sample([w.proc.pid], 0)
        assert s.pids_gpu_memory_bytes == 0
        assert w.proc.pid not in {x.pid for x in s.processes}
    finally:
        w.close()
        probe.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_standby_weights_give_the_cold_loads_outputs(dtype: str) -> None:
    from ondemand.audio import decode
    from ondemand.model.engine import Clip, Engine, read_model

    clips = [Clip(n, decode(golden.AUDIO / n, max_seconds=60).samples)
             for n in sorted(os.listdir(golden.AUDIO))]
    cold = Engine.load(golden.MODEL, device="cpu", dtype=dtype)
    host = read_model(golden.MODEL, dtype=dtype)
    warm = Engine.from_host(host, "cpu")
    assert warm.weights_bytes == host.nbytes > 0
    for a, b in zip(cold.infer(clips, embeddings=True), warm.infer(clips, embeddings=True),
                    strict=True):
        assert a.scores == b.scores
        assert np.array_equal(a.embedding, b.embedding)  # type: ignore[arg-type]


def test_transitions_reach_standby_and_leave_it() -> None:
    assert TRANSITIONS[S.COLD] >= {S.PREPARING, S.STARTING}
    assert TRANSITIONS[S.PREPARING] >= {S.STANDBY, S.LOADING}
    assert TRANSITIONS[S.STANDBY] >= {S.LOADING, S.STOPPING}
    assert S.READY not in TRANSITIONS[S.STANDBY]  # only through a load


# -- the supervisor, with the fake worker ---------------------------------------------------------
def standby_config(tmp: Path, **worker: Any) -> Any:
    return daemon_config(tmp, worker={"standby": True, **worker})


def test_standby_at_start_up_then_a_job_activates_it(tmp_path: Path) -> None:
    async def main() -> None:
        log = tmp_path / "ops.jsonl"
        async with Daemon(standby_config(tmp_path), env=fake_env(log=str(log))) as d:
            await d.wait_state("standby")
            st = (await d.status())["worker"]
            sb = st["standby"]
            assert sb["prepared"] and sb["weights_mb"] == 100.0
            assert sb["cuda_initialized"] is False and sb["host_mb"] > 0
            assert sb["pid"] == st["pid"] and st["gpu_memory_mb"] is None  # no NVML here
            job = await d.submit(wav_bytes(0.5))
            assert (await d.final(job["id"]))["status"] == "done"
            assert d.states() == ["preparing", "standby", "loading", "ready"]
            load = (await d.status())["worker"]["last_load"]
            assert load["kind"] == "activate" and not load["fresh_process"]
            assert load["standby"] == 1.0
            assert d.sup.spawns == 1 and (await d.status())["worker"]["standby"] is None
            assert [e["op"] for e in fake_log(log)] == ["prepare", "load", "infer"]
            assert fake_log(log)[1]["prepared"] is True

    run(main())


def test_a_new_standby_follows_every_exit(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = standby_config(tmp_path, exit_after_s=0.2)
        async with Daemon(cfg) as d:
            await d.wait_state("standby")
            first = d.sup.status().pid
            job = await d.submit(wav_bytes(0.5))
            await d.final(job["id"])
            await wait_for(lambda: d.states()[-1] == "standby" and d.sup.status().pid != first,
                           10, "a second standby")
            assert d.states() == ["preparing", "standby", "loading", "ready", "stopping",
                                  "cold", "preparing", "standby"]
            assert [c.reason for c in d.changes()][4:] == ["idle_exit", "exited", "standby",
                                                           "prepared"]

    run(main())


def test_a_job_during_the_prepare_rides_behind_it(tmp_path: Path) -> None:
    async def main() -> None:
        log = tmp_path / "ops.jsonl"
        async with Daemon(standby_config(tmp_path),
                          env=fake_env(prepare_s="1.0", log=str(log))) as d:
            await d.wait_state("preparing")
            job = await d.submit(wav_bytes(0.5))
            assert (await d.final(job["id"]))["status"] == "done"
            assert d.states() == ["preparing", "loading", "ready"]
            assert d.sup.spawns == 1
            assert [e["op"] for e in fake_log(log)] == ["prepare", "load", "infer"]
            assert d.sup.status().last_load.kind == "activate"

    run(main())


def test_failing_prepares_back_off_and_jobs_wait(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = standby_config(tmp_path, load_backoff_s=600.0)
        async with Daemon(cfg, env=fake_env(fail_prepare="1")) as d:
            await d.wait_state("backoff")
            st = d.sup.status()
            assert st.load_failures == 2 and "FAKE_FAIL_PREPARE" in st.last_error.message
            assert d.sup.spawns == 2  # no loop
            assert [e.kind for e in d.exits()] == ["load_failed", "load_failed"]

    run(main())


def test_an_operator_exit_ends_the_standby_until_the_next_load(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(standby_config(tmp_path, exit_after_s=0.2)) as d:
            await d.wait_state("standby")
            async with d.http.post("/v1/worker/unload", json={}, params={"exit": "true"}) as r:
                assert r.status == 202
            await wait_for(lambda: d.states()[-1] == "cold", 10, "cold")
            time.sleep(0.3)
            await wait_for(lambda: d.sup.state is S.COLD, 1)
            assert d.sup.spawns == 1  # no new standby
            job = await d.submit(wav_bytes(0.5))
            await d.final(job["id"])
            assert d.sup.status().last_load.kind == "spawn"
            await wait_for(lambda: d.states()[-1] == "standby", 10, "standby again")

    run(main())


def test_standby_is_its_own_unbilled_phase_in_the_cost_report(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(standby_config(tmp_path)) as d:
            await d.wait_state("standby")
            time.sleep(0.3)
            job = await d.submit(wav_bytes(0.5))
            await d.final(job["id"])
            async with d.http.get("/v1/cost", params={"since": "1h"}) as r:
                doc = await r.json()
            async with d.http.get("/metrics") as r:
                metrics = await r.text()
        period = doc["periods"][0]
        hours = period["hours"]
        assert hours["standby"] * 3600 >= 0.3
        assert hours["gpu_held"] == pytest.approx(
            hours["loading"] + hours["ready_busy"] + hours["ready_idle"]
            + hours["unloaded_alive"])
        assert period["cold_starts"]["by_kind"]["activate"]["count"] == 1
        assert 'ondemand_worker_phase_seconds_total{phase="standby"}' in metrics
        assert 'ondemand_worker_state{state="standby"}' in metrics
        assert Phase.STANDBY.alive and not Phase.STANDBY.billed

    run(main())


def test_status_json_has_the_standby_fields(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(standby_config(tmp_path)) as d:
            await d.wait_state("standby")
            doc = await d.status()
        assert doc["idle"]["standby"] is True
        assert set(doc["worker"]["standby"]) == {
            "pid", "prepared", "seconds", "weights_mb", "host_mb", "cuda_initialized",
            "gpu_memory_mb", "timings"}
        assert doc["worker"]["yielded"] is None
        json.dumps(doc)

    run(main())


def test_the_report_prices_the_restart_after_an_exit_as_an_activation() -> None:
    from ondemand.config import CostConfig
    from ondemand.cost import report
    from ondemand.cost.ledger import Interval, Trigger

    ivs: list[Interval] = []

    def add(state: Phase, s: float, e: float, reason: str = "") -> None:
        prev = ivs[-1].state if ivs else None
        ivs.append(Interval(id=len(ivs) + 1, state=state, start=s, end=e, last_seen=e,
                            from_state=prev, reason=reason,
                            trigger=Trigger.JOB if state.billed else None))

    add(Phase.LOADING, 0, 20, "job")  # the first start spawns a process: 20 s
    t = 20.0
    for _ in range(4):
        add(Phase.READY_BUSY, t, t + 10)
        add(Phase.STANDBY, t + 10, t + 310)  # 300 s in standby after each exit
        add(Phase.LOADING, t + 310, t + 311, "activate")  # then a 1 s activation
        t += 311
    add(Phase.READY_BUSY, t, t + 10)
    for i in range(1, len(ivs)):
        ivs[i - 1] = Interval(**{**ivs[i - 1].__dict__, "next_state": ivs[i].state})
    period = report.summarize(ivs, 0, t + 10, t + 10, CostConfig())
    assert period["hours"]["standby"] * 3600 == pytest.approx(1200)
    assert period["hours"]["gpu_held"] * 3600 == pytest.approx(20 + 4 + 50)
    assert period["covered_hours"] * 3600 == pytest.approx(t + 10)
    assert period["cold_starts"]["by_kind"]["activate"]["count"] == 4
    assert period["cold_starts"]["by_kind"]["spawn"]["count"] == 1
    rec = report.recommend(ivs, t + 10, CostConfig(), unload_after_s=-1, exit_after_s=120,
                           standby=True)
    assert rec["load_seconds"] == {"spawn": 20.0, "reload": None, "activate": 1.0,
                                   "after_exit": 1.0}
    off = report.recommend(ivs, t + 10, CostConfig(), unload_after_s=-1, exit_after_s=120)
    assert off["load_seconds"]["after_exit"] == 20.0

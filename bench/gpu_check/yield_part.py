"""GPU check, stepping aside (`worker.yield_gpu`): the supervisor's decision latency on a scripted
GPU (any machine: the fake worker, a scripted probe), and on a real GPU a second process that
allocates most of the free memory while the model is loaded.

Decision latency = from the moment the memory changes (the script, or the second process saying
it holds its allocation) to the supervisor's SteppedAside event; we also report when the worker
was gone (GPU memory given back) and, after the memory frees, when loads resumed.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ladder_part import LiveDaemon, config, wav_bytes

from ondemand.daemon.events import StateChanged, SteppedAside
from ondemand.daemon.supervisor import make_spawn
from ondemand.gpu import GpuProbe

ROOT = Path(__file__).resolve().parents[2]


def _after(events: list[Any], mono: float, pred: Callable[[Any], bool]) -> float | None:
    for e in events:
        if e.mono >= mono and pred(e):
            return float(e.mono - mono)
    return None


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def fake_latency(model: Path, *, trials: int, poll_s: float,
                       left: Callable[[], float]) -> dict[str, Any]:
    """The scripted GPU (tests/conftest.ScriptedGpu) with the fake worker: only the policy and
    the supervisor are measured."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import ScriptedGpu, fake_env

    gpu = ScriptedGpu(total_mb=80_000)
    lat, gone, back = [], [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-yield-") as tmp:
        cfg = config(Path(tmp), model, "cuda:0", "float32", yield_gpu=True, yield_poll_s=poll_s,
                     yield_settle_s=0.2, release_timeout_s=0.0, standby=False)
        spawn = make_spawn([sys.executable, str(ROOT / "tests" / "fake_worker.py")],
                           fake_env(load_s="0.01"))
        async with LiveDaemon(cfg, gpu, spawn) as d:
            gpu.ours = lambda pid: 3000.0 if d.sup.state.value in ("loading", "ready") else 0.0
            audio = wav_bytes(0.5)
            for _ in range(trials):
                if left() < 5:
                    break
                await d.recognize(audio)
                await asyncio.sleep(poll_s * (0.1 + 0.8 * (len(lat) % 7) / 7))  # phase spread
                t0 = time.monotonic()
                gpu.others = {99999: 77_500.0}  # free: 80000 - 3000 - 77500 < 1024
                await _until(lambda: d.sup.state.value == "yielded", 30, "yielded")
                lat.append(_after(d.events, t0, lambda e: isinstance(e, SteppedAside)))
                gone.append(_after(d.events, t0, lambda e: isinstance(e, StateChanged)
                                   and e.new == "cold"))
                t1 = time.monotonic()
                gpu.others = {}
                await _until(lambda: d.sup.state.value == "cold", 30, "back")
                back.append(time.monotonic() - t1)

    def stats(xs: list[float | None]) -> dict[str, float] | None:
        v = sorted(x for x in xs if x is not None)
        if not v:
            return None
        return {"median_ms": round(1000 * statistics.median(v), 2),
                "p95_ms": round(1000 * v[min(len(v) - 1, int(0.95 * len(v)))], 2),
                "max_ms": round(1000 * v[-1], 2)}

    return {"probe": "scripted", "worker": "tests/fake_worker.py", "poll_s": poll_s,
            "settle_s": 0.2, "trials": len(lat), "decision": stats(lat),
            "worker_gone": stats(gone), "resume_incl_settle": stats(back)}


HOG = r"""
import sys, time, torch
keep = int(float(sys.argv[1]) * 2**20)
free, total = torch.cuda.mem_get_info()
x = torch.empty(max(0, free - keep), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("held", x.numel(), flush=True)
sys.stdin.readline()
"""


async def real_gpu(model: Path, device: str, dtype: str, probe: GpuProbe, *,
                   left: Callable[[], float]) -> dict[str, Any]:
    """A second process takes all but `keep` MiB of the free memory while the model is loaded;
    the worker steps aside; a job waits; the process ends; the job runs."""
    keep_mb = 1024.0
    out: dict[str, Any] = {"keep_free_mb": keep_mb}
    with tempfile.TemporaryDirectory(prefix="gpu-check-yield-") as tmp:
        cfg = config(Path(tmp), model, device, dtype, yield_gpu=True, yield_poll_s=0.25,
                     yield_settle_s=2.0, yield_free_below_mb=2048.0,
                     yield_resume_free_mb=4096.0)
        async with LiveDaemon(cfg, probe) as d:
            audio = wav_bytes(2.0)
            await d.recognize(audio)
            out["loaded_held"] = (d.sup.status().gpu_memory_mb)
            hog = subprocess.Popen([sys.executable, "-c", HOG, str(keep_mb)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=os.environ.copy())
            try:
                assert hog.stdout is not None and hog.stdin is not None
                line = await asyncio.to_thread(hog.stdout.readline)
                t0 = time.monotonic()
                out["hog_bytes"] = int(line.split()[1]) if line.startswith("held") else None
                await _until(lambda: d.sup.state.value in ("yielded", "preparing"), 60,
                             "stepping aside")
                out["decision_s"] = _after(d.events, t0, lambda e: isinstance(e, SteppedAside))
                out["worker_gone_s"] = _after(d.events, t0, lambda e: isinstance(
                    e, StateChanged) and e.new == "cold")
                job = await d.submit(audio)
                await _until(lambda: d.sup.state.value == "yielded", 60, "yielded")
                st = d.sup.status()
                out["status_yielded"] = st.yielded.to_json() if st.yielded else None
                out["standby_while_yielded"] = st.standby.to_json() if st.standby else None
                out["job_while_yielded"] = (await d.job(job["id"]))["status"]
                t1 = time.monotonic()
                hog.stdin.write("\n")
                hog.stdin.flush()
                await asyncio.to_thread(hog.wait, 60)
                done = await d.job(job["id"], wait=120)
                out["job_after"] = done["status"]
                out["resume_to_done_s"] = round(time.monotonic() - t1, 3)
                out["resume_s"] = _after(d.events, t1, lambda e: isinstance(
                    e, StateChanged) and e.old == "yielded")
            finally:
                if hog.poll() is None:
                    hog.kill()
    return out

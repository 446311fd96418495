"""GPU check, the idle ladder: time to first result from each rung (ready, unloaded, standby,
cold) through the real daemon and the real worker, the load breakdowns, and what each rung holds
(worker RSS, GPU memory of the worker and of the device, board power).

The daemon runs in this process on a loopback socket (the production app, `build_app`); the
worker is `python -m ondemand.worker`.  Per sample, with `worker.standby = true` and no idle
timeouts (the rungs are stepped through the supervisor's own API):

    standby --job--> ready --job x k--> (warm) --unload--> unloaded --job--> ready
      --exit--> new standby (measure)  --exit the standby--> cold --job--> ready --exit--> standby
"""

from __future__ import annotations

import asyncio
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from ondemand import config as config_mod
from ondemand.daemon import api
from ondemand.daemon.app import build_app
from ondemand.daemon.events import Event
from ondemand.daemon.http import make_runner
from ondemand.daemon.supervisor import Spawn, Supervisor
from ondemand.gpu import GpuProbe, gpu_index


def wav_bytes(seconds: float, seed: int = 0) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (150 + 100 * rng.random()) * t)
    x += 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def config(storage: Path, model: Path, device: str, dtype: str, **worker: Any) -> Any:
    return config_mod.build(config_mod.Config, {
        "model": {"path": str(model)},
        "worker": {"device": device, "dtype": dtype, "unload_after_s": -1, "exit_after_s": -1,
                   "standby": True, "release_timeout_s": 10.0, **worker},
        "storage": {"dir": str(storage)},
        "server": {"max_wait_s": 600.0},
        "cost": {"sample_interval_s": 60.0},
    })


class LiveDaemon:
    """The production app on 127.0.0.1:0 in this process."""

    def __init__(self, cfg: Any, probe: GpuProbe, spawn: Spawn | None = None) -> None:
        self.cfg = cfg
        self.app = build_app(cfg, gpu=probe, spawn=spawn)
        self.events: list[Event] = []
        self.app[api.BUS].subscribe(self.events.append)
        self.runner = make_runner(self.app, cfg.server, access_log=None)
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LiveDaemon:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.http = aiohttp.ClientSession(f"http://{host}:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None
        await self.http.close()
        await self.runner.cleanup()

    @property
    def sup(self) -> Supervisor:
        return self.app[api.SUPERVISOR]

    async def state(self, want: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sup.state.value != want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker never reached {want} (is {self.sup.state})")
            await asyncio.sleep(0.01)

    async def submit(self, audio: bytes) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.post("/v1/jobs", data=audio,
                                  headers={"Content-Type": "audio/wav"}) as r:
            return await r.json()  # type: ignore[no-any-return]

    async def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(f"/v1/jobs/{job_id}", params={"wait": str(wait)}) as r:
            return await r.json()  # type: ignore[no-any-return]

    async def recognize(self, audio: bytes) -> tuple[float, dict[str, Any]]:
        assert self.http is not None
        t0 = time.perf_counter()
        async with self.http.post("/v1/recognize", data=audio,
                                  headers={"Content-Type": "audio/wav"}) as r:
            body = await r.json()
        wall = time.perf_counter() - t0
        if body.get("status") != "done":
            raise RuntimeError(f"recognize failed: {body}")
        return wall, body


async def held(d: LiveDaemon, probe: GpuProbe, settle_s: float) -> dict[str, Any]:
    """What the worker holds now: its RSS, its GPU memory (NVML), the device's used memory and
    the board power (mean of the readings over `settle_s`)."""
    idx = gpu_index(d.cfg.worker.device)
    pid = d.sup.status().pid
    powers: list[float] = []
    end = time.monotonic() + settle_s
    while True:
        s = probe.sample([pid] if pid else [], idx)
        if s.power_watts is not None:
            powers.append(s.power_watts)
        if time.monotonic() >= end:
            break
        await asyncio.sleep(0.2)
    mb = 2**20
    return {
        "state": d.sup.state.value, "pid": pid,
        "rss_mb": None if s.rss_bytes is None else round(s.rss_bytes / mb, 1),
        "worker_gpu_mb": None if s.pids_gpu_memory_bytes is None or not pid
        else round(s.pids_gpu_memory_bytes / mb, 1),
        "device_used_mb": None if s.gpu_memory_used_bytes is None
        else round(s.gpu_memory_used_bytes / mb, 1),
        "power_w": round(statistics.mean(powers), 1) if powers else None,
    }


def _load(d: LiveDaemon) -> dict[str, Any] | None:
    rec = d.sup.status().last_load
    return None if rec is None else rec.to_json()


async def ladder(model: Path, device: str, dtype: str, probe: GpuProbe, *, samples: int,
                 clip_s: float, warm_runs: int, settle_s: float,
                 left: Callable[[], float]) -> dict[str, Any]:
    audio = wav_bytes(clip_s)
    rungs: dict[str, list[float]] = {"ready": [], "unloaded": [], "standby": [], "cold": []}
    loads: dict[str, list[dict[str, Any] | None]] = {"unloaded": [], "standby": [], "cold": []}
    memory: dict[str, dict[str, Any]] = {}
    standby_rec: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        cfg = config(Path(tmp), model, device, dtype)
        async with LiveDaemon(cfg, probe) as d:
            t0 = time.perf_counter()
            await d.state("standby")
            first_prepare_s = time.perf_counter() - t0
            for i in range(samples):
                if i and left() < 60:
                    break
                await d.state("standby")
                memory.setdefault("standby", await held(d, probe, settle_s))
                st = d.sup.status().standby
                standby_rec = standby_rec or (st.to_json() if st else None)
                wall, _ = await d.recognize(audio)  # from standby: an activation
                rungs["standby"].append(wall)
                loads["standby"].append(_load(d))
                for _ in range(warm_runs):
                    rungs["ready"].append((await d.recognize(audio))[0])
                memory.setdefault("loaded", await held(d, probe, settle_s))
                await d.sup.unload("bench")
                await d.state("unloaded")
                memory.setdefault("unloaded", await held(d, probe, settle_s))
                wall, _ = await d.recognize(audio)  # an in-process reload
                rungs["unloaded"].append(wall)
                loads["unloaded"].append(_load(d))
                await d.sup.unload("bench", exit=True)  # ready -> exit -> a new standby
                await d.state("standby")
                await d.sup.unload("bench", exit=True)  # the standby too: cold, none prepared
                await d.state("cold")
                memory.setdefault("exited", await held(d, probe, settle_s))
                wall, _ = await d.recognize(audio)  # a fresh process
                rungs["cold"].append(wall)
                loads["cold"].append(_load(d))
                await d.sup.unload("bench", exit=True)  # and back to standby
            await d.state("standby")
    med = {k: round(statistics.median(v), 4) if v else None for k, v in rungs.items()}
    ratio = (round(med["standby"] / med["cold"], 3)
             if med["standby"] is not None and med["cold"] else None)
    return {
        "clip_s": clip_s, "samples": len(rungs["cold"]), "first_prepare_s": round(
            first_prepare_s, 3),
        "time_to_first_result_s": {k: [round(x, 4) for x in v] for k, v in rungs.items()},
        "median_s": med, "standby_over_cold": ratio, "loads": loads, "held": memory,
        "standby": standby_rec,
    }

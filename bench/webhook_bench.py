"""Webhook and token benchmark (issue 15), against `ondemand serve` subprocesses with the fake
worker from tests/ (so only the front end is measured), all on 127.0.0.1:

- delivery latency: the job's `finished` time (in the delivered document) -> the receiver has
  the request, for `--jobs` jobs submitted one after another;
- submit overhead: the time of one `POST /v1/jobs` (0.5 s WAV, sequential) on a daemon with no
  auth and no callbacks, and on one with [[tokens]] (limits set, so both checks run) and a
  callback_url on every job (check at submit + outbox row + trigger).

    .venv/bin/python bench/webhook_bench.py [--jobs 100] [--submits 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
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
import soundfile as sf
from aiohttp import web
from harness import start_serve  # bench/harness.py

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789abcdefghij"


def wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def config(tmp: Path, *, tokens: bool, port: int) -> Path:
    text = (f'[server]\nport = 0\n[storage]\ndir = "{tmp / "var"}"\n'
            f'[worker]\ncommand = "{sys.executable} {ROOT / "tests" / "fake_worker.py"}"\n'
            "unload_after_s = -1\nexit_after_s = -1\nstandby = false\n"
            '[webhooks]\nsecret = "bench"\nallowed_hosts = ["127.0.0.1/32"]\n'
            "backoff_min_s = 0.1\n")
    if tokens:
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        text += (f'[[tokens]]\nname = "bench"\nsha256 = "{digest}"\nscopes = ["jobs"]\n'
                 "max_pending = 100000\nsubmits_per_minute = 1000000\n")
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def start(cfg: Path) -> tuple[subprocess.Popen[str], str]:
    return start_serve(cfg)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": statistics.median(xs) * 1e3, "p90_ms": pct(xs, 0.9) * 1e3,
            "p99_ms": pct(xs, 0.99) * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    arrivals: dict[str, float] = {}
    got = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        at = time.time()
        doc = json.loads(body)
        arrivals[doc["id"]] = at - doc["finished"]
        got.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    clip = wav(0.5)
    out: dict[str, Any] = {}
    try:
        for label, tokens, callback in (("plain", False, False), ("tokens+callback", True, True)):
            with tempfile.TemporaryDirectory() as tmp:
                proc, url = start(config(Path(tmp), tokens=tokens, port=0))
                headers = {"Content-Type": "audio/wav"}
                if tokens:
                    headers["Authorization"] = f"Bearer {TOKEN}"
                params = {"callback_url": hook_url} if callback else {}
                try:
                    async with aiohttp.ClientSession(url) as http:
                        for _ in range(20):  # warm-up (and the worker's load)
                            async with http.post("/v1/jobs", data=clip, headers=headers,
                                                 params=params) as r:
                                assert r.status == 202, await r.text()
                        times = []
                        for _ in range(args.submits):
                            t0 = time.perf_counter()
                            async with http.post("/v1/jobs", data=clip, headers=headers,
                                                 params=params) as r:
                                await r.read()
                                assert r.status == 202
                            times.append(time.perf_counter() - t0)
                        out[f"submit_{label}"] = summary(times)
                        if callback:  # latency: one job at a time, wait for its delivery
                            await asyncio.sleep(2)
                            arrivals.clear()
                            for _ in range(args.jobs):
                                got.clear()
                                async with http.post("/v1/jobs", data=clip, headers=headers,
                                                     params=params) as r:
                                    assert r.status == 202
                                await asyncio.wait_for(got.wait(), 30)
                            out["delivery_latency"] = summary(list(arrivals.values()))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
    finally:
        await runner.cleanup()
    a, b = out["submit_plain"]["p50_ms"], out["submit_tokens+callback"]["p50_ms"]
    out["submit_overhead_p50_ms"] = b - a
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--submits", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Front-end memory under hostile-but-valid uploads (issue 10), against `ondemand serve`.

    .venv/bin/python bench/hostile_audio_bench.py [--clients 6 12] [--src DIR]
        [--out bench/out/hostile_audio.json]

Starts the real daemon (`python -m ondemand serve`, the fake worker from tests/ as
`worker.command`, so no model is needed), sends each upload below from N clients at once, and
samples the daemon's RSS (psutil, every 10 ms) before, during and after each burst:

- `flac-655k-119s`: a 283 KB silent FLAC declaring 655,350 Hz for 119 s (the issue's file);
- `wav-3e38`: a float WAV whose samples are all 3e38;
- the worst uploads still accepted under the defaults: `flac-384k-120s` (384 kHz mono at
  audio.max_seconds, 368 MB as float64), `flac-192k-stereo-120s` (368 MB), and
  `wav-48k-stereo-120s` (PCM_16, a 23 MB upload: the body itself is big too).

`--src DIR` runs the daemon from another checkout (e.g. `git archive <commit>` unpacked there)
with this interpreter, to measure before/after; only keys that checkout knows are written.
Figures we publish go into docs/operations.md ("Hostile audio") with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import soundfile as sf
from harness import start_serve  # bench/harness.py

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


# -- uploads ------------------------------------------------------------------------------------
def silent_flac(rate: int, seconds: float, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    frames = int(rate * seconds)
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((1 << 20, channels), np.int16)
        for start in range(0, frames, len(block)):
            f.write(block[: frames - start])
    return buf.getvalue()


def noise_wav(rate: int, seconds: float, channels: int) -> bytes:
    buf = io.BytesIO()
    x = np.random.default_rng(0).integers(-3000, 3000, (int(rate * seconds), channels), np.int16)
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def huge_floats() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(16000 * 60, 3e38, np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


UPLOADS = {
    "flac-655k-119s": lambda: silent_flac(655_350, 119.0),
    "wav-3e38": huge_floats,
    "flac-384k-120s": lambda: silent_flac(384_000, 120.0),
    "flac-192k-stereo-120s": lambda: silent_flac(192_000, 120.0, 2),
    "wav-48k-stereo-120s": lambda: noise_wav(48_000, 120.0, 2),
}


def load_upload(name: str, cache: Path) -> bytes:
    path = cache / f"{name}.bin"
    if not path.exists():
        path.write_bytes(UPLOADS[name]())
    return path.read_bytes()


# -- the daemon ---------------------------------------------------------------------------------
def start_daemon(src: Path, tmp: Path, server: dict[str, Any]) -> tuple[subprocess.Popen[str], str]:
    fake = src / "tests" / "fake_worker.py"
    lines = ["[server]", "port = 0"] + [f"{k} = {v!r}" for k, v in server.items()]
    lines += ["[worker]", f'command = "{sys.executable} {fake}"', "unload_after_s = -1",
              "exit_after_s = -1", "standby = false", "[storage]", f'dir = "{tmp / "var"}"']
    cfg = tmp / "config.toml"
    cfg.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("FAKE_")}
    return start_serve(cfg, env, cwd=tmp)


class RssSampler:
    """Samples a process's RSS every `interval_s` in a thread until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Burst:
    upload: str
    upload_kb: float
    clients: int
    statuses: dict[str, int]
    codes: dict[str, int]
    before_mb: float
    peak_mb: float
    after_mb: float
    wall_s: float


async def burst(url: str, name: str, data: bytes, clients: int, sampler: RssSampler) -> Burst:
    before = sampler.rss()
    sampler.peak = before
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}

    async def one(http: aiohttp.ClientSession) -> None:
        async with http.post("/v1/jobs", data=data,
                             headers={"Content-Type": "application/octet-stream"}) as r:
            body = await r.json()
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            code = body.get("error", {}).get("code") or body.get("status", "?")
            codes[code] = codes.get(code, 0) + 1

    start = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(url, timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(clients)))
    wall = time.monotonic() - start
    # "after": the lowest RSS over the next 2 s (freed memory shows up within that)
    after = sampler.rss()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        after = min(after, sampler.rss())
    return Burst(name, round(len(data) / 1024, 1), clients, statuses, codes,
                 round(before / MB, 1), round(sampler.peak / MB, 1), round(after / MB, 1),
                 round(wall, 2))


async def main_async(args: argparse.Namespace) -> list[Burst]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    uploads = {name: load_upload(name, cache) for name in args.uploads}
    results: list[Burst] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = {"max_concurrent_decodes": args.decodes} if args.decodes else {}
        proc, url = start_daemon(Path(args.src), Path(tmp), server)
        try:
            with RssSampler(proc.pid) as sampler:
                print(f"daemon pid {proc.pid} at {url}; idle RSS {sampler.rss() / MB:.1f} MB",
                      flush=True)
                for clients in args.clients:
                    for name, data in uploads.items():
                        b = await burst(url, name, data, clients, sampler)
                        results.append(b)
                        print(f"{b.upload:24s} {b.upload_kb:9.1f} KB x{b.clients:<3d} "
                              f"{b.codes}  RSS before {b.before_mb:7.1f}  peak "
                              f"{b.peak_mb:7.1f}  after {b.after_mb:7.1f} MB  "
                              f"{b.wall_s:6.2f} s", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[6, 12])
    ap.add_argument("--uploads", nargs="+", default=list(UPLOADS), choices=list(UPLOADS))
    ap.add_argument("--src", default=str(ROOT), help="checkout whose daemon to run")
    ap.add_argument("--decodes", type=int, default=0,
                    help="server.max_concurrent_decodes (0: the checkout's default)")
    ap.add_argument("--cache", default=str(ROOT / "bench" / "out" / "hostile"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "hostile_audio.json"))
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

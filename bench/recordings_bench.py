"""Long recordings (issue 12): decode time per minute of audio for each format, and an N-minute
recording end to end through `ondemand serve` with segments=vad (the real worker, CPU), with
the peak memory of the front end and of the worker.

    .venv/bin/python bench/recordings_bench.py [--model bench/models/plus_large]
        [--minutes 10,60] [--dtypes float32,bfloat16] [--formats-only] [--skip-formats]
        [--out bench/out/recordings.json]

The recording is real speech: tests/fixtures/media/dialogue.flac (espeak-ng, 17 s, ~45 %
pauses) repeated with varying gain, written as CD-quality WAV (44.1 kHz, 16-bit stereo: 606 MiB
for an hour), so the upload, the decode and the resampling are the expensive kind.  The formats
are encoded with PyAV (no system ffmpeg).  The model directory is made with
`ondemand make-test-model DIR --preset plus_large` when missing (random weights: the timings are
real, the labels meaningless).

Memory: VmHWM (peak resident set) of the `ondemand serve` process and of its worker, read from
/proc when the job is done; the worker is loaded before the upload (its load is reported apart).
"""

from __future__ import annotations

import argparse
import http.client
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
from urllib.parse import urlsplit

import harness  # bench/harness.py
import numpy as np
import soundfile as sf
import soxr

from ondemand.audio import Limits, decode_to

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
OUT = ROOT / "bench" / "out" / "recordings"
CD_RATE = 44100


def speech(minutes: float, rate: int = 16000) -> np.ndarray:
    """`minutes` of the dialogue fixture, repeated with a gain that changes every repeat."""
    x, r = sf.read(MEDIA / "dialogue.flac", dtype="float32")
    assert r == 16000
    n = int(minutes * 60 * 16000)
    reps = -(-n // len(x))
    gains = 0.5 + 0.5 * np.random.default_rng(0).random(reps)
    y = np.concatenate([g * x for g in gains])[:n]
    return y if rate == 16000 else soxr.resample(y, 16000, rate, quality="HQ").astype(np.float32)


def cd_wav(minutes: float) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"speech-{minutes:g}min-44k-stereo.wav"
    if not path.exists():
        mono = speech(minutes, CD_RATE)
        with sf.SoundFile(path, "w", CD_RATE, 2, subtype="PCM_16") as f:
            step = CD_RATE * 60
            for i in range(0, len(mono), step):
                block = mono[i:i + step]
                f.write(np.stack([block, 0.9 * block], axis=1))
    return path


# -- decode time per format ---------------------------------------------------------------------
def encode_av(mono16k: np.ndarray, path: Path, container: str, codec: str, rate: int,
              video: bool = False) -> None:
    import av

    with av.open(str(path), "w", format=container) as out:
        vstream = None
        if video:
            vstream = out.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 32, 32, "yuv420p"
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        src = soxr.resample(mono16k, 16000, rate, quality="HQ").astype(np.float32)
        stereo = np.stack([src, 0.9 * src])
        frame_size = 960 if codec == "libopus" else 1152 if codec == "libmp3lame" else 1024
        pts = 0
        for i in range(0, stereo.shape[1], frame_size * 50):
            chunk = np.ascontiguousarray(stereo[:, i:i + frame_size * 50])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = rate, pts
            pts += chunk.shape[1]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if vstream is not None:
            seconds = stereo.shape[1] / rate
            for k in range(int(seconds * 10)):
                img = np.full((32, 32, 3), (k * 7) % 255, np.uint8)
                vf = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
                vf.pts = k
                for packet in vstream.encode(vf):
                    out.mux(packet)
            for packet in vstream.encode(None):
                out.mux(packet)


def bench_formats(minutes: float = 2.0, runs: int = 3) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    mono = speech(minutes)
    stereo44 = speech(minutes, CD_RATE)
    files: dict[str, Path] = {}
    for name, fmt, subtype in (("wav-44k-stereo", "WAV", "PCM_16"),
                               ("flac-44k-stereo", "FLAC", "PCM_16")):
        files[name] = OUT / f"fmt-{name}.{fmt.lower()}"
        sf.write(files[name], np.stack([stereo44, 0.9 * stereo44], 1), CD_RATE, format=fmt,
                 subtype=subtype)
    files["mp3-44k-stereo"] = OUT / "fmt-mp3.mp3"
    sf.write(files["mp3-44k-stereo"], np.stack([stereo44, 0.9 * stereo44], 1), CD_RATE,
             format="MP3")
    for name, container, codec, rate, video in (
            ("ogg-opus-48k", "ogg", "libopus", 48000, False),
            ("webm-opus-48k", "webm", "libopus", 48000, False),
            ("m4a-aac-44k", "mp4", "aac", CD_RATE, False),
            ("mp4-video-aac-44k", "mp4", "aac", CD_RATE, True)):
        files[name] = OUT / f"fmt-{name}.{ 'ogg' if container == 'ogg' else container}"
        encode_av(mono, files[name], container, codec, rate, video)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                info = decode_to(path, Path(tmp) / "x.npy", Limits(3600.0, 1e6), durable=False)
                times.append(time.perf_counter() - t0)
            per_min = statistics.median(times) / (info.duration_s / 60)
            out[name] = {"reader": info.container, "seconds": round(info.duration_s, 2),
                         "bytes": path.stat().st_size, "decode_s_per_min": round(per_min, 4)}
            print(f"  {name:20s} via {info.container:24s} {per_min * 1000:7.1f} ms per minute")
    return out


# -- end to end ---------------------------------------------------------------------------------
def start_serve(config: Path) -> tuple[subprocess.Popen[str], str]:
    return harness.start_serve(config, {**os.environ, "PYTHONUNBUFFERED": "1"})


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(url: str, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status >= 400:
            raise SystemExit(f"{method} {path}: {resp.status} {data}")
        return data  # type: ignore[no-any-return]
    finally:
        conn.close()


def end_to_end(model: Path, wav: Path, dtype: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ondemand-rec-") as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[server]\nport = 0\nmax_upload_mb = 700.0\nmax_buffered_uploads_mb = 1400.0\n'
            f'read_timeout_s = 120.0\n[model]\npath = "{model}"\n'
            f'[worker]\ndevice = "cpu"\ndtype = "{dtype}"\nunload_after_s = -1\n'
            f'exit_after_s = -1\nstandby = false\nload_timeout_s = 600.0\n'
            f'[storage]\ndir = "{tmp}/var"\n')
        proc, url = start_serve(config)
        try:
            t0 = time.perf_counter()
            loaded = request(url, "POST", "/v1/worker/load", b"{}",
                             {"Content-Type": "application/json"})
            load_s = time.perf_counter() - t0
            worker_cpu0, front_cpu0 = cpu_s(loaded["pid"]), cpu_s(proc.pid)
            size = wav.stat().st_size
            t0 = time.perf_counter()
            with open(wav, "rb") as fh:
                sub = request(url, "POST", "/v1/jobs?segments=vad", fh,
                              {"Content-Type": "audio/wav", "Content-Length": str(size)})
            accepted_s = time.perf_counter() - t0
            while True:
                job = request(url, "GET", f"/v1/jobs/{sub['id']}?wait=30")
                if job["status"] in ("done", "failed", "cancelled"):
                    break
            total_s = time.perf_counter() - t0
            worker_pid = request(url, "GET", "/v1/status")["worker"]["pid"]
            worker_cpu_s = cpu_s(worker_pid) - worker_cpu0
            front_cpu_s = cpu_s(proc.pid) - front_cpu0
            res = job.get("result") or {}
            out = {
                "dtype": dtype, "status": job["status"], "error": job.get("error"),
                "audio_s": job["duration_s"], "upload_bytes": size,
                "load_s": round(load_s, 2),
                "accepted_s": round(accepted_s, 2),  # upload + decode + resample + spool (202)
                "compute_s": job["timings"]["compute_s"],
                "end_to_end_s": round(total_s, 2),
                "audio_s_per_s": round(job["duration_s"] / total_s, 2),
                "segments": len(res.get("segments", [])),
                "speech_s": (res.get("summary") or {}).get("speech_s"),
                "front_end_peak_mb": hwm_mb(proc.pid),
                "worker_peak_mb": hwm_mb(worker_pid),
                # CPU seconds the job took in each process: what a quiet machine would need
                # (other work on the shared cores stretches wall time, not CPU time)
                "worker_cpu_s": round(worker_cpu_s, 1),
                "front_end_cpu_s": round(front_cpu_s, 1),
                "audio_s_per_worker_cpu_s": round(job["duration_s"] / worker_cpu_s, 2),
                "load_avg_1m_end": round(os.getloadavg()[0], 2),
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print(f"  {wav.name} {dtype}: {json.dumps(out)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "bench" / "models" / "plus_large")
    ap.add_argument("--minutes", default="10,60")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--formats-only", action="store_true")
    ap.add_argument("--skip-formats", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "recordings.json")
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    if args.out.exists():
        report.update(json.loads(args.out.read_text()))
    if not args.skip_formats:
        print("decode time per minute of audio (median of 3):")
        report["formats"] = bench_formats()
    if not args.formats_only:
        if not (args.model / "model.pt").exists():
            subprocess.run([sys.executable, "-m", "ondemand", "make-test-model", str(args.model),
                            "--preset", "plus_large"], check=True)
        runs = report.setdefault("end_to_end", {})
        for minutes in [float(m) for m in args.minutes.split(",")]:
            wav = cd_wav(minutes)
            for dtype in args.dtypes.split(","):
                runs[f"{minutes:g}min-{dtype}"] = end_to_end(args.model.resolve(), wav, dtype)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

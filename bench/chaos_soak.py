"""Chaos soak: jobs keep flowing through `ondemand serve` while the worker and the front end are
killed, the worker is frozen and the disk fills up (issue 10).  Loopback only, bounded in count
and time.

    .venv/bin/python bench/chaos_soak.py [--jobs 2000] [--rate 10] [--events 60]
        [--max-seconds 420] [--seed 0] [--out bench/out/chaos_soak.json]

The daemon runs the fake worker (tests/fake_worker.py: the real protocol loop, FAKE_INFER_S
per batch, every batch logged to FAKE_LOG) with short liveness settings.  A client submits
`--jobs` clips, `--concurrency` at a time, each with a unique key, and retries a submission that
got no answer (front end down), 507 (disk full) or 503 (with Retry-After), the way a real client
would, paced at `--rate` submissions per second so that jobs flow for the whole soak.
Meanwhile one chaos event at a time, picked at random (seeded):

- `kill_worker`: SIGKILL the worker process;
- `stop_worker`: SIGSTOP the worker and leave it stopped: the daemon must find it hung (no
  heartbeat for worker.heartbeat_timeout_s on a batch) and SIGKILL it;
- `kill_front_end`: SIGKILL `ondemand serve` (the worker dies with it, PR_SET_PDEATHSIG), wait,
  start it again on the same port;
- `fill_disk`: fill storage.dir (a tmpfs mounted for the soak) for a few seconds, then free it
  (skipped, and said so, when a tmpfs cannot be mounted: that needs root).

Afterwards (chaos stopped, the queue given `--drain-seconds` to empty) it reads the job rows and
the fake worker's log and reports: submissions accepted (202), done, failed (by reason), lost
(a 202'd id missing or not final: must be 0), stuck past their deadline (must be 0), how often
each done job's batch ran (a kill mid-batch runs it again; a job is still *done* once: one row,
finished once), worker exits by kind, the SIGSTOPped workers the daemon killed as hung, the front
end's peak RSS (psutil, every incarnation), SIGSTOPped workers still alive at the end (must be
0: the daemon killed them as hung, or they died with a killed front end), tracebacks in its log,
and the exit status of the final SIGTERM (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
FAKE_WORKER = ROOT / "tests" / "fake_worker.py"
SERVING = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")
EXIT_KIND = re.compile(r"worker pid=(\d+) exit kind=(\w+)")
HUNG = re.compile(r"worker pid=(\d+) hung: batch (\S+) .* no heartbeat for ([\d.]+)s")

SETTINGS: dict[str, dict[str, Any]] = {
    "server": {"stop_timeout_s": 10.0, "max_wait_s": 5.0},
    "worker": {"unload_after_s": -1, "exit_after_s": -1, "standby": False, "stop_timeout_s": 2.0,
               "load_timeout_s": 20.0, "batch_audio_s": 4.0, "heartbeat_s": 0.25,
               "heartbeat_timeout_s": 2.0, "batch_deadline_min_s": 5.0,
               "batch_deadline_factor": 10.0, "release_timeout_s": 0.0},
    "queue": {"max_pending": 5000, "max_attempts": 5},
    "storage": {"retry_min_s": 0.1, "retry_max_s": 1.0},
    "cost": {"sample_interval_s": 1.0},
}
# A job is stuck when it is not final this long after the soak's chaos stopped: the longest
# batch deadline plus a worker restart, with room to spare.
STUCK_AFTER_S = 60.0


def wav(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, int | float) else json.dumps(str(v))

    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in vals.items())
                   for name, vals in sections.items())


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Any:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        yield False, (r.stderr.strip() or f"mount exited {r.returncode}")
        return
    try:
        yield True, ""
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "chaos-filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    f.write(chunk[:size])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return filler


@dataclass
class FrontEnd:
    """`ondemand serve` incarnations on one port; their stderr appended to one log file."""

    config: Path
    env: dict[str, str]
    log: Path
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ondemand", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err, env=self.env)
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(offset)
                m = SERVING.search(f.read().decode(errors="replace"))
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"ondemand serve did not start; see {self.log}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def worker_pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children():
                if child.status() != psutil.STATUS_ZOMBIE:
                    return int(child.pid)
        return None

    def watch_memory(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(0.2):
                proc = self.proc
                if proc is None or proc.poll() is not None:
                    continue
                with contextlib.suppress(psutil.Error):
                    self.peak_rss = max(self.peak_rss, psutil.Process(proc.pid).memory_info().rss)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop_watching(self) -> None:
        self._stop.set()


@dataclass
class Tally:
    accepted: dict[str, list[str]] = field(default_factory=dict)  # key -> job ids (202s)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    stopped: list[int] = field(default_factory=list)  # worker pids we SIGSTOPped
    disk_full_s: float = 0.0
    skipped: list[str] = field(default_factory=list)


async def submit_all(fe: FrontEnd, clips: list[tuple[str, bytes]], concurrency: int,
                     rate: float, tally: Tally, deadline: float) -> None:
    """Submit every clip, paced at `rate` per second (jobs flow through the whole soak)."""
    it = iter(enumerate(clips))
    timeout = aiohttp.ClientTimeout(total=30)
    t0 = time.monotonic()

    async def one(http: aiohttp.ClientSession) -> None:
        for i, (key, body) in it:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            while time.monotonic() < deadline:
                try:
                    async with http.post(f"{fe.url}/v1/jobs", data=body, params={"key": key},
                                         headers={"Content-Type": "audio/wav"}) as r:
                        payload = await r.json(content_type=None)
                        tally.answers[str(r.status)] += 1
                        if r.status == 202:
                            tally.accepted.setdefault(key, []).append(payload["id"])
                            break
                        wait = float(r.headers.get("Retry-After", "0.5"))
                        await asyncio.sleep(min(wait, 1.0))
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    # Front end down (or killed mid-answer): a real client retries; if the lost
                    # answer was a 202, the job exists twice (both must complete).
                    tally.answers["no answer"] += 1
                    await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(concurrency)))


async def chaos(fe: FrontEnd, disk: Path | None, rng: random.Random, tally: Tally,
                stop: asyncio.Event, max_events: int) -> None:
    kinds = ["kill_worker", "stop_worker", "kill_front_end", "fill_disk"]
    if disk is None:
        kinds.remove("fill_disk")
    n = 0
    while not stop.is_set() and n < max_events:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(1.0, 3.0))
        if stop.is_set():
            return
        kind = rng.choice(kinds)
        pid = fe.worker_pid()
        if kind in ("kill_worker", "stop_worker") and pid is None:
            continue  # no worker right now (starting or cold): pick again later
        n += 1
        tally.events[kind] += 1
        if kind == "kill_worker" and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        elif kind == "stop_worker" and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                tally.stopped.append(pid)
        elif kind == "kill_front_end":
            await asyncio.to_thread(fe.kill)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(fe.start)
        elif kind == "fill_disk" and disk is not None:
            hold = rng.uniform(2.0, 4.0)
            t0 = time.monotonic()
            filler = await asyncio.to_thread(fill, disk)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), hold)
            filler.unlink()
            tally.disk_full_s += time.monotonic() - t0


async def wait_drained(fe: FrontEnd, deadline: float) -> bool:
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                async with http.get(f"{fe.url}/v1/status") as r:
                    q = (await r.json())["queue"]
                    if q["queued"] == 0 and q["running"] == 0:
                        return True
            await asyncio.sleep(0.2)
    return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def report(tally: Tally, db: Path, fake_log: Path, serve_log: Path, fe: FrontEnd,
           exit_status: int | None, seconds: float, jobs: int, tmpfs_note: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = {r[0]: {"key": r[1], "status": r[2], "attempts": r[3],
                       "error": json.loads(r[4]) if r[4] else None,
                       "latency_s": (r[6] - r[5]) if r[6] is not None else None}
                for r in conn.execute(
                    "SELECT id, key, status, attempts, error, created, finished FROM jobs")}
    accepted_ids = {i for ids in tally.accepted.values() for i in ids}
    lost = sorted(i for i in accepted_ids if i not in rows)
    pending = sorted(i for i, r in rows.items() if r["status"] in ("queued", "running"))
    done = [i for i in accepted_ids if i in rows and rows[i]["status"] == "done"]
    failed = [i for i in accepted_ids if i in rows and rows[i]["status"] == "failed"]
    reasons = collections.Counter(rows[i]["error"]["code"] for i in failed)
    runs: collections.Counter[str] = collections.Counter()
    for line in fake_log.read_text().splitlines():
        e = json.loads(line)
        if e["op"] == "infer":
            runs.update(e["keys"])
    never_ran = [i for i in done if runs[rows[i]["key"]] == 0]
    runs_hist = collections.Counter(runs[rows[i]["key"]] for i in done)
    text = serve_log.read_text(errors="replace")
    exits = collections.Counter(kind for _pid, kind in EXIT_KIND.findall(text))
    hung = {int(pid): float(s) for pid, _b, s in HUNG.findall(text)}
    stopped = set(tally.stopped)  # a stopped worker may be picked twice
    stopped_killed = [pid for pid in stopped if pid in hung]
    # Rows no 202 named: a submission whose answer was lost when the front end was killed (the
    # client then sent it again).  They are jobs too, and must be final.
    extra = collections.Counter(r["status"] for i, r in rows.items() if i not in accepted_ids)
    latencies = sorted(rows[i]["latency_s"] for i in done if rows[i]["latency_s"] is not None)
    return {
        "jobs": jobs,
        "seconds": round(seconds, 1),
        "submissions_answered": dict(tally.answers),
        "accepted_202": len(accepted_ids),
        "keys_accepted_twice": sum(len(v) > 1 for v in tally.accepted.values()),
        "done": len(done),
        "failed": len(failed),
        "failed_by_reason": dict(reasons),
        "lost": len(lost),
        "stuck": len(pending),
        "done_jobs_whose_batch_ran": {f"{k}x": v for k, v in sorted(runs_hist.items())},
        "done_without_a_run_in_the_worker_log": len(never_ran),
        "job_latency_s": {
            "p50": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "max": round(latencies[-1], 3) if latencies else None},
        "chaos_events": dict(tally.events),
        "disk_full_seconds": round(tally.disk_full_s, 1),
        "disk_fill": tmpfs_note,
        "worker_exits_by_kind": dict(exits),
        "rows_whose_202_was_lost": dict(extra),
        "sigstopped_workers": len(stopped),
        "sigstopped_killed_as_hung": len(stopped_killed),
        "sigstopped_left_alive": sum(_alive(pid) for pid in stopped),
        "hung_kill_after_s_max": round(max(hung.values()), 2) if hung else None,
        "front_end_starts": fe.starts,
        "front_end_peak_rss_mb": round(fe.peak_rss / 2**20, 1),
        "tracebacks_in_log": text.count("Traceback"),
        "final_sigterm_exit_status": exit_status,
        "examples": {"lost": lost[:5], "stuck": pending[:5]},
    }


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    var, fake_log, serve_log = work / "var", work / "fake.log", work / "serve.log"
    with tmpfs(var, args.tmpfs_mb) as (mounted, why):
        tmpfs_note = (f"tmpfs {args.tmpfs_mb} MB" if mounted
                      else f"skipped: cannot mount a tmpfs ({why}); needs root")
        sections = {k: dict(v) for k, v in SETTINGS.items()}
        sections["server"]["port"] = free_port()
        sections["worker"]["command"] = f"{sys.executable} {FAKE_WORKER}"
        sections["storage"]["dir"] = str(var)
        config = work / "config.toml"
        config.write_text(toml(sections))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        env.update(FAKE_INFER_S=str(args.infer_s), FAKE_LOG=str(fake_log), PYTHONUNBUFFERED="1")
        fe = FrontEnd(config, env, serve_log)
        fe.start()
        fe.watch_memory()
        clips = [(f"k{i:05d}", wav(0.15 + (i % 7) * 0.03, 180 + i % 11)) for i in range(args.jobs)]
        tally = Tally()
        t0 = time.monotonic()
        deadline = t0 + args.max_seconds
        stop = asyncio.Event()
        chaos_task = asyncio.create_task(
            chaos(fe, var if mounted else None, rng, tally, stop, args.events))
        await submit_all(fe, clips, args.concurrency, args.rate, tally, deadline)
        # keep the chaos going while the queue drains, up to the time bound
        while not chaos_task.done() and time.monotonic() < deadline:
            if await wait_drained(fe, min(deadline, time.monotonic() + 2.0)):
                break
        stop.set()
        await chaos_task
        await wait_drained(fe, time.monotonic() + STUCK_AFTER_S)
        seconds = time.monotonic() - t0
        assert fe.proc is not None
        fe.proc.send_signal(signal.SIGTERM)
        exit_status = fe.proc.wait(60)
        fe.stop_watching()
        return report(tally, var / "jobs.sqlite3", fake_log, serve_log, fe, exit_status,
                      seconds, args.jobs, tmpfs_note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=10.0, help="submissions per second")
    ap.add_argument("--events", type=int, default=60, help="chaos events at most")
    ap.add_argument("--max-seconds", type=float, default=420.0, help="submissions and chaos")
    ap.add_argument("--infer-s", type=float, default=0.05, help="FAKE_INFER_S per batch")
    ap.add_argument("--tmpfs-mb", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "chaos_soak.json")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    try:
        result = asyncio.run(soak(args, work))
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = (result["lost"] == 0 and result["stuck"] == 0
          and result["final_sigterm_exit_status"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

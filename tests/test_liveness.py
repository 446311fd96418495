"""Liveness of a busy worker, cancelling a running job, non-finite model output (issue 10).

- A SIGSTOPped worker (a batch inside it) sends no heartbeat: /v1/status shows `stalled_s` and
  /readyz 503 while it lasts, then the supervisor SIGKILLs it (exit kind `hung`, one WARNING line
  with pid, batch and seconds) and a fresh worker does the job on attempt 2.
- A batch that keeps beating but runs past its deadline is killed as `batch_timeout`; a batch
  that always does fails after queue.max_attempts with the reason.
- DELETE of a running job answers 200 cancelled; its result (and embedding) is dropped when the
  batch returns, its batch-mate finishes normally.
- NaN scores from the model fail that job with `non_finite_output`; its batch-mate is done.
- The worker's heartbeat thread and its answers never interleave on the pipe.

Every wait is on a condition with a deadline; the fake worker is held in its batch by a gate
file, a hang knob or SIGSTOP, never by a bet on timing."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ondemand import config as config_mod
from ondemand import protocol as p
from ondemand.daemon import api
from ondemand.errors import ConfigError
from ondemand.worker.main import LoadInfo, Worker
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    fake_log,
    gated_worker,
    nth_spawn_worker,
    pid_alive,
    run,
    wait_for,
    wav_bytes,
)

BEAT = {"heartbeat_s": 0.1, "heartbeat_timeout_s": 2.0}


def in_batch(log: Path, n: int = 1) -> bool:
    return sum(e["op"] == "infer" for e in fake_log(log)) >= n


def test_sigstopped_worker_is_killed_as_hung_and_a_fresh_one_does_the_job(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = tmp_path / "fake.log"
    # The first worker's batch takes a minute: the stop lands inside it for certain.
    worker = nth_spawn_worker(tmp_path / "spawns", 1, infer_s="60")

    async def main() -> None:
        cfg = daemon_config(tmp_path / "var", worker=BEAT)
        async with Daemon(cfg, worker_cmd=worker, env=fake_env(log=str(log))) as d:
            job = await d.submit(wav_bytes(0.5))
            await wait_for(lambda: in_batch(log), 10, "the batch inside the worker")
            pid = d.sup.status().pid
            assert pid is not None
            t_stop = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            seen: dict[str, Any] = {}

            async def stall_shown() -> bool:
                async with d.http.get("/readyz") as r:
                    body = await r.json()
                worker_st = (await d.status())["worker"]
                if r.status == 503 and "stalled" in body["reason"] and worker_st["stalled_s"]:
                    seen.update(readyz=body, worker=worker_st)
                    return True
                return False

            await wait_for(stall_shown, 10, "/readyz 503 and stalled_s while the worker is stopped")
            assert f"pid {pid}" in seen["readyz"]["reason"]
            assert seen["worker"]["state"] == "ready" and seen["worker"]["batch_s"] > 0
            assert (await d.job(job["id"]))["status"] == "running"

            done = await d.final(job["id"], 30)
            killed_after = time.monotonic() - t_stop
            assert done["status"] == "done" and done["attempts"] == 2, done
            exits = d.exits()
            assert [e.kind for e in exits] == ["hung"] and exits[0].pid == pid, exits
            assert "SIGKILL" in exits[0].detail and "no heartbeat" in exits[0].detail
            assert killed_after >= BEAT["heartbeat_timeout_s"] - 0.5
            assert not pid_alive(pid)
            infers = [e["pid"] for e in fake_log(log) if e["op"] == "infer"]
            assert infers == [pid, d.sup.status().pid]  # a fresh worker did the retry
            status = (await d.status())["worker"]
            assert status["last_exit"]["kind"] == "hung" and status["last_exit"]["pid"] == pid
            assert status["stalled_s"] is None and status["batch_s"] is None
            async with d.http.get("/readyz") as r:
                assert r.status == 200

    run(main())
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and " hung: batch " in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "no heartbeat for" in warnings[0] and "pid=" in warnings[0]


def test_batch_past_its_deadline_is_killed_as_batch_timeout(tmp_path: Path) -> None:
    log = tmp_path / "fake.log"
    worker = nth_spawn_worker(tmp_path / "spawns", 1, hang_batch="1")  # beats, never answers
    # deadline = max(1 s, 1 x 0.5 s of audio / 100 audio-s per s) = 1 s; heartbeats keep coming
    cfg = daemon_config(tmp_path / "var", worker={
        "heartbeat_s": 0.1, "heartbeat_timeout_s": 30.0, "batch_deadline_min_s": 1.0,
        "batch_deadline_factor": 1.0, "batch_default_speed": 100.0})

    async def main() -> None:
        async with Daemon(cfg, worker_cmd=worker, env=fake_env(log=str(log))) as d:
            job = await d.submit(wav_bytes(0.5))
            await wait_for(lambda: in_batch(log), 10, "the batch inside the worker")
            st = d.sup.status()
            assert st.batch_deadline_s is not None and st.batch_deadline_s <= 1.0
            done = await d.final(job["id"], 30)
            assert done["status"] == "done" and done["attempts"] == 2, done
            exits = d.exits()
            assert [e.kind for e in exits] == ["batch_timeout"], exits
            assert "past its deadline of 1.0s" in exits[0].detail

    run(main())


def test_a_batch_that_always_hangs_fails_after_max_attempts(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path / "var", queue={"max_attempts": 2}, worker={
        "heartbeat_s": 0.1, "heartbeat_timeout_s": 30.0, "batch_deadline_min_s": 0.5,
        "batch_deadline_factor": 1.0})

    async def main() -> None:
        async with Daemon(cfg, env=fake_env(hang_batch="1")) as d:
            job = await d.final((await d.submit(wav_bytes(0.5)))["id"], 30)
            assert job["status"] == "failed" and job["attempts"] == 2, job
            assert job["error"]["code"] == "worker_crashed"
            assert "batch_timeout" in job["error"]["message"]
            assert [e.kind for e in d.exits()] == ["batch_timeout"] * 2

    run(main())


def test_cancel_a_running_job_while_its_batch_mate_finishes(tmp_path: Path) -> None:
    log, start, batch_gate = tmp_path / "fake.log", tmp_path / "start", tmp_path / "batch"
    var = tmp_path / "var"
    cfg = daemon_config(var, worker={"batch_audio_s": 8.0})

    async def main() -> None:
        async with Daemon(cfg, worker_cmd=gated_worker(start),
                          env=fake_env(log=str(log), gate=str(batch_gate))) as d:
            a = await d.submit(wav_bytes(0.5), key="a", embedding="true")
            b = await d.submit(wav_bytes(0.6), key="b", embedding="true")
            start.touch()  # both were queued: one batch holds them
            await wait_for(lambda: in_batch(log), 10, "the batch inside the worker")
            assert [e["keys"] for e in fake_log(log) if e["op"] == "infer"] == [["a", "b"]]
            assert (await d.job(a["id"]))["status"] == "running"
            waiter = asyncio.ensure_future(d.job(a["id"], wait=10))
            async with d.http.delete(f"/v1/jobs/{a['id']}") as r:
                assert r.status == 200
                assert await r.json() == {"id": a["id"], "status": "cancelled"}
            assert (await waiter)["status"] == "cancelled"  # long-polls learn it at once
            batch_gate.touch()
            done_b = await d.final(b["id"])
            assert done_b["status"] == "done" and done_b["result"]["key"] == "b"
            store = d.app[api.STORE]
            await wait_for(lambda: not store.embedding_path(a["id"]).exists(), 10,
                           "the cancelled job's embedding dropped")
            assert store.embedding_path(b["id"]).exists()
            job_a = await d.job(a["id"])
            assert job_a["status"] == "cancelled" and job_a["result"] is None
            # the batch ran once, the worker was not disturbed
            assert len([e for e in fake_log(log) if e["op"] == "infer"]) == 1
            assert d.exits() == [] and d.sup.spawns == 1
            async with d.http.delete(f"/v1/jobs/{a['id']}") as r:
                assert await r.json() == {"id": a["id"], "deleted": True}

    run(main())


def test_non_finite_model_output_fails_the_job_not_its_batch_mate(tmp_path: Path) -> None:
    log, start = tmp_path / "fake.log", tmp_path / "start"
    cfg = daemon_config(tmp_path / "var", worker={"batch_audio_s": 8.0})

    async def main() -> None:
        async with Daemon(cfg, worker_cmd=gated_worker(start),
                          env=fake_env(log=str(log), nan="poison")) as d:
            bad = await d.submit(wav_bytes(0.5), key="poison-1")
            good = await d.submit(wav_bytes(0.5), key="fine")
            start.touch()
            bad_job = await d.final(bad["id"])
            assert bad_job["status"] == "failed" and bad_job["attempts"] == 1, bad_job
            assert bad_job["error"]["code"] == "non_finite_output"
            assert "NaN" in bad_job["error"]["message"] and bad_job["result"] is None
            good_job = await d.final(good["id"])
            assert good_job["status"] == "done"
            assert all(math.isfinite(x) for x in good_job["result"]["scores"])
            assert [e["keys"] for e in fake_log(log) if e["op"] == "infer"] == [
                ["poison-1", "fine"]]  # one batch, not retried

    run(main())


# -- the worker side: heartbeats from a thread, whole lines ---------------------------------------
class _Slow:
    embedding = None

    def to_json(self) -> dict[str, Any]:
        return {"key": "k", "scores": [0.5, 0.5]}


class _SlowBackend:
    def load(self, op: p.Load) -> LoadInfo:
        return LoadInfo(device="cpu", dtype="float32")

    def infer(self, clips: Sequence[tuple[str, np.ndarray]], *, granularity: p.Granularity,
              embeddings: bool, batch_audio_s: float | None) -> list[_Slow]:
        time.sleep(0.4)  # a long batch in the model (the GIL released, as in torch's kernels)
        return [_Slow() for _ in clips]

    def unload(self) -> None:
        pass


class _Racy(io.StringIO):
    """Writes slowly, character by character: two unsynchronised writers would interleave."""

    def write(self, s: str) -> int:
        for ch in s:
            super().write(ch)
            if ch == "}":
                threading.Event().wait(0.001)
        return len(s)


def test_worker_beats_from_a_thread_and_lines_never_interleave(tmp_path: Path) -> None:
    audio = tmp_path / "a.npy"
    np.save(audio, np.zeros(1600, np.float32))
    out = _Racy()
    worker = Worker(_SlowBackend(), out)
    worker.handle(p.Load(model="m", revision="", cache_dir="", device="cpu", dtype="float32"))
    op = p.Infer(batch="b1", granularity="utterance",
                 items=(p.InferItem(job="j", key="k", audio=str(audio)),), heartbeat_s=0.02)
    worker.handle(op)
    events = [p.decode_event(line) for line in out.getvalue().splitlines()]
    beats = [e for e in events if isinstance(e, p.Heartbeat)]
    assert len(beats) >= 5 and all(b.batch == "b1" for b in beats)
    assert [b.seconds for b in beats] == sorted(b.seconds for b in beats)
    assert isinstance(events[-1], p.Result)  # no beat after the answer
    assert events[-1].results[0].result == {"key": "k", "scores": [0.5, 0.5]}


@pytest.mark.parametrize(("section", "values", "message"), [
    ("worker", {"heartbeat_s": 2.0, "heartbeat_timeout_s": 3.0},
     "worker.heartbeat_timeout_s: must be >= 2 x worker.heartbeat_s (4)"),
    ("worker", {"heartbeat_s": 0}, "worker.heartbeat_s: must be > 0"),
    ("worker", {"batch_deadline_factor": 0.5}, "worker.batch_deadline_factor: must be >= 1"),
    ("worker", {"batch_default_speed": float("inf")},
     "worker.batch_default_speed: must be a finite"),
    ("storage", {"retry_min_s": 2.0, "retry_max_s": 1.0},
     "storage.retry_max_s: must be >= storage.retry_min_s (2)"),
])
def test_liveness_settings_are_checked(section: str, values: dict[str, float],
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_mod.build(config_mod.Config, {section: values})


def test_a_worker_that_never_answers_unload_is_killed_as_hung(tmp_path: Path) -> None:
    """The unload is an op too: a worker that does not answer it within heartbeat_timeout_s is
    hung (before, the daemon stayed `unloading` and every job waited forever)."""
    cfg = daemon_config(tmp_path / "var", worker={**BEAT, "unload_after_s": 0})

    async def main() -> None:
        # the first worker's unload never finishes
        worker = nth_spawn_worker(tmp_path / "spawns", 1, unload_s="60")
        async with Daemon(cfg, worker_cmd=worker) as d:
            first = await d.final((await d.submit(wav_bytes(0.5)))["id"])
            assert first["status"] == "done"
            await d.wait_state("unloading")
            second = await d.submit(wav_bytes(0.5))  # waits for the model meanwhile
            done = await d.final(second["id"], 20)
            assert done["status"] == "done" and done["attempts"] == 1, done
            exits = d.exits()
            assert [e.kind for e in exits] == ["hung"] and "no answer" in exits[0].detail
            assert d.sup.spawns == 2

    run(main())

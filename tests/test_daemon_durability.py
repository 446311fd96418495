"""Durability and scale to zero, against `ondemand serve` in a subprocess and in-process."""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ondemand.client import Client
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    fake_log,
    nth_spawn_worker,
    pid_alive,
    run,
    serve_config,
    start_serve,
    wait_for,
    wav_bytes,
)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `cond` (a request to a daemon in another process) until true."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def test_kill_9_front_end_loses_no_job_and_runs_each_once(tmp_path: Path) -> None:
    """kill -9 of the front end with three jobs done, one inside a batch and eight queued: after
    a restart all twelve are done, the done ones were not run again and the interrupted one ran
    again with its attempt counted.  The second worker hangs in its batch (nth_spawn_worker), so
    the kill lands inside it for certain."""
    worker = nth_spawn_worker(tmp_path / "spawns", 2, hang_batch="1")
    cfg = serve_config(tmp_path, server={"stop_timeout_s": 2.0},
                       worker={"command": shlex.join(worker), "exit_after_s": 0.2,
                               "batch_audio_s": 0.01})  # one job per batch
    log = tmp_path / "fake.log"
    env = fake_env(log=str(log))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(0.5))
    keys = [f"k{i}" for i in range(12)]

    proc, url = start_serve(cfg, env)
    try:
        client = Client(url)
        ids = [client.submit(clip, key=k)["id"] for k in keys[:3]]
        assert [client.wait(i, poll_s=5)["status"] for i in ids] == ["done"] * 3
        wait_until(lambda: client.status()["worker"]["state"] == "cold", 20, "the first exit")
        ids += [client.submit(clip, key=k)["id"] for k in keys[3:]]
        wait_until(lambda: any(e.get("keys") == ["k3"] for e in fake_log(log)), 20,
                   "k3 inside the second worker's batch")
        worker_pid = client.status()["worker"]["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the worker dies with its parent (PR_SET_PDEATHSIG)
    wait_until(lambda: not pid_alive(worker_pid), 10, "the worker to die with the front end")
    before = fake_log(log)

    proc, url = start_serve(cfg, env)
    try:
        client = Client(url)
        jobs = [client.wait(i, poll_s=5) for i in ids]
        assert [j["status"] for j in jobs] == ["done"] * 12
        assert [j["result"]["key"] for j in jobs] == keys
        assert [j["attempts"] for j in jobs] == [1, 1, 1, 2] + [1] * 8
        after = fake_log(log)[len(before):]
        first_keys = [k for e in before if e["op"] == "infer" for k in e["keys"]]
        second_keys = [k for e in after if e["op"] == "infer" for k in e["keys"]]
        assert first_keys == keys[:4]  # three done, k3 interrupted
        assert second_keys == keys[3:]  # each once: the done ones were not run again
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_scale_to_zero_after_exit_after_s(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"unload_after_s": -1, "exit_after_s": 0.3})
        async with Daemon(cfg) as d:
            job = await d.final((await d.submit(wav_bytes(0.5)))["id"])
            pid = d.sup.status().pid or next(
                e.pid for e in d.events if getattr(e, "pid", None))
            assert job["status"] == "done"
            await d.wait_state("cold", timeout=5)
            assert not pid_alive(pid)
            st = (await d.status())["worker"]
            assert st["pid"] is None and st["state"] == "cold"

    run(main())


def test_unload_keeps_the_process_and_the_next_job_reuses_it(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"unload_after_s": 0.2, "exit_after_s": 30})
        log = tmp_path / "fake.log"
        async with Daemon(cfg, env=fake_env(log=str(log))) as d:
            t0 = time.monotonic()  # the idle countdown starts after this
            await d.final((await d.submit(wav_bytes(0.5)))["id"])
            pid = d.sup.status().pid
            await d.wait_state("unloaded", timeout=10)
            st = (await d.status())["worker"]
            assert st["pid"] == pid and pid_alive(pid)
            assert 30 - (time.monotonic() - t0) <= st["exit_in_s"] <= 30
            assert st["unload_in_s"] is None
            job = await d.final((await d.submit(wav_bytes(0.5)))["id"])
            assert job["status"] == "done"
            assert d.sup.status().pid == pid and d.sup.spawns == 1 and d.sup.loads == 2
            assert [e["op"] for e in fake_log(log)] == ["load", "infer", "unload", "load",
                                                         "infer"]
            await wait_for(lambda: d.sup.state.value == "unloaded", 5, "unloaded again")

    run(main())


def test_serve_front_end_is_small_and_torch_free(tmp_path: Path) -> None:
    import psutil

    proc, url = start_serve(serve_config(tmp_path), fake_env())
    try:
        Client(url).status()
        rss_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps
        assert rss_mb < 80, rss_mb
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert os.path.isdir(tmp_path / "var")

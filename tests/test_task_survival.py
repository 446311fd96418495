"""Owner tasks never die quietly (issue 10).

- Disk full at the moment a batch finishes (a real tmpfs as storage.dir, filled while the batch is
  inside the worker): the dispatcher survives, the job stays `running` with its result in memory,
  /readyz is 503 with the reason, and once space is freed the result is written (the batch is not
  run again) and /readyz is 200.  Skipped with the reason when a tmpfs cannot be mounted.
- SIGTERM while that write still fails: exit status 0, no traceback; after a restart with space
  the job is done.
- A task that dies (a fake component whose task raises: the seam is an extra component, not a
  mock of the guard or of serve()): /readyz 503 naming it, one ERROR line naming it, the
  running batch still finishes, and `ondemand serve` exits 1.
- TaskGuard's rules: an owner that retires its task, or a shutdown, is not a failure; an
  exception always is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ondemand.daemon import api
from ondemand.daemon.guard import TaskGuard
from ondemand.prewarm.rules import build_rules
from tests.conftest import (
    SERVING,
    Daemon,
    daemon_config,
    fake_env,
    fake_log,
    run,
    serve_config,
    wait_for,
    wav_bytes,
)

RETRY = {"retry_min_s": 0.05, "retry_max_s": 0.5}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs: a disk that really fills up (ENOSPC from the kernel, SQLITE_FULL)."""
    mnt = tmp_path / "var"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the test "
                    "needs root (CAP_SYS_ADMIN) to give the daemon a disk that really fills")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    f.write(chunk[:size])
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    return filler


def rows(db: Path) -> dict[str, tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, status, attempts FROM jobs")}


def test_disk_full_as_a_batch_finishes_keeps_the_job_retryable(tmp_path: Path,
                                                                tmpfs: Path) -> None:
    log, gate = tmp_path / "fake.log", tmp_path / "gate"  # both outside the full disk

    async def main() -> None:
        base = daemon_config(tmpfs)
        cfg = dataclasses.replace(base, storage=dataclasses.replace(base.storage, **RETRY))
        async with Daemon(cfg, env=fake_env(log=str(log), gate=str(gate))) as d:
            job = await d.submit(wav_bytes(0.5))
            await wait_for(lambda: any(e["op"] == "infer" for e in fake_log(log)), 10,
                           "the batch inside the worker")
            filler = fill(tmpfs)
            gate.touch()  # the batch returns onto a full disk
            reasons: list[str] = []

            async def not_ready() -> bool:
                async with d.http.get("/readyz") as r:
                    if r.status == 503:
                        reasons.append((await r.json())["reason"])
                        return True
                    return False

            await wait_for(not_ready, 10, "/readyz 503 while the result cannot be written")
            assert "full" in reasons[0], reasons
            assert d.app[api.DISPATCHER].blocked is not None
            assert (await d.job(job["id"]))["status"] == "running"  # retryable, not lost
            async with d.http.post("/v1/jobs", data=wav_bytes(0.5),
                                   headers={"Content-Type": "audio/wav"}) as r:
                assert r.status == 507, await r.text()  # nothing new is accepted meanwhile
            task = d.app[api.DISPATCHER].task
            assert task is not None and not task.done()

            filler.unlink()  # space comes back: the result waiting in memory is written
            done = await d.final(job["id"], 20)
            assert done["status"] == "done" and done["attempts"] == 1, done

            async def ready() -> bool:
                async with d.http.get("/readyz") as r:
                    return r.status == 200

            await wait_for(ready, 10, "/readyz 200 once the disk has space")
            assert d.app[api.DISPATCHER].blocked is None
            assert [e["op"] for e in fake_log(log)].count("infer") == 1  # not run again
            nxt = await d.final((await d.submit(wav_bytes(0.5)))["id"])  # the queue moves
            assert nxt["status"] == "done"

    run(main())


# -- `ondemand serve` in a subprocess, its log kept in a file ----------------------------------
def serve_logged(argv: list[str], env: dict[str, str], log: Path,
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """Start a daemon with stderr going to `log`; returns it and its URL once it listens."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        m = SERVING.search(log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the daemon did not start:\n{log.read_text(errors='replace')}")


async def _status(url: str, path: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession(url) as http, http.get(path) as r:
        return r.status, await r.json()


async def _submit(url: str) -> str:
    async with aiohttp.ClientSession(url) as http, http.post(
            "/v1/jobs", data=wav_bytes(0.5), headers={"Content-Type": "audio/wav"}) as r:
        body = await r.json()
        assert r.status == 202, body
        return str(body["id"])


def test_sigterm_while_a_result_cannot_be_written_exits_0_and_the_job_survives(
        tmp_path: Path, tmpfs: Path) -> None:
    log, gate, err = tmp_path / "fake.log", tmp_path / "gate", tmp_path / "serve.log"
    cfg = serve_config(tmp_path, storage={"dir": str(tmpfs), **RETRY})
    argv = [sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)]
    env = fake_env(log=str(log), gate=str(gate))
    proc, url = serve_logged(argv, env, err)
    try:
        job_id = run(_submit(url))
        deadline = time.monotonic() + 10
        while not any(e["op"] == "infer" for e in fake_log(log)):
            assert time.monotonic() < deadline, "the batch never reached the worker"
            time.sleep(0.02)
        filler = fill(tmpfs)
        gate.touch()

        async def blocked() -> bool:
            code, body = await _status(url, "/readyz")
            return code == 503 and "full" in str(body["reason"])

        run(wait_for(blocked, 10, "/readyz 503 while the result cannot be written"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert "requeued at the next start" in text, text
    filler.unlink()
    proc, url = serve_logged(argv, env, tmp_path / "serve2.log")
    try:
        async def finished() -> bool:
            _, body = await _status(url, f"/v1/jobs/{job_id}")
            return body["status"] == "done"

        run(wait_for(finished, 20, "the job done after the restart"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert rows(tmpfs / "jobs.sqlite3")[job_id] == ("done", 2)  # the interrupted run counted


# A daemon with one extra component whose task dies when a file appears.  The fault is injected
# by adding a component (as a plugin would), not by replacing the guard, the app or serve().
FAULTY = """
import asyncio, os, sys
from pathlib import Path
from ondemand.daemon import api, app as app_mod

real_build_app = app_mod.build_app

def build_app(cfg, **kw):
    app = real_build_app(cfg, **kw)

    async def doomed_ctx(app):
        async def doomed():
            while not Path(os.environ["DOOM"]).exists():
                await asyncio.sleep(0.02)
            raise RuntimeError("injected fault")

        task = asyncio.create_task(doomed(), name="doomed")
        with app[api.GUARD].watching(task):
            yield
        task.cancel()

    app.cleanup_ctx.append(doomed_ctx)
    return app

app_mod.build_app = build_app
from ondemand.cli import main
sys.exit(main(["serve", "--config", sys.argv[1]]))
"""


def test_a_task_that_dies_turns_readyz_503_and_exits_1(tmp_path: Path) -> None:
    log, gate, err, doom = (tmp_path / "fake.log", tmp_path / "gate", tmp_path / "serve.log",
                            tmp_path / "doom")
    cfg = serve_config(tmp_path, server={"stop_timeout_s": 30.0})
    env = {**fake_env(log=str(log), gate=str(gate)), "DOOM": str(doom)}
    proc, url = serve_logged([sys.executable, "-c", FAULTY, str(cfg)], env, err)
    try:
        job_id = run(_submit(url))
        deadline = time.monotonic() + 10
        while not any(e["op"] == "infer" for e in fake_log(log)):
            assert time.monotonic() < deadline, "the batch never reached the worker"
            time.sleep(0.02)
        doom.touch()  # the component's task dies while a batch is running (the drain waits)

        async def failed() -> bool:
            code, body = await _status(url, "/readyz")
            return code == 503 and "task doomed died: RuntimeError: injected fault" in str(
                body["reason"])

        run(wait_for(failed, 10, "/readyz 503 naming the dead task"))
        assert proc.poll() is None
        gate.touch()  # the running batch finishes, then the daemon stops
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text(errors="replace")
    errors = [line for line in text.splitlines() if "ERROR" in line and "doomed" in line]
    assert any("task doomed died: RuntimeError: injected fault" in line
               and "exit status 1" in line for line in errors), text
    assert rows(tmp_path / "var" / "jobs.sqlite3")[job_id] == ("done", 1)


def test_guard_rules() -> None:
    async def main() -> None:
        guard = TaskGuard()
        reasons: list[str] = []
        guard.on_failure(reasons.append)

        async def returns() -> None:
            return None

        retired = asyncio.create_task(returns(), name="retired")
        with guard.watching(retired):
            pass  # its owner retires it before it ends
        await retired
        cancelled = asyncio.create_task(asyncio.Event().wait(), name="cancelled")
        guard.watch(cancelled)
        guard.close()  # a shutdown: ends that follow are on purpose
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0)
        assert reasons == [] and guard.failed is None

        async def dies() -> None:
            raise OSError("boom")

        task = asyncio.create_task(dies(), name="bug")
        guard.watch(task)
        with contextlib.suppress(OSError):
            await task
        await asyncio.sleep(0)
        assert reasons == ["task bug died: OSError: boom"] == [guard.failed]

    run(main())


def test_unasked_return_is_a_failure() -> None:
    async def main() -> None:
        guard = TaskGuard()

        async def returns() -> None:
            return None

        task = asyncio.create_task(returns(), name="quiet")
        guard.watch(task)
        await task
        await asyncio.sleep(0)
        assert guard.failed == "task quiet returned"

    run(main())



@pytest.mark.parametrize("name", ["supervisor", "dispatcher", "purge", "prewarm"])
def test_every_owner_task_is_watched(tmp_path: Path, name: str) -> None:
    """Each component's task, ended from outside (cancelled: no mock, the real task), turns
    /readyz 503 naming it: none of them can end quietly."""
    base = daemon_config(tmp_path / "var")
    cfg = dataclasses.replace(base, prewarm=build_rules(
        [{"name": "never", "cron": "0 3 1 1 *", "hold": "1h", "catch_up": False}], "prewarm"))

    async def main() -> None:
        async with Daemon(cfg) as d:
            task = next(t for t in asyncio.all_tasks() if t.get_name() == name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with d.http.get("/readyz") as r:
                assert r.status == 503
                assert (await r.json())["reason"] == f"task {name} was cancelled"
            assert d.app[api.GUARD].failed == f"task {name} was cancelled"

    run(main())

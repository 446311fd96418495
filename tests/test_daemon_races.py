"""Races at the edges of the idle ladder, against the real app and the fake worker subprocess:
a job that arrives while the worker unloads, while it exits, and mid-countdown.

The worker is held in the racy state by SIGSTOP (`frozen`): it cannot answer the unload or the
exit until the test lets go, so the job's arrival inside that state is certain, not a bet on how
long an unload or an exit takes.  The idle countdown is checked against the event times: its
deadline is anchored at the last release of the worker, not at a sleep in the test."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from ondemand.daemon.events import WorkerActivity
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    fake_log,
    frozen,
    pid_alive,
    run,
    wait_for,
    wav_bytes,
)


def releases(d: Daemon) -> list[float]:
    """Monotonic times at which the worker's in-flight count went back to zero."""
    return [e.mono for e in d.events if isinstance(e, WorkerActivity) and e.inflight == 0]


async def worker_status(d: Daemon) -> tuple[dict[str, Any], float, float]:
    """`worker` of GET /v1/status, with the monotonic times just before and after the call:
    the daemon's `now` for it lies between them."""
    before = time.monotonic()
    st = (await d.status())["worker"]
    return st, before, time.monotonic()


def anchored(seconds_left: float | None, before: float, after: float, deadline: float) -> bool:
    """Whether a countdown read between `before` and `after` ends at `deadline` (1 ms: the
    event that marks the release is taken a few microseconds after the supervisor's clock)."""
    return (seconds_left is not None
            and before + seconds_left - 1e-3 <= deadline <= after + seconds_left + 1e-3)


def test_a_job_that_arrives_while_unloading_runs_once_on_the_reloaded_model(
        tmp_path: Path) -> None:
    async def main() -> None:
        log = tmp_path / "fake.log"
        async with Daemon(daemon_config(tmp_path), env=fake_env(log=str(log))) as d:
            first = await d.final((await d.submit(wav_bytes(0.5), key="first"))["id"])
            assert first["status"] == "done"
            pid = d.sup.status().pid
            with frozen(pid):  # the unload is sent but cannot be answered: `unloading` holds
                async with d.http.post("/v1/worker/unload", json={}) as r:
                    assert r.status == 202
                await d.wait_state("unloading")
                job = await d.submit(wav_bytes(0.5), key="late")
                await wait_for(lambda: d.waiting() == 1, 10, "the job waiting for the model")
                assert d.sup.state.value == "unloading"
            done = await d.final(job["id"])
            assert done["status"] == "done" and done["attempts"] == 1, done
            # unloaded, then loaded again in the same process for the waiting job, which ran
            # once; the worker ends ready (no idle ladder in this config)
            assert d.states() == ["starting", "loading", "ready", "unloading", "unloaded",
                                  "loading", "ready"]
            assert d.sup.state.value == "ready"
            assert d.sup.spawns == 1 and d.sup.loads == 2 and d.sup.status().pid == pid
            ops = [(e["op"], e.get("keys")) for e in fake_log(log)]
            assert ops == [("load", None), ("infer", ["first"]), ("unload", None),
                           ("load", None), ("infer", ["late"])]

    run(main())


def test_a_job_that_arrives_while_the_worker_exits_gets_a_fresh_worker(tmp_path: Path) -> None:
    async def main() -> None:
        log = tmp_path / "fake.log"
        # stop_timeout_s: long enough that the supervisor never SIGKILLs the frozen worker
        cfg = daemon_config(tmp_path, worker={"exit_after_s": 0.2, "stop_timeout_s": 60.0})
        async with Daemon(cfg, env=fake_env(log=str(log))) as d:
            with contextlib.ExitStack() as stack:
                async with d.sup.lease("test"):  # loads; held, so no idle timer runs yet
                    pid = d.sup.status().pid
                    stack.enter_context(frozen(pid))
                # released: the idle exit comes due and asks a worker that cannot answer
                await d.wait_state("stopping")
                assert d.changes()[-1].reason == "idle_exit"
                job = await d.submit(wav_bytes(0.5), key="late")
                await wait_for(lambda: d.waiting() == 1, 10, "the job waiting for a worker")
                assert d.sup.state.value == "stopping" and pid_alive(pid)
            done = await d.final(job["id"])
            assert done["status"] == "done" and done["attempts"] == 1, done
            ex = d.exits()[0]
            assert ex.pid == pid and ex.kind == "exited"  # it finished exiting, unharmed
            assert d.sup.spawns == 2
            changes = d.changes()
            assert [c.new for c in changes[:8]] == ["starting", "loading", "ready", "stopping",
                                                    "cold", "starting", "loading", "ready"]
            assert changes[5].trigger == f"job:{job['id']}"  # the fresh worker is the job's
            infers = [e for e in fake_log(log) if e["op"] == "infer"]
            assert [(e["pid"], e["keys"]) for e in infers] == [(changes[5].pid, ["late"])]
            assert changes[5].pid != pid

    run(main())


def test_a_job_mid_countdown_restarts_the_idle_countdown(tmp_path: Path) -> None:
    unload_s, exit_s = 3.0, 60.0

    async def main() -> None:
        log = tmp_path / "fake.log"
        cfg = daemon_config(tmp_path, worker={"unload_after_s": unload_s, "exit_after_s": exit_s})
        async with Daemon(cfg, env=fake_env(log=str(log))) as d:
            await d.final((await d.submit(wav_bytes(0.5), key="a"))["id"])
            await wait_for(lambda: len(releases(d)) == 1, 10, "the first release")
            st, before, after = await worker_status(d)
            first = releases(d)[0]
            assert st["state"] == "ready", st
            assert anchored(st["unload_in_s"], before, after, first + unload_s), (st, first)
            assert anchored(st["exit_in_s"], before, after, first + exit_s), (st, first)

            # a job arrives while the countdown runs (the worker is still loaded: no reload)
            await d.final((await d.submit(wav_bytes(0.5), key="b"))["id"])
            await wait_for(lambda: len(releases(d)) == 2, 10, "the second release")
            assert "unloading" not in d.states(), "the countdown ran out before job b came"
            st, before, after = await worker_status(d)
            second = releases(d)[1]
            assert second > first
            # both countdowns grew back: they now run from the second release
            assert anchored(st["unload_in_s"], before, after, second + unload_s), (st, second)
            assert anchored(st["exit_in_s"], before, after, second + exit_s), (st, second)

            await d.wait_state("unloaded", timeout=unload_s + 20)
            (unloading,) = [c for c in d.changes() if c.new == "unloading"]
            assert unloading.reason == "idle_unload"
            # measured from the last job, not the first (the supervisor fires within 1 ms)
            assert unloading.mono >= second + unload_s - 2e-3, (unloading.mono - second)
            assert [e["op"] for e in fake_log(log)] == ["load", "infer", "infer", "unload"]
            assert d.sup.loads == 1

    run(main())

"""Worker lifecycle with a misbehaving fake worker: load failures and backoff, load timeout,
crashes mid-batch, SIGTERM ignored, out of memory, the idle ladder and holds."""

from __future__ import annotations

import time
from pathlib import Path

from ondemand.daemon.supervisor import TRANSITIONS, WorkerState
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    fake_log,
    frozen,
    gated_worker,
    pid_alive,
    run,
    wait_for,
    wav_bytes,
)


def test_transition_table_is_closed() -> None:
    assert set(TRANSITIONS) == set(WorkerState)
    for targets in TRANSITIONS.values():
        assert targets <= set(WorkerState)


def test_repeated_load_failures_back_off_and_say_why(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"load_backoff_s": 600.0})
        async with Daemon(cfg, env=fake_env(fail_load="1")) as d:
            job = await d.submit(wav_bytes(0.5))
            await d.wait_state("backoff")
            st = (await d.status())["worker"]
            assert st["load_failures"] == 2 and st["last_error"]["code"] == "model"
            assert "FAKE_FAIL_LOAD" in st["last_error"]["message"]
            assert 500 < st["backoff_s"] <= 600
            assert d.sup.spawns == 2  # no loop: two tries, then backoff
            assert (await d.job(job["id"]))["status"] == "queued"  # the job waits, not lost
            async with d.http.post("/v1/worker/load", json={}) as r:
                assert r.status == 503 and "Retry-After" in r.headers
                assert (await r.json())["error"]["code"] == "load_failed"
            assert [e.kind for e in d.exits()] == ["load_failed", "load_failed"]

    run(main())


def test_exit_during_load_is_classified(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), env=fake_env(exit_in_load="3")) as d:
            await d.submit(wav_bytes(0.5))
            await d.wait_state("backoff")
            assert d.sup.status().last_error.code == "exited_during_load"
            assert d.exits()[0].kind == "crashed" and "rc=3" in d.exits()[0].detail

    run(main())


def test_load_timeout_kills_a_hung_worker_even_if_it_ignores_sigterm(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"load_timeout_s": 0.5, "stop_timeout_s": 0.5,
                                              "max_load_failures": 1})
        async with Daemon(cfg, env=fake_env(hang_load="1", ignore_sigterm="1")) as d:
            await d.submit(wav_bytes(0.5))
            await d.wait_state("backoff", timeout=10)
            assert d.sup.status().last_error.code == "load_timeout"
            (ex,) = d.exits()
            assert ex.kind == "stop_escalated" and not pid_alive(ex.pid)

    run(main())


def test_crash_mid_batch_requeues_and_a_new_worker_finishes(tmp_path: Path) -> None:
    async def main() -> None:
        marker = tmp_path / "crashed"
        async with Daemon(daemon_config(tmp_path), env=fake_env(crash_once=str(marker))) as d:
            job = await d.submit(wav_bytes(0.5))
            done = await d.final(job["id"])
            assert done["status"] == "done" and done["attempts"] == 2
            assert marker.exists() and d.sup.spawns == 2
            assert d.exits()[0].kind == "killed"  # SIGKILL from outside: possibly the OOM killer

    run(main())


def test_poison_job_fails_after_max_attempts_without_taking_neighbours(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, queue={"max_attempts": 2},
                            worker={"batch_audio_s": 100.0})
        log, gate = tmp_path / "fake.log", tmp_path / "gate"
        async with Daemon(cfg, worker_cmd=gated_worker(gate),
                          env=fake_env(crash_key="poison", log=str(log))) as d:
            jobs = [await d.submit(wav_bytes(0.5), key=k) for k in ("a", "poison", "b")]
            gate.touch()  # all three are queued: the first batch holds them all
            final = [await d.final(j["id"]) for j in jobs]
            assert [f["status"] for f in final] == ["done", "failed", "done"]
            assert final[1]["error"]["code"] == "worker_crashed"
            assert "2 attempts" in final[1]["error"]["message"]
            # the neighbours went down with the poison once, then each ran alone
            assert [f["attempts"] for f in final] == [2, 2, 2]
            batches = [e["keys"] for e in fake_log(log) if e["op"] == "infer"]
            assert sorted(batches[0]) == ["a", "b", "poison"]
            assert all(len(b) == 1 for b in batches[1:])

    run(main())


def test_oom_splits_the_batch_before_failing_anything(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"batch_audio_s": 100.0})
        log, gate = tmp_path / "fake.log", tmp_path / "gate"
        async with Daemon(cfg, worker_cmd=gated_worker(gate),
                          env=fake_env(oom_above="2", log=str(log))) as d:
            jobs = [await d.submit(wav_bytes(0.5 + 0.01 * i)) for i in range(6)]
            gate.touch()  # all six are queued: the first batch holds them all
            final = [await d.final(j["id"]) for j in jobs]
            assert all(f["status"] == "done" and f["attempts"] == 1 for f in final), final
            sizes = [e["n"] for e in fake_log(log) if e["op"] == "infer"]
            assert sizes[0] == 6 and max(sizes[1:]) <= 3 and sum(s for s in sizes if s <= 2) == 6
            assert d.sup.spawns == 1

    run(main())


def test_single_clip_oom_fails_with_out_of_memory(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), env=fake_env(oom_above="0")) as d:
            job = await d.final((await d.submit(wav_bytes(0.5)))["id"])
            assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory"
            assert job["attempts"] == 1

    run(main())


def test_shutdown_escalates_to_sigkill_and_reaps(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"stop_timeout_s": 0.5},
                            server={"stop_timeout_s": 0.2})
        log = tmp_path / "fake.log"
        d = Daemon(cfg, env=fake_env(hang_batch="1", ignore_sigterm="1", log=str(log)))
        async with d:
            job = await d.submit(wav_bytes(0.5))
            await wait_for(lambda: d.sup.status().in_flight == 1, 10, "batch running")
            # the lease is granted before the batch reaches the worker: wait until it hangs in it
            await wait_for(lambda: log.exists() and '"infer"' in log.read_text(), 10, "in batch")
            pid = d.sup.status().pid
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 30  # bounded by the stop timeouts, not the hung batch
        (ex,) = d.exits()
        assert ex.pid == pid and ex.kind == "stop_escalated" and not pid_alive(pid)
        # ask, wait worker.stop_timeout_s, then SIGKILL
        (stopping,) = [c for c in d.changes() if c.new == "stopping"]
        assert stopping.reason == "shutdown" and ex.mono - stopping.mono >= 0.5
        # the interrupted job went back to the queue without spending an attempt
        from ondemand.daemon.store import Store

        store = Store(tmp_path, max_pending=10)
        await store.open()
        j = await store.get(job["id"])
        assert (j.status, j.attempts) == ("queued", 0)
        await store.close()

    run(main())


def test_never_unloads_under_a_running_batch(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"unload_after_s": 0})
        async with Daemon(cfg) as d:
            await d.sup.load("test", hold_s=3600)  # loaded and held: nothing unloads it yet
            with frozen(d.sup.status().pid):  # the batch reaches a worker that cannot finish
                job = await d.submit(wav_bytes(0.5))
                await wait_for(lambda: d.sup.status().in_flight == 1, 10, "batch running")
                await d.sup.unload("test")  # taken in while busy (the hold ends): deferred
                assert d.sup.state is WorkerState.READY
            assert (await d.final(job["id"]))["status"] == "done"
            await d.wait_state("unloaded")
            assert d.states()[-2:] == ["unloading", "unloaded"]
            assert d.changes()[-2].reason == "unload"  # the deferred request, not the idle timer

    run(main())


def test_hold_suspends_the_idle_ladder_and_holds_merge(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"unload_after_s": 0, "exit_after_s": 0.2})
        async with Daemon(cfg) as d:
            t0 = time.monotonic()
            await d.sup.load("schedule:morning", hold_s=1.0)
            await d.sup.load("manual", hold_s=0.2)  # shorter: merged into the longer one
            assert d.sup.status().hold_trigger == "schedule:morning"
            await d.wait_state("cold", timeout=10)
            changes = d.changes()
            assert changes[0].trigger == "schedule:morning"
            assert changes[-1].new == "cold" and changes[-2].reason == "idle_exit"
            # not before the longer hold ended (the supervisor's timers allow 1 ms)
            assert changes[-2].mono >= t0 + 1.0 - 1e-3

    run(main())


def test_shutdown_during_a_hung_load_is_prompt(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, worker={"load_timeout_s": 3600, "stop_timeout_s": 60},
                            server={"stop_timeout_s": 60})
        d = Daemon(cfg, env=fake_env(hang_load="1"))
        async with d:
            await d.submit(wav_bytes(0.5))
            await d.wait_state("loading")
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 30  # neither stop_timeout_s (60 s) is waited out
        assert d.exits()[0].kind == "exited"

    run(main())

"""Stepping aside for other GPU work (issue 14, `worker.yield_gpu`, docs/ladder.md).

The policy (daemon/yielding.py) is pure: scripted readings drive it exactly.  The supervisor is
driven by a scripted GPU probe (conftest.ScriptedGpu) with the fake worker: another process grows
into the free-memory floor, the running batch finishes, the worker exits, jobs wait in
`yielded` with the reason and the other processes named, and come back after the settle time; a
load whose need does not fit waits instead of dying of out-of-memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ondemand.daemon.events import SteppedAside
from ondemand.daemon.supervisor import TimerKind, WorkerState
from ondemand.daemon.yielding import GpuReading, Verdict, YieldPolicy
from ondemand.gpu import GpuProcess
from tests.conftest import (
    Daemon,
    ScriptedGpu,
    daemon_config,
    fake_env,
    run,
    wait_for,
    wav_bytes,
)

S = WorkerState
OTHER = 4242


def reading(at: float, free: float, ours: float = 0.0, total: float = 8000.0) -> GpuReading:
    others = total - free - ours
    return GpuReading(at=at, total_mb=total, free_mb=free, ours_mb=ours,
                      others=(GpuProcess(OTHER, int(others * 2**20)),) if others > 0 else ())


def policy(settle: float = 1.0) -> YieldPolicy:
    return YieldPolicy(free_below_mb=1000, resume_free_mb=2000, settle_s=settle)


# -- the policy ------------------------------------------------------------------------------------
def test_admission_needs_the_floor_free_after_the_load() -> None:
    pol = policy()
    assert pol.admit(reading(0, free=3000), need_mb=2000)
    assert not pol.admit(reading(0, free=2999), need_mb=2000)


def test_others_growing_into_the_floor_is_a_yield_our_own_batch_is_not() -> None:
    pol = policy()
    assert pol.admit(reading(0, free=7000), need_mb=1000)  # baseline: others hold nothing
    # Our batch fills the card: free under the floor, but nobody else grew.
    assert pol.watch(reading(1, free=500, ours=7500), holding=True, need_mb=1000) is Verdict.STAY
    # Another process takes 3 GiB.
    v = pol.watch(reading(2, free=500, ours=4500), holding=True, need_mb=1000)
    assert v is Verdict.YIELD
    # Nothing happens while we do not hold the GPU.
    assert policy().watch(reading(0, free=10), holding=False, need_mb=1000) is Verdict.STAY


def test_resume_needs_the_level_for_the_whole_settle_time_no_flapping() -> None:
    pol = policy(settle=1.0)
    pol.step_aside(reading(0, free=100), "other_processes")
    t, verdicts = 0.0, []
    for free in (3000, 2999, 3000, 3000, 2500, 3000, 3000):  # dips below need + resume
        t += 0.25
        verdicts.append(pol.watch(reading(t, free=free), holding=False, need_mb=1000))
    assert set(verdicts) == {Verdict.WAIT}
    assert pol.settled_s(t) == pytest.approx(0.25)  # the clear stretch began at t = 1.5
    for _ in range(2):
        t += 0.25
        assert pol.watch(reading(t, free=3000), holding=False, need_mb=1000) is Verdict.WAIT
    t += 0.25  # 2.5: a whole second above the level
    assert pol.watch(reading(t, free=3000), holding=False, need_mb=1000) is Verdict.RESUME
    assert not pol.yielded
    # After the resume and the load (need 1000), 2000 stay free: above the 1000 floor.
    assert pol.admit(reading(t, free=3000), need_mb=1000)
    assert pol.watch(reading(t + 1, free=2000, ours=1000), holding=True,
                     need_mb=1000) is Verdict.STAY


def test_thresholds_must_leave_a_gap() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        YieldPolicy(free_below_mb=1000, resume_free_mb=1000, settle_s=0)


def test_config_refuses_a_resume_level_at_or_below_the_floor() -> None:
    from ondemand.errors import ConfigError

    with pytest.raises(ConfigError, match=r"worker\.yield_resume_free_mb: must be >"):
        daemon_config(Path("/nonexistent"), worker={"yield_free_below_mb": 3000})


# -- the supervisor with a scripted GPU ------------------------------------------------------
HELD = ("loading", "ready", "unloading", "unloaded", "stopping")


def yield_config(tmp: Path, **worker: Any) -> Any:
    return daemon_config(tmp, worker={
        "yield_gpu": True, "yield_poll_s": 0.05, "yield_settle_s": 0.3,
        "yield_free_below_mb": 1024, "yield_resume_free_mb": 2048,
        "yield_need_margin_mb": 500, "standby": True, **worker})


def scripted(d_holder: list[Daemon]) -> ScriptedGpu:
    """A 8000 MiB GPU on which our worker holds 600 MiB while it has the model."""
    gpu = ScriptedGpu(total_mb=8000)
    gpu.ours = lambda pid: 600.0 if d_holder and d_holder[0].sup.state.value in HELD else 0.0
    return gpu


def test_another_process_growing_makes_the_worker_step_aside_and_come_back(
        tmp_path: Path) -> None:
    async def main() -> None:
        holder: list[Daemon] = []
        gpu = scripted(holder)
        async with Daemon(yield_config(tmp_path), gpu=gpu) as d:
            holder.append(d)
            first = await d.submit(wav_bytes(0.5))
            assert (await d.final(first["id"]))["status"] == "done"
            t0 = time.monotonic()
            gpu.others = {OTHER: 7000.0}  # free: 8000 - 600 - 7000 = 400 < 1024
            await d.wait_state("yielded")
            aside = next(e for e in d.events if isinstance(e, SteppedAside))
            assert aside.reason == "other_processes" and aside.others_mb == pytest.approx(7000)
            assert aside.mono - t0 < 0.5  # decision latency: within a poll or so
            assert d.states()[-4:] == ["stopping", "cold", "preparing", "yielded"]
            assert [c.reason for c in d.changes() if c.new == "stopping"][-1] == "yield"
            st = (await d.status())["worker"]
            y = st["yielded"]
            assert y["reason"] == "other_processes" and not y["pending"]
            assert y["gpu"]["others"] == [{"pid": OTHER, "memory_mb": 7000.0}]
            assert y["need_mb"] == 600.0 and y["resume_at_free_mb"] == 600.0 + 2048
            assert st["standby"]["prepared"]  # a standby waits meanwhile: it holds no GPU
            # Jobs wait, visibly.
            job = await d.submit(wav_bytes(0.5))
            assert job["worker"] == "yielded"
            time.sleep(0.5)
            assert (await d.job(job["id"]))["status"] == "queued"
            gpu.others = {OTHER: 4000.0}  # free 4000 >= 600 + 2048: back after 0.3 s
            assert (await d.final(job["id"]))["status"] == "done"
            assert d.sup.status().last_load.kind == "activate"
            assert d.states()[-3:] == ["standby", "loading", "ready"]

    run(main())


def test_the_running_batch_finishes_before_the_worker_steps_aside(tmp_path: Path) -> None:
    async def main() -> None:
        holder: list[Daemon] = []
        gpu = scripted(holder)
        gate = tmp_path / "gate"
        async with Daemon(yield_config(tmp_path, standby=False), gpu=gpu,
                          env=fake_env(gate=str(gate))) as d:
            holder.append(d)
            running = await d.submit(wav_bytes(0.5))
            await wait_for(lambda: bool(d.sup._batches), 10, "a batch in flight")
            waiting = await d.submit(wav_bytes(0.6))
            gpu.others = {OTHER: 7000.0}
            await wait_for(lambda: d.sup.status().yielded is not None, 5, "stepping aside")
            st = d.sup.status()
            assert st.state is S.READY and st.yielded is not None and st.yielded.pending
            gate.touch()
            assert (await d.final(running["id"]))["status"] == "done"
            await d.wait_state("yielded")
            assert (await d.job(waiting["id"]))["status"] == "queued"  # not started under it
            gpu.others = {}
            assert (await d.final(waiting["id"]))["status"] == "done"

    run(main())


def test_a_load_that_does_not_fit_waits_instead_of_failing(tmp_path: Path) -> None:
    async def main() -> None:
        gpu = ScriptedGpu(total_mb=8000)
        gpu.others = {OTHER: 7600.0}  # 400 free: the need (500 margin) does not fit
        async with Daemon(yield_config(tmp_path, standby=False), gpu=gpu) as d:
            job = await d.submit(wav_bytes(0.5))
            await d.wait_state("yielded")
            y = (await d.status())["worker"]["yielded"]
            assert y["reason"] == "insufficient_memory"
            assert d.sup.spawns == 0  # no load was attempted
            assert (await d.job(job["id"]))["status"] == "queued"
            gpu.others = {}
            assert (await d.final(job["id"]))["status"] == "done"
            assert d.states() == ["yielded", "cold", "starting", "loading", "ready"]

    run(main())


def test_no_polling_while_cold_or_in_standby(tmp_path: Path) -> None:
    async def main() -> None:
        gpu = ScriptedGpu(total_mb=8000)
        async with Daemon(yield_config(tmp_path), gpu=gpu) as d:
            await d.wait_state("standby")
            before = gpu.samples
            time.sleep(0.3)
            await wait_for(lambda: True, 1)
            assert d.sup._timers.left(TimerKind.GPU_POLL) is None
            assert gpu.samples - before <= 2  # the cost sampler's, not a 0.05 s poll

    run(main())

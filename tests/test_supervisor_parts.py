"""The supervisor's helpers, driven directly with plain numbers: no event loop, no worker.

The supervisor (daemon/supervisor.py) owns the worker's state; what it consults changes none:
the idle ladder's arithmetic (daemon/idle.py), liveness bookkeeping and batch deadlines
(daemon/liveness.py), the load record and backoff (daemon/loads.py), the GPU view for stepping
aside (daemon/gpu_watch.py) and the standby record (daemon/worker_status.py).  The daemon tests
(test_daemon_lifecycle, test_liveness, test_standby, test_yield, ...) check the behaviour end to
end; these pin the arithmetic each piece owns.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from ondemand import protocol
from ondemand.config import WorkerConfig
from ondemand.daemon.gpu_watch import GpuWatch
from ondemand.daemon.idle import IdleLadder
from ondemand.daemon.liveness import SPEED_SAMPLES, Liveness, batch_deadline_s
from ondemand.daemon.loads import MAX_BACKOFF_S, LoadBook
from ondemand.daemon.worker_status import StandbyRecord
from ondemand.daemon.yielding import Verdict
from ondemand.errors import LoadFailed, OutOfMemory, WorkerCrashed
from ondemand.gpu import GpuProcess, GpuSample

MB = 2**20


# -- idle ladder ---------------------------------------------------------------------------------
def ladder(unload: float = -1.0, exit: float = 120.0, now: float = 100.0) -> IdleLadder:
    return IdleLadder(unload_after_s=unload, exit_after_s=exit, now=now)


def test_idle_deadlines_follow_last_use_and_minus_one_is_never() -> None:
    assert ladder(unload=30, exit=120).deadlines() == (130.0, 220.0)
    assert ladder(unload=-1, exit=120).deadlines() == (None, 220.0)
    assert ladder(unload=30, exit=-1).deadlines() == (130.0, None)
    assert ladder(unload=-1, exit=-1).deadlines() == (None, None)
    assert ladder(unload=0, exit=5).deadlines() == (100.0, 105.0)  # 0 = at once
    idle = ladder(unload=30, exit=120)
    idle.used(200.0)
    assert idle.deadlines() == (230.0, 320.0)


def test_idle_exit_no_later_than_unload_skips_the_unload() -> None:
    assert ladder(unload=60, exit=60).deadlines() == (None, 160.0)
    assert ladder(unload=90, exit=30).deadlines() == (None, 130.0)


def test_idle_hold_pushes_both_deadlines_and_the_longest_hold_wins() -> None:
    idle = ladder(unload=30, exit=120)
    idle.hold(500.0, "schedule:morning")
    # Both at the hold's end: exiting frees everything, so the unload is skipped.
    assert idle.deadlines() == (None, 500.0)
    idle.hold(300.0, "manual")  # shorter: merged into the longer one
    assert (idle.hold_until, idle.hold_trigger) == (500.0, "schedule:morning")
    idle.hold(800.0, "manual")
    assert (idle.hold_until, idle.hold_trigger) == (800.0, "manual")
    assert idle.hold_left(700.0) == 100.0 and idle.hold_left(900.0) == 0.0
    # A hold shorter than the ladder leaves the ladder alone.
    short = ladder(unload=30, exit=120)
    short.hold(110.0, "manual")
    assert short.deadlines() == (130.0, 220.0)


def test_idle_clear_hold_says_whether_there_was_one() -> None:
    idle = ladder()
    assert not idle.clear_hold()
    idle.hold(500.0, "manual")
    assert idle.clear_hold()
    assert (idle.hold_until, idle.hold_trigger) == (0.0, "")
    assert idle.deadlines() == (None, 220.0)


def test_idle_next_step_unload_first_and_only_the_exit_once_unloaded() -> None:
    idle = ladder(unload=30, exit=120)
    assert idle.next_step_at(loaded=True) == 130.0
    assert idle.next_step_at(loaded=False) == 220.0
    assert ladder(unload=-1, exit=-1).next_step_at(loaded=True) is None
    assert ladder(unload=30, exit=-1).next_step_at(loaded=False) is None


def test_idle_due_exit_before_unload_within_a_millisecond() -> None:
    idle = ladder(unload=30, exit=120)
    assert idle.due(129.0, loaded=True) is None
    assert idle.due(129.9995, loaded=True) == "unload"  # a timer firing a hair early counts
    assert idle.due(130.0, loaded=False) is None  # unloaded already: only the exit is left
    assert idle.due(220.0, loaded=True) == "exit"
    assert idle.due(220.0, loaded=False) == "exit"
    idle.used(200.0)  # a use since the timer was armed: nothing due yet
    assert idle.due(220.0, loaded=True) is None


def test_idle_countdown_and_warm_because() -> None:
    idle = ladder(unload=30, exit=120)
    assert idle.countdown(110.0, loaded=True) == (20.0, 110.0)
    assert idle.countdown(110.0, loaded=False) == (None, 110.0)
    assert idle.countdown(400.0, loaded=True) == (0.0, 0.0)  # overdue: never negative
    assert idle.warm_because(110.0, in_flight=2) == "in_flight"
    assert idle.warm_because(110.0, in_flight=0) == "idle_timeout"
    idle.hold(200.0, "manual")
    assert idle.warm_because(110.0, in_flight=0) == "hold"
    assert idle.warm_because(110.0, in_flight=1) == "in_flight"


# -- liveness --------------------------------------------------------------------------------------
CFG = WorkerConfig(heartbeat_s=2.0, heartbeat_timeout_s=30.0, batch_deadline_min_s=120.0,
                   batch_deadline_factor=10.0, batch_default_speed=1.0)


def infer(batch: str, jobs: int = 2) -> protocol.Infer:
    items = tuple(protocol.InferItem(job=f"{batch}-{i}", key=f"k{i}", audio=f"/spool/{i}.npy")
                  for i in range(jobs))
    return protocol.Infer(batch=batch, granularity="utterance", items=items)


class _Loop:
    """A loop for the futures a batch carries (never run)."""

    def __enter__(self) -> asyncio.AbstractEventLoop:
        self.loop = asyncio.new_event_loop()
        return self.loop

    def __exit__(self, *exc: Any) -> None:
        self.loop.close()


def test_batch_deadline_floor_factor_and_slowest_speed() -> None:
    kw: dict[str, float] = {"min_s": 120.0, "factor": 10.0, "default_speed": 1.0}
    assert batch_deadline_s(5.0, [], **kw) == 120.0  # the floor
    assert batch_deadline_s(60.0, [], **kw) == 600.0  # 10 x 60 s at the default 1 audio s/s
    assert batch_deadline_s(60.0, [20.0, 4.0, 50.0], **kw) == 150.0  # the slowest speed: 4
    assert batch_deadline_s(60.0, [100.0], **kw) == 120.0  # fast: the floor again
    assert batch_deadline_s(0.0, [], **kw) == 120.0


def test_liveness_measures_speeds_from_results_only_the_last_samples() -> None:
    live = Liveness(CFG)
    with _Loop() as loop:
        for i in range(SPEED_SAMPLES + 1):
            live.start(infer(f"b{i}"), loop.create_future(), 60.0, now=float(i))
            # the first batch is the slowest (2 audio s/s), then 30 audio s/s
            live.finish(protocol.Result(batch=f"b{i}", seconds=30.0 if i == 0 else 2.0,
                                        results=()), now=float(i) + 1)
        assert len(live.speeds) == SPEED_SAMPLES and min(live.speeds) == 30.0  # b0 fell out
        assert live.deadline_s(3600.0) == 1200.0
        # No speed from a failure, from a batch without audio or one that took no time.
        live.start(infer("f"), loop.create_future(), 60.0, now=50.0)
        live.finish(protocol.BatchFailed(batch="f", code="out_of_memory", message="oom"), 51.0)
        live.start(infer("z"), loop.create_future(), 0.0, now=52.0)
        live.finish(protocol.Result(batch="z", seconds=1.0, results=()), 53.0)
        assert len(live.speeds) == SPEED_SAMPLES and min(live.speeds) == 30.0
        assert live.finish(protocol.Result(batch="gone", seconds=1.0, results=()), 54.0) is None
        assert live.last_beat == 54.0  # any answer is a sign of life


def test_liveness_timers_stall_and_the_earliest_deadline() -> None:
    live = Liveness(CFG)
    assert live.timers(0.0) is None and live.stalled_s(0.0) is None
    assert live.batch_s(0.0) is None and live.deadline_in_s(0.0) is None
    with _Loop() as loop:
        live.start(infer("a"), loop.create_future(), 60.0, now=10.0)  # deadline 610
        live.start(infer("b"), loop.create_future(), 1.0, now=20.0)  # deadline 140 (floor)
        assert live.timers(25.0) == (25.0, 115.0)  # heartbeat 30 s after the last sign of life
        assert live.batch_s(25.0) == 15.0 and live.deadline_in_s(25.0) == 115.0
        assert live.stalled_s(24.0) is None  # within two beats
        assert live.stalled_s(24.5) == 4.5
        assert live.beat("a", 40.0) and live.last_beat == 40.0
        assert not live.beat("crossed", 41.0) and live.last_beat == 40.0
        assert live.timers(40.0) == (30.0, 100.0)
        what, why = live.hung(70.0)
        assert what == "batch a (2 jobs, 60.0s of audio)"
        assert why == "no heartbeat for 30.0s (worker.heartbeat_timeout_s=30)"
        assert live.overdue(139.0) is None  # the earliest deadline is still ahead
        late = live.overdue(139.9995)
        assert late is not None and late[0] == "batch b (2 jobs, 1.0s of audio)"
        assert "past its deadline of 120.0s" in late[1]


def test_liveness_answers_and_fails_the_callers() -> None:
    live = Liveness(CFG)
    with _Loop() as loop:
        ok, bad, cancelled, lost = (loop.create_future() for _ in range(4))
        for name, fut in (("ok", ok), ("bad", bad), ("cancelled", cancelled), ("lost", lost)):
            live.start(infer(name), fut, 10.0, now=0.0)
        result = protocol.Result(batch="ok", seconds=1.0, results=())
        running = live.finish(result, 1.0)
        assert running is not None
        running.answer(result)
        assert ok.result() is result
        failed = protocol.BatchFailed(batch="bad", code="out_of_memory", message="too big")
        running = live.finish(failed, 1.0)
        assert running is not None
        running.answer(failed)
        assert isinstance(bad.exception(), OutOfMemory)
        cancelled.cancel()
        live.fail_all(WorkerCrashed("the worker crashed"))
        assert isinstance(lost.exception(), WorkerCrashed) and cancelled.cancelled()
        assert live.batches == {} and live.timers(2.0) is None


# -- loads -----------------------------------------------------------------------------------------
def loaded(seconds: float = 2.0) -> protocol.Loaded:
    return protocol.Loaded(seconds=seconds, device="cuda:0", dtype="float16",
                           timings={"weights_s": 1.0}, weights_mb=900.0)


def test_load_record_spawn_counts_the_interpreter_reload_and_activate_do_not() -> None:
    book = LoadBook(WorkerConfig())
    book.begin("spawn", "job:ab12", 10.0)
    book.hello(10.5)
    rec = book.loaded(loaded(), 13.0)
    assert (rec.seconds, rec.fresh_process, rec.interpreter_s, rec.kind) == (3.0, True, 0.5,
                                                                             "spawn")
    assert rec.trigger == "job:ab12" and rec.worker_s == 2.0 and book.loads == 1
    ev = book.event(pid=42, device="cuda:0")
    assert (ev.seconds, ev.trigger, ev.pid, ev.fresh_process, ev.kind) == (3.0, "job:ab12", 42,
                                                                           True, "spawn")
    for kind in ("reload", "activate"):
        book.begin(kind, "manual", 20.0)
        rec = book.loaded(loaded(), 21.0)
        assert (rec.fresh_process, rec.interpreter_s, rec.kind) == (False, 0.0, kind)
    assert book.loads == 3


def test_load_failures_retry_then_back_off_doubling_up_to_an_hour() -> None:
    book = LoadBook(WorkerConfig(max_load_failures=3, load_backoff_s=30.0))
    err = book.failed("load_failed", "no such model")
    assert isinstance(err, LoadFailed) and err.retry_after_s == 1.0 and book.retry
    assert "(load_failed): no such model" in str(err)
    book.failed("load_timeout", "slow")
    err = book.failed("load_timeout", "slow")
    assert not book.retry and err.retry_after_s == 30.0
    assert book.backoff_s() == 30.0
    book.failed("load_timeout", "slow")
    assert book.backoff_s() == 60.0
    refusal = book.backoff_error(59.6)
    assert refusal.retry_after_s == 59.6
    assert "failed to load 4 times in a row (load_timeout: slow); next attempt in 60s" in str(
        refusal)
    for _ in range(20):
        book.failed("load_timeout", "slow")
    assert book.backoff_s() == MAX_BACKOFF_S
    book.begin("spawn", "manual", 0.0)
    book.loaded(loaded(), 1.0)
    assert book.failures == 0 and book.last_error is None and book.retry


def test_spawn_failure_counts_and_names_the_error() -> None:
    book = LoadBook(WorkerConfig())
    assert book.last_error_text() == "unknown error"
    book.spawn_failed(FileNotFoundError(2, "No such file", "/bin/worker"))
    assert book.failures == 1 and book.last_error is not None
    assert book.last_error.code == "spawn_failed" and "/bin/worker" in book.last_error_text()
    book.spawned()
    assert book.spawns == 1


def test_standby_record_from_prepared_and_measured_now() -> None:
    book = LoadBook(WorkerConfig())
    book.begin_standby(5.0)
    ev = protocol.Prepared(seconds=3.0, weights_mb=900.0, host_mb=1500.0,
                           cuda_initialized=False, timings={"import_s": 1.5})
    rec = book.prepared(7, ev, 9.0, gpu_memory_mb=0.0)
    assert book.standby is rec
    assert (rec.pid, rec.prepared, rec.seconds, rec.weights_mb, rec.gpu_memory_mb) == (
        7, True, 4.0, 900.0, 0.0)
    now = rec.now(host_mb=1600.0, gpu_memory_mb=None)
    assert (now.host_mb, now.gpu_memory_mb, now.timings) == (1600.0, None, {"import_s": 1.5})
    early = StandbyRecord.preparing(8)
    assert not early.prepared and early.seconds is None and early.to_json()["pid"] == 8
    book.spawned()
    assert book.standby is None


# -- the GPU view for stepping aside -------------------------------------------------------------
class Probe:
    name = "scripted"
    fallback = False

    def __init__(self, free_mb: float, others: dict[int, float], ours: float = 0.0) -> None:
        self.free_mb, self.others, self.ours = free_mb, others, ours
        self.asked: list[tuple[list[int], int | None]] = []

    def sample(self, pids: Any, gpu: int | None) -> GpuSample:
        self.asked.append((list(pids), gpu))
        total = 8000.0
        procs = tuple(GpuProcess(p, int(mb * MB)) for p, mb in self.others.items())
        return GpuSample(
            source="nvml", gpu=gpu, pids=tuple(pids), pids_gpu_memory_bytes=int(self.ours * MB),
            gpu_memory_used_bytes=int((total - self.free_mb) * MB),
            gpu_memory_total_bytes=int(total * MB), power_watts=None, energy_joules=None,
            utilization_pct=None, pstate=None, rss_bytes=None, cpu_seconds=None,
            processes=procs)

    def close(self) -> None:
        pass


YIELD = WorkerConfig(device="cuda:0", yield_gpu=True, yield_free_below_mb=1000.0,
                     yield_resume_free_mb=2000.0, yield_settle_s=1.0, yield_need_margin_mb=500.0)


def test_gpu_watch_exists_only_where_stepping_aside_can_work() -> None:
    probe = Probe(4000.0, {})
    assert GpuWatch.create(dataclasses.replace(YIELD, yield_gpu=False), probe, lambda: 0.0) is None
    assert GpuWatch.create(YIELD, None, lambda: 0.0) is None
    assert GpuWatch.create(dataclasses.replace(YIELD, device="cpu"), probe, lambda: 0.0) is None
    fallback = Probe(4000.0, {})
    fallback.fallback = True
    assert GpuWatch.create(YIELD, fallback, lambda: 0.0) is None
    assert GpuWatch.create(YIELD, probe, lambda: 0.0) is not None


def test_gpu_watch_need_admission_and_the_step_aside_report() -> None:
    probe, clock = Probe(free_mb=1500.0, others={4242: 5500.0}), [10.0]
    watch = GpuWatch.create(YIELD, probe, lambda: clock[0])
    assert watch is not None
    assert watch.need_mb() == 500.0  # no weights reported yet: the margin alone
    watch.weights_mb = 900.0
    assert watch.need_mb() == 1400.0
    reading = watch.read([77])
    assert reading is not None and reading.at == 10.0 and probe.asked == [([77], 0)]
    assert not watch.admit(reading)  # 1500 free - 1400 needed leaves less than the 1000 floor
    assert watch.record(10.0, pending=False) is None  # not aside yet
    line, event = watch.step_aside(reading, "insufficient_memory")
    assert watch.yielded and watch.reason == "insufficient_memory"
    assert line == ("reason=insufficient_memory free=1500 MiB need=1400 MiB others=6500 MiB "
                    "(pid 4242 5500.0 MiB); loads wait until 3400 MiB are free for 1s")
    assert (event.reason, event.free_mb, event.need_mb) == ("insufficient_memory", 1500.0,
                                                            1400.0)
    rec = watch.record(12.5, pending=True)
    assert rec is not None and rec.pending and rec.for_s == 2.5 and rec.resume_at_free_mb == 3400
    assert rec.trigger_gpu is not None and rec.trigger_gpu["others"][0]["pid"] == 4242
    # Free again: back after the settle time (watch passes the need on).
    probe.free_mb, probe.others = 7000.0, {}
    for t, want in ((13.0, Verdict.WAIT), (13.5, Verdict.WAIT), (14.0, Verdict.RESUME)):
        clock[0] = t
        r = watch.read([])
        assert r is not None and watch.watch(r, holding=False) is want
    assert not watch.yielded and watch.record(14.0, pending=False) is None


def test_gpu_watch_without_memory_figures_reads_nothing() -> None:
    class Blind(Probe):
        def sample(self, pids: Any, gpu: int | None) -> GpuSample:
            return dataclasses.replace(super().sample(pids, gpu), gpu_memory_total_bytes=None)

    watch = GpuWatch.create(YIELD, Blind(4000.0, {}), lambda: 0.0)
    assert watch is not None and watch.read([]) is None


@pytest.mark.parametrize("free", [2399.0, 2400.0])
def test_gpu_watch_admits_when_the_floor_stays_free_after_the_load(free: float) -> None:
    watch = GpuWatch.create(YIELD, Probe(free, {}), lambda: 0.0)
    assert watch is not None
    watch.weights_mb = 900.0
    reading = watch.read([])
    assert reading is not None and watch.admit(reading) is (free - 1400.0 >= 1000.0)

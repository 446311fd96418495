"""The cost ledger, report and recommendation: exact arithmetic from synthetic state events."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ondemand import config as config_mod
from ondemand.config import CostConfig, WorkerConfig
from ondemand.cost import report as cost
from ondemand.cost.accounting import Accounting
from ondemand.cost.ledger import IdleCause, Interval, Ledger, Phase, Trigger
from ondemand.daemon.events import EventBus, ModelLoaded, StateChanged, WorkerActivity
from ondemand.errors import ConfigError
from ondemand.gpu import GpuSample

DAY = 86400.0
T0 = 1_700_000_000.0 - (1_700_000_000.0 % DAY)  # a UTC midnight (2023-11-14)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ledger_at(tmp_path: Path, clock: Clock) -> Ledger:
    return Ledger(tmp_path / "cost.sqlite3", clock=clock)


def record_session(lg: Ledger, t: float, *, load: float, busy: float, idle: float) -> float:
    """A job-triggered cold start at t: loading, busy, idle-warm, then exit. Returns exit time."""
    lg.record(Phase.LOADING, at=t, trigger=Trigger.JOB, gpu=0, pid=10)
    lg.record(Phase.READY_BUSY, at=t + load, trigger=Trigger.JOB, gpu=0, pid=10)
    lg.record(
        Phase.READY_IDLE, at=t + load + busy, trigger=Trigger.JOB, gpu=0, pid=10,
        idle_cause=IdleCause.IDLE_TIMEOUT,
    )
    end = t + load + busy + idle
    lg.record(Phase.EXITED, at=end, gpu=0)
    return end


# -- ledger --------------------------------------------------------------------------------


def test_intervals_tile_time_and_survive_reopen(tmp_path: Path) -> None:
    clock = Clock()
    lg = ledger_at(tmp_path, clock)
    lg.record(Phase.EXITED, at=T0, reason="startup")
    end = record_session(lg, T0 + 100, load=20, busy=30, idle=300)
    clock.t = end + 50
    lg.close()
    lg.close_db()

    lg2 = ledger_at(tmp_path, clock)
    assert lg2.recovered == []  # a clean shutdown leaves nothing open
    ivs = lg2.intervals(T0, T0 + DAY)
    assert [(iv.state, iv.start, iv.end) for iv in ivs] == [
        (Phase.EXITED, T0, T0 + 100),
        (Phase.LOADING, T0 + 100, T0 + 120),
        (Phase.READY_BUSY, T0 + 120, T0 + 150),
        (Phase.READY_IDLE, T0 + 150, T0 + 450),
        (Phase.EXITED, T0 + 450, T0 + 500),
    ]
    assert ivs[1].from_state is Phase.EXITED and ivs[1].next_state is Phase.READY_BUSY
    assert ivs[-1].closed_by == "shutdown"


def test_same_phase_is_not_a_new_interval(tmp_path: Path) -> None:
    lg = ledger_at(tmp_path, Clock())
    lg.record(Phase.LOADING, at=T0, trigger=Trigger.JOB, gpu=0)  # spawned: no pid yet
    lg.record(Phase.LOADING, at=T0 + 1, trigger=Trigger.JOB, gpu=0, pid=42)  # hello
    ivs = lg.intervals(T0, T0 + 10)
    assert len(ivs) == 1 and ivs[0].pid == 42 and ivs[0].start == T0


def test_crash_closes_open_interval_at_last_seen(tmp_path: Path) -> None:
    clock = Clock()
    lg = ledger_at(tmp_path, clock)
    lg.record(Phase.LOADING, at=T0, trigger=Trigger.SCHEDULE, gpu=0, pid=7)
    lg.record(Phase.READY_IDLE, at=T0 + 10, trigger=Trigger.SCHEDULE, gpu=0, pid=7,
              idle_cause=IdleCause.IDLE_TIMEOUT)
    lg.add_sample(T0 + 25, energy_j=100.0, power_s=15.0, gpu_mem=1000, rss=5)
    lg.add_sample(T0 + 40, energy_j=150.0, power_s=15.0, gpu_mem=3000, rss=4)
    lg.close_db()  # kill -9: nothing closed

    clock.t = T0 + 100
    lg2 = ledger_at(tmp_path, clock)
    assert [(iv.state, iv.end, iv.closed_by) for iv in lg2.recovered] == [
        (Phase.READY_IDLE, T0 + 40, "recovery")
    ]
    lg2.record(Phase.EXITED, at=T0 + 100, reason="startup")
    ivs = lg2.intervals(T0, T0 + 200)
    idle = ivs[1]
    assert (idle.energy_j, idle.power_s, idle.gpu_mem_max, idle.rss_max, idle.samples) == (
        250.0, 30.0, 3000, 5, 2,
    )
    assert ivs[2].from_state is None  # the restart breaks the chain

    clock.t = T0 + 200
    r = cost.summarize(ivs, T0, T0 + 200, clock.t, CostConfig(gpu_hour_usd=3.6))
    # 10 s loading + 30 s idle held; 60 s unknown (daemon down); 100 s exited.
    assert r["hours"]["loading"] * 3600 == pytest.approx(10)
    assert r["hours"]["ready_idle"] * 3600 == pytest.approx(30)
    assert r["covered_hours"] * 3600 == pytest.approx(140)
    assert r["cost"]["on_demand_usd"] == pytest.approx(40 * 0.001)
    assert r["cost"]["always_on_usd"] == pytest.approx(140 * 0.001)
    assert r["energy"]["mean_watts"] == {"ready_idle": pytest.approx(250 / 30)}


def test_clock_stepping_back_never_makes_negative_intervals(tmp_path: Path) -> None:
    lg = ledger_at(tmp_path, Clock())
    lg.record(Phase.READY_BUSY, at=T0 + 10, trigger=Trigger.JOB)
    lg.record(Phase.READY_IDLE, at=T0 + 5, trigger=Trigger.JOB)
    ivs = lg.intervals(T0, T0 + 100)
    assert ivs[0].end == T0 + 10 and ivs[1].start == T0 + 10


# -- report ------------------------------------------------------------------------------------


def test_report_arithmetic_with_day_boundary_cut(tmp_path: Path) -> None:
    clock = Clock(T0 + 2 * DAY)
    lg = ledger_at(tmp_path, clock)
    lg.record(Phase.EXITED, at=T0, reason="startup")
    # Day 1 ends in the middle of this session: load 23:50-00:10 (a cold start that began on
    # day 1), busy 00:10-00:40, idle-warm until 01:40.
    t = T0 + DAY - 600
    record_session(lg, t, load=1200, busy=1800, idle=3600)
    ivs = lg.intervals(T0, T0 + 2 * DAY)
    cfg = CostConfig(gpu_hour_usd=2.0)

    doc = cost.report(ivs, cost.Period(T0, T0 + 2 * DAY, "two days"), clock.t, cfg)
    assert doc["hours"]["loading"] == pytest.approx(1200 / 3600)
    assert doc["hours"]["ready_busy"] == pytest.approx(0.5)
    assert doc["hours"]["ready_idle"] == pytest.approx(1.0)
    assert doc["hours"]["gpu_held"] == pytest.approx(1200 / 3600 + 1.5)
    assert doc["covered_hours"] == pytest.approx(48.0)
    assert doc["cost"]["on_demand_usd"] == pytest.approx(2.0 * (1200 / 3600 + 1.5))
    assert doc["cost"]["always_on_usd"] == pytest.approx(96.0)
    assert doc["cost"]["savings_usd"] == pytest.approx(96.0 - 2.0 * (1200 / 3600 + 1.5))
    assert doc["cost"]["savings_pct"] == pytest.approx(100 * (1 - (1200 / 3600 + 1.5) / 48))
    assert doc["cost"]["idle_usd"] == pytest.approx(2.0)
    assert doc["cold_starts"]["by_trigger"] == {
        "job": {"count": 1, "seconds": 1200.0, "mean_s": 1200.0}
    }

    day1, day2 = doc["days"]
    assert (day1["day"], day2["day"]) == ("2023-11-14", "2023-11-15")
    assert day1["hours"]["loading"] * 3600 == pytest.approx(600)
    assert day2["hours"]["loading"] * 3600 == pytest.approx(600)
    # The cold start belongs to the day it began, with all its seconds.
    assert (day1["cold_starts"], day1["cold_start_seconds"]) == (1, 1200.0)
    assert (day2["cold_starts"], day2["cold_start_seconds"]) == (0, 0.0)
    assert day2["hours"]["ready_busy"] == pytest.approx(0.5)
    assert day1["on_demand_usd"] + day2["on_demand_usd"] == pytest.approx(
        doc["cost"]["on_demand_usd"]
    )

    # A period starting after the load began: its time is clipped, the cold start is not ours.
    cut = cost.summarize(ivs, T0 + DAY, T0 + DAY + 1800, clock.t, cfg)
    assert cut["hours"]["loading"] * 3600 == pytest.approx(600)
    assert cut["hours"]["ready_busy"] * 3600 == pytest.approx(1200)
    assert cut["cold_starts"]["count"] == 0
    assert cut["covered_hours"] == pytest.approx(0.5)


def test_idle_warm_split_by_hold_and_tail(tmp_path: Path) -> None:
    lg = ledger_at(tmp_path, Clock())
    lg.record(Phase.LOADING, at=T0, trigger=Trigger.SCHEDULE, gpu=0)
    lg.record(Phase.READY_IDLE, at=T0 + 60, trigger=Trigger.SCHEDULE, gpu=0,
              idle_cause=IdleCause.SCHEDULE_HOLD, hold_until=T0 + 3660)
    lg.record(Phase.UNLOADED_ALIVE, at=T0 + 3660 + 300, trigger=Trigger.SCHEDULE, gpu=0,
              idle_cause=IdleCause.IDLE_TIMEOUT)
    lg.record(Phase.EXITED, at=T0 + 3660 + 900, gpu=0)
    ivs = lg.intervals(T0, T0 + DAY)
    r = cost.summarize(ivs, T0, T0 + 7200, T0 + 7200, CostConfig())
    idle = r["idle_warm_hours"]
    assert idle["schedule_hold"] * 3600 == pytest.approx(3600)
    assert idle["idle_timeout"] * 3600 == pytest.approx(300)
    assert idle["manual_hold"] == 0
    assert r["hours"]["unloaded_alive"] * 3600 == pytest.approx(600)
    assert r["cold_starts"]["by_trigger"]["schedule"]["count"] == 1
    # Cut in the middle of the hold: only the part inside counts, still as hold.
    half = cost.summarize(ivs, T0, T0 + 1860, T0 + 7200, CostConfig())
    assert half["idle_warm_hours"]["schedule_hold"] * 3600 == pytest.approx(1800)
    assert half["idle_warm_hours"]["idle_timeout"] == 0


def test_energy_and_energy_cost() -> None:
    def iv(i: int, state: Phase, s: float, e: float, joules: float, power_s: float) -> Interval:
        return Interval(id=i, state=state, start=s, end=e, last_seen=e, energy_j=joules,
                        power_s=power_s, trigger=Trigger.JOB)

    ivs = [
        iv(1, Phase.EXITED, 0, 1000, 30.0 * 1000, 1000),  # 30 W baseline
        iv(2, Phase.LOADING, 1000, 1100, 100.0 * 100, 100),  # 100 W
        iv(3, Phase.READY_BUSY, 1100, 1400, 200.0 * 300, 300),  # 200 W
        iv(4, Phase.READY_IDLE, 1400, 2400, 60.0 * 900, 900),  # 60 W, 900 s of readings
        iv(5, Phase.EXITED, 2400, 3600, 30.0 * 1200, 1200),
    ]
    cfg = CostConfig(gpu_hour_usd=3.6, energy_kwh_usd=0.36)
    r = cost.summarize(ivs, 0, 3600, 3600, cfg)
    e = r["energy"]
    assert e["mean_watts"]["ready_idle"] == pytest.approx(60.0)
    assert e["on_demand_j"] == pytest.approx(30 * 2200 + 100 * 100 + 200 * 300 + 60 * 1000)
    assert e["always_on_j"] == pytest.approx(100 * 100 + 200 * 300 + 60 * 3200)
    assert e["baseline_measured"] is True
    usd_per_j = 0.36 / 3.6e6
    assert r["cost"]["energy_included"] is True
    assert r["cost"]["on_demand_usd"] == pytest.approx(1400 * 0.001 + e["on_demand_j"] * usd_per_j)
    assert r["cost"]["always_on_usd"] == pytest.approx(3600 * 0.001 + e["always_on_j"] * usd_per_j)
    assert r["cost"]["idle_usd"] == pytest.approx(1000 * 0.001 + 60 * 1000 * usd_per_j)
    # Without power readings there is no energy section and no energy money.
    bare = [Interval(id=i.id, state=i.state, start=i.start, end=i.end, last_seen=i.last_seen)
            for i in ivs]
    r2 = cost.summarize(bare, 0, 3600, 3600, cfg)
    assert r2["energy"] is None and r2["cost"]["energy_included"] is False


def test_days_buckets() -> None:
    assert cost.days(T0 + 3600, T0 + DAY + 60) == [(T0 + 3600, T0 + DAY), (T0 + DAY, T0 + DAY + 60)]
    assert cost.days(T0, T0) == []


def test_parse_when() -> None:
    now = T0 + 10 * DAY
    assert cost.parse_when("30d", now) == now - 30 * DAY
    assert cost.parse_when("24h", now) == now - DAY
    assert cost.parse_when("now", now) == now
    assert cost.parse_when("2023-11-14", now) == T0
    assert cost.parse_when("2023-11-14T01:00Z", now) == T0 + 3600
    with pytest.raises(ValueError, match="duration"):
        cost.parse_when("yesterday", now)


# -- recommendation ------------------------------------------------------------------------


def sessions(gaps: Sequence[float], *, load: float = 20.0, busy: float = 10.0) -> list[Interval]:
    """Busy bursts separated by `gaps`, the worker exiting after each (a job-triggered cold
    start ends every gap): what an exit_after_s = 0 daemon would record."""
    out: list[Interval] = []
    t = 0.0

    def add(state: Phase, s: float, e: float, **kw: object) -> None:
        prev = out[-1].state if out else None
        if out:
            out[-1] = Interval(**{**out[-1].__dict__, "next_state": state})
        out.append(Interval(id=len(out) + 1, state=state, start=s, end=e, last_seen=e,
                            from_state=prev, trigger=Trigger.JOB, **kw))  # type: ignore[arg-type]

    for g in [*gaps, None]:
        add(Phase.LOADING, t, t + load)
        add(Phase.READY_BUSY, t + load, t + load + busy)
        t += load + busy
        if g is not None:
            add(Phase.EXITED, t, t + g)
            t += g
    return out


def test_demand_gaps_measure_from_busy_end_to_next_demand() -> None:
    assert cost.demand_gaps(sessions([5, 50, 500])) == [5, 50, 500]


def naive_cost(gaps: Sequence[float], p: cost.Prices, u: float, e: float) -> float:
    u = min(u, e)
    total = 0.0
    for g in gaps:
        if g <= u:
            total += p.ready * g
        elif g <= e:
            total += p.ready * u + p.unloaded * (g - u) + p.reload
        else:
            total += p.ready * u + p.unloaded * (e - u) + p.spawn
    return total


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.floats(0, 5000), min_size=1, max_size=30),
    u=st.sampled_from([0.0, 1.0, 60.0, 600.0, math.inf]),
    e=st.sampled_from([0.0, 30.0, 900.0, math.inf]),
    ready=st.floats(0, 1), unloaded=st.floats(0, 1), reload=st.floats(0, 10),
    spawn=st.floats(0, 10),
)
def test_gap_cost_matches_naive(
    gaps: list[float], u: float, e: float, ready: float, unloaded: float, reload: float,
    spawn: float,
) -> None:
    p = cost.Prices(ready=ready, unloaded=unloaded, loading=ready, spawn=spawn, reload=reload)
    got, _, _ = cost.GapCost(gaps, p)(u, e)
    assert got == pytest.approx(naive_cost(gaps, p, u, e), rel=1e-9, abs=1e-9)


def test_recommendation_is_break_even_for_bimodal_gaps() -> None:
    # $3.60/h = $0.001/s warm; a 20 s load + $0.10 penalty = $0.12 a cold start: break-even 120 s.
    cfg = CostConfig(gpu_hour_usd=3.6, cold_start_penalty_usd=0.1)
    gaps = [30.0] * 10 + [3600.0] * 5  # bursts 30 s apart, and hour-long pauses
    rec = cost.recommend(sessions(gaps), 1e6, cfg, unload_after_s=300, exit_after_s=900)
    assert rec["status"] == "ok"
    assert rec["break_even_s"]["exit"] == pytest.approx(120.0)
    # Covering the 30 s gaps (0.03 each) beats a cold start (0.12); the hour gaps do not pay.
    assert rec["recommended"]["exit_after_s"] == 30
    assert rec["recommended"]["spawns"] == 5
    assert rec["recommended"]["cost_usd"] == pytest.approx(10 * 0.03 + 5 * (0.03 + 0.12))
    # Current 300/900: 10 x 0.03 + 5 x (0.9 + 0.12) -- no reload was observed, so the unload tier
    # is priced like a spawn, and an unloaded worker is billed like a loaded one.
    assert rec["current"]["cost_usd"] == pytest.approx(10 * 0.03 + 5 * (0.9 + 0.12))
    assert rec["saving_vs_current_usd"] == pytest.approx(5 * 0.87)
    assert rec["always_warm"]["cost_usd"] == pytest.approx(10 * 0.03 + 5 * 3.6)


def test_recommendation_brute_force_optimal() -> None:
    cfg = CostConfig(gpu_hour_usd=1.0, cold_start_penalty_usd=0.01)
    gaps = [3, 8, 15, 40, 41, 90, 200, 200, 700, 1500, 4000]
    rec = cost.recommend(sessions(gaps), 1e6, cfg, unload_after_s=-1, exit_after_s=-1)
    p = cost.Prices(ready=1 / 3600, unloaded=1 / 3600, loading=1 / 3600,
                    spawn=20 / 3600 + 0.01, reload=20 / 3600 + 0.01)
    grid = [float(x) for x in range(0, 4100)] + [math.inf]
    best = min(naive_cost(gaps, p, math.inf, e) for e in grid)
    assert rec["recommended"]["cost_usd"] == pytest.approx(best, rel=1e-9)


def test_recommendation_needs_data() -> None:
    rec = cost.recommend([], 0, CostConfig(), unload_after_s=300, exit_after_s=900)
    assert rec["status"] == "insufficient_data" and rec["recommended"] is None
    rec = cost.recommend(sessions([10]), 1e6, CostConfig(), unload_after_s=300, exit_after_s=900)
    assert rec["status"] == "insufficient_data"
    assert rec["break_even_s"]["exit"] == pytest.approx(20.0)  # load seconds x same rate


def test_document_default_periods(tmp_path: Path) -> None:
    clock = Clock(T0 + 40 * DAY)
    lg = ledger_at(tmp_path, clock)
    lg.record(Phase.EXITED, at=T0 + 39 * DAY)
    doc = cost.document(lg.intervals, clock.t, CostConfig(), WorkerConfig())
    assert [p["label"] for p in doc["periods"]] == ["last_24h", "last_30d"]
    assert doc["periods"][0]["covered_hours"] == pytest.approx(24)
    assert len(doc["periods"][1]["days"]) == 30
    with pytest.raises(ValueError):
        cost.document(lg.intervals, clock.t, CostConfig(), WorkerConfig(), since=clock.t,
                      until=clock.t - 1)


# -- accounting: supervisor events -> ledger ---------------------------------------------------


class FakeProbe:
    name = "fake"
    fallback = False

    def __init__(self) -> None:
        self.watts = 50.0
        self.calls: list[tuple[tuple[int, ...], int | None]] = []

    def sample(self, pids: Sequence[int], gpu: int | None) -> GpuSample:
        self.calls.append((tuple(pids), gpu))
        return GpuSample(
            source="nvml", gpu=gpu, pids=tuple(pids), pids_gpu_memory_bytes=len(pids) * 1000,
            gpu_memory_used_bytes=5000, gpu_memory_total_bytes=10000, power_watts=self.watts,
            energy_joules=None, utilization_pct=0.0, pstate=8, rss_bytes=100 if pids else None,
            cpu_seconds=1.0 if pids else None,
        )

    def close(self) -> None:
        pass


def state(old: str, new: str, t: float, trigger: str = "job:a1", pid: int | None = 99,
          reason: str = "x") -> StateChanged:
    return StateChanged(old=old, new=new, reason=reason, trigger=trigger, pid=pid,
                        device="cuda:0", time=t, mono=t)


def test_accounting_maps_supervisor_events(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock(T0)
        lg = ledger_at(tmp_path, clock)
        probe = FakeProbe()
        acc = Accounting(CostConfig(gpu_hour_usd=3.6, sample_interval_s=3600,
                                    baseline_interval_s=0), WorkerConfig(), lg, probe, clock=clock)
        bus = EventBus()
        acc.start(bus)
        pub = bus.publish
        clock.t = T0 + 10
        pub(state("cold", "starting", T0 + 10, pid=None))
        clock.t = T0 + 11
        pub(state("starting", "loading", T0 + 11, reason="spawned"))
        clock.t = T0 + 30
        pub(state("loading", "ready", T0 + 30, reason="loaded"))
        pub(ModelLoaded(seconds=20.0, trigger="job:a1", pid=99, device="cuda:0",
                        fresh_process=True, time=T0 + 30, mono=T0 + 30))
        pub(WorkerActivity(inflight=1, hold_s=0, hold_trigger="", time=T0 + 30, mono=0))
        clock.t = T0 + 40
        pub(WorkerActivity(inflight=0, hold_s=0, hold_trigger="", time=T0 + 40, mono=0))
        clock.t = T0 + 50
        pub(WorkerActivity(inflight=0, hold_s=100, hold_trigger="manual", time=T0 + 50, mono=0))
        clock.t = T0 + 400
        pub(state("ready", "unloading", T0 + 400, trigger="idle", reason="idle_unload"))
        pub(state("unloading", "unloaded", T0 + 401, trigger="idle"))
        clock.t = T0 + 500
        pub(state("unloaded", "stopping", T0 + 500, trigger="idle", reason="idle_exit"))
        clock.t = T0 + 502
        pub(state("stopping", "cold", T0 + 502, trigger="idle", pid=None, reason="exited"))
        clock.t = T0 + 600
        acc.close()

        ivs = lg.intervals(T0, T0 + 1000)
        got = [(iv.state.value, iv.start - T0, iv.end - T0 if iv.end else None,
                iv.trigger and iv.trigger.value, iv.idle_cause and iv.idle_cause.value)
               for iv in ivs]
        assert got == [
            ("exited", 0, 10, None, None),
            ("loading", 10, 30, "job", None),
            ("ready_idle", 30, 30, "job", "idle_timeout"),  # loaded, lease granted at once
            ("ready_busy", 30, 40, "job", None),
            ("ready_idle", 40, 50, "job", "idle_timeout"),
            ("ready_idle", 50, 400, "job", "manual_hold"),
            ("unloaded_alive", 400, 502, "job", "idle_timeout"),
            ("exited", 502, 600, None, None),
        ]
        assert ivs[5].hold_until == T0 + 150
        assert ivs[1].pid == 99  # filled in when the hello arrived
        r = cost.summarize(ivs, T0, T0 + 600, clock.t, acc.cfg)
        assert r["idle_warm_hours"]["manual_hold"] * 3600 == pytest.approx(100)
        assert r["idle_warm_hours"]["idle_timeout"] * 3600 == pytest.approx(260)
        assert r["cost"]["on_demand_usd"] == pytest.approx(492 * 0.001)
        # Readings: one at start, one closing each phase, one baseline after the exit.
        assert probe.calls[0] == ((), 0)
        assert ((99,), 0) in probe.calls
        assert probe.calls[-1] == ((), 0)
        # Energy went to the phases: 50 W x each closed stretch between readings.
        assert sum(iv.energy_j for iv in ivs) == pytest.approx(50.0 * 600)
        text = acc.metrics.exposition().decode()
        assert 'ondemand_cold_starts_total{trigger="job"} 1.0' in text
        assert 'ondemand_worker_state{state="cold"} 1.0' in text
        # Idle cost: 10 + 350 s idle-warm + 102 s unloaded-alive at $0.001/s.
        assert "ondemand_idle_cost_dollars_total 0.462" in text

    asyncio.run(main())


def test_cost_config_key_path_errors() -> None:
    cfg = config_mod.build(config_mod.Config, {"cost": {"gpu_hour_usd": 2, "probe": "psutil"}})
    assert cfg.cost.gpu_hour_usd == 2.0 and cfg.cost.probe == "psutil"
    with pytest.raises(ConfigError, match=r"^cost.gpu_hour_usd: must be >= 0, got -1"):
        config_mod.build(config_mod.Config, {"cost": {"gpu_hour_usd": -1}})
    with pytest.raises(ConfigError, match=r"^cost.probe: must be one of auto, nvml, psutil"):
        config_mod.build(config_mod.Config, {"cost": {"probe": "nvidia-smi"}})
    with pytest.raises(ConfigError, match=r"^cost.sample_interval_s: must be > 0"):
        config_mod.build(config_mod.Config, {"cost": {"sample_interval_s": 0}})
    with pytest.raises(ConfigError, match=r"^cost.price: unknown key"):
        config_mod.build(config_mod.Config, {"cost": {"price": 1}})

"""Prewarm rules: next-fire tables (injected times), DST, windows, lead, config errors, and the
scheduler's timing against a fake `start_hold` (no daemon; see test_prewarm_daemon.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ondemand import config as config_mod
from ondemand.durations import parse_duration
from ondemand.errors import ConfigError
from ondemand.prewarm.rules import (
    PrewarmRule,
    lead_s,
    local_zone,
    next_fire,
    percentile,
    prev_fire,
    wall_to_instant,
    window_end,
)
from ondemand.prewarm.scheduler import PrewarmScheduler
from tests.conftest import run_virtual, wait_for

BERLIN = ZoneInfo("Europe/Berlin")

NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")


def fires(
    rule: PrewarmRule, start: datetime, end: datetime, local: tzinfo = UTC
) -> Iterator[datetime]:
    """Every fire instant in (start, end] (test helper over next_fire)."""
    t = next_fire(rule, start, local)
    while t <= end:
        yield t
        t = next_fire(rule, t, local)


def rule(cron: str, tz: ZoneInfo | None = None, hold: str = "1h", **kw: Any) -> PrewarmRule:
    data: dict[str, Any] = {"cron": cron, "hold": hold, **kw}
    if tz is not None:
        data["timezone"] = tz.key
    return config_mod.build(config_mod.Config, {"prewarm": [data]}).prewarm[0]


def local(tz: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    """A wall time in `tz` as a UTC instant (aware datetimes in different zones compare unequal
    when one is an ambiguous time, so every comparison here is made in UTC)."""
    return datetime(*args, tzinfo=tz, fold=fold).astimezone(UTC)  # type: ignore[misc]


def fire_list(r: PrewarmRule, tz: ZoneInfo, start: datetime, n: int) -> list[str]:
    """The next `n` fires after `start`, as local ISO strings (offset shows the DST side)."""
    out, t = [], start
    for _ in range(n):
        t = next_fire(r, t)
        out.append(t.astimezone(tz).isoformat())
    return out


# -- next-fire tables -------------------------------------------------------------------------
def test_weekday_mornings_skip_the_weekend() -> None:
    r = rule("0 9 * * 1-5", BERLIN, hold="9h")
    friday_noon = local(BERLIN, 2024, 6, 7, 12)
    assert fire_list(r, BERLIN, friday_noon, 3) == [
        "2024-06-10T09:00:00+02:00", "2024-06-11T09:00:00+02:00", "2024-06-12T09:00:00+02:00"]
    # the window is [09:00, 18:00) on weekdays only
    assert window_end(r, friday_noon) == local(BERLIN, 2024, 6, 7, 18)
    assert window_end(r, local(BERLIN, 2024, 6, 7, 17, 59)) == local(BERLIN, 2024, 6, 7, 18)
    assert window_end(r, local(BERLIN, 2024, 6, 7, 18)) is None
    assert window_end(r, local(BERLIN, 2024, 6, 8, 12)) is None  # Saturday
    assert window_end(r, local(BERLIN, 2024, 6, 10, 8, 59)) is None
    assert window_end(r, local(BERLIN, 2024, 6, 10, 9)) == local(BERLIN, 2024, 6, 10, 18)
    # a fire exactly at `after` is not "after" it; at `at` it is the previous fire
    nine = local(BERLIN, 2024, 6, 10, 9)
    assert next_fire(r, nine) == local(BERLIN, 2024, 6, 11, 9)
    assert prev_fire(r, nine) == nine


def test_month_ends() -> None:
    r31 = rule("0 9 31 * *", TOKYO)
    assert [s[:10] for s in fire_list(r31, TOKYO, local(TOKYO, 2024, 1, 1), 7)] == [
        "2024-01-31", "2024-03-31", "2024-05-31", "2024-07-31", "2024-08-31", "2024-10-31",
        "2024-12-31"]
    last = rule("0 9 L * *", TOKYO)  # croniter's "last day of the month"
    assert [s[:10] for s in fire_list(last, TOKYO, local(TOKYO, 2023, 1, 1), 14)] == [
        "2023-01-31", "2023-02-28", "2023-03-31", "2023-04-30", "2023-05-31", "2023-06-30",
        "2023-07-31", "2023-08-31", "2023-09-30", "2023-10-31", "2023-11-30", "2023-12-31",
        "2024-01-31", "2024-02-29"]


@pytest.mark.parametrize(
    ("tz", "cron", "start", "expected"),
    [
        # Berlin springs forward 2024-03-31 02:00 -> 03:00: 02:30 does not exist; it fires when
        # the clock jumps (03:00 CEST), and the days around are untouched.
        (BERLIN, "30 2 * * *", (2024, 3, 30), [
            "2024-03-30T02:30:00+01:00", "2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"]),
        # Berlin falls back 2024-10-27 03:00 -> 02:00: 02:30 happens twice and fires once.
        (BERLIN, "30 2 * * *", (2024, 10, 26), [
            "2024-10-26T02:30:00+02:00", "2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]),
        # New York springs forward 2024-03-10 02:00 -> 03:00.
        (NEW_YORK, "30 2 * * *", (2024, 3, 9), [
            "2024-03-09T02:30:00-05:00", "2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]),
        # New York falls back 2024-11-03 02:00 -> 01:00: 01:30 happens twice and fires once.
        (NEW_YORK, "30 1 * * *", (2024, 11, 2), [
            "2024-11-02T01:30:00-04:00", "2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"]),
        # A 09:00 workday rule keeps 09:00 local on both sides (the UTC time moves).
        (NEW_YORK, "0 9 * * 1-5", (2024, 3, 8), [
            "2024-03-08T09:00:00-05:00", "2024-03-11T09:00:00-04:00", "2024-03-12T09:00:00-04:00"]),
        # Tokyo has no DST: the same UTC time every day through both zones' transitions.
        (TOKYO, "30 2 * * *", (2024, 3, 30), [
            "2024-03-30T02:30:00+09:00", "2024-03-31T02:30:00+09:00", "2024-04-01T02:30:00+09:00"]),
    ],
)
def test_dst_transitions(tz: ZoneInfo, cron: str, start: tuple[int, int, int],
                         expected: list[str]) -> None:
    r = rule(cron, tz)
    assert fire_list(r, tz, local(tz, *start) - timedelta(seconds=1), 3) == expected


@pytest.mark.parametrize(
    ("tz", "day", "hourly", "half_hourly"),
    [
        (BERLIN, (2024, 3, 31), 23, 46),  # 23 distinct instants: 02:00 and 03:00 collapse
        (BERLIN, (2024, 10, 27), 24, 48),  # 25 hours, 24 wall hours, each fires once
        (NEW_YORK, (2024, 3, 10), 23, 46),
        (NEW_YORK, (2024, 11, 3), 24, 48),
        (TOKYO, (2024, 3, 31), 24, 48),
    ],
)
def test_transition_days_no_double_or_missed_fire(tz: ZoneInfo, day: tuple[int, int, int],
                                                  hourly: int, half_hourly: int) -> None:
    start = local(tz, *day) - timedelta(microseconds=1)
    nxt = datetime(*day) + timedelta(days=1)  # the next local midnight (23 or 25 h away)
    end = local(tz, nxt.year, nxt.month, nxt.day) - timedelta(microseconds=1)
    for cron, n in (("0 * * * *", hourly), ("*/30 * * * *", half_hourly)):
        got = list(fires(rule(cron, tz), start, end))
        assert len(got) == n, (cron, [t.astimezone(tz).isoformat() for t in got])
        assert got == sorted(set(got))  # strictly increasing: nothing fires twice
        walls = {t.astimezone(tz).strftime("%H:%M") for t in got}
        # every wall time of the day is covered (a skipped one by the instant of the jump)
        assert len(walls) == len(got)


def test_wall_to_instant_gap_and_fold() -> None:
    assert wall_to_instant(datetime(2024, 3, 31, 2, 30), BERLIN) == datetime(
        2024, 3, 31, 1, 0, tzinfo=UTC)
    assert wall_to_instant(datetime(2024, 10, 27, 2, 30), BERLIN) == datetime(
        2024, 10, 27, 0, 30, tzinfo=UTC)  # the first of the two 02:30s
    assert wall_to_instant(datetime(2024, 6, 1, 9), TOKYO) == datetime(2024, 6, 1, 0,
                                                                       tzinfo=UTC)


def test_inside_the_repeated_hour() -> None:
    """At 01:10 EST (second pass) 01:30 EDT has already fired: it is the previous fire, the
    next is tomorrow, and the window counts from the first pass."""
    r = rule("30 1 * * *", NEW_YORK, hold="90m")
    second_pass = local(NEW_YORK, 2024, 11, 3, 1, 10, fold=1)
    assert second_pass.astimezone(NEW_YORK).utcoffset() == timedelta(hours=-5)
    assert prev_fire(r, second_pass) == local(NEW_YORK, 2024, 11, 3, 1, 30)
    assert next_fire(r, second_pass) == local(NEW_YORK, 2024, 11, 4, 1, 30)
    assert window_end(r, second_pass) == local(NEW_YORK, 2024, 11, 3, 1, 30) + timedelta(
        minutes=90)


YEAR = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))


@settings(max_examples=150, deadline=None)
@given(
    t=st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2024, 12, 31),
                   timezones=st.just(UTC)),
    tz=st.sampled_from([BERLIN, NEW_YORK, TOKYO]),
    cron=st.sampled_from(["30 2 * * *", "30 1 * * *", "*/20 1-3 * * *", "0 9 * * 1-5",
                          "0 0 L * *"]),
)
def test_prev_and_next_agree(t: datetime, tz: ZoneInfo, cron: str) -> None:
    """For any instant, prev <= t < next and nothing fires in between."""
    r = rule(cron, tz)
    before, after = prev_fire(r, t), next_fire(r, t)
    assert before is not None and before <= t < after
    assert next_fire(r, before) == after


def test_overlapping_windows_use_the_latest_fire() -> None:
    r = rule("0 9 * * *", TOKYO, hold="36h")  # each window overlaps the next day's
    at = local(TOKYO, 2024, 6, 2, 8)  # inside yesterday's and the day before's windows
    assert window_end(r, at) == local(TOKYO, 2024, 6, 2, 21)


# -- lead ---------------------------------------------------------------------------------------
def test_percentile_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 95) == 3.0  # few samples: the maximum
    twenty = [10.0] * 19 + [30.0]
    assert percentile(twenty, 95) == 10.0  # rank 19 of 20
    assert percentile(twenty, 100) == 30.0
    with pytest.raises(ValueError):
        percentile([], 95)


def test_lead_from_loads_and_floor() -> None:
    assert lead_s([], floor_s=60, pct=95, factor=1.25) == 60  # no history: the floor
    assert lead_s([2.0, 3.0], floor_s=60, pct=95, factor=1.25) == 60  # fast loads: the floor
    assert lead_s([20.0, 40.0, 30.0], floor_s=5, pct=95, factor=1.25) == 50.0


# -- config -------------------------------------------------------------------------------------
def test_parse_duration() -> None:
    assert parse_duration("9h") == 9 * 3600
    assert parse_duration("30m") == 1800
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1d2h") == 26 * 3600
    assert parse_duration("1.5h") == 5400
    assert parse_duration(600) == 600
    for bad in ("", "9", "h", "9 hours", "0s", "-1h", 0, True, "1m1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("prewarm", "message"),
    [
        ([{"cron": "0 9 * *", "hold": "1h"}], "prewarm[1].cron: must have 5 fields"),
        ([{"cron": "0 9 * * *", "hold": "1h"}, {"cron": "61 9 * * *", "hold": "1h"}],
         "prewarm[2].cron: not a valid cron expression"),
        ([{"cron": "0 9 30 2 *", "hold": "1h"}], "prewarm[1].cron: '0 9 30 2 *' never fires"),
        ([{"cron": "0 9 * * * *", "hold": "1h"}], "prewarm[1].cron: must have 5 fields"),
        ([{"cron": "0 9 * * *", "hold": "9 hours"}], 'prewarm[1].hold: must be a duration like'),
        ([{"cron": "0 9 * * *", "hold": "0s"}], "prewarm[1].hold: must be a positive duration"),
        ([{"cron": "0 9 * * *", "hold": "1h", "timezone": "Mars/Olympus"}],
         "prewarm[1].timezone: unknown time zone 'Mars/Olympus'"),
        ([{"cron": "0 9 * * *", "hold": "1h", "holds": "2h"}], "prewarm[1].holds: unknown key"),
        ([{"hold": "1h"}], "prewarm[1].cron: required"),
        ([{"cron": "0 9 * * *"}], "prewarm[1].hold: required"),
        ([{"cron": 9, "hold": "1h"}], "prewarm[1].cron: must be str"),
        ([{"cron": "0 9 * * *", "hold": "1h", "catch_up": "yes"}],
         "prewarm[1].catch_up: must be bool"),
        ([{"name": "a", "cron": "0 9 * * *", "hold": "1h"},
          {"name": "a", "cron": "0 8 * * *", "hold": "1h"}],
         "prewarm[2].name: 'a' is already the name of prewarm[1]"),
        ({"cron": "0 9 * * *", "hold": "1h"}, "prewarm: must be an array of tables"),
        (["0 9 * * *"], "prewarm[1]: must be a table"),
    ],
)
def test_config_errors_name_the_key(prewarm: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_mod.build(config_mod.Config, {"prewarm": prewarm})
    assert str(e.value).startswith(message), str(e.value)


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[[prewarm]]\nname = "workday"\ncron = "0 9 * * 1-5"\nhold = "9h"\n'
        'timezone = "Europe/Berlin"\n\n[[prewarm]]\ncron = "@daily"\nhold = 600\n'
        "catch_up = false\n\n[prewarm_lead]\nfloor_s = 30\nfactor = 1.5\n")
    cfg = config_mod.load(path)
    a, b = cfg.prewarm
    assert (a.name, a.cron, a.hold_s, a.tz, a.catch_up) == (
        "workday", "0 9 * * 1-5", 32400.0, BERLIN, True)
    assert (b.name, b.hold_s, b.tz, b.catch_up, b.trigger) == (
        "prewarm[2]", 600.0, None, False, "schedule:prewarm[2]")
    assert (cfg.prewarm_lead.floor_s, cfg.prewarm_lead.factor) == (30.0, 1.5)
    assert config_mod.Config().prewarm == ()
    with pytest.raises(ConfigError, match=r"^prewarm_lead.factor: must be >= 1, got 0.5"):
        config_mod.build(config_mod.Config, {"prewarm_lead": {"factor": 0.5}})


def test_local_zone(tmp_path: Path) -> None:
    assert local_zone("Asia/Tokyo") == TOKYO
    assert local_zone(":America/New_York") == NEW_YORK
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Europe/Berlin")
    assert local_zone(None, link) == BERLIN
    assert local_zone("Not/AZone", tmp_path / "missing") == UTC


# -- the scheduler against a fake start_hold ----------------------------------------------------
class Holds:
    """A fake `start_hold` that takes `load_s` (like a load) and records when it was called."""

    def __init__(self, clock: Any, load_s: float = 0.0, fail: bool = False) -> None:
        self.clock, self.load_s, self.fail = clock, load_s, fail
        self.calls: list[tuple[datetime, datetime, str, str]] = []  # (at, until, trigger, name)

    async def __call__(self, until: datetime, trigger: str, name: str) -> None:
        self.calls.append((self.clock(), until, trigger, name))
        await asyncio.sleep(self.load_s)
        if self.fail:
            raise RuntimeError("the model failed to load")


FIRE = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # an ordinary minute: no DST change anywhere


def shifted_clock(seconds_to_minute: float) -> Any:
    """A wall clock on the running loop's time (virtual under run_virtual: exact whatever the
    machine's load) on which the next whole minute, a cron fire, is `seconds_to_minute` away.
    Returns (clock, fire)."""
    loop = asyncio.get_running_loop()
    start, t0 = FIRE - timedelta(seconds=seconds_to_minute), loop.time()
    return (lambda: start + timedelta(seconds=loop.time() - t0)), FIRE


def lead_cfg(**kw: Any) -> config_mod.PrewarmLeadConfig:
    return config_mod.build(config_mod.PrewarmLeadConfig, kw)


def test_scheduler_starts_early_by_the_lead_and_is_ready_by_the_fire() -> None:
    async def main() -> None:
        clock, fire = shifted_clock(1.5)
        holds = Holds(clock, load_s=0.4)
        sched = PrewarmScheduler([rule("* * * * *", hold="30s", name="m", catch_up=False)],
                                 lead_cfg(floor_s=0.1, factor=1.25), holds, clock=clock,
                                 loads=[0.4, 0.3])
        assert sched.lead_s() == pytest.approx(0.5)
        sched.start()
        try:
            await wait_for(lambda: bool(sched.fired) and sched.fired[0].ready is not None)
        finally:
            await sched.close()
        at, hold_until, trigger, name = holds.calls[0]
        assert (trigger, name, hold_until) == ("schedule", "m", fire + timedelta(seconds=30))
        assert (at - fire).total_seconds() == pytest.approx(-0.5, abs=1e-6)  # fire - lead
        # the (fake) load takes 0.4 s: ready 0.1 s before the fire
        assert sched.fired[0].lateness_s == pytest.approx(-0.1, abs=1e-6)
        snap = sched.snapshot()
        assert snap["lead"]["source"] == "measured" and snap["lead"]["seconds"] == 0.5
        r = snap["rules"][0]
        assert r["next_fire"]["utc"] == (fire + timedelta(minutes=1)).isoformat()
        assert r["last"]["lateness_s"] == -0.1
        assert r["in_window_until"] is None  # ready before the window opens

    run_virtual(main())


def test_scheduler_uses_the_floor_and_a_new_load_moves_the_start() -> None:
    async def main() -> None:
        clock, fire = shifted_clock(2.0)
        holds = Holds(clock)
        sched = PrewarmScheduler([rule("* * * * *", name="m", catch_up=False)],
                                 lead_cfg(floor_s=0.2), holds, clock=clock)
        assert sched.lead_s() == 0.2 and sched.snapshot()["lead"]["source"] == "floor"
        sched.start()
        try:
            # planned with the floor (start at fire - 0.2 s), then a load is recorded
            await wait_for(lambda: sched.snapshot()["rules"][0]["next_start"] is not None)
            sched.record_load(1.0)  # lead 1.25 s: the planned start moves 1.05 s earlier
            await wait_for(lambda: bool(holds.calls))
        finally:
            await sched.close()
        assert (holds.calls[0][0] - fire).total_seconds() == pytest.approx(-1.25, abs=1e-6)

    run_virtual(main())


@pytest.mark.parametrize("catch_up", [True, False])
def test_startup_inside_a_window(catch_up: bool) -> None:
    async def main() -> None:
        clock, fire = shifted_clock(40.0)  # 20 s after the previous minute's fire
        holds = Holds(clock)
        sched = PrewarmScheduler([rule("* * * * *", hold="30s", name="w", catch_up=catch_up)],
                                 lead_cfg(floor_s=1), holds, clock=clock)
        sched.start()
        try:
            # the start-up pass (where catch-up is decided) is done once a next fire is planned
            await wait_for(lambda: sched.snapshot()["rules"][0]["next_fire"] is not None)
            if catch_up:
                await wait_for(lambda: bool(holds.calls))
        finally:
            await sched.close()
        if not catch_up:
            assert holds.calls == []
            return
        prev = fire - timedelta(minutes=1)
        assert holds.calls[0][1:] == (prev + timedelta(seconds=30), "schedule", "w")
        assert sched.fired[0].catch_up and sched.fired[0].fire == prev

    run_virtual(main())


def test_a_failed_prewarm_is_recorded_and_the_schedule_goes_on() -> None:
    async def main() -> None:
        clock, fire = shifted_clock(0.3)
        holds = Holds(clock, fail=True)
        sched = PrewarmScheduler([rule("* * * * *", name="f", catch_up=False)],
                                 lead_cfg(floor_s=0.1), holds, clock=clock)
        sched.start()
        try:
            await wait_for(lambda: bool(sched.fired) and sched.fired[0].error is not None)
            snap = sched.snapshot()
        finally:
            await sched.close()
        assert "failed to load" in snap["rules"][0]["last"]["error"]
        assert snap["rules"][0]["next_fire"]["utc"] == (fire + timedelta(minutes=1)).isoformat()

    run_virtual(main())


def test_config_toml_documents_prewarm() -> None:
    """config.toml lists [prewarm_lead] with its defaults and a commented [[prewarm]] example
    that is valid once uncommented."""
    text = (Path(__file__).resolve().parents[1] / "config.toml").read_text()
    data = tomllib.loads(text)
    assert "prewarm" not in data  # no rule unless the user writes one
    defaults = {f.name: f.default for f in dataclasses.fields(config_mod.PrewarmLeadConfig)}
    assert data["prewarm_lead"] == defaults
    example = [line[2:] for line in text.splitlines()
               if line.startswith(("# [[prewarm]]", "# name =", "# cron =", "# hold =",
                                   "# timezone =", "# catch_up ="))]
    (r,) = config_mod.build(config_mod.Config, tomllib.loads("\n".join(example))).prewarm
    assert (r.name, r.cron, r.hold_s, r.tz) == ("workday", "0 9 * * 1-5", 9 * 3600, BERLIN)


def test_a_clock_jump_past_a_window_is_missed_and_caught_up() -> None:
    """Suspend/resume or a wall-clock step: the fire whose window passed unseen is skipped (not
    loaded late), the window the clock landed in is caught up, and the plan moves on."""

    async def main() -> None:
        base, fire = shifted_clock(30.0)
        jump = timedelta(0)

        def clock() -> datetime:
            return base() + jump

        holds = Holds(clock)
        sched = PrewarmScheduler([rule("* * * * *", hold="5s", name="j")], lead_cfg(floor_s=1),
                                 holds, clock=clock, recheck_s=0.05)
        sched.start()
        try:
            await wait_for(lambda: sched.snapshot()["rules"][0]["next_fire"] is not None)
            assert holds.calls == []
            jump = timedelta(seconds=30 + 61)  # 1 s into the window of the fire after `fire`
            await wait_for(lambda: bool(holds.calls))
            snap = sched.snapshot()
        finally:
            await sched.close()
        nxt = fire + timedelta(minutes=1)
        assert holds.calls[0][1:] == (nxt + timedelta(seconds=5), "schedule", "j")
        assert [(r.fire, r.catch_up) for r in sched.fired] == [(nxt, True)]
        assert snap["rules"][0]["next_fire"]["utc"] == (nxt + timedelta(minutes=1)).isoformat()

    run_virtual(main())

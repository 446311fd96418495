"""Prewarm rules: when the model must be *ready*, and for how long it stays loaded.  Pure code:
no event loop, no aiohttp, no torch; every function takes the time it works from.

A rule is a `[[prewarm]]` table in config.toml:

    [[prewarm]]
    name = "workday"          # optional; default "prewarm[N]"; loads are tagged schedule:<name>
    cron = "0 9 * * 1-5"      # 5-field cron (croniter), in `timezone`'s wall-clock time
    hold = "9h"               # stay loaded this long from the fire time ("1h30m", "90s", 3600)
    timezone = "Europe/Berlin"  # IANA name; default "" = this machine's zone
    catch_up = true           # a daemon started inside [fire, fire + hold) warms at once

Key paths in errors count the tables from 1 in file order: the first `[[prewarm]]` is
`prewarm[1]` (what a person counting the tables in the file sees).

Wall-clock semantics across daylight-saving changes (cron's own rule, made exact): every wall
time the expression matches fires exactly once.
- A time that happens twice (fall back: 01:30 in New York, 02:30 in Berlin) fires at its first
  occurrence only; the repeated hour does not fire again (no double fire).
- A time that does not exist (spring forward: 02:30 in both zones) fires at the instant the
  clock jumps past it (03:00 after the jump), so no day is skipped (no missed fire).  Several
  skipped times collapse into that one instant.
Internally the cron expression is iterated over naive wall times and each match is mapped to an
instant; that mapping is monotonic, which is what makes "first fire after t" and "last fire at
or before t" exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from ondemand.durations import parse_duration
from ondemand.errors import ConfigError

# Largest difference between a zone's offsets across a transition, plus slack; bounds how far
# past `t` a wall time can lie whose instant is still at or before `t` (second pass of a
# repeated hour).  Real zones change by at most 2 h (Antarctica/Troll).
_MAX_SHIFT = timedelta(hours=3)
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_RULE_KEYS = ("name", "cron", "hold", "timezone", "catch_up")


@dataclass(frozen=True)
class PrewarmRule:
    """One validated `[[prewarm]]` table.  `tz` is None for the machine's zone (resolved by
    whoever runs the schedule, see `local_zone`)."""

    name: str
    cron: str
    hold_s: float
    timezone: str = ""  # "" = the machine's zone
    catch_up: bool = True
    tz: ZoneInfo | None = None

    def zone(self, local: tzinfo) -> tzinfo:
        return self.tz if self.tz is not None else local

    @property
    def trigger(self) -> str:
        """What loads started by this rule are tagged with (events, ledger, metrics)."""
        return f"schedule:{self.name}"


# -- config -----------------------------------------------------------------------------------
def check_cron(expr: str) -> str | None:
    """An error text for `expr`, or None when it is a 5-field expression that fires."""
    fields = expr.split()
    if len(fields) == 1 and fields[0].lower() in _ALIASES:
        pass
    elif len(fields) != 5:
        return (
            f"must have 5 fields (minute hour day-of-month month day-of-week), got "
            f"{len(fields)} in {expr!r}"
        )
    try:
        # A fixed reference keeps validation deterministic; croniter refuses expressions that
        # never match ("0 9 30 2 *") with CroniterBadDateError.
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        return f"{expr!r} never fires (no such date)"
    except (ValueError, KeyError, TypeError) as e:  # croniter's errors derive from ValueError
        return f"not a valid cron expression {expr!r}: {e}"
    return None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin, "
            f"America/New_York or UTC"
        ) from e


def build_rule(data: Any, path: str, index: int) -> PrewarmRule:
    """Validate one `[[prewarm]]` table; errors start with `path` (e.g. `prewarm[1].`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path[:-1]}: must be a table, got {type(data).__name__}")
    for key in data:
        if key not in _RULE_KEYS:
            raise ConfigError(f"{path}{key}: unknown key (known here: {', '.join(_RULE_KEYS)})")
    for key in ("cron", "hold"):
        if key not in data:
            raise ConfigError(f"{path}{key}: required (e.g. cron = \"0 9 * * 1-5\", hold = \"9h\")")
    strings = {k: data.get(k, "") for k in ("name", "cron", "timezone")}
    for key, value in strings.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}{key}: must be str, got {value!r}")
    catch_up = data.get("catch_up", True)
    if not isinstance(catch_up, bool):
        raise ConfigError(f"{path}catch_up: must be bool, got {catch_up!r}")
    cron = " ".join(strings["cron"].split())
    problem = check_cron(cron)
    if problem:
        raise ConfigError(f"{path}cron: {problem}")
    try:
        hold_s = parse_duration(data["hold"])
    except ValueError as e:
        raise ConfigError(f"{path}hold: {e}") from None
    tz = None
    if strings["timezone"]:
        try:
            tz = _zone(strings["timezone"])
        except ValueError as e:
            raise ConfigError(f"{path}timezone: {e}") from None
    name = strings["name"].strip() or f"prewarm[{index}]"
    return PrewarmRule(name=name, cron=cron, hold_s=hold_s, timezone=strings["timezone"],
                       catch_up=catch_up, tz=tz)


def build_rules(value: Any, key: str) -> tuple[PrewarmRule, ...]:
    """The `build` hook for `Config.prewarm`: a TOML array of tables -> rules (1-based paths)."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables ([[prewarm]]), got {value!r}")
    rules: list[PrewarmRule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value, start=1):
        rule = build_rule(item, f"{key}[{i}].", i)
        if rule.name in seen:
            raise ConfigError(
                f"{key}[{i}].name: {rule.name!r} is already the name of {key}[{seen[rule.name]}]"
            )
        seen[rule.name] = i
        rules.append(rule)
    return tuple(rules)


def local_zone(tz_env: str | None = None, localtime: Path = Path("/etc/localtime")) -> tzinfo:
    """This machine's zone as a ZoneInfo: $TZ when it names one, else the /etc/localtime link
    target (…/zoneinfo/Europe/Berlin), else that file's rules, else UTC."""
    if tz_env:
        try:
            return ZoneInfo(tz_env.removeprefix(":"))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = localtime.resolve(strict=True)
        parts = target.parts
        if "zoneinfo" in parts:
            name = "/".join(parts[parts.index("zoneinfo") + 1 :])
            return ZoneInfo(name)
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ZoneInfoNotFoundError, ValueError):
        return UTC


# -- fire times -------------------------------------------------------------------------------
def wall_to_instant(wall: datetime, tz: tzinfo) -> datetime:
    """The UTC instant at which the naive wall time `wall` in `tz` fires (see module doc):
    first occurrence when it repeats, the moment of the jump when it does not exist."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # In a gap: fold=1 reads it with the offset after the jump (the earlier instant), fold=0
    # with the offset before it (the later one); the jump lies between.  Find it to the second.
    lo = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    hi = first
    lo, hi = min(lo, hi), max(lo, hi)
    after = hi.astimezone(tz).utcoffset()
    lo_s, hi_s = 0, int((hi - lo).total_seconds())
    while lo_s < hi_s:  # smallest offset (seconds from lo) already on the post-jump offset
        mid = (lo_s + hi_s) // 2
        if (lo + timedelta(seconds=mid)).astimezone(tz).utcoffset() == after:
            hi_s = mid
        else:
            lo_s = mid + 1
    return lo + timedelta(seconds=lo_s)


def _aware(t: datetime) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"need an aware datetime, got {t!r}")
    return t


def next_fire(rule: PrewarmRule, after: datetime, local: tzinfo = UTC) -> datetime:
    """The first fire instant strictly after `after` (aware), in UTC."""
    tz = rule.zone(local)
    after = _aware(after)
    # The wall time of `after` read at its first occurrence is never later than `after`, and
    # the wall->instant map is monotonic, so no match at or before it can fire after `after`.
    it = croniter(rule.cron, after.astimezone(tz).replace(tzinfo=None))
    while True:
        t = wall_to_instant(it.get_next(datetime), tz)
        if t > after:
            return t


def prev_fire(rule: PrewarmRule, at: datetime, local: tzinfo = UTC) -> datetime | None:
    """The last fire instant at or before `at` (aware), in UTC; None if croniter finds none."""
    tz = rule.zone(local)
    at = _aware(at)
    # In the repeated hour a wall time later than `at`'s own can have fired already (its first
    # pass); start past any such time and walk back.
    it = croniter(rule.cron, at.astimezone(tz).replace(tzinfo=None) + _MAX_SHIFT)
    try:
        while True:
            t = wall_to_instant(it.get_prev(datetime), tz)
            if t <= at:
                return t
    except CroniterBadDateError:
        return None


def window_end(rule: PrewarmRule, now: datetime, local: tzinfo = UTC) -> datetime | None:
    """The end of the hold window `now` is inside ([fire, fire + hold) of the last fire at or
    before `now`), or None.  Every fire holds equally long, so the last fire's window ends
    last: checking it alone is exact even when windows overlap."""
    fired = prev_fire(rule, now, local)
    if fired is None:
        return None
    end = fired + timedelta(seconds=rule.hold_s)
    return end if now < end else None


# -- lead -------------------------------------------------------------------------------------
def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (never interpolates below an observed value): with fewer than
    100 / (100 - pct) samples it is the maximum."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def lead_s(loads: Sequence[float], *, floor_s: float, pct: float, factor: float) -> float:
    """How long before a fire loading starts: `factor` x the `pct` percentile of the recent
    load durations, never below `floor_s`; with no history, the floor."""
    if not loads:
        return floor_s
    return max(floor_s, factor * percentile(loads, pct))

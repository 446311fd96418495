"""The prewarm scheduler: one task that starts a hold `lead` seconds before each rule's fire so
the model is *ready by* the fire time, and keeps it until fire + hold.

It owns only its schedule (each rule's next fire, the recent load durations, the last outcome
per rule).  The worker and its holds belong to the supervisor: the scheduler calls the injected
`start_hold(until, trigger, rule_name)` and awaits it (the supervisor merges overlapping holds
and suspends idle unload/exit while one is active).  Loads are tagged `schedule:<name>`.

Timing: the task sleeps until the earliest `fire - lead` (or until a new load measurement may
have moved it), never longer than `recheck_s`.  The cap is there because asyncio sleeps on the
monotonic clock, which stops while the machine is suspended and ignores wall-clock steps (NTP);
a cron time is a wall-clock time, so the schedule is re-read against the injected wall clock at
least that often.  A fire whose whole window passed unseen (suspend, clock step) is logged as
missed; if the clock is still inside a window of the rule, `catch_up` warms at once, exactly as at
start-up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from ondemand.config import PrewarmLeadConfig
from ondemand.prewarm.rules import PrewarmRule, local_zone, next_fire, window_end
from ondemand.prewarm.rules import lead_s as compute_lead

log = logging.getLogger(__name__)

StartHold = Callable[[datetime, str, str], Awaitable[None]]  # (until, trigger, rule name)
Clock = Callable[[], datetime]
RECHECK_S = 60.0
HISTORY = 100  # fire outcomes kept for /v1/prewarm and benchmarks


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime, tz: tzinfo) -> dict[str, str]:
    return {"local": t.astimezone(tz).isoformat(), "utc": t.astimezone(UTC).isoformat()}


def zone_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or tz)


@dataclass
class FireRecord:
    """One fire (or catch-up) and what came of it; `lateness_s` < 0 means ready early."""

    rule: str
    fire: datetime
    started: datetime
    until: datetime
    lead_s: float
    catch_up: bool
    ready: datetime | None = None
    error: str | None = None

    @property
    def lateness_s(self) -> float | None:
        return None if self.ready is None else (self.ready - self.fire).total_seconds()

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "fire_utc": self.fire.isoformat(),
            "started_utc": self.started.isoformat(),
            "until_utc": self.until.isoformat(),
            "lead_s": round(self.lead_s, 3),
            "catch_up": self.catch_up,
            "ready_utc": self.ready.isoformat() if self.ready else None,
            "lateness_s": None if self.lateness_s is None else round(self.lateness_s, 3),
            "error": self.error,
        }


@dataclass
class _RuleState:
    rule: PrewarmRule
    tz: tzinfo
    next_fire: datetime | None = None  # None: croniter found no further fire
    last: FireRecord | None = None


@dataclass
class LoadHistory:
    """Recent load durations in seconds (`ModelLoaded.seconds`), newest last."""

    samples: int
    loads: collections.deque[float] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.loads = collections.deque(self.loads, maxlen=self.samples)

    def record(self, seconds: float) -> None:
        if seconds >= 0:
            self.loads.append(seconds)


class PrewarmScheduler:
    def __init__(
        self,
        rules: Iterable[PrewarmRule],
        lead: PrewarmLeadConfig,
        start_hold: StartHold,
        *,
        clock: Clock = utc_now,
        local_tz: tzinfo | None = None,
        recheck_s: float = RECHECK_S,
        loads: Iterable[float] = (),
    ) -> None:
        self.lead_cfg = lead
        self._start_hold = start_hold
        self._clock = clock
        self.local_tz = local_tz if local_tz is not None else local_zone()
        self._recheck_s = recheck_s
        self._rules = [_RuleState(r, r.zone(self.local_tz)) for r in rules]
        self.history = LoadHistory(lead.samples, collections.deque(loads))
        self.fired: collections.deque[FireRecord] = collections.deque(maxlen=HISTORY)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._holds: set[asyncio.Task[None]] = set()

    # -- public API ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._rules:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="prewarm")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The scheduler's task (None without rules), watched by the daemon's TaskGuard: it
        does no I/O of its own (a failed hold is logged and the schedule goes on), so its end
        is a bug that stops the daemon with exit status 1 instead of silently ending prewarm."""
        return self._task

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._holds) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            # A task that died was reported by the daemon's TaskGuard: no second traceback.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def now(self) -> datetime:
        """The scheduler's wall clock (injected)."""
        return self._clock()

    def record_load(self, seconds: float) -> None:
        """A load finished (any trigger): it may move the lead, so re-plan."""
        self.history.record(seconds)
        self._wake.set()

    def lead_s(self) -> float:
        c = self.lead_cfg
        return compute_lead(list(self.history.loads), floor_s=c.floor_s, pct=c.percentile,
                      factor=c.factor)

    def snapshot(self) -> dict[str, Any]:
        """What `GET /v1/prewarm` shows: rules with next fire (local + UTC), the lead used."""
        now, lead = self._clock(), self.lead_s()
        rules = []
        for st in self._rules:
            r = st.rule
            end = window_end(r, now, self.local_tz)
            rules.append({
                "name": r.name,
                "cron": r.cron,
                "timezone": zone_name(st.tz),
                "hold_s": r.hold_s,
                "catch_up": r.catch_up,
                "next_fire": _iso(st.next_fire, st.tz) if st.next_fire else None,
                "next_start": (
                    _iso(st.next_fire - timedelta(seconds=lead), st.tz) if st.next_fire else None
                ),
                "in_window_until": _iso(end, st.tz) if end else None,
                "last": st.last.to_json() if st.last else None,
            })
        c = self.lead_cfg
        loads = list(self.history.loads)
        return {
            "now": _iso(now, self.local_tz),
            "lead": {
                "seconds": round(lead, 3),
                "source": "measured" if loads and lead > c.floor_s else "floor",
                "floor_s": c.floor_s,
                "percentile": c.percentile,
                "factor": c.factor,
                "loads_recorded": len(loads),
                "recent_load_s": [round(x, 3) for x in loads][-5:],
            },
            "rules": rules,
        }

    # -- the task ------------------------------------------------------------------------------
    async def _run(self) -> None:
        now = self._clock()
        for st in self._rules:
            self._resync(st, now, reason="startup")
        while True:
            now, lead = self._clock(), self.lead_s()
            for st in self._rules:
                fire = st.next_fire
                if fire is None or fire - timedelta(seconds=lead) > now:
                    continue
                if fire + timedelta(seconds=st.rule.hold_s) <= now:
                    log.warning("prewarm rule=%s missed fire=%s (its window ended unseen: "
                                "suspend or clock step)", st.rule.name, fire.isoformat())
                    self._resync(st, now, reason="missed")
                    continue
                self._fire(st, fire, now, lead, catch_up=False)
                st.next_fire = self._next(st, fire)
            self._wake.clear()
            await self._sleep(self._delay(now, lead))

    def _delay(self, now: datetime, lead: float) -> float:
        starts = [st.next_fire - timedelta(seconds=lead) for st in self._rules if st.next_fire]
        if not starts:
            return self._recheck_s
        return min(max(0.0, (min(starts) - now).total_seconds()), self._recheck_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _next(self, st: _RuleState, after: datetime) -> datetime | None:
        try:
            return next_fire(st.rule, after, self.local_tz)
        except ValueError as e:  # croniter: no further match within its search horizon
            log.warning("prewarm rule=%s has no fire after %s (%s)", st.rule.name,
                        after.isoformat(), e)
            return None

    def _resync(self, st: _RuleState, now: datetime, *, reason: str) -> None:
        """Start-up or after a jump: warm now if inside a window (catch_up); plan the next."""
        end = window_end(st.rule, now, self.local_tz) if st.rule.catch_up else None
        if end is not None:
            fired = end - timedelta(seconds=st.rule.hold_s)
            log.info("prewarm rule=%s inside its window until %s (%s): catching up",
                     st.rule.name, end.astimezone(st.tz).isoformat(), reason)
            self._fire(st, fired, now, self.lead_s(), catch_up=True)
        st.next_fire = self._next(st, now)

    def _fire(self, st: _RuleState, fire: datetime, now: datetime, lead: float, *,
              catch_up: bool) -> None:
        until = fire + timedelta(seconds=st.rule.hold_s)
        rec = FireRecord(rule=st.rule.name, fire=fire, started=now, until=until, lead_s=lead,
                         catch_up=catch_up)
        st.last = rec
        self.fired.append(rec)
        log.info("prewarm rule=%s fire=%s lead=%.1fs until=%s: loading", st.rule.name,
                 fire.astimezone(st.tz).isoformat(), lead, until.astimezone(st.tz).isoformat())
        task = asyncio.get_running_loop().create_task(self._hold(st.rule, rec),
                                                      name=f"prewarm-{st.rule.name}")
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)

    async def _hold(self, rule: PrewarmRule, rec: FireRecord) -> None:
        try:
            await self._start_hold(rec.until, "schedule", rule.name)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed prewarm must not stop the schedule; jobs still load
            rec.error = f"{type(e).__name__}: {e}"
            log.warning("prewarm rule=%s load failed: %s", rule.name, rec.error)
            return
        rec.ready = self._clock()
        log.info("prewarm rule=%s ready lateness=%+.2fs (negative: before the fire time)",
                 rule.name, rec.lateness_s or 0.0)

"""The cost report and the keep-alive recommendation, computed from ledger intervals.

Pure functions of (intervals, period, now, settings): no I/O, no clock.  docs/cost.md explains
every figure; the rules that matter for exactness:

* Time is clipped to the period: an interval that crosses `since`/`until` (or a day boundary)
  counts only its part inside.  An open interval runs to `now`.
* A cold start (a `loading` interval) belongs to the period and day in which it *began*, with
  its whole duration, so counts and seconds never split across days.
* The GPU is billed (`gpu_hour_usd`) for every phase that holds it: loading, busy, idle-warm and
  unloaded-alive (the CUDA context pins the GPU); standby and yielded hold none and are not.
  `covered` time is everything the ledger knows about (held + standby + yielded + exited); time
  the daemon was down is in neither on-demand nor always-on.
* Always-on is "loaded 24/7": every covered second billed, plus, with energy, the idle-warm mean
  power for every second that was not busy or loading.
* Energy counts only where the power was measured; a state's mean watts = its energy / the
  seconds its power readings covered.  Energy is money only with `energy_kwh_usd` > 0 and only
  when both sides of the comparison can be priced.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ondemand.config import CostConfig, WorkerConfig
from ondemand.cost.ledger import IdleCause, Interval, Phase, Trigger
from ondemand.durations import is_duration, parse_duration

DAY_S = 86400.0
J_PER_KWH = 3.6e6
LOADED = (Phase.LOADING, Phase.READY_BUSY, Phase.READY_IDLE)
HELD = (*LOADED, Phase.UNLOADED_ALIVE)  # the GPU is held: billed (standby and yielded are not)
MIN_GAPS = 3  # fewer observed gaps between jobs than this: no recommendation


@dataclass(frozen=True)
class Period:
    since: float
    until: float
    label: str = ""


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _clip(iv: Interval, since: float, until: float, now: float) -> tuple[float, float]:
    s = max(iv.start, since)
    e = min(iv.end_or(now), until)
    return s, max(s, e)


def _fraction(iv: Interval, seconds: float, now: float) -> float:
    full = iv.end_or(now) - iv.start
    return 1.0 if full <= 0 else seconds / full


def _idle_split(iv: Interval, s: float, e: float) -> dict[IdleCause, float]:
    """Seconds of [s, e] by idle cause: a hold lasts until hold_until, the rest is the tail."""
    cause = iv.idle_cause or IdleCause.IDLE_TIMEOUT
    if cause is IdleCause.IDLE_TIMEOUT or iv.hold_until is None:
        return {cause: e - s}
    held = max(0.0, min(e, iv.hold_until) - s)
    return {cause: held, IdleCause.IDLE_TIMEOUT: (e - s) - held}


def _cold_start_kind(iv: Interval) -> str:
    """spawn (a new process), reload (in-process, from unloaded) or activate (a standby's)."""
    if iv.reason == "activate":
        return "activate"
    return "reload" if iv.from_state is Phase.UNLOADED_ALIVE else "spawn"


def _succeeded(iv: Interval) -> bool:
    return iv.next_state in (Phase.READY_BUSY, Phase.READY_IDLE)


def summarize(
    intervals: Iterable[Interval], since: float, until: float, now: float, cfg: CostConfig
) -> dict[str, Any]:
    """The figures for [since, until): seconds by phase and idle cause, cold starts, energy, and
    the money on-demand vs always-on."""
    seconds = {p: 0.0 for p in Phase}
    idle = {c: 0.0 for c in IdleCause}
    energy_j = {p: 0.0 for p in Phase}
    power_s = {p: 0.0 for p in Phase}
    starts: dict[str, dict[str, float]] = {}
    kinds: dict[str, dict[str, float]] = {}
    failed = 0
    for iv in intervals:
        s, e = _clip(iv, since, until, now)
        dur = e - s
        seconds[iv.state] += dur
        if iv.state is Phase.READY_IDLE:
            for cause, sec in _idle_split(iv, s, e).items():
                idle[cause] += sec
        if dur > 0:
            frac = _fraction(iv, dur, now)
            energy_j[iv.state] += iv.energy_j * frac
            power_s[iv.state] += iv.power_s * frac
        if iv.state is Phase.LOADING and since <= iv.start < until:
            full = iv.end_or(now) - iv.start
            trig = (iv.trigger or Trigger.JOB).value
            for table, key in ((starts, trig), (kinds, _cold_start_kind(iv))):
                row = table.setdefault(key, {"count": 0, "seconds": 0.0})
                row["count"] += 1
                row["seconds"] += full
            if iv.end is not None and not _succeeded(iv):
                failed += 1

    held_s = sum(seconds[p] for p in HELD)
    covered_s = sum(seconds.values())  # held + standby + yielded + exited
    rate = cfg.gpu_hour_usd / 3600.0
    mean_w = {p: energy_j[p] / power_s[p] for p in Phase if power_s[p] > 0}
    energy = _energy(seconds, energy_j, power_s, mean_w, covered_s)
    with_energy = (
        cfg.energy_kwh_usd > 0 and energy is not None and energy["always_on_j"] is not None
    )
    usd_per_j = cfg.energy_kwh_usd / J_PER_KWH if with_energy else 0.0
    on_demand_j = energy["on_demand_j"] if energy and with_energy else 0.0
    always_on_j = energy["always_on_j"] if energy and with_energy else 0.0
    on_demand = held_s * rate + on_demand_j * usd_per_j
    always_on = covered_s * rate + always_on_j * usd_per_j
    idle_states = (Phase.READY_IDLE, Phase.UNLOADED_ALIVE)
    idle_usd = sum(seconds[p] * (rate + mean_w.get(p, 0.0) * usd_per_j) for p in idle_states)
    savings = always_on - on_demand
    count = sum(int(r["count"]) for r in starts.values())
    return {
        "since": iso(since),
        "until": iso(until),
        "covered_hours": covered_s / 3600.0,
        "hours": {
            **{p.value: seconds[p] / 3600.0 for p in Phase},
            "loaded": sum(seconds[p] for p in LOADED) / 3600.0,
            "gpu_held": held_s / 3600.0,
        },
        "idle_warm_hours": {
            "total": seconds[Phase.READY_IDLE] / 3600.0,
            **{c.value: idle[c] / 3600.0 for c in IdleCause},
        },
        "cold_starts": {
            "count": count,
            "seconds": sum(r["seconds"] for r in starts.values()),
            "failed": failed,
            "by_trigger": _with_means(starts),
            "by_kind": _with_means(kinds),
        },
        "energy": energy,
        "cost": {
            "gpu_hour_usd": cfg.gpu_hour_usd,
            "energy_kwh_usd": cfg.energy_kwh_usd or None,
            "energy_included": with_energy,
            "on_demand_usd": on_demand,
            "always_on_usd": always_on,
            "savings_usd": savings,
            "savings_pct": 100.0 * savings / always_on if always_on > 0 else None,
            "idle_usd": idle_usd,
        },
    }


def _with_means(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        k: {"count": int(v["count"]), "seconds": v["seconds"], "mean_s": v["seconds"] / v["count"]}
        for k, v in sorted(table.items())
    }


def _energy(
    seconds: dict[Phase, float],
    energy_j: dict[Phase, float],
    power_s: dict[Phase, float],
    mean_w: dict[Phase, float],
    covered_s: float,
) -> dict[str, Any] | None:
    """Energy figures, or None when no power was measured (no NVML, or no power sensor)."""
    if not mean_w:
        return None
    # Extrapolate each phase's mean power over its whole time: samples are periodic, so a
    # phase's first seconds (before its first reading) would otherwise count as zero.
    on_demand_j = sum(mean_w[p] * seconds[p] for p in mean_w)
    work_s = seconds[Phase.READY_BUSY] + seconds[Phase.LOADING]
    idle_w = mean_w.get(Phase.READY_IDLE)
    work_j = sum(mean_w.get(p, 0.0) * seconds[p] for p in (Phase.READY_BUSY, Phase.LOADING))
    always_on_j = None if idle_w is None else work_j + idle_w * max(0.0, covered_s - work_s)
    return {
        "measured_j": sum(energy_j.values()),
        "measured_kwh": sum(energy_j.values()) / J_PER_KWH,
        "by_phase_j": {p.value: energy_j[p] for p in Phase if power_s[p] > 0},
        "mean_watts": {p.value: w for p, w in mean_w.items()},
        "on_demand_j": on_demand_j,
        "always_on_j": always_on_j,
        "baseline_measured": Phase.EXITED in mean_w,
    }


def days(since: float, until: float) -> list[tuple[float, float]]:
    """UTC day buckets covering [since, until), the first and last clipped."""
    out = []
    start = since
    while start < until:
        end = min(until, (math.floor(start / DAY_S) + 1) * DAY_S)
        out.append((start, end))
        start = end
    return out


def report(
    intervals: Sequence[Interval], period: Period, now: float, cfg: CostConfig
) -> dict[str, Any]:
    """`summarize` for the period, plus one compact row per UTC day."""
    body = summarize(intervals, period.since, period.until, now, cfg)
    ordered = sorted(intervals, key=lambda i: (i.start, i.id))
    starts = [iv.start for iv in ordered]
    reach: list[float] = []  # reach[i]: the latest end among ordered[0..i] (monotone)
    for iv in ordered:
        reach.append(max(reach[-1] if reach else -math.inf, iv.end_or(now)))
    rows = []
    for s, e in days(period.since, period.until):
        # Only the intervals that can overlap the day: O(log n) to find them, not O(n).
        lo = bisect.bisect_right(reach, s)
        hi = bisect.bisect_left(starts, e)
        day = summarize(ordered[lo:hi], s, e, now, cfg)
        rows.append(
            {
                "day": iso(s)[:10],
                "covered_hours": day["covered_hours"],
                "hours": day["hours"],
                "idle_warm_hours": day["idle_warm_hours"],
                "cold_starts": day["cold_starts"]["count"],
                "cold_start_seconds": day["cold_starts"]["seconds"],
                "on_demand_usd": day["cost"]["on_demand_usd"],
                "always_on_usd": day["cost"]["always_on_usd"],
                "savings_usd": day["cost"]["savings_usd"],
            }
        )
    return {"label": period.label, **body, "days": rows}


# -- recommendation --------------------------------------------------------------------------


def demand_gaps(intervals: Sequence[Interval]) -> list[float]:
    """Seconds between the end of busy work and the next job's demand (a busy interval, or a load
    a job triggered).  A break in the tiling (daemon down) resets: that gap is unknown."""
    gaps: list[float] = []
    last_end: float | None = None
    in_demand = False
    prev_end: float | None = None
    for iv in sorted(intervals, key=lambda i: (i.start, i.id)):
        if prev_end is not None and iv.start > prev_end + 1e-6:
            last_end, in_demand = None, False
        prev_end = iv.end
        demand = iv.state is Phase.READY_BUSY or (
            iv.state is Phase.LOADING and iv.trigger is Trigger.JOB
        )
        if not demand:
            in_demand = False
            continue
        if not in_demand and last_end is not None:
            gaps.append(iv.start - last_end)
        in_demand = True
        if iv.state is Phase.READY_BUSY and iv.end is not None:
            last_end = iv.end
    return gaps


@dataclass(frozen=True)
class Prices:
    """$/s while idle-warm, unloaded-alive and loading; $ per spawn and per in-process reload."""

    ready: float
    unloaded: float
    loading: float
    spawn: float
    reload: float


class GapCost:
    """Total cost of a (unload_after, exit_after) ladder over a fixed list of gaps, O(log n)."""

    def __init__(self, gaps: Sequence[float], prices: Prices) -> None:
        self.g = sorted(gaps)
        self.sums = [0.0]
        for x in self.g:
            self.sums.append(self.sums[-1] + x)
        self.p = prices

    def __call__(self, unload: float, exit_: float) -> tuple[float, int, int]:
        """(cost, in-process reloads, spawns).  A gap g: g <= U stays warm; U < g <= E pays
        unloaded time and a reload; g > E pays up to E and a fresh spawn.  inf = never."""
        p, n = self.p, len(self.g)
        u = min(unload, exit_)
        iu = bisect.bisect_right(self.g, u)
        ie = bisect.bisect_right(self.g, exit_)
        cost = p.ready * self.sums[iu]
        mid, tail = ie - iu, n - ie
        if mid:
            cost += mid * (p.ready * u - p.unloaded * u + p.reload)
            cost += p.unloaded * (self.sums[ie] - self.sums[iu])
        if tail:
            cost += tail * (p.ready * u + p.unloaded * (exit_ - u) + p.spawn)
        return cost, mid, tail


def _candidates(gaps: Sequence[float], extra: Iterable[float], limit: int = 160) -> list[float]:
    """0, the gaps (as whole seconds, rounded up so a gap equal to a timeout stays warm; at most
    `limit` quantiles), the extras, and never (inf)."""
    values = sorted({float(math.ceil(g)) for g in gaps})
    if len(values) > limit:
        values = [values[round(i * (len(values) - 1) / (limit - 1))] for i in range(limit)]
    return sorted({0.0, *values, *(x for x in extra if x >= 0), math.inf})


def _setting(v: float) -> float:
    """A worker setting as seconds: -1 (never) -> inf."""
    return math.inf if v < 0 else v


def _as_setting(v: float) -> float:
    return -1.0 if math.isinf(v) else v


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def recommend(
    intervals: Sequence[Interval],
    now: float,
    cfg: CostConfig,
    *,
    unload_after_s: float,
    exit_after_s: float,
    standby: bool = False,
) -> dict[str, Any]:
    """Choose unload_after_s/exit_after_s that minimise idle-warm + cold-start cost over the
    observed gaps between jobs (docs/cost.md, "Recommendation").  With `standby` the restart
    after an exit is priced as an activation once one was observed."""
    gaps = demand_gaps(intervals)
    loads = [iv for iv in intervals if iv.state is Phase.LOADING and _succeeded(iv)]
    spawn_s = _mean([iv.end_or(now) - iv.start for iv in loads if _cold_start_kind(iv) == "spawn"])
    reload_s = _mean(
        [iv.end_or(now) - iv.start for iv in loads if _cold_start_kind(iv) == "reload"]
    )
    activate_s = _mean(
        [iv.end_or(now) - iv.start for iv in loads if _cold_start_kind(iv) == "activate"]
    )
    measured_spawn_s = spawn_s
    if standby and activate_s is not None:
        # With standby an exit is followed by an activation, not a fresh process: the exit
        # rung's restart is priced with what activations took.
        spawn_s = activate_s
    power: dict[Phase, float] = {}
    for phase in (Phase.READY_IDLE, Phase.UNLOADED_ALIVE, Phase.LOADING):
        ivs = [iv for iv in intervals if iv.state is phase and iv.power_s > 0]
        if ivs:
            power[phase] = sum(iv.energy_j for iv in ivs) / sum(iv.power_s for iv in ivs)
    gpu = cfg.gpu_hour_usd / 3600.0
    per_j = cfg.energy_kwh_usd / J_PER_KWH
    rate = {ph: gpu + power.get(ph, 0.0) * per_j for ph in (*power, *HELD)}
    out: dict[str, Any] = {
        "gaps": _gap_stats(gaps),
        "load_seconds": {"spawn": measured_spawn_s, "reload": reload_s,
                         "activate": activate_s, "after_exit": spawn_s},
        "rates_usd_per_hour": {
            "ready_idle": rate[Phase.READY_IDLE] * 3600,
            "unloaded_alive": rate[Phase.UNLOADED_ALIVE] * 3600,
            "loading": rate[Phase.LOADING] * 3600,
        },
        "current": {"unload_after_s": unload_after_s, "exit_after_s": exit_after_s},
        "recommended": None,
    }
    if spawn_s is None and reload_s is None:
        out["status"] = "insufficient_data"
        out["why"] = "no completed model load observed yet"
        return out
    spawn_s = spawn_s if spawn_s is not None else reload_s
    # No in-process reload observed: assume it costs as much as a spawn (conservative).
    reload_s = reload_s if reload_s is not None else spawn_s
    assert spawn_s is not None and reload_s is not None
    pen = cfg.cold_start_penalty_usd
    prices = Prices(
        ready=rate[Phase.READY_IDLE],
        unloaded=rate[Phase.UNLOADED_ALIVE],
        loading=rate[Phase.LOADING],
        spawn=spawn_s * rate[Phase.LOADING] + pen,
        reload=reload_s * rate[Phase.LOADING] + pen,
    )
    out["cold_start_usd"] = {"spawn": prices.spawn, "reload": prices.reload}
    out["break_even_s"] = {
        # Idle-warm seconds that cost as much as one cold start: the classic keep-alive bound.
        "exit": prices.spawn / prices.ready if prices.ready > 0 else None,
        "unload": prices.reload / prices.ready if prices.ready > 0 else None,
    }
    if len(gaps) < MIN_GAPS:
        out["status"] = "insufficient_data"
        out["why"] = f"{len(gaps)} gaps between jobs observed; need at least {MIN_GAPS}"
        return out
    cur_u, cur_e = _setting(unload_after_s), _setting(exit_after_s)
    evaluate = GapCost(gaps, prices)
    be = [x for x in out["break_even_s"].values() if x is not None]
    cands = _candidates(gaps, [cur_u, cur_e, *(math.ceil(x) for x in be if math.isfinite(x))])
    best: tuple[float, int, float, float] | None = None
    for i, u in enumerate(cands):
        for e in cands[i:]:
            cost, reloads, spawns = evaluate(u, e)
            # Cheapest; on a tie (within rounding), fewer cold starts, then shorter timeouts.
            key = (round(cost, 9), reloads + spawns, u, e)
            if best is None or key < (round(best[0], 9), *best[1:]):
                best = (cost, reloads + spawns, u, e)
    assert best is not None
    cost_cur = evaluate(cur_u, cur_e)
    cost_best = evaluate(best[2], best[3])
    cost_warm = evaluate(math.inf, math.inf)
    out["status"] = "ok"
    out["current"].update(_policy(cost_cur))
    out["recommended"] = {
        "unload_after_s": _as_setting(best[2]),
        "exit_after_s": _as_setting(best[3]),
        **_policy(cost_best),
    }
    out["always_warm"] = _policy(cost_warm)
    out["saving_vs_current_usd"] = cost_cur[0] - cost_best[0]
    out["why"] = _why(best[2], best[3], prices)
    if pen == 0:
        out["why"] += (
            "; cold starts are priced at their GPU seconds only: set cost.cold_start_penalty_usd"
            " to put a value on your users' wait"
        )
    return out


def _policy(c: tuple[float, int, int]) -> dict[str, Any]:
    return {"cost_usd": c[0], "reloads": c[1], "spawns": c[2]}


def _gap_stats(gaps: Sequence[float]) -> dict[str, Any]:
    if not gaps:
        return {"count": 0}
    g = sorted(gaps)

    def q(x: float) -> float:
        return g[min(len(g) - 1, int(x * len(g)))]

    return {"count": len(g), "p50_s": q(0.5), "p90_s": q(0.9), "max_s": g[-1]}


def _why(u: float, e: float, p: Prices) -> str:
    if math.isinf(e) and math.isinf(u):
        return "cold starts cost more than keeping the model warm through every observed gap"
    parts = []
    if u >= e:
        parts.append(
            "unloading in-process saves nothing here (an unloaded worker is billed like a loaded"
            " one, and a reload costs more than the idle it saves), so exit directly"
            if p.unloaded >= p.ready
            else "no observed gap is long enough for the unloaded tier to pay for its reload"
        )
    parts.append(
        "keeping warm longer than this costs more than the cold starts it avoids"
        " for the observed gaps"
    )
    return "; ".join(parts)


# -- the document: GET /v1/cost and `ondemand cost` -----------------------------------------

def parse_when(text: str, now: float) -> float:
    """A duration before now (`30d`, `24h`, `1h30m`: durations.parse_duration), `now`, a Unix
    time, or an ISO date/datetime (without a zone: UTC).  Raises ValueError with what is
    accepted."""
    t = text.strip()
    if t == "now":
        return now
    if is_duration(t):
        return now - parse_duration(t)
    with contextlib.suppress(ValueError):
        return float(t)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use a duration before now (30d, 24h, 1h30m), 'now',"
            " a Unix time or an ISO date (2024-05-01, 2024-05-01T12:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def default_periods(now: float) -> list[Period]:
    return [Period(now - DAY_S, now, "last_24h"), Period(now - 30 * DAY_S, now, "last_30d")]


def document(
    read: Callable[[float, float], list[Interval]],
    now: float,
    cfg: CostConfig,
    worker: WorkerConfig,
    *,
    since: float | None = None,
    until: float | None = None,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole cost document: one report per period (default: last 24 h and last 30 days)
    and the recommendation from the longest period's gaps."""
    if since is None and until is None:
        periods = default_periods(now)
    else:
        end = now if until is None else until
        start = end - 30 * DAY_S if since is None else since
        if start >= end:
            raise ValueError(f"since ({iso(start)}) must be before until ({iso(end)})")
        periods = [Period(start, end, "period")]
    lo = min(p.since for p in periods)
    hi = max(p.until for p in periods)
    intervals = read(lo, hi)
    return {
        "generated_at": iso(now),
        "probe": probe,
        "settings": {
            "gpu_hour_usd": cfg.gpu_hour_usd,
            "energy_kwh_usd": cfg.energy_kwh_usd or None,
            "cold_start_penalty_usd": cfg.cold_start_penalty_usd,
            "unload_after_s": worker.unload_after_s,
            "exit_after_s": worker.exit_after_s,
            "standby": worker.standby,
        },
        "periods": [report(intervals, p, now, cfg) for p in periods],
        "recommendation": recommend(
            intervals,
            now,
            cfg,
            unload_after_s=worker.unload_after_s,
            exit_after_s=worker.exit_after_s,
            standby=worker.standby,
        ),
    }

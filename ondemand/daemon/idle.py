"""The idle ladder's arithmetic: when an idle worker drops its model, when it exits, and holds.

Idle ladder (docs/ladder.md): `worker.unload_after_s` after the last use drops the model but
keeps the process (cheap reactivation); `worker.exit_after_s` ends the process, the only way to
free the CUDA context.  0 = at once, -1 = never.  When exiting comes no later than unloading,
unloading first gains nothing and is skipped.  Holds (`Supervisor.load(hold_s=...)`) push both
deadlines to their end; overlapping holds merge, the longest wins and its trigger is shown.

`IdleLadder` is pure: no timer, no clock, no worker state.  The supervisor's owner task feeds it
the times (last use, holds), arms one IDLE timer at `next_step_at` while no lease is held, and
re-checks `due` when it fires (LocalAI #5221, llama.cpp #28698: never unload under a running job;
the in-flight count stays the supervisor's).  Tests drive it with plain numbers
(tests/test_supervisor_parts.py).
"""

from __future__ import annotations

from typing import Literal

from ondemand.daemon.worker_status import WarmBecause

EPSILON_S = 1e-3  # a timer that fires this early has fired on time

IdleStep = Literal["unload", "exit"]


class IdleLadder:
    """Last use and the hold, on the supervisor's clock; the deadlines that follow from them."""

    def __init__(self, *, unload_after_s: float, exit_after_s: float, now: float) -> None:
        self.unload_after_s = unload_after_s  # -1 = never
        self.exit_after_s = exit_after_s  # -1 = never
        self.last_used = now
        self.hold_until = 0.0
        self.hold_trigger = ""

    def used(self, now: float) -> None:
        """The worker was just used (a lease ended, a load finished or was asked for)."""
        self.last_used = now

    def hold(self, until: float, trigger: str) -> None:
        """Keep the model until `until`; a hold that ends later wins (its trigger is shown)."""
        if until > self.hold_until:
            self.hold_until, self.hold_trigger = until, trigger

    def clear_hold(self) -> bool:
        """Drop the hold (an unload request); whether there was one to drop."""
        had = bool(self.hold_trigger)
        self.hold_until, self.hold_trigger = 0.0, ""
        return had

    def hold_left(self, now: float) -> float:
        """Seconds the hold still lasts (0 = none)."""
        return max(0.0, self.hold_until - now)

    def deadlines(self) -> tuple[float | None, float | None]:
        """(unload_at, exit_at) on the clock; None = never.  The hold pushes both."""
        floor = self.hold_until
        u, x = self.unload_after_s, self.exit_after_s
        unload_at = max(self.last_used + u, floor) if u >= 0 else None
        exit_at = max(self.last_used + x, floor) if x >= 0 else None
        if unload_at is not None and exit_at is not None and exit_at <= unload_at:
            unload_at = None  # exiting frees everything; unloading first gains nothing
        return unload_at, exit_at

    def next_step_at(self, *, loaded: bool) -> float | None:
        """When the next rung is due for an idle worker (`loaded`: the model is on it; without,
        only the exit is left); None = never."""
        unload_at, exit_at = self.deadlines()
        if not loaded:
            unload_at = None
        return min((t for t in (unload_at, exit_at) if t is not None), default=None)

    def due(self, now: float, *, loaded: bool) -> IdleStep | None:
        """The rung to take now, exit before unload; None when a hold or a new use moved it."""
        unload_at, exit_at = self.deadlines()
        now += EPSILON_S
        if exit_at is not None and now >= exit_at:
            return "exit"
        if unload_at is not None and now >= unload_at and loaded:
            return "unload"
        return None

    def countdown(self, now: float, *, loaded: bool) -> tuple[float | None, float | None]:
        """(unload_in_s, exit_in_s) for `/v1/status` of an idle worker; None = not armed."""
        unload_at, exit_at = self.deadlines()
        unload_in = max(0.0, unload_at - now) if unload_at is not None and loaded else None
        exit_in = max(0.0, exit_at - now) if exit_at is not None else None
        return unload_in, exit_in

    def warm_because(self, now: float, *, in_flight: int) -> WarmBecause:
        """Why a ready worker keeps its model now."""
        if in_flight:
            return "in_flight"
        return "hold" if self.hold_until > now else "idle_timeout"

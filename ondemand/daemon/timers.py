"""A table of one-shot timers, at most one per kind, for a task that owns its state.

The owner arms a timer with `arm(kind, delay)`; when it fires, `Fired(kind, gen)` is posted to
the owner's queue like any other message, so the owner handles it in turn and never from a
callback.  Re-arming or cancelling a kind bumps its generation: a `Fired` already queued for the
old timer is stale, and `fired(msg)` says so (without the generation, an idle timer that fired just
before a new lease arrived would unload the model under the lease).  No polling loops: every
timer is a `loop.call_later`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=enum.Enum)


@dataclass(frozen=True)
class Fired(Generic[K]):
    kind: K
    gen: int


class Timers(Generic[K]):
    def __init__(self, post: Callable[[Fired[K]], None], clock: Callable[[], float]) -> None:
        self._post = post
        self._clock = clock
        self._handles: dict[K, asyncio.TimerHandle] = {}
        self._deadlines: dict[K, float] = {}
        self._gens: collections.Counter[K] = collections.Counter()

    def arm(self, kind: K, delay: float) -> None:
        """Fire `kind` in `delay` seconds (at once when <= 0), replacing an armed one."""
        self.cancel(kind)
        delay = max(0.0, delay)
        self._deadlines[kind] = self._clock() + delay
        self._handles[kind] = asyncio.get_running_loop().call_later(
            delay, self._post, Fired(kind, self._gens[kind]))

    def cancel(self, *kinds: K) -> None:
        """Cancel these kinds (none given: every armed one); a queued Fired turns stale."""
        for kind in kinds or tuple(self._handles):
            handle = self._handles.pop(kind, None)
            if handle is not None:
                handle.cancel()
            self._deadlines.pop(kind, None)
            self._gens[kind] += 1

    def fired(self, msg: Fired[K]) -> bool:
        """Whether `msg` is the current timer of its kind (which is then no longer armed)."""
        if msg.gen != self._gens[msg.kind]:
            return False
        self._handles.pop(msg.kind, None)
        self._deadlines.pop(msg.kind, None)
        return True

    def left(self, kind: K) -> float | None:
        """Seconds until `kind` fires (on the injected clock); None when it is not armed."""
        at = self._deadlines.get(kind)
        return None if at is None else max(0.0, at - self._clock())

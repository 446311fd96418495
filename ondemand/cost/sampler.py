"""The GPU sampler: reads the probe every `cost.sample_interval_s` while a worker process is alive,
and every `cost.baseline_interval_s` (0: once) when none is, so the report knows what the GPU
draws with nothing of ours on it.

Timer-based (`loop.call_later`), never a polling loop.  On every worker state change the
accounting calls `flush()` (one reading for the phase that is ending, so its energy is attributed
to it), records the new phase in the ledger, then `retarget()` re-arms the timer for the new one.
Energy between two readings comes from the board's energy counter when NVML has one, else from
the mean of the two power readings (trapezoid), and goes to the phase that was current during it.
Each reading goes to `sink` (ledger + metrics), on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ondemand.cost.ledger import Phase
from ondemand.gpu import GpuProbe, GpuSample

log = logging.getLogger(__name__)

SLOW_SAMPLE_S = 0.05  # a probe slower than this is logged: it runs on the event loop


@dataclass(frozen=True)
class Reading:
    """One sample with what it means for accounting."""

    at: float
    phase: Phase  # the phase the time since the previous reading belongs to
    sample: GpuSample
    energy_j: float  # energy since the previous reading (0 when it cannot be known)
    power_s: float  # seconds that energy covers (0 when there was no power reading)
    cpu_s: float  # worker CPU seconds since the previous reading of the same PIDs


Sink = Callable[[Reading], None]


class Sampler:
    def __init__(
        self,
        probe: GpuProbe,
        sink: Sink,
        *,
        interval_s: float,
        baseline_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.probe = probe
        self._sink = sink
        self._interval = interval_s
        self._baseline = baseline_interval_s
        self._clock = clock
        self._phase = Phase.EXITED
        self._pids: tuple[int, ...] = ()
        self._gpu: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._prev: GpuSample | None = None
        self._prev_at: float | None = None
        self._running = False
        self._failing = False  # the last tick failed (logged once per streak)
        self.samples = 0
        self.last: Reading | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    def start(
        self, phase: Phase = Phase.EXITED, pids: Sequence[int] = (), gpu: int | None = None
    ) -> None:
        """Begin sampling (on the running loop), with a first reading now."""
        self._running = True
        self._phase, self._pids, self._gpu = phase, tuple(pids), gpu
        self.sample_now()
        self._arm()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        """Take a reading now, for the phase that is ending (so its energy is attributed to it).
        Call before the ledger enters the next phase."""
        if self._running:
            self.sample_now()

    def retarget(self, phase: Phase, pids: Sequence[int], gpu: int | None) -> None:
        """The worker entered `phase`: re-arm the timer for it; after the last worker process
        went away, take the baseline reading (what the GPU holds and draws without us)."""
        if (phase, tuple(pids), gpu) == (self._phase, self._pids, self._gpu):
            return
        was_alive = self._phase.alive
        self._phase, self._pids, self._gpu = phase, tuple(pids), gpu
        if self._running:
            if was_alive and not phase.alive:
                self.sample_now()
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self._interval if self._phase.alive else self._baseline
        if delay > 0 and self._running:
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        try:
            self.sample_now()
        except Exception:  # a probe bug or a full disk under the ledger: the chain goes on
            if not self._failing:
                log.exception("sampler: sample failed; retried every tick, logged again only "
                              "once it works")
            self._failing = True
        else:
            if self._failing:
                log.info("sampler: samples are recorded again")
            self._failing = False
        finally:
            self._arm()

    def sample_now(self) -> Reading:
        """Take one reading now for the current phase and hand it to the sink."""
        t0 = time.perf_counter()
        sample = self.probe.sample(self._pids, self._gpu)
        took = time.perf_counter() - t0
        if took > SLOW_SAMPLE_S:
            log.warning("sampler: probe %s took %.0f ms", self.probe.name, took * 1000)
        at = self._clock()
        energy_j, power_s = self._energy(sample, at)
        cpu_s = 0.0
        prev = self._prev
        if (
            prev is not None
            and prev.cpu_seconds is not None
            and sample.cpu_seconds is not None
            and prev.pids == sample.pids
        ):
            # CPU time is cumulative per process: only the same PIDs make a delta.
            cpu_s = max(0.0, sample.cpu_seconds - prev.cpu_seconds)
        reading = Reading(at, self._phase, sample, energy_j, power_s, cpu_s)
        self._prev, self._prev_at = sample, at
        self.samples += 1
        self.last = reading
        self._sink(reading)
        return reading

    def _energy(self, sample: GpuSample, at: float) -> tuple[float, float]:
        prev, prev_at = self._prev, self._prev_at
        if prev is None or prev_at is None or prev.gpu != sample.gpu or at <= prev_at:
            return 0.0, 0.0
        dt = at - prev_at
        if prev.energy_joules is not None and sample.energy_joules is not None:
            delta = sample.energy_joules - prev.energy_joules
            if delta >= 0:  # the counter resets with the driver
                return delta, dt
        if prev.power_watts is not None and sample.power_watts is not None:
            return (prev.power_watts + sample.power_watts) / 2.0 * dt, dt
        return 0.0, 0.0

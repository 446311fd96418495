"""Stepping aside for other GPU work (`worker.yield_gpu`, docs/ladder.md): a pure policy.

The supervisor reads the GPU every `worker.yield_poll_s` while it holds the GPU or waits to get it
back; `gpu_watch.GpuWatch` turns each `gpu.GpuSample` into a `GpuReading` and asks
`YieldPolicy.watch` what to do; it asks `admit` before every load.  The policy owns no timer, no
I/O and no clock: every time comes in a reading, so a scripted fake probe drives it exactly
(tests/test_yield.py).  Only the supervisor acts on a verdict (finish the batch, exit, go to
standby; refuse loads meanwhile).

Rules, in MiB of GPU memory (`need` = the model's weights on the device + yield_need_margin_mb):

- step aside while holding the GPU when `free < yield_free_below_mb` and the other processes
  hold more than they did when our load was admitted (by GROWTH_MIN_MB): other work wants the
  room.  Without the growth test our own batch filling the card would make us yield to ourselves.
- admit a load only when `free - need >= yield_free_below_mb`: after the load the floor is still
  free, so the load does not trip the rule above (and no job dies of an out-of-memory load);
  otherwise step aside at once (reason `insufficient_memory`) and let the jobs wait.
- come back only when `free - need >= yield_resume_free_mb` (> yield_free_below_mb: hysteresis)
  has held on every reading for `yield_settle_s`; one reading below starts the settle time again.
  No flapping: the resume level leaves more than the trigger level free after our load.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ondemand.gpu import GpuProcess, GpuSample

MB = 2**20
GROWTH_MIN_MB = 64.0  # others' memory must grow by more than this (allocator noise) to count


class Verdict(enum.Enum):
    STAY = "stay"  # nothing to do
    YIELD = "yield"  # step aside now
    WAIT = "wait"  # stay aside
    RESUME = "resume"  # the memory has been free long enough: loads may start again


@dataclass(frozen=True)
class GpuReading:
    """One look at the GPU: `at` on the supervisor's clock; memory in MiB."""

    at: float
    total_mb: float
    free_mb: float
    ours_mb: float | None  # what our worker holds (None: NVML cannot attribute it)
    others: tuple[GpuProcess, ...]  # every other compute process NVML lists

    @property
    def others_mb(self) -> float:
        """What everything but our worker holds: used - ours when ours is known (this counts
        processes NVML cannot list, e.g. other containers), else the listed others' sum."""
        used = self.total_mb - self.free_mb
        if self.ours_mb is not None:
            return max(0.0, used - self.ours_mb)
        return sum((p.memory_bytes or 0) for p in self.others) / MB

    @classmethod
    def from_sample(cls, sample: GpuSample, at: float,
                    ours: Collection[int]) -> GpuReading | None:
        """None when the sample has no memory figures (no NVML, or the call failed)."""
        free = sample.free_bytes
        if free is None or sample.gpu_memory_total_bytes is None:
            return None
        mine = sample.pids_gpu_memory_bytes if sample.pids else 0
        return cls(at=at, total_mb=sample.gpu_memory_total_bytes / MB, free_mb=free / MB,
                   ours_mb=None if mine is None else mine / MB,
                   others=tuple(p for p in sample.processes if p.pid not in ours))

    def to_json(self) -> dict[str, Any]:
        return {"free_mb": round(self.free_mb, 1), "total_mb": round(self.total_mb, 1),
                "ours_mb": None if self.ours_mb is None else round(self.ours_mb, 1),
                "others_mb": round(self.others_mb, 1),
                "others": [p.to_json() for p in self.others]}


class YieldPolicy:
    """Thresholds and hysteresis; state: whether we are aside, since when and why."""

    def __init__(self, *, free_below_mb: float, resume_free_mb: float, settle_s: float) -> None:
        if resume_free_mb <= free_below_mb:
            raise ValueError("resume_free_mb must be above free_below_mb (hysteresis)")
        self.free_below_mb = free_below_mb
        self.resume_free_mb = resume_free_mb
        self.settle_s = settle_s
        self.yielded = False
        self.reason = ""  # other_processes | insufficient_memory
        self.since: float | None = None  # clock of the reading that made us step aside
        self.trigger: GpuReading | None = None  # that reading
        self.last: GpuReading | None = None
        self.need_mb = 0.0  # the need the last decision used
        self._clear_since: float | None = None  # first reading of the current clear stretch
        self._baseline_mb: float | None = None  # others' memory when our load was admitted

    def admit(self, r: GpuReading, need_mb: float) -> bool:
        """May a load start now?  Records the others' memory as the growth baseline when yes."""
        self.last, self.need_mb = r, need_mb
        if self.yielded:
            return False
        ok = r.free_mb - need_mb >= self.free_below_mb
        if ok:
            self._baseline_mb = r.others_mb
        return ok

    def watch(self, r: GpuReading, *, holding: bool, need_mb: float) -> Verdict:
        """The verdict for one periodic reading.  `holding`: our worker may hold GPU memory."""
        self.last, self.need_mb = r, need_mb
        if not self.yielded:
            if not holding:
                self._baseline_mb = None
                return Verdict.STAY
            if self._baseline_mb is None:
                self._baseline_mb = r.others_mb  # we were loaded before the policy looked
            grew = r.others_mb > self._baseline_mb + GROWTH_MIN_MB
            return Verdict.YIELD if r.free_mb < self.free_below_mb and grew else Verdict.STAY
        if r.free_mb - need_mb < self.resume_free_mb:
            self._clear_since = None
            return Verdict.WAIT
        if self._clear_since is None:
            self._clear_since = r.at
        if r.at - self._clear_since < self.settle_s:
            return Verdict.WAIT
        self.yielded = False
        self.reason, self.since, self.trigger = "", None, None
        self._clear_since = self._baseline_mb = None
        return Verdict.RESUME

    def step_aside(self, r: GpuReading, reason: str) -> None:
        self.yielded = True
        self.reason, self.since, self.trigger, self.last = reason, r.at, r, r
        self._clear_since = None

    def settled_s(self, now: float) -> float:
        """Seconds the memory has been free enough so far (0 while it is not)."""
        return 0.0 if self._clear_since is None else max(0.0, now - self._clear_since)

    def resume_at_free_mb(self) -> float:
        return self.need_mb + self.resume_free_mb

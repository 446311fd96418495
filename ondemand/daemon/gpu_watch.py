"""The supervisor's view of the GPU for stepping aside (`worker.yield_gpu`, docs/ladder.md).

`GpuWatch` joins the pure `yielding.YieldPolicy` to the GPU probe: it reads the GPU (our worker's
pid apart from the others), knows the model's need (the weights the worker reported +
`worker.yield_need_margin_mb`), words the step-aside line and event, and builds the `yielded`
block of `/v1/status`.  It arms no timer and changes no worker state: the supervisor's owner task
asks it (`watch` on every GPU_POLL, `admit` before every load) and acts on the verdict (revoke the
leases, stop the worker, go to `yielded`, come back).  It exists only where stepping aside can
work: `GpuWatch.create` says why not (no NVML, device cpu) and returns None.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ondemand.config import WorkerConfig
from ondemand.daemon.events import SteppedAside
from ondemand.daemon.worker_status import YieldRecord
from ondemand.daemon.yielding import GpuReading, Verdict, YieldPolicy
from ondemand.gpu import GpuProbe, gpu_index

log = logging.getLogger(__name__)


class GpuWatch:
    """The yield policy, the probe that feeds it and the model's need on the GPU."""

    def __init__(self, cfg: WorkerConfig, probe: GpuProbe, index: int,
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.probe = probe
        self.index = index
        self.clock = clock
        self.policy = YieldPolicy(free_below_mb=cfg.yield_free_below_mb,
                                  resume_free_mb=cfg.yield_resume_free_mb,
                                  settle_s=cfg.yield_settle_s)
        self.weights_mb: float | None = None  # as the worker reported them (prepared/loaded)

    @classmethod
    def create(cls, cfg: WorkerConfig, probe: GpuProbe | None,
               clock: Callable[[], float]) -> GpuWatch | None:
        """The watch for `worker.yield_gpu`; None when it is off or cannot see the GPU."""
        if not cfg.yield_gpu:
            return None
        index = gpu_index(cfg.device)
        if probe is None or probe.fallback or index is None:
            log.info("worker.yield_gpu: no NVML view of the GPU (device %s, probe %s); "
                     "stepping aside is off", cfg.device, probe.name if probe else "none")
            return None
        return cls(cfg, probe, index, clock)

    @property
    def yielded(self) -> bool:
        """Stepped aside: loads wait until the policy lets us back."""
        return self.policy.yielded

    @property
    def reason(self) -> str:
        return self.policy.reason

    def need_mb(self) -> float:
        """The model's need on the GPU: its weights (0 before any prepare or load reported
        them) + worker.yield_need_margin_mb."""
        return (self.weights_mb or 0.0) + self.cfg.yield_need_margin_mb

    def read(self, ours: Sequence[int]) -> GpuReading | None:
        """One look at the GPU (`ours`: our worker's pid, if any); None without figures."""
        pids = list(ours)
        sample = self.probe.sample(pids, self.index)
        return GpuReading.from_sample(sample, self.clock(), pids)

    def watch(self, reading: GpuReading, *, holding: bool) -> Verdict:
        """The policy's verdict on a periodic reading (`holding`: we may hold GPU memory)."""
        return self.policy.watch(reading, holding=holding, need_mb=self.need_mb())

    def admit(self, reading: GpuReading) -> bool:
        """Whether the model's need fits now, so a load may start."""
        return self.policy.admit(reading, self.need_mb())

    def step_aside(self, reading: GpuReading, reason: str) -> tuple[str, SteppedAside]:
        """Record that we step aside; (the log line's text, the event to publish)."""
        pol = self.policy
        pol.step_aside(reading, reason)
        others = ", ".join(f"pid {p.pid} {p.to_json()['memory_mb']} MiB" for p in reading.others)
        line = (f"reason={reason} free={reading.free_mb:.0f} MiB need={pol.need_mb:.0f} MiB "
                f"others={reading.others_mb:.0f} MiB ({others or 'not listed'}); loads wait "
                f"until {pol.resume_at_free_mb():.0f} MiB are free for {pol.settle_s:g}s")
        return line, SteppedAside(reason=reason, free_mb=reading.free_mb, need_mb=pol.need_mb,
                                  others_mb=reading.others_mb)

    def record(self, now: float, *, pending: bool) -> YieldRecord | None:
        """The `yielded` block of `/v1/status` while aside (`pending`: the batch finishes first)."""
        pol = self.policy
        if not pol.yielded:
            return None
        last, trig = pol.last, pol.trigger
        return YieldRecord(
            reason=pol.reason, pending=pending,
            for_s=now - (pol.since if pol.since is not None else now), need_mb=pol.need_mb,
            resume_at_free_mb=pol.resume_at_free_mb(), settle_s=pol.settle_s,
            settled_s=pol.settled_s(now), gpu=last.to_json() if last else None,
            trigger_gpu=trig.to_json() if trig else None)

"""GPU probes: what our worker holds on the GPU, and what the GPU draws.

`open_probe()` returns an `NvmlProbe` when NVML (`nvidia-ml-py`, imported as `pynvml`) initialises,
else a `PsutilProbe` that says it is a fallback (`probe.fallback` is True, `sample.source` is
"psutil"): it reports the worker's host RSS and CPU time, and None for every GPU field.

Every NVML call is guarded on its own: a GPU that does not support power readings (or a container
that hides the worker's PIDs) gives None for that field only, never an exception to the sampler.
Probes are synchronous and quick (NVML queries take well under a millisecond); the sampler owns
the timing.  Tests inject a fake `nvml` module to exercise the guarded paths without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol, TypeVar

import psutil

log = logging.getLogger(__name__)

T = TypeVar("T")
Source = Literal["nvml", "psutil"]

# NVML reports P-state 32 when it does not know it.
_PSTATE_UNKNOWN = 32


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on the GPU as NVML lists it; `memory_bytes` None where the driver
    cannot attribute memory (some containers)."""

    pid: int
    memory_bytes: int | None

    def to_json(self) -> dict[str, object]:
        mb = None if self.memory_bytes is None else round(self.memory_bytes / 2**20, 1)
        return {"pid": self.pid, "memory_mb": mb}


@dataclass(frozen=True)
class GpuSample:
    """One reading.  GPU fields are None when the probe cannot tell (always so for psutil)."""

    source: Source
    gpu: int | None  # device index the GPU fields refer to
    pids: tuple[int, ...]  # the PIDs asked about that were found alive
    pids_gpu_memory_bytes: int | None  # GPU memory used by those PIDs
    gpu_memory_used_bytes: int | None  # GPU memory used in total (all processes)
    gpu_memory_total_bytes: int | None
    power_watts: float | None
    energy_joules: float | None  # the board's cumulative energy counter (Volta+), if it has one
    utilization_pct: float | None
    pstate: int | None
    rss_bytes: int | None  # host RSS of the PIDs (None when no PID was alive)
    cpu_seconds: float | None  # cumulative user+system CPU time of the PIDs
    # Every compute process NVML lists on the GPU, ours included (empty without NVML, or when
    # the listing failed): who else holds memory, for stepping aside (docs/ladder.md).
    processes: tuple[GpuProcess, ...] = ()

    @property
    def free_bytes(self) -> int | None:
        if self.gpu_memory_total_bytes is None or self.gpu_memory_used_bytes is None:
            return None
        return max(0, self.gpu_memory_total_bytes - self.gpu_memory_used_bytes)


class GpuProbe(Protocol):
    name: str
    fallback: bool  # True when the probe cannot see the GPU at all

    def sample(self, pids: Sequence[int], gpu: int | None) -> GpuSample: ...

    def close(self) -> None: ...


def gpu_index(device: str) -> int | None:
    """NVML index of a torch device string: `cuda:N` -> N, `cuda`/`auto` -> 0, `cpu` -> None.

    NVML numbers devices physically while CUDA honours CUDA_VISIBLE_DEVICES; a plain integer list
    there is mapped (`CUDA_VISIBLE_DEVICES=2,3` makes `cuda:1` NVML index 3); UUID lists are not
    and fall back to the CUDA index."""
    if device == "cpu":
        return None
    index = int(device[5:]) if device.startswith("cuda:") and device[5:].isdigit() else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    if index < len(visible) and all(v.isdigit() for v in visible):
        return int(visible[index])
    return index


def host_usage(pids: Sequence[int]) -> tuple[tuple[int, ...], int | None, float | None]:
    """(alive pids, summed RSS bytes, summed CPU seconds) of `pids`; gone PIDs are skipped."""
    alive: list[int] = []
    rss = 0
    cpu = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
        except (psutil.Error, OSError):
            continue
        alive.append(pid)
    if not alive:
        return (), None, None
    return tuple(alive), rss, cpu


class PsutilProbe:
    """The fallback without NVML: host RSS and CPU time of the worker, no GPU figures."""

    name = "psutil"
    fallback = True

    def __init__(self, reason: str = "") -> None:
        self.reason = reason  # why NVML is not used, for /v1/cost and the log

    def sample(self, pids: Sequence[int], gpu: int | None) -> GpuSample:
        alive, rss, cpu = host_usage(pids)
        return GpuSample(
            source="psutil",
            gpu=gpu,
            pids=alive,
            pids_gpu_memory_bytes=None,
            gpu_memory_used_bytes=None,
            gpu_memory_total_bytes=None,
            power_watts=None,
            energy_joules=None,
            utilization_pct=None,
            pstate=None,
            rss_bytes=rss,
            cpu_seconds=cpu,
        )

    def close(self) -> None:
        pass


class NvmlProbe:
    """NVML readings for one device per sample, plus the psutil host figures."""

    name = "nvml"
    fallback = False

    def __init__(self, nvml: ModuleType | Any) -> None:
        """`nvml` is an initialised `pynvml` (or a test fake with the same functions)."""
        self._nvml = nvml
        self._handles: dict[int, Any] = {}
        self._failed: set[str] = set()  # calls already logged as failing, to log each once

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as e:  # NVMLError and its many subclasses, or a driver gone away
            if what not in self._failed:
                self._failed.add(what)
                log.info("nvml %s unavailable: %s", what, e)
            return None

    def _handle(self, gpu: int) -> Any:
        if gpu not in self._handles:
            handle = self._call("handle", lambda: self._nvml.nvmlDeviceGetHandleByIndex(gpu))
            if handle is None:
                return None
            self._handles[gpu] = handle
        return self._handles[gpu]

    def sample(self, pids: Sequence[int], gpu: int | None) -> GpuSample:
        alive, rss, cpu = host_usage(pids)
        handle = self._handle(gpu) if gpu is not None else None
        pid_mem = used = total = pstate = None
        power = energy = util = None
        listed: tuple[GpuProcess, ...] = ()
        if handle is not None:
            nv = self._nvml
            procs = self._call("processes", lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle))
            if procs is not None:
                listed = tuple(GpuProcess(int(p.pid), None if p.usedGpuMemory is None
                                          else int(p.usedGpuMemory)) for p in procs)
                # usedGpuMemory is None where the driver cannot attribute memory (some
                # containers); a PID we asked about that NVML does not list holds nothing.
                wanted = set(pids)
                mine = [p for p in procs if p.pid in wanted]
                known = [p.usedGpuMemory for p in mine if p.usedGpuMemory is not None]
                pid_mem = sum(known) if len(known) == len(mine) else None
            mem = self._call("memory", lambda: nv.nvmlDeviceGetMemoryInfo(handle))
            if mem is not None:
                used, total = int(mem.used), int(mem.total)
            mw = self._call("power", lambda: nv.nvmlDeviceGetPowerUsage(handle))
            power = None if mw is None else mw / 1000.0
            mj = self._call("energy", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle))
            energy = None if mj is None else mj / 1000.0
            rates = self._call("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(handle))
            util = None if rates is None else float(rates.gpu)
            ps = self._call("pstate", lambda: nv.nvmlDeviceGetPerformanceState(handle))
            pstate = None if ps is None or ps == _PSTATE_UNKNOWN else int(ps)
        return GpuSample(
            source="nvml",
            gpu=gpu,
            pids=alive,
            pids_gpu_memory_bytes=pid_mem,
            gpu_memory_used_bytes=used,
            gpu_memory_total_bytes=total,
            power_watts=power,
            energy_joules=energy,
            utilization_pct=util,
            pstate=pstate,
            rss_bytes=rss,
            cpu_seconds=cpu,
            processes=listed,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def _import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


def open_probe(
    kind: str = "auto", *, importer: Callable[[], ModuleType | Any] = _import_pynvml
) -> GpuProbe:
    """`auto`: NVML when it initialises, else the psutil fallback (logged once, with why).
    `nvml`: the same, but the fallback is logged as a warning.  `psutil`: never touch NVML."""
    if kind == "psutil":
        return PsutilProbe("probe = psutil in [cost]")
    try:
        nvml = importer()
        nvml.nvmlInit()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
        reason = f"NVML unavailable ({type(e).__name__}: {e})"
        (log.warning if kind == "nvml" else log.info)(
            "gpu probe: %s; falling back to psutil (process RSS and CPU time, no GPU figures)",
            reason,
        )
        return PsutilProbe(reason)
    count = None
    with contextlib.suppress(Exception):
        count = nvml.nvmlDeviceGetCount()
    log.info("gpu probe: nvml devices=%s", count)
    return NvmlProbe(nvml)

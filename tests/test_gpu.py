"""GPU probes and the sampler: the real no-NVML path of this machine, a fake NVML, energy."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from ondemand.cost.ledger import Phase
from ondemand.cost.sampler import Reading, Sampler
from ondemand.gpu import GpuSample, NvmlProbe, PsutilProbe, gpu_index, open_probe
from tests.conftest import run_virtual


def nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(nvml_works(), reason="this machine has NVML; the fallback path needs none")
def test_without_nvml_auto_falls_back_to_psutil_and_says_so() -> None:
    probe = open_probe("auto")  # the real pynvml import and nvmlInit, failing here
    assert isinstance(probe, PsutilProbe) and probe.fallback
    assert "NVML" in probe.reason
    s = probe.sample([os.getpid()], 0)
    assert s.source == "psutil" and s.pids == (os.getpid(),)
    assert s.rss_bytes is not None and s.rss_bytes > 10_000_000
    assert s.cpu_seconds is not None and s.cpu_seconds > 0
    assert (s.power_watts, s.pids_gpu_memory_bytes, s.gpu_memory_used_bytes, s.pstate) == (
        None, None, None, None,
    )
    probe.close()


def test_psutil_probe_skips_gone_pids() -> None:
    s = PsutilProbe().sample([2**22 + 12345], None)  # beyond pid_max on Linux
    assert (s.pids, s.rss_bytes, s.cpu_seconds) == ((), None, None)


def test_open_probe_psutil_never_touches_nvml() -> None:
    def boom() -> Any:
        raise AssertionError("NVML imported")

    assert open_probe("psutil", importer=boom).fallback


def test_open_probe_import_error_falls_back() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    probe = open_probe("nvml", importer=missing)
    assert isinstance(probe, PsutilProbe) and "ImportError" in probe.reason


class NVMLError(Exception):
    pass


class FakeNvml:
    """The pynvml functions NvmlProbe calls, with knobs to fail."""

    def __init__(self, *, fail: Sequence[str] = (), procs: list[Any] | None = None) -> None:
        self.fail = set(fail)
        self.procs = procs if procs is not None else []
        self.shut = False

    def _maybe(self, name: str, value: Any) -> Any:
        if name in self.fail:
            raise NVMLError(f"{name}: Not Supported")
        return value

    def nvmlInit(self) -> None:
        self._maybe("init", None)

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        return self._maybe("handle", f"h{i}")

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        return list(self._maybe("processes", self.procs))

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        return self._maybe("memory", SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30))

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return int(self._maybe("power", 71_500))

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any) -> int:
        return int(self._maybe("energy", 5_000_000))

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        return self._maybe("utilization", SimpleNamespace(gpu=37, memory=5))

    def nvmlDeviceGetPerformanceState(self, h: Any) -> int:
        return int(self._maybe("pstate", 0))


def proc(pid: int, used: int | None) -> Any:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def test_nvml_probe_reads_everything() -> None:
    me = os.getpid()
    fake = FakeNvml(procs=[proc(me, 700 << 20), proc(1, 5 << 30)])
    probe = open_probe("auto", importer=lambda: fake)
    assert isinstance(probe, NvmlProbe) and not probe.fallback
    s = probe.sample([me], 1)
    assert s.source == "nvml" and s.gpu == 1
    assert s.pids_gpu_memory_bytes == 700 << 20  # only our PIDs
    assert (s.gpu_memory_used_bytes, s.gpu_memory_total_bytes) == (3 << 30, 80 << 30)
    assert (s.power_watts, s.energy_joules, s.utilization_pct, s.pstate) == (71.5, 5000.0, 37, 0)
    assert s.rss_bytes and s.cpu_seconds
    probe.close()
    assert fake.shut


def test_nvml_probe_degrades_per_call() -> None:
    me = os.getpid()
    fake = FakeNvml(fail=["power", "energy", "pstate"], procs=[proc(me, None)])
    s = NvmlProbe(fake).sample([me], 0)
    assert (s.power_watts, s.energy_joules, s.pstate) == (None, None, None)
    assert s.pids_gpu_memory_bytes is None  # the driver could not attribute it
    assert s.gpu_memory_used_bytes == 3 << 30  # the other calls still answer
    # A PID NVML does not list holds nothing on the GPU.
    assert NvmlProbe(FakeNvml()).sample([me], 0).pids_gpu_memory_bytes == 0
    # No handle (bad index): every GPU field None, host figures still there.
    s = NvmlProbe(FakeNvml(fail=["handle"])).sample([me], 5)
    assert s.gpu_memory_used_bytes is None and s.rss_bytes


def test_nvml_init_failure_falls_back() -> None:
    probe = open_probe("auto", importer=lambda: FakeNvml(fail=["init"]))
    assert isinstance(probe, PsutilProbe) and "NVMLError" in probe.reason


def test_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [gpu_index(d) for d in ("cpu", "cuda", "auto", "cuda:3")] == [None, 0, 0, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_index("cuda:1") == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    assert gpu_index("cuda:0") == 0


# -- sampler -------------------------------------------------------------------------------


class ScriptedProbe:
    name = "scripted"
    fallback = False

    def __init__(self) -> None:
        self.watts: float | None = 100.0
        self.energy: float | None = None
        self.cpu = 0.0

    def sample(self, pids: Sequence[int], gpu_: int | None) -> GpuSample:
        return GpuSample(
            source="nvml", gpu=gpu_, pids=tuple(pids), pids_gpu_memory_bytes=None,
            gpu_memory_used_bytes=None, gpu_memory_total_bytes=None, power_watts=self.watts,
            energy_joules=self.energy, utilization_pct=None, pstate=None, rss_bytes=None,
            cpu_seconds=self.cpu if pids else None,
        )

    def close(self) -> None:
        pass


def test_sampler_energy_trapezoid_counter_and_cpu() -> None:
    async def main() -> None:
        now = [1000.0]
        probe = ScriptedProbe()
        got: list[Reading] = []
        s = Sampler(probe, got.append, interval_s=3600, baseline_interval_s=0,
                    clock=lambda: now[0])
        s.start(Phase.READY_IDLE, (5,), 0)
        now[0] = 1010.0
        probe.watts, probe.cpu = 200.0, 2.5
        r = s.sample_now()
        assert (r.energy_j, r.power_s, r.cpu_s, r.phase) == (1500.0, 10.0, 2.5, Phase.READY_IDLE)
        # The board's energy counter wins over the power readings.
        probe.energy = 10_000.0
        now[0] = 1020.0
        s.sample_now()
        probe.energy = 10_420.0
        now[0] = 1030.0
        assert s.sample_now().energy_j == 420.0
        # Missing power: no energy rather than a guess.
        probe.energy = probe.watts = None
        now[0] = 1040.0
        assert (s.sample_now().energy_j, s.last and s.last.power_s) == (0.0, 0.0)
        s.stop()

    asyncio.run(main())


def test_sampler_timer_only_while_alive_plus_baseline() -> None:
    async def main() -> None:
        probe = ScriptedProbe()
        got: list[Reading] = []
        s = Sampler(probe, got.append, interval_s=0.02, baseline_interval_s=0,
                    clock=time.time)
        s.start(Phase.EXITED, (), 0)
        assert len(got) == 1  # the first baseline, no timer (baseline_interval_s = 0)
        s.retarget(Phase.READY_IDLE, (1,), 0)
        await asyncio.sleep(0.11)  # virtual time: exactly five 0.02 s intervals
        assert len(got) == 1 + 5 and all(r.phase is Phase.READY_IDLE for r in got[1:])
        s.flush()
        s.retarget(Phase.EXITED, (), 0)
        n = len(got)
        assert got[-1].phase is Phase.EXITED and got[-1].sample.pids == ()  # the baseline
        await asyncio.sleep(1.0)  # fifty intervals
        assert len(got) == n  # no sampling while nothing of ours is alive
        s.stop()

    run_virtual(main())


def test_sampler_survives_probe_errors(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ScriptedProbe):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def sample(self, pids: Sequence[int], gpu_: int | None) -> GpuSample:
            self.n += 1
            if self.n == 2:
                raise RuntimeError("driver went away")
            return super().sample(pids, gpu_)

    async def main() -> None:
        probe = Broken()
        got: list[Reading] = []
        s = Sampler(probe, got.append, interval_s=0.01, baseline_interval_s=0)
        s.start(Phase.READY_BUSY, (1,), 0)
        await asyncio.sleep(0.055)  # virtual time: five 0.01 s intervals; the first one fails
        s.stop()
        assert len(got) == 1 + 5 - 1

    run_virtual(main())
    assert "sample failed" in caplog.text


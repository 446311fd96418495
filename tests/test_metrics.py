"""Prometheus metrics: exact names, a dedicated registry, an exposition that parses."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from ondemand.cost.ledger import Phase, Trigger
from ondemand.cost.metrics import Metrics
from ondemand.cost.sampler import Reading
from ondemand.gpu import GpuSample

STATES = ["cold", "starting", "loading", "ready", "unloading", "unloaded", "stopping", "backoff"]
# The issue's names, as sample names in the text format (counters carry _total).
ISSUE_SAMPLES = {
    "ondemand_worker_state",
    "ondemand_model_load_seconds_bucket",
    "ondemand_cold_starts_total",
    "ondemand_jobs_total",
    "ondemand_jobs_queued",
    "ondemand_queue_wait_seconds_bucket",
    "ondemand_job_duration_seconds_bucket",
    "ondemand_worker_restarts_total",
    "ondemand_gpu_memory_bytes",
    "ondemand_gpu_power_watts",
    "ondemand_gpu_energy_joules_total",
    "ondemand_idle_cost_dollars_total",
    "ondemand_worker_phase_seconds_total",
    "ondemand_worker_host_memory_bytes",
    "ondemand_gpu_yields_total",
}
FAMILIES = {
    "ondemand_worker_state": "gauge",
    "ondemand_model_load_seconds": "histogram",
    "ondemand_cold_starts": "counter",
    "ondemand_jobs": "counter",
    "ondemand_jobs_queued": "gauge",
    "ondemand_queue_wait_seconds": "histogram",
    "ondemand_job_duration_seconds": "histogram",
    "ondemand_worker_restarts": "counter",
    "ondemand_gpu_memory_bytes": "gauge",
    "ondemand_gpu_power_watts": "gauge",
    "ondemand_gpu_energy_joules": "counter",
    "ondemand_idle_cost_dollars": "counter",
    "ondemand_worker_phase_seconds": "counter",
    "ondemand_worker_host_memory_bytes": "gauge",
    "ondemand_gpu_yields": "counter",
}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sample(power: float | None = 65.0) -> GpuSample:
    return GpuSample(
        source="nvml", gpu=0, pids=(42,), pids_gpu_memory_bytes=1 << 30,
        gpu_memory_used_bytes=2 << 30, gpu_memory_total_bytes=80 << 30, power_watts=power,
        energy_joules=None, utilization_pct=10.0, pstate=0, rss_bytes=1 << 28, cpu_seconds=1.0,
    )


def families(m: Metrics) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        out.setdefault(f"{fam.name}:{fam.type}", {})
        for s in fam.samples:
            out[f"{fam.name}:{fam.type}"][(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError((name, labels))


def test_exposition_parses_with_exactly_the_issue_names() -> None:
    m = Metrics(STATES, gpu_hour_usd=3.6)
    fams = {f.name: f.type for f in text_string_to_metric_families(m.exposition().decode())}
    # GPU gauges appear with the first NVML reading (never with the psutil fallback).
    assert fams == {k: v for k, v in FAMILIES.items() if "gpu_memory" not in k and "power" not in k}
    m.reading(Reading(0.0, Phase.READY_IDLE, sample(), 0.0, 0.0, 0.0))
    fams = {f.name: f.type for f in text_string_to_metric_families(m.exposition().decode())}
    assert fams == FAMILIES  # no *_created series either
    names = {
        s.name.removesuffix("_created")
        for f in text_string_to_metric_families(m.exposition().decode())
        for s in f.samples
    }
    assert names >= ISSUE_SAMPLES
    assert all(n.startswith("ondemand_") for n in names)


def test_dedicated_registry() -> None:
    m1 = Metrics(STATES)
    m2 = Metrics(STATES)  # a second app in the same process does not collide
    assert m1.registry is not m2.registry is not REGISTRY
    assert REGISTRY.get_sample_value("ondemand_jobs_queued") is None


def test_values_follow_events() -> None:
    clock = Clock()
    m = Metrics(STATES, gpu_hour_usd=3.6, energy_kwh_usd=0.36, clock=clock)
    m.set_state("ready")
    assert value(m, "ondemand_worker_state", state="ready") == 1
    assert value(m, "ondemand_worker_state", state="cold") == 0
    m.load_begun(Trigger.SCHEDULE)
    m.model_loaded(3.2)
    m.job_finished("done", 0.5, 0.02)
    m.job_finished("failed", None, None)
    m.worker_exited("exited")  # asked for: not a restart
    m.worker_exited("killed")
    m.jobs_queued.set(7)
    assert value(m, "ondemand_cold_starts_total", trigger="schedule") == 1
    assert value(m, "ondemand_cold_starts_total", trigger="job") == 0
    assert value(m, "ondemand_model_load_seconds_count") == 1
    assert value(m, "ondemand_model_load_seconds_bucket", le="5.0") == 1
    assert value(m, "ondemand_model_load_seconds_bucket", le="2.0") == 0
    assert value(m, "ondemand_jobs_total", status="done") == 1
    assert value(m, "ondemand_jobs_total", status="cancelled") == 0
    assert value(m, "ondemand_queue_wait_seconds_sum") == 0.5
    assert value(m, "ondemand_job_duration_seconds_count") == 1
    assert value(m, "ondemand_worker_restarts_total", reason="killed") == 1
    assert value(m, "ondemand_jobs_queued") == 7

    m.reading(Reading(clock.t, Phase.READY_BUSY, sample(), 650.0, 10.0, 0.5))
    assert value(m, "ondemand_gpu_power_watts", gpu="0") == 65
    assert value(m, "ondemand_gpu_memory_bytes", gpu="0", scope="worker") == 1 << 30
    assert value(m, "ondemand_gpu_memory_bytes", gpu="0", scope="total") == 80 << 30
    assert value(m, "ondemand_gpu_energy_joules_total", phase="ready_busy") == 650


def test_idle_cost_grows_while_idle_only() -> None:
    clock = Clock()
    m = Metrics(STATES, gpu_hour_usd=3.6, energy_kwh_usd=3.6, clock=clock)  # $0.001/s, $1e-6/J
    m.phase(Phase.READY_BUSY, 1000)
    clock.t = 1100
    assert value(m, "ondemand_idle_cost_dollars_total") == 0
    m.phase(Phase.READY_IDLE, 1100)
    clock.t = 1150
    assert abs(value(m, "ondemand_idle_cost_dollars_total") - 0.05) < 1e-12  # grows at scrape
    m.reading(Reading(1150, Phase.READY_IDLE, sample(), 2000.0, 50.0, 0.0))  # 2 kJ idle energy
    m.phase(Phase.UNLOADED_ALIVE, 1200)
    m.phase(Phase.EXITED, 1300)
    clock.t = 5000
    assert abs(value(m, "ondemand_idle_cost_dollars_total") - (0.2 + 0.002)) < 1e-12


def test_psutil_readings_set_no_gpu_gauges() -> None:
    m = Metrics(STATES)
    s = GpuSample(
        source="psutil", gpu=0, pids=(1,), pids_gpu_memory_bytes=None,
        gpu_memory_used_bytes=None, gpu_memory_total_bytes=None, power_watts=None,
        energy_joules=None, utilization_pct=None, pstate=None, rss_bytes=5, cpu_seconds=1.0,
    )
    m.reading(Reading(0, Phase.READY_IDLE, s, 0.0, 0.0, 0.0))
    text = m.exposition().decode()
    assert "ondemand_gpu_memory_bytes{" not in text and "ondemand_gpu_power_watts{" not in text

"""Prometheus metrics on a dedicated registry (never the global one, so two apps in one test
process do not collide).  Names align with peers (Triton, Ray Serve, llama-swap):

    ondemand_worker_state{state}                 1 for the supervisor's current state, else 0
    ondemand_model_load_seconds                  histogram of load seconds (reloads too)
    ondemand_cold_starts_total{trigger}          loads begun, by job / schedule / manual
    ondemand_jobs_total{status}                  jobs finished: done / failed / cancelled
    ondemand_jobs_queued                         jobs waiting (set at scrape time)
    ondemand_queue_wait_seconds                  histogram, acceptance -> batch sent
    ondemand_job_duration_seconds                histogram, the batch round trip in the worker
    ondemand_worker_restarts_total{reason}       unrequested worker exits, by exit kind
    ondemand_gpu_memory_bytes{gpu,scope}         scope: worker (our PIDs) / used / total
    ondemand_gpu_power_watts{gpu}                board power draw
    ondemand_gpu_energy_joules_total{phase}      energy by ledger phase
    ondemand_idle_cost_dollars_total             GPU-hour price (+ energy) of idle-warm and
                                                 unloaded-alive time, growing while idle
    ondemand_worker_phase_seconds_total{phase}   seconds in each ledger phase since start
                                                 (standby and yielded: not GPU-billed)
    ondemand_worker_host_memory_bytes            the worker process's RSS (a standby's cost)
    ondemand_gpu_yields_total{reason}            times the worker stepped aside for other work

Only event callbacks and sampler readings change these.  A scrape reads them and touches
nothing else: it never counts as activity (no lease, no idle-timer reset).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from ondemand.cost.ledger import Phase, Trigger
from ondemand.cost.sampler import Reading

LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
JOB_STATUSES = ("done", "failed", "cancelled")
# daemon/process.py ExitKind, less "exited" (asked for)
EXIT_KINDS = ("load_failed", "load_timeout", "crashed", "killed", "stop_escalated",
              "protocol_error", "hung", "batch_timeout")
IDLE_PHASES = (Phase.READY_IDLE, Phase.UNLOADED_ALIVE)
# The classic text format every Prometheus reads (our names need none of 1.0.0's quoting).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _IdleCost:
    """`ondemand_idle_cost_dollars_total`: closed idle time + the open idle stretch up to the
    scrape, so the counter grows smoothly while idle without a timer."""

    def __init__(self, usd_per_s: float, usd_per_j: float, clock: Callable[[], float]) -> None:
        self.usd_per_s = usd_per_s
        self.usd_per_j = usd_per_j
        self._clock = clock
        self.closed = 0.0
        self._idle_since: float | None = None

    def enter(self, phase: Phase, at: float) -> None:
        self.close_open(at)
        if phase in IDLE_PHASES:
            self._idle_since = at

    def close_open(self, at: float) -> None:
        if self._idle_since is not None:
            self.closed += max(0.0, at - self._idle_since) * self.usd_per_s
            self._idle_since = None

    def add_energy(self, phase: Phase, joules: float) -> None:
        if phase in IDLE_PHASES:
            self.closed += joules * self.usd_per_j

    def value(self) -> float:
        if self._idle_since is None:
            return self.closed
        return self.closed + max(0.0, self._clock() - self._idle_since) * self.usd_per_s

    def describe(self) -> Iterable[Metric]:
        return [self._family(0.0)]

    def collect(self) -> Iterable[Metric]:
        return [self._family(self.value())]

    @staticmethod
    def _family(value: float) -> Metric:
        return CounterMetricFamily(
            "ondemand_idle_cost_dollars",
            "GPU-hour price (plus energy, when priced) of idle-warm and unloaded-alive time.",
            value=value,
        )


class _PhaseSeconds:
    """`ondemand_worker_phase_seconds_total{phase}`: closed time per phase + the open stretch up
    to the scrape (no timer), like the idle cost."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.closed = {p: 0.0 for p in Phase}
        self._phase: Phase | None = None
        self._since = 0.0

    def enter(self, phase: Phase, at: float) -> None:
        if self._phase is not None:
            self.closed[self._phase] += max(0.0, at - self._since)
        self._phase, self._since = phase, at

    def describe(self) -> Iterable[Metric]:
        return [self._family({})]

    def collect(self) -> Iterable[Metric]:
        values = dict(self.closed)
        if self._phase is not None:
            values[self._phase] += max(0.0, self._clock() - self._since)
        return [self._family(values)]

    @staticmethod
    def _family(values: dict[Phase, float]) -> Metric:
        fam = CounterMetricFamily(
            "ondemand_worker_phase_seconds",
            "Seconds the worker spent in each ledger phase (standby, yielded: not GPU-billed).",
            labels=["phase"],
        )
        for p in Phase:
            fam.add_metric([p.value], values.get(p, 0.0))
        return fam


YIELD_REASONS = ("other_processes", "insufficient_memory")


class Metrics:
    def __init__(
        self,
        states: Sequence[str],
        *,
        gpu_hour_usd: float = 0.0,
        energy_kwh_usd: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        r = self.registry = CollectorRegistry()
        self._states = tuple(states)
        self.worker_state = Gauge(
            "ondemand_worker_state", "1 for the worker's current state.", ["state"], registry=r
        )
        self.model_load_seconds = Histogram(
            "ondemand_model_load_seconds",
            "Seconds from a load request to the model being ready (in-process reloads too).",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.cold_starts = Counter(
            "ondemand_cold_starts", "Model loads begun, by trigger.", ["trigger"], registry=r
        )
        self.jobs = Counter("ondemand_jobs", "Jobs finished, by status.", ["status"], registry=r)
        self.jobs_queued = Gauge("ondemand_jobs_queued", "Jobs waiting to run.", registry=r)
        self.queue_wait = Histogram(
            "ondemand_queue_wait_seconds",
            "Seconds from acceptance to the job's batch being sent (cold start included).",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "ondemand_job_duration_seconds",
            "Seconds of the job's batch round trip in the worker.",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "ondemand_worker_restarts",
            "Worker exits we did not ask for, by kind (crashed, killed, load_failed, ...).",
            ["reason"],
            registry=r,
        )
        self.gpu_memory = Gauge(
            "ondemand_gpu_memory_bytes",
            "GPU memory: scope=worker held by our worker's PIDs, used/total on the device.",
            ["gpu", "scope"],
            registry=r,
        )
        self.gpu_power = Gauge(
            "ondemand_gpu_power_watts", "GPU board power draw.", ["gpu"], registry=r
        )
        self.energy = Counter(
            "ondemand_gpu_energy_joules",
            "GPU energy by worker phase (exited: the baseline with nothing of ours).",
            ["phase"],
            registry=r,
        )
        self.host_memory = Gauge(
            "ondemand_worker_host_memory_bytes",
            "Host memory (RSS) of the worker process; 0 without one.  In standby: its cost.",
            registry=r,
        )
        self.yields = Counter(
            "ondemand_gpu_yields", "Times the worker stepped aside for other GPU work.",
            ["reason"], registry=r,
        )
        self.idle_cost = _IdleCost(gpu_hour_usd / 3600.0, energy_kwh_usd / 3.6e6, clock)
        r.register(self.idle_cost)
        self.phase_seconds = _PhaseSeconds(clock)
        r.register(self.phase_seconds)
        # Every label value exists from the start, so rates and dashboards see zeros, not gaps.
        for s in self._states:
            self.worker_state.labels(state=s).set(0)
        for t in Trigger:
            self.cold_starts.labels(trigger=t.value)
        for st in JOB_STATUSES:
            self.jobs.labels(status=st)
        for kind in EXIT_KINDS:
            self.restarts.labels(reason=kind)
        for p in Phase:
            self.energy.labels(phase=p.value)
        for reason in YIELD_REASONS:
            self.yields.labels(reason=reason)
        # Expose exactly our names: no `*_created` series (the switch for them is process-wide
        # in prometheus-client, so filter here instead of flipping it for everyone).
        self._exposed = self.registry.restricted_registry(_sample_names(self.registry))

    # -- updates (event callbacks and sampler readings) --------------------------------------
    def set_state(self, state: str) -> None:
        for s in self._states:
            self.worker_state.labels(state=s).set(1 if s == state else 0)

    def phase(self, phase: Phase, at: float) -> None:
        self.idle_cost.enter(phase, at)
        self.phase_seconds.enter(phase, at)

    def stepped_aside(self, reason: str) -> None:
        self.yields.labels(reason=reason).inc()

    def load_begun(self, trigger: Trigger) -> None:
        self.cold_starts.labels(trigger=trigger.value).inc()

    def model_loaded(self, seconds: float) -> None:
        self.model_load_seconds.observe(seconds)

    def job_finished(self, status: str, queue_s: float | None, compute_s: float | None) -> None:
        self.jobs.labels(status=status).inc()
        if queue_s is not None:
            self.queue_wait.observe(queue_s)
        if compute_s is not None:
            self.job_duration.observe(compute_s)

    def worker_exited(self, kind: str) -> None:
        if kind != "exited":  # "exited" is one we asked for
            self.restarts.labels(reason=kind).inc()

    def reading(self, r: Reading) -> None:
        s = r.sample
        self.host_memory.set(s.rss_bytes if s.pids and s.rss_bytes is not None else 0)
        if s.gpu is not None:
            gpu = str(s.gpu)
            for scope, value in (
                ("worker", s.pids_gpu_memory_bytes if s.pids else 0),
                ("used", s.gpu_memory_used_bytes),
                ("total", s.gpu_memory_total_bytes),
            ):
                if value is not None and s.source == "nvml":
                    self.gpu_memory.labels(gpu=gpu, scope=scope).set(value)
            if s.power_watts is not None:
                self.gpu_power.labels(gpu=gpu).set(s.power_watts)
        if r.energy_j > 0:
            self.energy.labels(phase=r.phase.value).inc(r.energy_j)
            self.idle_cost.add_energy(r.phase, r.energy_j)

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _sample_names(registry: CollectorRegistry) -> list[str]:
    return [m.name + suffix for m in registry.collect() for suffix in _SUFFIXES[m.type]]

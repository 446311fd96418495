"""The dispatcher: turns queued jobs into worker batches and records their outcome.

One task.  It sleeps until a submission wakes it, takes a lease on the worker (which loads the
model when needed), and while jobs are queued forms a batch around the *oldest* queued job:
candidates with the same granularity are planned with `batching.plan_batches` (length-sorted,
padded-audio budget `worker.batch_audio_s`, 0 = the device default) and the planned batch holding
the oldest job runs.  Nothing waits to fill a batch, so a lone job is never delayed.

Failure handling, job-aware:
- out of memory (`batch_failed` code out_of_memory): the batch is split in halves and each half
  retried; a single clip that still does not fit fails with out_of_memory.
- worker crash mid-batch: every job of the batch goes back to `queued` (its attempt counted) and
  is retried *alone*, so one poison clip cannot take its neighbours down; after
  `queue.max_attempts` attempts a job fails with the crash as its reason.
- shutdown: the running batch gets `server.stop_timeout_s` to finish, then its jobs are requeued
  without counting the attempt.

Timings per job: `queue_s` from acceptance to its batch being sent (cold start included),
`cold_start_s` the part of it spent waiting for the model to load, `compute_s` the seconds the
worker spent on the job's batch (reading audio, inference, writing embeddings).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from ondemand import batching
from ondemand.audio import SAMPLE_RATE
from ondemand.config import QueueConfig, WorkerConfig
from ondemand.daemon.events import EventBus, JobFinished, JobsStarted
from ondemand.daemon.store import DONE, FAILED, Job, Store
from ondemand.daemon.supervisor import (
    BatchFailed,
    Lease,
    Supervisor,
    WorkerCrashed,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

SCAN_LIMIT = 512  # queued jobs looked at when forming a batch
EWMA = 0.2  # weight of the newest batch in the per-job compute estimate


class Dispatcher:
    def __init__(
        self,
        store: Store,
        supervisor: Supervisor,
        bus: EventBus,
        queue_cfg: QueueConfig,
        worker_cfg: WorkerConfig,
        *,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.store = store
        self.sup = supervisor
        self.bus = bus
        self.queue_cfg = queue_cfg
        self.worker_cfg = worker_cfg
        self.stop_timeout_s = stop_timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: list[Job] = []  # the batch in flight (requeued on shutdown)
        self._suspects: set[str] = set()  # jobs of a crashed batch: retried alone
        self._batch_ids = itertools.count(1)
        self._stopping = False
        self.job_compute_s: float | None = None  # EWMA of compute seconds per job

    # -- public ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dispatcher")

    def wake(self) -> None:
        """A job was queued (or the worker may be usable again)."""
        self._wake.set()

    async def close(self) -> None:
        """Let the running batch finish (bounded), then stop; interrupted jobs are requeued."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        if self._running:  # only a running batch is worth waiting for, not a pending load
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), self.stop_timeout_s)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:
            ids = [j.id for j in self._running]
            log.info("dispatcher requeues %d interrupted job(s) on shutdown", len(ids))
            await self.store.requeue(ids, refund=True)
            self._running = []

    def eta_s(self, position: int) -> float:
        """A rough wait for a job with `position` jobs ahead of it."""
        per_job = self.job_compute_s if self.job_compute_s is not None else 0.5
        eta = (position + 1) * per_job
        if self.sup.state.value != "ready":
            eta += self.sup.last_load_s if self.sup.last_load_s is not None else 10.0
        return round(eta, 3)

    # -- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            jobs = await self.store.queued(SCAN_LIMIT)
            if not jobs:
                await self._wake.wait()
                continue
            retry_in = await self._serve(jobs)
            if retry_in is not None and not self._stopping:
                # The worker cannot load now (backoff): jobs stay queued; status says why.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), retry_in)

    async def _serve(self, jobs: list[Job]) -> float | None:
        """Run batches under one lease until the queue is empty.  Returns seconds to wait
        before trying again when the worker is unavailable, else None."""
        t0 = time.monotonic()
        try:
            async with self.sup.lease(f"job:{jobs[0].id}") as lease:
                cold_s = time.monotonic() - t0
                # Jobs that arrived during the cold start join the first batch.
                jobs = await self.store.queued(SCAN_LIMIT)
                while jobs and not self._stopping:
                    await self._run_batch(lease, self._form_batch(jobs), cold_s)
                    cold_s = 0.0
                    jobs = await self.store.queued(SCAN_LIMIT)
        except WorkerUnavailable as e:
            log.warning("dispatcher: worker unavailable (%s); retry in %.1fs", e.message,
                        e.retry_after_s)
            return e.retry_after_s
        except WorkerCrashed:
            pass  # the batch's jobs are requeued; the next lease starts a fresh worker
        return None

    def _form_batch(self, jobs: list[Job]) -> list[Job]:
        first = jobs[0]
        if first.id in self._suspects:
            return [first]
        same = [
            j for j in jobs
            if j.granularity == first.granularity and j.id not in self._suspects
        ]
        budget = self.worker_cfg.batch_audio_s or batching.default_budget_s(
            self.sup.device.split(":")[0]
        )
        lengths = [round(j.duration_s * SAMPLE_RATE) for j in same]
        for planned in batching.plan_batches(lengths, int(budget * SAMPLE_RATE)):
            if 0 in planned:  # the oldest job's batch
                return [same[i] for i in sorted(planned)]
        return [first]

    async def _run_batch(self, lease: Lease, batch: list[Job], cold_s: float) -> None:
        started = time.time()
        moved = set(await self.store.mark_running([j.id for j in batch], started))
        batch = [j for j in batch if j.id in moved]  # some may have been cancelled meanwhile
        if not batch:
            return
        for j in batch:
            j.attempts += 1
            j.started = started
        self.bus.publish(JobsStarted(jobs=tuple(j.id for j in batch)))
        self._running = batch  # left set when cancelled: close() requeues it
        try:
            await self._infer(lease, batch, cold_s)
        except WorkerCrashed as e:
            self._running = []
            await self._crashed(batch, e)
            raise
        self._running = []

    async def _infer(self, lease: Lease, batch: list[Job], cold_s: float) -> None:
        request: dict[str, Any] = {
            "batch": f"b{next(self._batch_ids)}",
            "granularity": batch[0].granularity,
            "items": [
                {
                    "job": j.id,
                    "key": j.key,
                    "audio": str(self.store.audio_path(j.id)),
                    "embedding": str(self.store.embedding_path(j.id)) if j.embedding else None,
                }
                for j in batch
            ],
        }
        if self.worker_cfg.batch_audio_s:
            request["batch_audio_s"] = self.worker_cfg.batch_audio_s
        t0 = time.monotonic()
        try:
            answer = await lease.infer(request)
        except BatchFailed as e:
            if len(batch) > 1:
                half = len(batch) // 2
                log.warning("batch %s failed (%s) with %d jobs: retrying as %d + %d",
                            request["batch"], e.code, len(batch), half, len(batch) - half)
                await self._infer(lease, batch[:half], cold_s)
                await self._infer(lease, batch[half:], cold_s)
                return
            await self._finish(batch[0], FAILED, error={"code": e.code, "message": e.message},
                               timings=self._timings(batch[0], cold_s, None))
            return
        results: list[dict[str, Any]] = list(answer.get("results") or [])
        seconds = answer.get("seconds")
        compute_s = float(seconds) if seconds is not None else time.monotonic() - t0
        per_job = compute_s / len(batch)
        self.job_compute_s = (
            per_job if self.job_compute_s is None
            else (1 - EWMA) * self.job_compute_s + EWMA * per_job
        )
        by_id = {str(r.get("job")): r for r in results}
        for j in batch:
            r = by_id.get(j.id)
            timings = self._timings(j, cold_s, compute_s)
            if r is None:
                err = {"code": "internal", "message": "the worker returned no result for the job"}
                await self._finish(j, FAILED, error=err, timings=timings)
            elif "error" in r:
                await self._finish(j, FAILED, error=_error(r["error"]), timings=timings)
            else:
                await self._finish(j, DONE, result=r.get("result"), timings=timings)

    async def _crashed(self, batch: list[Job], e: WorkerCrashed) -> None:
        requeue = []
        for j in batch:
            if j.attempts >= self.queue_cfg.max_attempts:
                msg = (f"the worker failed on each of {j.attempts} attempts "
                       f"(queue.max_attempts={self.queue_cfg.max_attempts}); last: {e.message}")
                await self._finish(j, FAILED, error={"code": "worker_crashed", "message": msg},
                                   timings=self._timings(j, 0.0, None))
            else:
                requeue.append(j.id)
                self._suspects.add(j.id)
        if requeue:
            log.warning("worker crashed under %d job(s): requeued %s", len(requeue),
                        ",".join(i[:8] for i in requeue))
            await self.store.requeue(requeue)

    @staticmethod
    def _timings(job: Job, cold_s: float, compute_s: float | None) -> dict[str, float | None]:
        queue_s = (job.started or job.created) - job.created
        return {"queue_s": round(max(0.0, queue_s), 6), "cold_start_s": round(cold_s, 6),
                "compute_s": None if compute_s is None else round(compute_s, 6)}

    async def _finish(
        self,
        job: Job,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        timings: dict[str, float | None],
    ) -> None:
        self._suspects.discard(job.id)
        done = await self.store.finish(job.id, status, result=result, error=error,
                                       timings=timings)
        self.store.remove_audio(job.id)
        if done is None:
            return  # no longer running (cancelled or purged meanwhile): exactly once
        log.info("job %s %s attempts=%d", job.id[:8], status, done.attempts)
        self.bus.publish(JobFinished(job=job.id, status=status, queue_s=timings.get("queue_s"),
                                     compute_s=timings.get("compute_s"), attempts=done.attempts))


def _error(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {"code": str(raw.get("code", "error")), "message": str(raw.get("message", ""))}
    return {"code": "error", "message": str(raw)}

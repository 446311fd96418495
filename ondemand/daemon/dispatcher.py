"""The dispatcher: turns queued jobs into worker batches and records their outcome.

One task.  It sleeps until a submission wakes it, takes a lease on the worker (which loads the
model when needed), and while jobs are queued forms a batch around the *oldest* queued job:
candidates with the same granularity are planned with `batching.plan_batches` (length-sorted,
padded-audio budget `worker.batch_audio_s`, 0 = the device default) and the planned batch holding
the oldest job runs.  Nothing waits to fill a batch, so a lone job is never delayed.

Failure handling, job-aware:
- out of memory (`BatchFailed` code out_of_memory): the batch is split in halves and each half
  retried; a single clip that still does not fit fails with out_of_memory.
- worker crash mid-batch: every job of the batch goes back to `queued` (its attempt counted) and
  is retried *alone*, so one poison clip cannot take its neighbours down; after
  `queue.max_attempts` attempts a job fails with the crash as its reason.
- worker hung or past its batch deadline (the supervisor SIGKILLs it): a crash, as above.
- a job cancelled while its batch runs: its result is dropped when the batch returns (the store
  only finishes `running` jobs), the other jobs of the batch finish normally.
- the supervisor steps aside for other GPU work (`Lease.revoked`): no new batch starts under the
  lease; the running one finishes; the queued jobs wait for the next lease (state `yielded`).
- shutdown: the running batch gets `server.stop_timeout_s` to finish, then its jobs are requeued
  without counting the attempt.
- storage failing (disk full, I/O error) -- issue 10: a failed result write killed this task and
  the queue never moved again.  Every write that records an outcome (finish, requeue) is retried
  with backoff (`storage.retry_min_s` doubling to `retry_max_s`) until it succeeds, the outcome
  waiting in memory and the job `running` meanwhile; nothing is reported (JobFinished, a long
  poll) before it is durable.  `blocked` says why for /readyz.  A failing read of the queue backs
  off the same way.  At shutdown a write still failing is given up: the job stays `running` in the
  database and the next start requeues it.  An embedding the worker could not write
  (`insufficient_storage`) requeues its job without counting the attempt, after a backoff.

Timings per job: `queue_s` from acceptance to its batch being sent (cold start included),
`cold_start_s` the part of it spent waiting for the model to load, `compute_s` the seconds the
worker spent on the job's batch (reading audio, inference, writing embeddings).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ondemand import batching, protocol, segments
from ondemand.audio import SAMPLE_RATE
from ondemand.config import QueueConfig, SegmentsConfig, StorageConfig, WorkerConfig
from ondemand.daemon.events import EventBus, JobFinished, JobProgress, JobsStarted
from ondemand.daemon.store import DONE, FAILED, Job, Store
from ondemand.daemon.supervisor import Lease, Supervisor, WorkerState
from ondemand.errors import (
    InternalError,
    OndemandError,
    ProtocolError,
    StorageFull,
    StorageUnavailable,
    WorkerCrashed,
    WorkerUnavailable,
)
from ondemand.protocol import ErrorInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

SCAN_LIMIT = 512  # queued jobs looked at when forming a batch
EWMA = 0.2  # weight of the newest batch in the per-job compute estimate
# What a failing storage.dir raises through the store: retried, never fatal to the task.
STORAGE_ERRORS = (StorageUnavailable, sqlite3.OperationalError, OSError)


class Runner(Protocol):
    """What runs one batch: a supervisor `Lease` (local), or cluster/dispatch.py's HTTP lease."""

    async def infer(self, op: protocol.Infer, *, audio_s: float = 0.0) -> protocol.Result: ...


class _Abandoned(Exception):
    """A write still failing when the dispatcher closes: the job stays `running` on disk."""


class Backoff:
    """retry_min_s, doubling to retry_max_s; `reset()` after a success."""

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg
        self.failures = 0

    def next_s(self) -> float:
        delay = min(self.cfg.retry_min_s * 2 ** min(self.failures, 30), self.cfg.retry_max_s)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


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
        storage_cfg: StorageConfig | None = None,
        segments_cfg: SegmentsConfig | None = None,
    ) -> None:
        self.store = store
        self.sup = supervisor
        self.bus = bus
        self.queue_cfg = queue_cfg
        self.worker_cfg = worker_cfg
        self.stop_timeout_s = stop_timeout_s
        self.storage_cfg = storage_cfg or StorageConfig()
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()  # ends backoff sleeps at shutdown (not submissions)
        self.blocked: str | None = None  # why outcomes wait in memory (storage failing), or None
        self._task: asyncio.Task[None] | None = None
        self._running: list[Job] = []  # the jobs of the batches in flight (requeued on shutdown)
        self._suspects: set[str] = set()  # jobs of a crashed batch: retried alone
        self._batch_ids = itertools.count(1)
        self._stopping = False
        self._embed_backoff = Backoff(self.storage_cfg)
        self.job_compute_s: float | None = None  # EWMA of compute seconds per job
        # issue 12: segmented jobs.  Their [segments] settings travel in each Infer item;
        # `progress` holds {job: (done_s, total_s)} while they run (the worker's Progress).
        self.segments_cfg = segments_cfg or SegmentsConfig()
        self.progress: dict[str, tuple[float, float]] = {}
        self.audio_speed: float | None = None  # EWMA of audio seconds per compute second
        bus.subscribe(self._on_progress, JobProgress)

    # -- public ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dispatcher")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The owner task (watched by the app's TaskGuard)."""
        return self._task

    def wake(self) -> None:
        """A job was queued (or the worker may be usable again)."""
        self._wake.set()

    async def close(self) -> None:
        """Let the running batch finish (bounded), then stop; interrupted jobs are requeued."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        self._stop_event.set()
        # A task that died was reported by the app's TaskGuard: its exception is not re-raised
        # here, so a shutdown never ends in a traceback.
        if self._running:  # only a running batch is worth waiting for, not a pending load
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), self.stop_timeout_s)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._running:
            ids = [j.id for j in self._running]
            self._running = []
            log.info("dispatcher requeues %d interrupted job(s) on shutdown", len(ids))
            try:
                await self.store.requeue(ids, refund=True)
            except STORAGE_ERRORS as e:
                log.warning("dispatcher: cannot requeue %d interrupted job(s) (%s); they stay "
                            "running in the database and are requeued at the next start",
                            len(ids), e.__cause__ or e)

    def eta_s(self, position: int, audio_s: float = 0.0) -> float:
        """A rough wait for a job with `position` jobs ahead of it and `audio_s` seconds of its
        own audio (an hour-long recording is not one short clip's worth)."""
        per_job = self.job_compute_s if self.job_compute_s is not None else 0.5
        eta = position * per_job + max(per_job, audio_s / self._speed())
        if self.sup.state is not WorkerState.READY:
            eta += self.sup.last_load_s if self.sup.last_load_s is not None else 10.0
        return round(eta, 3)

    def progress_of(self, job_id: str) -> dict[str, float] | None:
        """{done_s, total_s, eta_s} of a running segmented job, None before its first report."""
        got = self.progress.get(job_id)
        if got is None:
            return None
        done, total = got
        return {"done_s": done, "total_s": total,
                "eta_s": round(max(0.0, total - done) / self._speed(), 3)}

    def _speed(self) -> float:
        return self.audio_speed or self.worker_cfg.batch_default_speed

    def _on_progress(self, ev: JobProgress) -> None:
        if any(j.id == ev.job for j in self._running):
            self.progress[ev.job] = (ev.done_s, ev.total_s)

    # -- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = Backoff(self.storage_cfg)
        while not self._stopping:
            try:
                await self._step()
                backoff.reset()
            except _Abandoned:
                return
            except STORAGE_ERRORS as e:  # reading or moving jobs failed: nothing was changed
                delay = backoff.next_s()
                if backoff.failures == 1:
                    log.warning("dispatcher: the job store fails (%s); retrying after %.1fs, up "
                                "to every %gs, until it works", e.__cause__ or e, delay,
                                self.storage_cfg.retry_max_s)
                await self._pause(delay)

    async def _step(self) -> None:
        self._wake.clear()
        jobs = await self.store.queued(SCAN_LIMIT)
        if not jobs:
            await self._wake.wait()
            return
        retry_in = await self._serve(jobs)
        if retry_in is not None and not self._stopping:
            # The worker cannot load now (backoff): jobs stay queued; status says why.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), retry_in)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, ended early by close() (not by submissions: no hot retry loop)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _durable(self, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """Run a store write that records an outcome until it succeeds (backing off); the outcome
        waits in memory meanwhile and `blocked` says why.  Raises _Abandoned when the
        dispatcher closes with the write still failing."""
        backoff = Backoff(self.storage_cfg)
        while True:
            try:
                out = await write()
            except STORAGE_ERRORS as exc:
                e = exc.__cause__ or exc  # the database's own words: "database or disk is full"
                if self._stopping:
                    log.warning("dispatcher: %s still fails at shutdown (%s); the job stays "
                                "running in the database and is requeued at the next start",
                                what, e)
                    raise _Abandoned from exc
                delay = backoff.next_s()
                self.blocked = f"{what} failed ({e}); retrying"
                if backoff.failures == 1:
                    log.warning("dispatcher: %s failed (%s); the outcome waits in memory, "
                                "retrying every %.1fs up to %gs until it is on disk", what, e,
                                delay, self.storage_cfg.retry_max_s)
                await self._pause(delay)
                continue
            if backoff.failures:
                log.info("dispatcher: %s done after %d failed attempt(s)", what,
                         backoff.failures)
                self.blocked = None
            return out

    async def _serve(self, jobs: list[Job]) -> float | None:
        """Run batches under one lease until the queue is empty.  Returns seconds to wait
        before trying again when the worker is unavailable, else None."""
        t0 = time.monotonic()
        try:
            async with self.sup.lease(f"job:{jobs[0].id}") as lease:
                cold_s = time.monotonic() - t0
                # Jobs that arrived during the cold start join the first batch.
                jobs = await self.store.queued(SCAN_LIMIT)
                # A revoked lease (the supervisor steps aside for other GPU work) starts no
                # further batch: the jobs stay queued and the next lease waits for the GPU.
                while jobs and not self._stopping and lease.revoked is None:
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
        # Segmented jobs share a batch only with segmented jobs, planned by their longest
        # segment: the worker pools their segments into model batches of the same budget.
        same = [
            j for j in jobs
            if j.granularity == first.granularity and j.id not in self._suspects
            and (j.segments is None) == (first.segments is None)
        ]
        budget = self.worker_cfg.batch_audio_s or batching.default_budget_s(self._device_type())
        lengths = [round(self._plan_s(j) * SAMPLE_RATE) for j in same]
        for planned in batching.plan_batches(lengths, int(budget * SAMPLE_RATE)):
            if 0 in planned:  # the oldest job's batch
                return [same[i] for i in sorted(planned)]
        return [first]

    def _device_type(self) -> str:
        """cpu / cuda: what the batches run on (the default batch budget follows it)."""
        return self.sup.device.split(":")[0]

    def _plan_s(self, job: Job) -> float:
        spec = self._segmenting(job)
        return job.duration_s if spec is None else min(
            job.duration_s, segments.longest_segment_s(spec))

    def _segmenting(self, job: Job) -> protocol.Segmenting | None:
        if not job.segments:
            return None
        cfg = self.segments_cfg
        return protocol.Segmenting(
            mode="fixed" if job.segments.get("mode") == "fixed" else "vad",
            window_s=float(job.segments.get("window_s", cfg.window_s)),
            hop_s=float(job.segments.get("hop_s", cfg.hop_s)),
            vad_threshold=cfg.vad_threshold, min_speech_s=cfg.min_speech_s,
            merge_pause_s=cfg.merge_pause_s, max_segment_s=cfg.max_segment_s, pad_s=cfg.pad_s)

    async def _run_batch(self, lease: Lease, batch: list[Job], cold_s: float) -> None:
        started = time.time()
        moved = set(await self.store.mark_running([j.id for j in batch], started))  # may raise
        batch = [j for j in batch if j.id in moved]  # some may have been cancelled meanwhile
        if not batch:
            return
        for j in batch:
            j.attempts += 1
            j.started = started
        self.bus.publish(JobsStarted(jobs=tuple(j.id for j in batch)))
        self._running.extend(batch)  # left there when cancelled: close() requeues them
        try:
            await self._infer(lease, batch, cold_s)
        except WorkerCrashed as e:
            self._forget_running(batch)
            await self._crashed(batch, e)
            raise
        finally:
            for j in batch:
                self.progress.pop(j.id, None)
        self._forget_running(batch)

    def _forget_running(self, batch: list[Job]) -> None:
        done = {j.id for j in batch}
        self._running = [j for j in self._running if j.id not in done]

    async def _infer(self, lease: Runner, batch: list[Job], cold_s: float) -> None:
        try:
            granularity = protocol.as_granularity(batch[0].granularity)
        except ProtocolError as e:  # a damaged row must fail its jobs, not this task
            for j in batch:
                await self._finish(j, FAILED, error=ErrorInfo(InternalError.code, str(e)),
                                   timings=self._timings(j, cold_s, None))
            return
        op = protocol.Infer(
            batch=f"b{next(self._batch_ids)}",
            granularity=granularity,
            items=tuple(
                protocol.InferItem(
                    job=j.id,
                    key=j.key,
                    audio=str(self.store.audio_path(j.id)),
                    embedding=str(self.store.embedding_path(j.id)) if j.embedding else None,
                    segments=self._segmenting(j),
                )
                for j in batch
            ),
            batch_audio_s=self.worker_cfg.batch_audio_s or None,
        )
        try:
            answer = await lease.infer(op, audio_s=sum(j.duration_s for j in batch))
        except (WorkerCrashed, WorkerUnavailable):
            raise
        except OndemandError as e:  # the worker's BatchFailed: out_of_memory splits the batch
            if len(batch) > 1:
                half = len(batch) // 2
                log.warning("batch %s failed (%s) with %d jobs: retrying as %d + %d",
                            op.batch, e.code, len(batch), half, len(batch) - half)
                await self._infer(lease, batch[:half], cold_s)
                await self._infer(lease, batch[half:], cold_s)
                return
            await self._finish(batch[0], FAILED, error=ErrorInfo(e.code, e.message),
                               timings=self._timings(batch[0], cold_s, None))
            return
        per_job = answer.seconds / len(batch)
        if answer.seconds > 0:
            speed = sum(j.duration_s for j in batch) / answer.seconds
            self.audio_speed = speed if self.audio_speed is None else (
                (1 - EWMA) * self.audio_speed + EWMA * speed)
        self.job_compute_s = (
            per_job if self.job_compute_s is None
            else (1 - EWMA) * self.job_compute_s + EWMA * per_job
        )
        by_id = {r.job: r for r in answer.results}
        unwritten: list[tuple[Job, str]] = []
        for j in batch:
            r = by_id.get(j.id)
            timings = self._timings(j, cold_s, answer.seconds)
            if r is None:
                err = ErrorInfo(InternalError.code, "the worker returned no result for the job")
                await self._finish(j, FAILED, error=err, timings=timings)
            elif r.error is not None and r.error.code == StorageFull.code:
                unwritten.append((j, r.error.message))
            elif r.error is not None:
                await self._finish(j, FAILED, error=r.error, timings=timings)
            else:
                await self._finish(j, DONE, result=r.result, timings=timings)
        if unwritten:
            await self._output_unwritten(unwritten)
        elif self._embed_backoff.failures:
            self._embed_backoff.reset()
            self.blocked = None

    async def _output_unwritten(self, jobs: list[tuple[Job, str]]) -> None:
        """The worker could not write these jobs' embeddings (a full disk): requeue them without
        counting the attempt, then back off before the next batch."""
        ids = [j.id for j, _ in jobs]
        await self._durable(f"requeueing {len(ids)} job(s)",
                            lambda: self.store.requeue(ids, refund=True))
        delay = self._embed_backoff.next_s()
        self.blocked = f"embeddings cannot be written ({jobs[0][1]}); retrying"
        log.warning("dispatcher: %d job(s) requeued, their embeddings could not be written (%s);"
                    " next batch in %.1fs", len(ids), jobs[0][1], delay)
        await self._pause(delay)

    async def _crashed(self, batch: list[Job], e: WorkerCrashed) -> None:
        requeue = []
        for j in batch:
            if j.attempts >= self.queue_cfg.max_attempts:
                msg = (f"the worker failed on each of {j.attempts} attempts "
                       f"(queue.max_attempts={self.queue_cfg.max_attempts}); last: {e.message}")
                await self._finish(j, FAILED, error=ErrorInfo(WorkerCrashed.code, msg),
                                   timings=self._timings(j, 0.0, None))
            else:
                requeue.append(j.id)
                self._suspects.add(j.id)
        if requeue:
            log.warning("worker crashed under %d job(s): requeued %s", len(requeue),
                        ",".join(i[:8] for i in requeue))
            await self._durable(f"requeueing {len(requeue)} job(s)",
                                lambda: self.store.requeue(requeue))

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
        error: ErrorInfo | None = None,
        timings: dict[str, float | None],
    ) -> None:
        done = await self._durable(
            f"writing the outcome of job {job.id[:8]}",
            lambda: self.store.finish(job.id, status, result=result,
                                      error=error.to_json() if error else None, timings=timings))
        self._suspects.discard(job.id)
        self._remove(self.store.audio_path(job.id))
        if done is None:
            # No longer running (cancelled or deleted meanwhile): exactly once, and what the
            # worker wrote for it is nobody's.
            self._remove(self.store.embedding_path(job.id))
            return
        log.info("job %s %s attempts=%d", job.id[:8], status, done.attempts)
        self.bus.publish(JobFinished(job=job.id, status=status, queue_s=timings.get("queue_s"),
                                     compute_s=timings.get("compute_s"), attempts=done.attempts))

    @staticmethod
    def _remove(path: Any) -> None:
        """Best effort: a file left behind is swept at the next start, never fatal here."""
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("dispatcher: cannot remove %s: %s", path, e)


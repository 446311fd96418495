"""Batches on the Ray Serve application: the dispatcher of `cluster.backend = "ray"`.

`RayDispatcher` is the local dispatcher (daemon/dispatcher.py: batch forming, out-of-memory
splits, crash retries, durable outcomes, shutdown requeue) with two changes:

- several batches in flight: up to `max_replicas x batches_per_replica`, each its own task.  That
  number is also what Serve's autoscaler sees (one HTTP request per batch, target
  `batches_per_replica` per replica), so the replica count follows our queue depth: a queue deep
  enough for N batches asks for N / batches_per_replica replicas, up to max_replicas;
- a batch is an HTTP POST (`BatchClient`, aiohttp: no ray in this process) of a
  cluster/wire.py body to the application's route, answered by the replica's typed Result.

Failures, mapped onto the local worker's (exactly once: the store's `finish` takes a running job
once, whatever answers arrive late):
- connect refused, HTTP 404 (not deployed) or 503 (Serve cannot take it): nothing ran, so the
  jobs go back to the queue without counting the attempt, and the dispatcher waits
  `cluster.retry_s` (or for the cluster to be ready again);
- a 5xx, a connection lost after the request went out, no answer within the deadline: the
  replica (or its node) died under the batch: a crash, as when the local worker dies: attempts
  counted, the jobs retried alone, failed after `queue.max_attempts`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ondemand import protocol
from ondemand.cluster import wire
from ondemand.cluster.link import Cluster
from ondemand.config import ClusterConfig, QueueConfig, WorkerConfig
from ondemand.daemon.dispatcher import SCAN_LIMIT, Dispatcher, _Abandoned
from ondemand.daemon.events import Event, EventBus, JobsStarted
from ondemand.daemon.store import Job, Store
from ondemand.daemon.supervisor import Supervisor
from ondemand.errors import (
    ClusterUnavailable,
    ProtocolError,
    StorageFull,
    WorkerCrashed,
    WorkerUnavailable,
    from_code,
)
from ondemand.spool import read_npy, write_npy

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BatchServed(Event):
    """A replica answered a batch: which one, when it began (its wall clock), for how long."""

    batch: str
    jobs: tuple[str, ...]
    replica: str
    node: str
    device: str
    started: float
    seconds: float
    cold_start_s: float


class BatchClient:
    """POSTs batches to the Serve application (`cluster.url`)."""

    def __init__(self, cfg: ClusterConfig, worker: WorkerConfig) -> None:
        self.cfg = cfg
        self.worker = worker
        self._session: aiohttp.ClientSession | None = None

    def deadline_s(self, audio_s: float) -> float:
        """A cold start (worker.load_timeout_s) plus the local worker's batch deadline."""
        w = self.worker
        return w.load_timeout_s + max(w.batch_deadline_min_s,
                                      w.batch_deadline_factor * audio_s / w.batch_default_speed)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, op: protocol.Infer, audio_s: float) -> wire.BatchResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        audio = None
        if self.cfg.audio_transport == "body":
            audio = await asyncio.to_thread(
                lambda: {i.job: read_npy(i.audio) for i in op.items})
        body = wire.encode_request(wire.BatchRequest(op=op, audio=audio))
        timeout = self.deadline_s(audio_s)
        url = self.cfg.url
        try:
            async with self._session.post(
                    url, data=body, headers={"Content-Type": wire.CONTENT_TYPE},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                data = await r.read()
                status = r.status
        except aiohttp.ClientConnectorError as e:
            raise ClusterUnavailable(f"cannot reach Ray Serve at {url}: {e}",
                                     retry_after_s=self.cfg.retry_s) from e
        except TimeoutError as e:
            raise WorkerCrashed(f"no answer from the cluster within {timeout:.0f}s "
                                "(worker.load_timeout_s + the batch deadline)") from e
        except aiohttp.ClientError as e:  # sent, then lost: the replica or the proxy died
            raise WorkerCrashed(f"the connection to the replica was lost mid-batch: "
                                f"{type(e).__name__}: {e}") from e
        if status in (404, 503):
            raise ClusterUnavailable(
                f"Ray Serve at {url} cannot take the batch now (HTTP {status}: "
                f"{data[:200].decode('utf-8', 'replace')})", retry_after_s=self.cfg.retry_s)
        if status != 200:
            raise WorkerCrashed(f"the replica failed the batch (HTTP {status}: "
                                f"{data[:200].decode('utf-8', 'replace').strip()}); it died, or "
                                "its node was lost")
        try:
            resp = wire.decode_response(data)
        except ProtocolError as e:
            raise WorkerCrashed(f"the replica answered something that is not a batch result "
                                f"({e}); a replica of another ondemand version?") from e
        if audio is not None and resp.embeddings and isinstance(resp.answer, protocol.Result):
            answer = await asyncio.to_thread(self._write_embeddings, op, resp)
            resp = dataclasses.replace(resp, answer=answer)
        return resp

    @staticmethod
    def _write_embeddings(op: protocol.Infer, resp: wire.BatchResponse) -> protocol.Result:
        """The embeddings that came back in the body, into storage.dir (as the local worker
        writes them); a full disk turns the job's result into insufficient_storage, which the
        dispatcher requeues without counting the attempt."""
        assert isinstance(resp.answer, protocol.Result)
        paths = {i.job: i.embedding for i in op.items if i.embedding}
        results = []
        for r in resp.answer.results:
            path, emb = paths.get(r.job), resp.embeddings.get(r.job)
            if r.error is None and path and emb is not None:
                try:
                    write_npy(Path(path), emb, durable=False)
                except OSError as e:
                    log.warning("job %s: cannot write the embedding: %s", r.job, e)
                    r = protocol.ItemResult(r.job, error=protocol.ErrorInfo(
                        StorageFull.code, f"the embedding could not be written ({e})"))
            results.append(r)
        return dataclasses.replace(resp.answer, results=tuple(results))


class _HttpLease:
    """The dispatcher's `Runner` for one batch (and its halves after an out-of-memory split)."""

    def __init__(self, disp: RayDispatcher) -> None:
        self.disp = disp

    async def infer(self, op: protocol.Infer, *, audio_s: float = 0.0) -> protocol.Result:
        sent = time.time()
        resp = await self.disp.client.post(op, audio_s)
        cold = max(0.0, resp.loaded_at - sent)  # the replica came up for this batch
        answer = resp.answer
        seconds = answer.seconds if isinstance(answer, protocol.Result) else 0.0
        jobs = tuple(i.job for i in op.items)
        for job in jobs:
            self.disp._cold[job] = cold
        log.info("batch %s: %d job(s) on replica %s node %s %s in %.3fs%s", op.batch,
                 len(jobs), resp.replica, resp.node[:8], resp.device, seconds,
                 f" (cold start {cold:.2f}s)" if cold else "")
        self.disp.bus.publish(BatchServed(batch=op.batch, jobs=jobs, replica=resp.replica,
                                          node=resp.node, device=resp.device,
                                          started=resp.started, seconds=seconds,
                                          cold_start_s=cold))
        if isinstance(answer, protocol.BatchFailed):
            raise from_code(answer.code, answer.message)
        return answer


class RayDispatcher(Dispatcher):
    def __init__(
        self,
        store: Store,
        supervisor: Supervisor,
        bus: EventBus,
        queue_cfg: QueueConfig,
        worker_cfg: WorkerConfig,
        cluster: Cluster,
        **common: Any,
    ) -> None:
        super().__init__(store, supervisor, bus, queue_cfg, worker_cfg, **common)
        self.cluster = cluster
        self.client = BatchClient(cluster.cfg, worker_cfg)
        self.max_in_flight = cluster.cfg.max_replicas * cluster.cfg.batches_per_replica
        self._tasks: set[asyncio.Task[float | None]] = set()  # the batches in flight
        self._cold: dict[str, float] = {}  # job -> its batch's cold start, for its timings
        cluster.on_ready(self.wake)

    async def close(self) -> None:
        await super().close()
        await self.client.close()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _device_type(self) -> str:
        return self.cluster.cfg.device_type

    def eta_s(self, position: int, audio_s: float = 0.0) -> float:
        per_job = self.job_compute_s if self.job_compute_s is not None else 0.5
        parallel = max(1, min(self.max_in_flight, len(self.cluster.replicas) or 1))
        eta = position * per_job / parallel + max(per_job, audio_s / self._speed())
        if not any(r.state in ("idle", "busy") for r in self.cluster.replicas.values()):
            eta += self.cluster.last_load_s if self.cluster.last_load_s is not None else 10.0
        return round(eta, 3)

    def _timings(self, job: Job, cold_s: float,  # type: ignore[override]
                 compute_s: float | None) -> dict[str, float | None]:
        return Dispatcher._timings(job, self._cold.pop(job.id, cold_s), compute_s)

    # -- the loop ----------------------------------------------------------------------------
    async def _serve(self, jobs: list[Job]) -> float | None:
        try:
            self.cluster.check_ready()
        except ClusterUnavailable as e:
            log.info("dispatcher: %s", e.message)
            return e.retry_after_s
        tasks = self._tasks
        retry: float | None = None
        try:
            while not self._stopping and retry is None:
                self._wake.clear()
                if len(tasks) < self.max_in_flight:
                    queued = await self.store.queued(SCAN_LIMIT)
                    if queued:
                        batch = await self._start(self._form_batch(queued))
                        if batch:
                            tasks.add(asyncio.create_task(self._remote(batch),
                                                          name="ray-batch"))
                        continue
                    if not tasks:
                        break
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    done, _ = await asyncio.wait({*tasks, waker},
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
                for t in done & tasks:
                    tasks.discard(t)
                    retry = t.result() if retry is None else retry
        finally:
            if tasks:
                # On cancellation (a shutdown past server.stop_timeout_s) the batches are cut:
                # their jobs stay in _running and close() requeues them.
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                tasks.clear()
                for o in outcomes:
                    if isinstance(o, _Abandoned):
                        raise o
                    if isinstance(o, BaseException) and not isinstance(
                            o, asyncio.CancelledError):
                        raise o
        return retry

    async def _start(self, batch: list[Job]) -> list[Job]:
        """Mark the batch running (before the next batch is formed, so no job is in two)."""
        started = time.time()
        moved = set(await self.store.mark_running([j.id for j in batch], started))
        batch = [j for j in batch if j.id in moved]
        for j in batch:
            j.attempts += 1
            j.started = started
        if batch:
            self.bus.publish(JobsStarted(jobs=tuple(j.id for j in batch)))
        self._running.extend(batch)
        return batch

    async def _remote(self, batch: list[Job]) -> float | None:
        """One batch on the cluster; returns seconds to wait before the next when the cluster
        could not take it, else None."""
        try:
            await self._infer(_HttpLease(self), batch, 0.0)
        except WorkerCrashed as e:
            self._done(batch)
            await self._crashed(batch, e)
        except WorkerUnavailable as e:
            self._done(batch)
            ids = [j.id for j in batch]
            log.warning("dispatcher: %s; %d job(s) back in the queue (attempt not counted)",
                        e.message, len(ids))
            await self._durable(f"requeueing {len(ids)} job(s)",
                                lambda: self.store.requeue(ids, refund=True))
            return e.retry_after_s or self.cluster.cfg.retry_s
        else:
            self._done(batch)
        return None

    def _done(self, batch: list[Job]) -> None:
        self._forget_running(batch)
        for j in batch:
            self._cold.pop(j.id, None)
            self.progress.pop(j.id, None)

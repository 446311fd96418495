"""The engine as a Ray Serve replica (`cluster.backend = "ray"`, docs/cluster.md).

Runs inside Ray's replica processes, never in the front end: the Serve application is deployed
by the cluster agent from the import path `ondemand.worker.ray_replica:build` (the same path a
KubeRay RayService names), and the replica imports torch through the backend exactly as the local
worker does.  ray is imported lazily, only here and in the agent (tests/test_layout.py).

One replica = one engine = one `Worker` of worker/main.py: the same batch code (spool reads,
NaN checks, embeddings, per-job errors) as the local worker process, so results are identical.
A batch arrives as one HTTP request (cluster/wire.py); the replica answers it with exactly one
Result or BatchFailed in a 200, also when the batch fails: a 5xx therefore always means the
replica (or Ray) failed, which the front end counts as a crash (attempts, requeue).  Batches run
one at a time on the engine (`_lock`); Serve's max_ongoing_requests may queue more at the
replica (`cluster.batches_per_replica`).

Lifecycle reports: the replica tells the registry actor (`Registry`, named `ondemand-registry`,
detached, 0 CPUs) when it starts loading, becomes idle, busy, idle again and when it stops
gracefully; the agent relays them to the front end, where the cost ledger and /v1/status use
them.  A replica killed outright reports nothing: the agent sees the controller drop it.
Reports are fire-and-forget: a missing registry never fails a batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pkgutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ondemand import protocol as p
from ondemand.cluster import messages, wire
from ondemand.spool import read_npy, write_npy
from ondemand.worker.main import Backend, Worker

log = logging.getLogger("ondemand.worker.ray_replica")

REGISTRY = "ondemand-registry"
NAMESPACE = "ondemand"
DEPLOYMENT = "Replica"
REGISTRY_EVENTS = 10000  # events the registry keeps for a slow or restarting agent


class Registry:
    """The replicas' lifecycle log (a Ray actor): replicas `report` encoded ReplicaEvent lines,
    the agent reads them in order with `since(seq)`.  `latest` keeps each replica's last line, so
    an agent that starts after a replica (a restarted front end) still learns its state."""

    def __init__(self) -> None:
        self._seq = 0
        self._log: collections.deque[tuple[int, str]] = collections.deque(maxlen=REGISTRY_EVENTS)
        self._latest: dict[str, str] = {}

    def report(self, line: str) -> None:
        self._seq += 1
        self._log.append((self._seq, line))
        event = messages.decode_event(line)
        if isinstance(event, messages.ReplicaEvent):
            if event.state == "exited":
                self._latest.pop(event.replica, None)
            else:
                self._latest[event.replica] = line

    def since(self, seq: int) -> tuple[int, list[str]]:
        """(the newest seq, the lines after `seq`); from 0 (or a seq the log no longer holds):
        the last line of every live replica instead of the history."""
        if seq <= 0 or (self._log and self._log[0][0] > seq + 1):
            return self._seq, list(self._latest.values())
        return self._seq, [line for s, line in self._log if s > seq]

    def forget(self, replica: str) -> None:
        self._latest.pop(replica, None)


def _backend(path: str) -> Backend:
    """The engine backend named "module:Class": worker/backend.py's TorchBackend unless a test
    injects another (the replica's counterpart of `worker.command`)."""
    factory = pkgutil.resolve_name(path)
    backend: Backend = factory()
    return backend


def _discard() -> Any:
    """The Worker's protocol stream: unused here (answers travel in the HTTP response)."""
    return open(os.devnull, "w")  # lives as long as the replica


class Replica:
    """The Serve deployment's class (deployed by `build`)."""

    def __init__(self, spec_json: str) -> None:
        import ray
        from ray import serve

        started = time.time()
        self._spec = messages.decode_spec(spec_json)
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.app = ctx.app_name
        self.node = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.pid = os.getpid()
        self.device = self._spec.device
        self._registry: Any = None
        self._report("loading", at=started)
        backend = _backend(self._spec.backend)
        r = self._spec
        info = backend.load(p.Load(model=r.model, revision=r.revision, cache_dir=r.cache_dir,
                                   device=r.device, dtype=r.dtype))
        self.worker = Worker(backend, _discard())
        self.worker.loaded = True
        self.device = info.device
        self.loaded_at = time.time()
        self._lock = asyncio.Lock()
        self._stopped = False
        log.info("replica %s loaded on %s (%s) in %.2fs", self.id, self.node[:8], self.device,
                 self.loaded_at - started)
        self._report("idle", at=self.loaded_at, load_s=self.loaded_at - started)

    # -- lifecycle reports ------------------------------------------------------------------
    def _report(self, state: str, *, at: float, load_s: float | None = None,
                reason: str = "") -> None:
        import ray

        line = messages.encode(messages.ReplicaEvent(
            replica=self.id, node=self.node, node_ip=self.node_ip, pid=self.pid,
            device=self.device, state=state, at=at, load_s=load_s, reason=reason,
            app=self.app))
        try:
            if self._registry is None:
                self._registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
            self._registry.report.remote(line)
        except Exception as e:  # no agent yet: the controller still lists us; nothing fails
            self._registry = None
            log.debug("replica %s: cannot report %s: %s", self.id, state, e)

    def __del__(self) -> None:
        # Serve calls this on a graceful stop (downscale, redeploy); a killed replica never
        # gets here and the agent reports its exit instead.
        if getattr(self, "_stopped", True) is False:
            self._stopped = True
            self._report("exited", at=time.time(), reason="stopped")

    def check_health(self) -> None:
        """Serve's periodic health check: the engine is loaded."""
        if not self.worker.loaded:
            raise RuntimeError("the model is not loaded")

    # -- batches ------------------------------------------------------------------------------
    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        req = wire.decode_request(await request.body())
        async with self._lock:
            started = time.time()
            self._report("busy", at=started)
            try:
                answer, embeddings = await asyncio.to_thread(self._run, req)
            finally:
                self._report("idle", at=time.time())
        body = wire.encode_response(wire.BatchResponse(
            answer=answer, replica=self.id, node=self.node, device=self.device, pid=self.pid,
            started=started, loaded_at=self.loaded_at, embeddings=embeddings))
        return Response(body, media_type=wire.CONTENT_TYPE)

    def _run(self, req: wire.BatchRequest) -> tuple[p.Result | p.BatchFailed,
                                                    dict[str, np.ndarray]]:
        op = req.op
        if req.audio is None:  # audio_transport = "path": the shared storage.dir
            return self.worker._run_batch(op, time.perf_counter()), {}
        # The audio came in the body: spool it locally so the batch runs through the very same
        # code as the local worker's, then hand the embeddings back in the answer.
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ondemand-batch-") as tmp:
            items = []
            for item in op.items:
                audio = Path(tmp, f"{item.job}.npy")
                write_npy(audio, req.audio[item.job], durable=False)
                emb = str(Path(tmp, f"{item.job}.emb.npy")) if item.embedding else None
                items.append(p.InferItem(job=item.job, key=item.key, audio=str(audio),
                                         embedding=emb))
            local = p.Infer(batch=op.batch, granularity=op.granularity, items=tuple(items),
                            batch_audio_s=op.batch_audio_s)
            answer = self.worker._run_batch(local, t0)
            embeddings = {}
            if isinstance(answer, p.Result):
                ok = {r.job for r in answer.results if r.error is None}
                for item in items:
                    if item.embedding and item.job in ok and Path(item.embedding).exists():
                        embeddings[item.job] = read_npy(item.embedding)
        return answer, embeddings


def build(args: dict[str, Any]) -> Any:
    """The Serve application builder (`import_path: ondemand.worker.ray_replica:build`);
    `args["spec"]` is messages.encode_spec(ReplicaSpec).  Autoscaling, resources and
    max_ongoing_requests come from the application config's deployment overrides."""
    from ray import serve

    deployment: Any = serve.deployment(Replica, name=DEPLOYMENT)
    return deployment.bind(args["spec"])

"""The cluster backend in the daemon: its cleanup context and what the routes need from it.

`context(cfg, ...)` is the component `build_app` lists after the supervisor and before the
dispatcher: with `cluster.backend = "ray"` it starts the `Cluster` (the agent process, the
replica table, holds) and stops it after the dispatcher has finished; with "local" it does
nothing, and nothing of Ray is imported or started.  The helpers below are the one place the
routes (daemon/api.py), the prewarm scheduler and the dispatcher's construction ask "local or
ray?": holds go to the supervisor or the cluster, /v1/status gains `cluster`, /readyz its reason.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ondemand.cluster.dispatch import RayDispatcher
from ondemand.cluster.link import Cluster
from ondemand.config import Config
from ondemand.daemon import api
from ondemand.daemon.dispatcher import Dispatcher

CLUSTER = web.AppKey("cluster", Cluster)

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def context(
    cfg: Config,
    *,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    replica_backend: str | None = None,
) -> CleanupCtx:
    """The cluster component.  `command` (the agent's), `env` (the replicas' extra environment)
    and `replica_backend` are the injected boundaries for tests."""

    async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
        if cfg.cluster.backend != "ray":
            yield
            return
        cluster = Cluster(cfg, app[api.BUS], command=command, env=env,
                          replica_backend=replica_backend)
        cluster.start()
        app[CLUSTER] = cluster
        with app[api.GUARD].watching(cluster.task):
            yield
        await cluster.close()

    return cluster_ctx


def dispatcher(app: web.Application, cfg: Config) -> Dispatcher:
    """The dispatcher for the configured backend."""
    common: dict[str, Any] = {"stop_timeout_s": cfg.server.stop_timeout_s,
                              "storage_cfg": cfg.storage, "segments_cfg": cfg.segments}
    store, sup, bus = app[api.STORE], app[api.SUPERVISOR], app[api.BUS]
    if cfg.cluster.backend == "ray":
        return RayDispatcher(store, sup, bus, cfg.queue, cfg.worker, app[CLUSTER], **common)
    return Dispatcher(store, sup, bus, cfg.queue, cfg.worker, **common)


async def hold(app: web.Application, trigger: str, hold_s: float, *, wait: bool) -> None:
    """A hold (prewarm window, manual load): the local worker's, or replicas on the cluster."""
    cluster = app.get(CLUSTER)
    if cluster is not None:
        await cluster.hold(trigger, hold_s, wait=wait)
    else:
        await app[api.SUPERVISOR].load(trigger, hold_s=hold_s, wait=wait)


async def release(app: web.Application, trigger: str, *, exit: bool) -> None:
    cluster = app.get(CLUSTER)
    if cluster is not None:
        await cluster.release(trigger)
    else:
        await app[api.SUPERVISOR].unload(trigger, exit=exit)


def hold_status(app: web.Application) -> tuple[float | None, str | None]:
    """(seconds the hold still lasts, its trigger), or (None, None)."""
    cluster = app.get(CLUSTER)
    if cluster is not None:
        left = cluster.hold_left_s()
        return left, (cluster.status()["hold_trigger"] if left else None)
    w = app[api.SUPERVISOR].status()
    return w.hold_s, w.hold_trigger


def unready_reason(app: web.Application) -> str | None:
    cluster = app.get(CLUSTER)
    return cluster.unready_reason() if cluster is not None else None


def status(app: web.Application) -> dict[str, Any]:
    """`/v1/status` `cluster`: the backend and one entry per live replica (docs/api.md).  The
    local backend's one replica is the worker process, while it exists."""
    cluster = app.get(CLUSTER)
    if cluster is not None:
        doc = cluster.status()
        disp = app[api.DISPATCHER]
        doc["in_flight"] = disp.in_flight if isinstance(disp, RayDispatcher) else 0
        return doc
    w = app[api.SUPERVISOR].status()
    replicas = []
    if w.pid is not None:
        loaded = w.state.value == "ready"
        replicas.append({
            "id": f"local-{w.pid}", "node": socket.gethostname(), "node_ip": "127.0.0.1",
            "pid": w.pid, "state": ("busy" if w.in_flight else "idle") if loaded
            else w.state.value, "device": w.device, "since": None, "started": None,
            "loaded_since": None,  # the supervisor keeps no wall time of its load
        })
    return {"backend": "local", "replicas": replicas}


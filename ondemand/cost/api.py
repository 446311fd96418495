"""Cost accounting in the daemon: its cleanup context, `GET /v1/cost` and `GET /metrics`.

`context(cfg, gpu=...)` is the accounting component; `build_app` lists it FIRST among the app's
components: it opens the GPU probe (shared with the supervisor through `app[GPU]`) and the
ledger before the supervisor starts, and closes them after the supervisor has stopped the worker,
so the shutdown's stopping -> cold transitions are still recorded.  `add_routes(app)` adds the
two routes.

Neither handler touches the supervisor: a scrape or a cost report is never activity (no lease,
no idle-timer reset), like the health checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ondemand.config import Config
from ondemand.cost import report as cost
from ondemand.cost.accounting import Accounting
from ondemand.cost.ledger import Ledger, connect, read_intervals
from ondemand.cost.metrics import CONTENT_TYPE
from ondemand.cost.replicas import (
    ReplicaAccounting,
    ReplicaLedger,
    cluster_report,
    read_replica_intervals,
    units,
)
from ondemand.cost.tokens import TokenMetrics, add_tokens
from ondemand.daemon import api
from ondemand.daemon.http import json_response
from ondemand.daemon.store import QUEUED
from ondemand.errors import BadRequest
from ondemand.gpu import GpuProbe, open_probe

GPU: web.AppKey[Any] = web.AppKey("gpu_probe")
TOKEN_METRICS = web.AppKey("token_metrics", TokenMetrics)
ACCOUNTING = web.AppKey("accounting", Accounting)
REPLICAS = web.AppKey("replica_accounting", ReplicaAccounting)  # cluster.backend = "ray" only


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def context(cfg: Config, *, gpu: GpuProbe | None = None) -> CleanupCtx:
    """The accounting component (GPU probe, ledger, sampler, metrics) as a cleanup context."""

    async def cost_ctx(app: web.Application) -> AsyncIterator[None]:
        probe = gpu if gpu is not None else open_probe(cfg.cost.probe)
        app[GPU] = probe
        ledger = Ledger.in_dir(Path(cfg.storage.dir))
        acc = Accounting(cfg.cost, cfg.worker, ledger, probe)
        acc.start(app[api.BUS])
        app[ACCOUNTING] = acc
        replicas = None
        if cfg.cluster.backend == "ray":  # each replica's lifetime (cost/replicas.py)
            replicas = ReplicaAccounting(cfg.cost, cfg.cluster, ReplicaLedger(ledger.path))
            replicas.start(app[api.BUS])
            app[REPLICAS] = replicas
        try:
            yield
        finally:
            if replicas is not None:
                replicas.close()
                replicas.ledger.close_db()
            acc.close()
            ledger.close_db()
            if gpu is None:
                probe.close()

    return cost_ctx


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/cost", get_cost)
    app.router.add_get("/metrics", get_metrics)
    app[TOKEN_METRICS] = TokenMetrics()


def cost_document(
    ledger_path: Path,
    cfg: Config,
    *,
    since: float | None,
    until: float | None,
    probe: dict[str, Any] | None,
    now: float | None = None,
) -> dict[str, Any]:
    """The cost document from the ledger file, on its own read-only connection (safe in a
    thread, beside the daemon's writer: SQLite WAL)."""
    conn = connect(ledger_path, readonly=True)
    now = time.time() if now is None else now
    try:
        doc = cost.document(
            lambda lo, hi: read_intervals(conn, lo, hi),
            now,
            cfg.cost,
            cfg.worker,
            since=since,
            until=until,
            probe=probe,
        )
        _add_replicas(doc, conn, cfg, now)
        return doc
    finally:
        conn.close()


def _add_replicas(doc: dict[str, Any], conn: Any, cfg: Config, now: float) -> None:
    """Each period gains `cluster` (the Ray replicas' figures, summed and per node) and `total`
    (local worker + replicas); docs/cluster.md, "Costs"."""
    for period in doc["periods"]:
        lo, hi = cost.parse_when(period["since"], now), cost.parse_when(period["until"], now)
        ivs = read_replica_intervals(conn, lo, hi)
        if not ivs and cfg.cluster.backend != "ray":
            continue
        c = cluster_report(ivs, lo, hi, now, cfg.cost, covered_hours=period["covered_hours"],
                           max_replicas=cfg.cluster.max_replicas, units=units(cfg.cluster))
        period["cluster"] = c
        local = period["cost"]
        period["total"] = {"on_demand_usd": local["on_demand_usd"] + c["on_demand_usd"],
                           "idle_usd": local["idle_usd"] + c["idle_usd"],
                           "gpu_hours": period["hours"]["gpu_held"] + c["gpu_hours"]}


def _when(request: web.Request, key: str, now: float) -> float | None:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return None
    try:
        return cost.parse_when(raw, now)
    except ValueError as e:
        raise BadRequest(f"{key}: {e}") from e


async def get_cost(request: web.Request) -> web.Response:
    """`GET /v1/cost[?since=30d][&until=...]`: the last 24 h and 30 days by default."""
    acc = request.app[ACCOUNTING]
    now = time.time()
    since, until = _when(request, "since", now), _when(request, "until", now)
    try:
        doc = await asyncio.to_thread(
            cost_document,
            acc.ledger.path,
            request.app[api.CONFIG],
            since=since,
            until=until,
            probe=acc.probe_info(),
            now=now,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from e
    store = request.app[api.STORE]
    spans = [(cost.parse_when(p["since"], now), cost.parse_when(p["until"], now))
             for p in doc["periods"]]
    found = {span: await store.usage(*span) for span in spans}
    return json_response(add_tokens(doc, lambda lo, hi: found[(lo, hi)]))


async def get_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format from the daemon's own registry."""
    acc = request.app[ACCOUNTING]
    store = request.app[api.STORE]
    acc.metrics.jobs_queued.set((await store.counts()).get(QUEUED, 0))
    body = acc.metrics.exposition() + request.app[TOKEN_METRICS].exposition(await store.usage())
    replicas = request.app.get(REPLICAS)
    if replicas is not None:  # ray: the replicas' series (cost/replicas.py)
        body += replicas.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

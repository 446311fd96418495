"""The aiohttp front end: assembles the daemon and owns every component through `cleanup_ctx`.

Never imports torch (tests/test_layout.py proves it).  The start-up order is the one literal
list `components` in `build_app`; shutdown runs it in reverse (aiohttp cleanup_ctx):

1. accounting (cost/api.py): GPU probe, ledger, sampler, metrics: first up, last down, so the
   shutdown's state changes are still recorded;
2. store: opens SQLite and recovers interrupted jobs;
3. supervisor: owns the worker; on the way down stops it (ask, wait, SIGKILL, reap);
3b. cluster (cluster/api.py): with cluster.backend = "ray", the Ray cluster's agent, replicas
   and holds; nothing at all with "local";
4. dispatcher (cluster/dispatch.py's RayDispatcher with "ray"): on the way down lets its batches
   finish (bounded by server.stop_timeout_s);
5. webhooks (daemon/webhooks.py): the callback delivery task; stops before the store closes
   and after the dispatcher's last outcomes (an attempt cut short runs again after a restart);
6. purge timer;
7. prewarm scheduler (prewarm/api.py): no hold starts during shutdown;
8. event log (daemon/events_api.py, GET /v1/events): last up, first down; open streams end
   at `on_shutdown`, before any of this.

Middlewares: errors first (outermost: it renders what the others raise), then bearer tokens and
scopes (daemon/auth.py).

Each component's long-lived task is watched by the app's TaskGuard (`app[api.GUARD]`,
daemon/guard.py): one that ends unasked turns /readyz 503 with the reason, logs one ERROR line
naming it, and makes `serve()` stop in order and return exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from ondemand.cluster import api as cluster_api
from ondemand.config import Config
from ondemand.console import routes as console
from ondemand.cost import api as cost_api
from ondemand.daemon import api, auth, events_api, jobs_api, listen, openapi, webhooks
from ondemand.daemon import lock as storage_lock
from ondemand.daemon.auth import check_bind
from ondemand.daemon.events import EventBus
from ondemand.daemon.guard import TaskGuard
from ondemand.daemon.http import error_middleware, make_runner
from ondemand.daemon.store import Store
from ondemand.daemon.supervisor import Spawn, Supervisor
from ondemand.daemon.upload import Intake
from ondemand.errors import StorageUnavailable
from ondemand.gpu import GpuProbe
from ondemand.prewarm import api as prewarm_api

log = logging.getLogger(__name__)

__all__ = ["build_app", "check_bind", "drain", "serve"]


def build_app(
    cfg: Config,
    *,
    spawn: Spawn | None = None,
    gpu: GpuProbe | None = None,
    cluster: dict[str, Any] | None = None,
) -> web.Application:
    """The daemon's app.  `spawn` and `gpu` are the injected boundaries (tests: fake worker);
    `cluster` the cluster component's (cluster_api.context's keyword arguments)."""
    app = web.Application(
        middlewares=[error_middleware, auth.middleware(cfg)],
        client_max_size=int(cfg.server.max_upload_mb * 1024 * 1024) + 1024 * 1024,
    )
    app[api.CONFIG] = cfg
    bus = EventBus()
    app[api.BUS] = bus
    app[api.WATCH] = api.JobWatch(bus)
    app[api.DRAINING] = asyncio.Event()
    app[api.INTAKE] = Intake(cfg)
    app[auth.LIMITER] = auth.SubmitLimiter()
    guard = TaskGuard()
    app[api.GUARD] = guard

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = Store(Path(cfg.storage.dir), max_pending=cfg.queue.max_pending)
        await store.open()
        app[api.STORE] = store
        yield
        await store.close()

    async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
        probe = app[cost_api.GPU]  # opened (and closed) by cost_api's context, shared
        worker = cfg.worker
        if cfg.cluster.backend != "local":  # Ray's replicas run the batches: no local standby
            worker = dataclasses.replace(worker, standby=False)
        sup = Supervisor(worker, cfg.model, bus, spawn=spawn, gpu=probe)
        sup.start()
        app[api.SUPERVISOR] = sup
        with guard.watching(sup.task):
            yield
        await sup.close()

    async def dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
        disp = cluster_api.dispatcher(app, cfg)
        disp.start()
        app[api.DISPATCHER] = disp
        with guard.watching(disp.task):
            yield
        await disp.close()

    async def purge_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_purge_loop(app[api.STORE], cfg), name="purge")
        with guard.watching(task):
            yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # a death was reported
            await task

    # The order is the start-up order; shutdown runs it backwards (see the module docstring).
    components = [
        cost_api.context(cfg, gpu=gpu),
        store_ctx,
        supervisor_ctx,
        cluster_api.context(cfg, **(cluster or {})),
        dispatcher_ctx,
        webhooks.context(cfg),
        purge_ctx,
        prewarm_api.context(cfg),
        events_api.context(cfg),
    ]
    app.cleanup_ctx.extend(components)
    api.add_routes(app)
    cost_api.add_routes(app)
    prewarm_api.add_routes(app)
    openapi.add_routes(app)
    jobs_api.add_routes(app)
    events_api.add_routes(app)
    console.setup(app, cfg)  # the web page at / (no token needed for the page itself)
    return app


async def _purge_loop(store: Store, cfg: Config) -> None:
    retain_s = cfg.queue.retain_results_h * 3600
    while True:
        try:
            await store.purge(time.time() - retain_s)
        except StorageUnavailable:
            pass  # the store logged the failing database once; a line per purge would be noise
        except Exception:
            log.exception("purge failed; retrying in %gs", cfg.queue.purge_interval_s)
        await asyncio.sleep(cfg.queue.purge_interval_s)


async def drain(app: web.Application) -> None:
    """First step of a graceful stop, while the socket still answers: refuse new work with 503
    shutting_down (and wake long-polls), let the running batch finish within
    server.stop_timeout_s (else requeue it), start no new batch.  Queued jobs stay in the store
    for the next start.  The runner's cleanup then unloads and stops the worker."""
    app[api.GUARD].close()  # from here on, owner tasks end on purpose
    app[api.DRAINING].set()
    await app[api.DISPATCHER].close()


async def serve(cfg: Config, *, ready: asyncio.Event | None = None) -> int:
    """Run the daemon until SIGINT/SIGTERM (signals only set a flag; shutdown is orderly), or
    until an owner task fails (daemon/guard.py).  Returns the exit status: 0 after a signal, 1
    after a failed task, so the service manager restarts the daemon.
    Under systemd (Type=notify) it sends READY=1 once listening, STATUS= lines, watchdog pings
    and STOPPING=1 (ondemand/daemon/service.py).

    Start-up order: signal handlers first (a signal at any later point stops the daemon in order,
    never a traceback); then storage.dir's lock (daemon/lock.py), before anything in it is opened
    or recovered; then the listening sockets (daemon/listen.py); only then the components, whose
    store and ledger check their databases.  Each refusal is an OndemandError with one line
    (exit 2 from the CLI): storage.dir unusable or held by another daemon, a damaged job
    database, the port in use (issue 10)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # `ondemand serve` blocks both until here, so one sent during the imports waits for the
    # handler above instead of raising KeyboardInterrupt inside an import (commands/daemon_cmds).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    check_bind(cfg)
    with contextlib.ExitStack() as resources:  # released in reverse order, however it ends
        resources.callback(storage_lock.acquire(Path(cfg.storage.dir)).release)
        socks = listen.bind(cfg.server.host, cfg.server.port)
        for sock in socks:
            resources.callback(sock.close)
        return await _run(cfg, socks, stop, ready)


async def _run(cfg: Config, socks: list[socket.socket], stop: asyncio.Event,
               ready: asyncio.Event | None) -> int:
    """The app on the bound sockets until `stop`, then drain and clean up.  Returns the exit
    status (1 when an owner task failed)."""
    from ondemand.daemon.sdnotify import Notifier
    from ondemand.daemon.service import ServiceNotifier

    app = build_app(cfg)
    guard = app[api.GUARD]
    guard.on_failure(lambda _reason: stop.set())
    notifier = Notifier()
    service: ServiceNotifier | None = None
    runner = make_runner(app, cfg.server, handle_signals=False, access_log=None)
    try:
        await runner.setup()  # opens (and checks) the ledger and the store
        if not stop.is_set():  # a signal during start-up: stop without ever serving
            for sock in socks:
                await web.SockSite(runner, sock,
                                   shutdown_timeout=cfg.server.stop_timeout_s).start()
            for addr in runner.addresses:
                host, port = addr[:2]
                log.info("ondemand serving on http://%s:%d (storage %s)", host, port,
                         Path(cfg.storage.dir).resolve())
            service = ServiceNotifier(app, notifier)
            await service.tick(ping=False)  # STATUS first: `systemctl status` never shows nothing
            notifier.ready()
            service.start()
            if ready is not None:
                ready.set()
            await stop.wait()
        log.info("ondemand shutting down: draining (server.stop_timeout_s=%g)",
                 cfg.server.stop_timeout_s)
        notifier.stopping("stopping: running batch finishing, queued jobs kept")
        await drain(app)
    finally:
        if service is not None:
            await service.close()
        await runner.cleanup()
        notifier.close()
    if guard.failed is not None:
        log.error("ondemand stopped with exit status 1: %s", guard.failed)
        return 1
    return 0

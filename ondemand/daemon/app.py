"""The aiohttp front end: assembles the daemon and owns every component through `cleanup_ctx`.

Never imports torch (tests/test_daemon_api.py proves it).  Start-up order: store (recovers
interrupted jobs), supervisor, dispatcher, purge timer; shutdown runs in reverse: the purge stops,
the dispatcher lets its batch finish (bounded by server.stop_timeout_s), the supervisor stops the
worker (ask, wait, SIGKILL, reap), the store closes.

Extension points for other components (prewarm scheduler, cost ledger, metrics): build the app
with `build_app()`, subscribe to `app[BUS]` before it starts, and append your own cleanup context
*after* ours (it then starts after and stops before the supervisor); use `app[SUPERVISOR].load(
"schedule:<name>", hold_s=...)` for holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from ondemand.config import Config
from ondemand.console import routes as console
from ondemand.cost import api as cost_api
from ondemand.daemon import api, events_api, jobs_api
from ondemand.daemon.dispatcher import Dispatcher
from ondemand.daemon.events import EventBus
from ondemand.daemon.http import Handler, Unauthorized, error_middleware, response_for
from ondemand.daemon.store import Store
from ondemand.daemon.supervisor import Spawn, Supervisor
from ondemand.errors import ConfigError
from ondemand.gpu import GpuProbe
from ondemand.prewarm import api as prewarm_api

log = logging.getLogger(__name__)

# Everything else needs the bearer token when one is set (issue 6: "every endpoint except
# /healthz"); /readyz reports queue and worker state, so it is behind the token too.
OPEN_PATHS = ("/healthz",)


def check_bind(cfg: Config) -> None:
    """Refuse to listen beyond loopback without a token unless explicitly allowed."""
    host = cfg.server.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not cfg.auth_token() and not cfg.server.allow_insecure_bind:
        raise ConfigError(
            f"server.host: {host!r} is reachable from other machines but no server.token (or "
            "ONDEMAND_TOKEN) is set; set a token, bind 127.0.0.1, or set "
            "server.allow_insecure_bind = true"
        )


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path not in OPEN_PATHS and not console.is_public(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return response_for(Unauthorized(
                    "missing or wrong bearer token; send `Authorization: Bearer <token>` "
                    "(server.token / ONDEMAND_TOKEN)"))
        return await handler(request)

    return auth


def build_app(
    cfg: Config,
    *,
    spawn: Spawn | None = None,
    gpu: GpuProbe | None = None,
) -> web.Application:
    """The daemon's app.  `spawn` and `gpu` are the injected boundaries (tests: fake worker)."""
    app = web.Application(
        middlewares=[error_middleware, _auth_middleware(cfg.auth_token())],
        client_max_size=int(cfg.server.max_upload_mb * 1024 * 1024) + 1024 * 1024,
    )
    app[api.CONFIG] = cfg
    bus = EventBus()
    app[api.BUS] = bus
    app[api.WATCH] = api.JobWatch(bus)
    app[api.DRAINING] = asyncio.Event()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = Store(Path(cfg.storage.dir), max_pending=cfg.queue.max_pending)
        await store.open()
        app[api.STORE] = store
        yield
        await store.close()

    async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
        probe = app[cost_api.GPU]  # opened (and closed) by cost_api's context, shared
        sup = Supervisor(cfg.worker, cfg.model, bus, spawn=spawn, gpu=probe)
        sup.start()
        app[api.SUPERVISOR] = sup
        yield
        await sup.close()

    async def dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
        disp = Dispatcher(app[api.STORE], app[api.SUPERVISOR], bus, cfg.queue, cfg.worker,
                          stop_timeout_s=cfg.server.stop_timeout_s)
        disp.start()
        app[api.DISPATCHER] = disp
        yield
        await disp.close()

    async def purge_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_purge_loop(app[api.STORE], cfg), name="purge")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.extend([store_ctx, supervisor_ctx, dispatcher_ctx, purge_ctx])
    api.add_routes(app)
    cost_api.setup(app, cfg, gpu=gpu)  # ledger + sampler + metrics: first up, last down
    prewarm_api.setup(app, cfg)  # scheduled holds: last up, first down
    jobs_api.add_routes(app)  # GET /v1/jobs: the recent-jobs listing
    events_api.setup(app, cfg)  # GET /v1/events (SSE): up after prewarm, down before it
    console.setup(app, cfg)  # the web page at / (no token needed for the page itself)
    return app


async def _purge_loop(store: Store, cfg: Config) -> None:
    retain_s = cfg.queue.retain_results_h * 3600
    while True:
        try:
            await store.purge(time.time() - retain_s)
        except Exception:
            log.exception("purge failed; retrying in %gs", cfg.queue.purge_interval_s)
        await asyncio.sleep(cfg.queue.purge_interval_s)


async def drain(app: web.Application) -> None:
    """First step of a graceful stop, while the socket still answers: refuse new work with 503
    shutting_down (and wake long-polls), let the running batch finish within
    server.stop_timeout_s (else requeue it), start no new batch.  Queued jobs stay in the store
    for the next start.  The runner's cleanup then unloads and stops the worker."""
    app[api.DRAINING].set()
    await app[api.DISPATCHER].close()


async def serve(cfg: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGINT/SIGTERM (signals only set a flag; shutdown is orderly).
    Under systemd (Type=notify) it sends READY=1 once listening, STATUS= lines, watchdog pings
    and STOPPING=1 (ondemand/daemon/service.py)."""
    import signal

    from ondemand.daemon.sdnotify import Notifier
    from ondemand.daemon.service import ServiceNotifier

    check_bind(cfg)
    app = build_app(cfg)
    notifier = Notifier()
    service: ServiceNotifier | None = None
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, cfg.server.host, cfg.server.port,
                           shutdown_timeout=cfg.server.stop_timeout_s)
        await site.start()
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

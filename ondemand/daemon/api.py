"""HTTP API v1 handlers.  Errors are raised as OndemandError and rendered by daemon/http.py.

Submission path (the only hot path): read the upload under `server.max_upload_mb` and
`server.read_timeout_s`, decode and validate it in a thread, `server.max_concurrent_decodes` at a
time (daemon/upload.py: bad input never reaches the queue, let alone the GPU), spool the 16 kHz
float32 samples with fsync, commit the row (group-committed), and only then answer 202.
Every JSON answer goes through http.json_response (NaN and Infinity are refused, not written).

Tokens (daemon/auth.py): a job records the name of the token that submitted it (`owner`); a
token without `admin` sees only its own jobs (another's answers 404, as if it did not exist).
A submission is counted against its token's `submits_per_minute` before its body is read, and
against its `max_pending` in the insert's transaction.  `callback_url` (query or form field) is
checked against `webhooks.allowed_hosts` before the body is decoded (daemon/destinations.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import PurePath
from typing import Any

from aiohttp import web

from ondemand import protocol, segments
from ondemand.audio import Limits
from ondemand.cluster import api as cluster_api
from ondemand.config import Config
from ondemand.daemon import auth
from ondemand.daemon.destinations import check_callback
from ondemand.daemon.dispatcher import Dispatcher
from ondemand.daemon.events import EventBus, JobFinished, JobQueued
from ondemand.daemon.guard import TaskGuard
from ondemand.daemon.http import json_response
from ondemand.daemon.store import (
    FINAL,
    QUEUED,
    Job,
    Store,
)
from ondemand.daemon.supervisor import Supervisor
from ondemand.daemon.upload import Intake
from ondemand.errors import (
    BadRequest,
    JobConflict,
    JobNotFound,
    OndemandError,
    RequestTimeout,
    ShuttingDown,
    StorageFull,
)
from ondemand.protocol import GRANULARITIES

MAX_KEY_CHARS = 200
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")

CONFIG = web.AppKey("config", Config)
BUS = web.AppKey("bus", EventBus)
STORE = web.AppKey("store", Store)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
INTAKE = web.AppKey("intake", Intake)
GUARD = web.AppKey("guard", TaskGuard)  # the owner tasks, watched (daemon/guard.py)
# Set when SIGTERM starts the drain (app.drain): new work is refused with 503 shutting_down,
# long-polls return at once, /readyz turns 503; queued jobs stay for the next start.
DRAINING = web.AppKey("draining", asyncio.Event)
DRAIN_RETRY_AFTER_S = 10.0


class JobWatch:
    """Wakes long-polls when a job reaches a final state (fed by JobFinished events)."""

    def __init__(self, bus: EventBus) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        bus.subscribe(self._on_finished, JobFinished)

    def _on_finished(self, event: JobFinished) -> None:
        for ev in self._events.get(event.job, ()):
            ev.set()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        ev = asyncio.Event()
        self._events.setdefault(job_id, set()).add(ev)
        try:
            yield ev
        finally:
            waiting = self._events.get(job_id)
            if waiting is not None:
                waiting.discard(ev)
                if not waiting:
                    del self._events[job_id]


WATCH = web.AppKey("watch", JobWatch)


# -- helpers ---------------------------------------------------------------------------------
def _flag(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise BadRequest(f"{name} must be true or false, got {value!r}")


def _number(value: Any, name: str, *, minimum: float = 0.0) -> float:
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, got {value!r}") from None
    if not n >= minimum or n == float("inf"):
        raise BadRequest(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return n


def _storage_error(e: OSError) -> Exception:
    """Spooling failed.  Out of space (ENOSPC, EDQUOT, EFBIG: a file size limit) is a clear
    507 that says nothing was queued; anything else stays a logged 500."""
    # numpy's tofile() reports a short write as a bare OSError("N requested and M written"):
    # that is what a full disk (or quota, or file size limit) looks like from np.save.
    short_write = e.errno is None and "written" in str(e)
    if short_write or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageFull("the server's storage is full, so the upload was not stored and no job "
                           "was queued; retry later (operators: free space in storage.dir)")
    return e


def refuse_if_draining(app: web.Application) -> None:
    if app[DRAINING].is_set():
        raise ShuttingDown(
            "the daemon is shutting down; retry in a few seconds (queued jobs are kept)",
            retry_after_s=DRAIN_RETRY_AFTER_S)


def _options(request: web.Request, fields: dict[str, str]) -> tuple[str, bool, str]:
    opts = {**request.query, **fields}
    granularity = opts.get("granularity", "utterance")
    if granularity not in GRANULARITIES:
        raise BadRequest(f"granularity must be utterance or frame, got {granularity!r}")
    embedding = _flag(opts.get("embedding", "false"), "embedding")
    key = opts.get("key", "")
    if len(key) > MAX_KEY_CHARS:
        raise BadRequest(f"key must be at most {MAX_KEY_CHARS} characters")
    return granularity, embedding, key


def _segmenting(request: web.Request, fields: dict[str, str],
                granularity: str) -> protocol.Segmenting | None:
    """The `segments` option (none | vad | fixed, with window_s and hop_s for fixed)."""
    opts = {**request.query, **fields}
    window = opts.get("window_s")
    hop = opts.get("hop_s")
    try:
        spec = segments.make_spec(
            opts.get("segments", "none"),
            window_s=None if window is None else _number(window, "window_s"),
            hop_s=None if hop is None else _number(hop, "hop_s"),
            settings=request.app[CONFIG].segments)
    except segments.SpecError as e:
        raise BadRequest(str(e)) from None
    if spec is not None and granularity != "utterance":
        raise BadRequest("segments gives one result per segment: use granularity=utterance "
                         "(with embedding=true the .npy holds one row per segment)")
    return spec


def _limits(cfg: Config, spec: protocol.Segmenting | None) -> Limits:
    audio_cfg = cfg.audio
    if spec is not None:
        return Limits(audio_cfg.max_segmented_seconds, audio_cfg.decode_mb(True),
                      "Split it into shorter recordings (audio.max_segmented_seconds).")
    return Limits(audio_cfg.max_seconds, audio_cfg.decode_mb(False),
                  f"Submit it with segments=vad (speech segments) or segments=fixed (windows) "
                  f"for a timeline of recordings up to {audio_cfg.max_segmented_seconds:g} s, "
                  "or split it.")


async def submit(request: web.Request) -> tuple[Job, int]:
    """Validate, spool and durably queue one job; returns it and its queue position."""
    app = request.app
    store = app[STORE]
    refuse_if_draining(app)
    who = auth.principal(request)
    app[auth.LIMITER].admit(who)  # 429 before the body is read
    job_id = secrets.token_urlsafe(16)
    path = store.audio_path(job_id)
    async with app[INTAKE].receive(request) as upload:  # its file is removed when decoded
        granularity, embedding, key = _options(request, upload.fields)
        spec = _segmenting(request, upload.fields, granularity)
        callback = {**request.query, **upload.fields}.get("callback_url") or None
        if callback is not None:
            await check_callback(app[CONFIG].webhooks, callback)
        try:  # streamed into the spool file, fsynced before it appears
            decoded = await app[INTAKE].decode(upload, path, _limits(app[CONFIG], spec))
        except OSError as e:
            raise _storage_error(e) from e
    job = Job(id=job_id, status=QUEUED, key=key or PurePath(upload.filename).stem or job_id,
              granularity=granularity, embedding=embedding, duration_s=decoded.duration_s,
              created=time.time(), owner=who.name, callback_url=callback,
              segments=None if spec is None else {
                  "mode": spec.mode, "window_s": spec.window_s, "hop_s": spec.hop_s})
    try:
        position = await store.add(job, owner_max_pending=who.max_pending)
    except sqlite3.OperationalError as e:
        store.remove_audio(job_id)
        if "full" in str(e):  # SQLITE_FULL: "database or disk is full"
            raise _storage_error(OSError(errno.ENOSPC, str(e))) from e
        raise
    except Exception:
        # Not on cancellation: the row may be committed already; an orphan spool file is swept
        # at the next start, a row without its audio would be a half job.
        store.remove_audio(job_id)
        raise
    app[BUS].publish(JobQueued(job=job_id, position=position))
    app[DISPATCHER].wake()
    return job, position


async def _wait_final(request: web.Request, job_id: str, wait_s: float) -> Job:
    store = request.app[STORE]
    owner = auth.principal(request).owner_filter
    with request.app[WATCH].watch(job_id) as finished:
        job = await store.get(job_id, owner=owner)
        if job.status in FINAL or wait_s <= 0:
            return job
        draining = asyncio.ensure_future(request.app[DRAINING].wait())
        finish = asyncio.ensure_future(finished.wait())
        try:  # a drain must not wait for long-polls: the job's state so far is the answer
            await asyncio.wait((finish, draining), timeout=wait_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            draining.cancel()
            finish.cancel()
    return await store.get(job_id, owner=owner)


def _wait_param(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    return min(_number(raw, "wait"), request.app[CONFIG].server.max_wait_s)


# -- handlers --------------------------------------------------------------------------------
async def post_job(request: web.Request) -> web.Response:
    job, position = await submit(request)
    body = {"id": job.id, "status": job.status, "position": position,
            "worker": request.app[SUPERVISOR].state.value,
            "eta_s": request.app[DISPATCHER].eta_s(position, job.duration_s)}
    return json_response(body, status=202, headers={"Location": f"/v1/jobs/{job.id}"})


async def get_job(request: web.Request) -> web.Response:
    job = await _wait_final(request, request.match_info["id"], _wait_param(request))
    job.progress = request.app[DISPATCHER].progress_of(job.id)
    return json_response(job.to_json())


async def get_embedding(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    job = await store.get(request.match_info["id"], owner=auth.principal(request).owner_filter)
    if job.status != "done":
        raise JobConflict(f"job {job.id} is {job.status}; its embedding exists once it is done")
    path = store.embedding_path(job.id)
    if not job.embedding or not path.is_file():
        raise JobNotFound(f"job {job.id} has no embedding; submit with embedding=true")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def delete_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    outcome = await request.app[STORE].cancel_or_delete(
        job_id, owner=auth.principal(request).owner_filter)
    if outcome == "cancelled":
        request.app[BUS].publish(JobFinished(job=job_id, status="cancelled", queue_s=None,
                                             compute_s=None, attempts=0))
        return json_response({"id": job_id, "status": "cancelled"})
    return json_response({"id": job_id, "deleted": True})


async def recognize(request: web.Request) -> web.Response:
    job, position = await submit(request)
    job = await _wait_final(request, job.id, request.app[CONFIG].server.max_wait_s)
    if job.status in FINAL:
        return json_response(job.to_json())
    body = job.to_json()
    body["position"] = position
    return json_response(body, status=202, headers={"Location": f"/v1/jobs/{job.id}"})


async def status(request: web.Request) -> web.Response:
    app = request.app
    cfg = app[CONFIG]
    counts = await app[STORE].counts()
    return json_response({
        "worker": app[SUPERVISOR].status().to_json(),
        "queue": {**counts, "max_pending": cfg.queue.max_pending},
        "idle": {"unload_after_s": cfg.worker.unload_after_s,
                 "exit_after_s": cfg.worker.exit_after_s, "standby": cfg.worker.standby,
                 "yield_gpu": cfg.worker.yield_gpu},
        "cluster": cluster_api.status(app),
    })


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    stall_s = request.app[CONFIG].server.read_timeout_s
    try:
        async with asyncio.timeout(stall_s):  # a small body: all of it within the stall limit
            body = await request.json()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {stall_s:g} s "
                             "(server.read_timeout_s)") from None
    except ValueError:
        raise BadRequest("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def worker_load(request: web.Request) -> web.Response:
    refuse_if_draining(request.app)
    body = {**request.query, **await _json_body(request)}
    hold_s = _number(body.get("hold_s", 0), "hold_s")
    wait = body.get("wait", True)
    wait = _flag(wait, "wait") if isinstance(wait, str) else bool(wait)
    sup = request.app[SUPERVISOR]
    await cluster_api.hold(request.app, "manual", hold_s, wait=wait)  # worker or replicas
    return json_response(sup.status().to_json(), status=200 if wait else 202)


async def worker_unload(request: web.Request) -> web.Response:
    body = {**request.query, **await _json_body(request)}
    exit_ = body.get("exit", False)
    exit_ = _flag(exit_, "exit") if isinstance(exit_, str) else bool(exit_)
    sup = request.app[SUPERVISOR]
    await cluster_api.release(request.app, "manual", exit=exit_)  # worker or replicas
    return json_response(sup.status().to_json(), status=202)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    failed = app[GUARD].failed
    if failed is not None:  # an owner task ended: the daemon is stopping with exit status 1
        return json_response({"ready": False, "reason": failed}, status=503,
                             headers={"Retry-After": str(int(DRAIN_RETRY_AFTER_S))})
    if app[DRAINING].is_set():
        return json_response({"ready": False, "reason": "shutting down"}, status=503,
                             headers={"Retry-After": str(int(DRAIN_RETRY_AFTER_S))})
    if not app[STORE].healthy:  # a failing job database (store.py): the reason, logged once
        return json_response(
            {"ready": False, "reason": f"job database failing: {app[STORE].error}"},
            status=503, headers={"Retry-After": "5"})
    # Results waiting in memory for storage; a hung or stuck worker (issue 10: both said ready).
    busy = (app[DISPATCHER].blocked or app[SUPERVISOR].unready_reason()
            or cluster_api.unready_reason(app))
    if busy is not None:
        return json_response({"ready": False, "reason": busy}, status=503,
                             headers={"Retry-After": "5"})
    try:
        counts = await app[STORE].counts()
    except OndemandError as e:  # storage failing between two checks: still a readiness answer
        return json_response({"ready": False, "reason": f"job database failing: {e.message}"},
                             status=503, headers={"Retry-After": "5"})
    pending = counts[QUEUED] + counts["running"]
    if pending >= app[CONFIG].queue.max_pending:
        return json_response({"ready": False, "reason": "queue full"}, status=503,
                             headers={"Retry-After": "5"})
    return json_response({"ready": True, "worker": app[SUPERVISOR].state.value})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_get("/v1/jobs/{id}/embedding.npy", get_embedding)
    app.router.add_delete("/v1/jobs/{id}", delete_job)
    app.router.add_post("/v1/recognize", recognize)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/worker/load", worker_load)
    app.router.add_post("/v1/worker/unload", worker_unload)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

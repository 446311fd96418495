"""`GET /v1/events`: a Server-Sent Events stream of the worker's life and of job progress.

One `EventLog` (owned by the app through `cleanup_ctx`) subscribes to the bus, gives each event it
keeps a monotonically increasing id and keeps the last `console.events_buffer` of them for
`Last-Event-ID` resume.  Ids start at the start-up time in milliseconds, so they also increase
across restarts and an id from an earlier run is recognised as too old.

Per connection:

    retry: 3000
    event: hello    {"last_id", "heartbeat_s"}              no id
    event: reset    {"reason"}                              Last-Event-ID not in the buffer
    (the buffered events after Last-Event-ID)
    event: worker   {"worker": <GET /v1/status "worker">}   no id; fresh at every (re)connect
    event: queue    {"queued", "running", "max_pending"}    no id
    then live events, and `: ping` every console.events_heartbeat_s while idle.

Invariants:
- The bus runs callbacks synchronously on the loop, so a callback only appends prepared bytes to
  each client's bounded deque.  A client that falls `events_buffer` frames behind is cut off
  (it resumes from the buffer or gets `reset`): a stalled reader never holds memory unbounded or
  slows the supervisor.
- Snapshots are state, not history: they carry no id and are coalesced (one `worker` per loop
  iteration, one `queue` query at a time), and are built only while someone listens.  The worker
  snapshot is taken after the supervisor's current step (`call_soon`), so its countdowns already
  include the step's `last used` update.
- Reading the stream is not activity: no lease, no idle-timer reset (like /v1/status).
- `on_shutdown` ends every stream (after the listening socket closed, before the runner waits for
  open requests), so an open page never holds up a stop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ondemand.config import Config
from ondemand.daemon import api
from ondemand.daemon.events import (
    Event,
    EventBus,
    JobFinished,
    JobProgress,
    JobQueued,
    JobsStarted,
    ModelLoaded,
    StateChanged,
    WorkerActivity,
    WorkerExited,
)
from ondemand.daemon.store import QUEUED, RUNNING, Store
from ondemand.daemon.supervisor import Supervisor
from ondemand.errors import ShuttingDown

log = logging.getLogger(__name__)

RETRY_MS = 3000  # the reconnect delay suggested to EventSource clients
WORKER_EVENTS = (StateChanged, ModelLoaded, WorkerExited, WorkerActivity)
JOB_EVENTS = (JobQueued, JobsStarted, JobProgress, JobFinished)
# Events that can change the queue counts (a crash requeues its batch: WorkerExited).
QUEUE_EVENTS = (*JOB_EVENTS, WorkerExited)
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    "X-Content-Type-Options": "nosniff",
}


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _fields(event: Event) -> dict[str, Any]:
    out = {k: v for k, v in vars(event).items() if k != "mono"}
    out["time"] = round(event.time, 6)
    return out


def describe(event: Event) -> list[tuple[str, dict[str, Any]]]:
    """The stream events for a bus event: (name, data) pairs; [] for ones not streamed."""
    if isinstance(event, JobsStarted):
        return [("job", {"job": j, "status": RUNNING, "time": round(event.time, 6)})
                for j in event.jobs]
    if isinstance(event, JobQueued):
        return [("job", {**_fields(event), "status": QUEUED})]
    if isinstance(event, JobProgress):  # a segmented recording, part done (issue 12)
        return [("job", {**_fields(event), "status": RUNNING})]
    names: dict[type[Event], str] = {StateChanged: "state", ModelLoaded: "loaded",
                                     WorkerExited: "exited", WorkerActivity: "activity",
                                     JobFinished: "job"}
    name = names.get(type(event))
    return [(name, _fields(event))] if name else []


@dataclass(eq=False)
class Client:
    """One connected stream: frames waiting to be written, and a wake-up for its writer."""

    limit: int
    frames: collections.deque[bytes] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False  # cut off (fell behind) or shutting down: end once drained

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self.frames) >= self.limit:
            self.frames.clear()  # it resumes by Last-Event-ID, or gets reset
            self.close()
            return
        self.frames.append(data)
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class EventLog:
    def __init__(self, bus: EventBus, sup: Supervisor, store: Store, *, buffer: int,
                 max_pending: int) -> None:
        self._sup = sup
        self._store = store
        self._max_pending = max_pending
        self._ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer)
        self._next_id = int(time.time() * 1000)
        self._clients: set[Client] = set()
        self._client_limit = buffer
        self._worker_due = False
        self._queue_dirty = False
        self._queue_task: asyncio.Task[None] | None = None
        self.closed = False
        self._unsubscribe = bus.subscribe(self._on_event, *WORKER_EVENTS, *JOB_EVENTS)

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    # -- the bus side (synchronous, on the loop) --------------------------------------------
    def _on_event(self, event: Event) -> None:
        for name, data in describe(event):
            event_id = self._next_id
            self._next_id += 1
            data_frame = frame(name, data, event_id)
            self._ring.append((event_id, data_frame))
            self._broadcast(data_frame)
        if not self._clients:
            return
        if isinstance(event, WORKER_EVENTS) and not self._worker_due:
            self._worker_due = True
            asyncio.get_running_loop().call_soon(self._send_worker)
        if isinstance(event, QUEUE_EVENTS):
            self._want_queue()

    def _broadcast(self, data: bytes) -> None:
        for client in list(self._clients):
            client.push(data)

    def worker_frame(self) -> bytes:
        return frame("worker", {"worker": self._sup.status().to_json(),
                                "time": round(time.time(), 6)})

    def _send_worker(self) -> None:
        self._worker_due = False
        if self._clients:
            self._broadcast(self.worker_frame())

    def _want_queue(self) -> None:
        self._queue_dirty = True
        if self._queue_task is None or self._queue_task.done():
            self._queue_task = asyncio.get_running_loop().create_task(
                self._send_queue(), name="events-queue")

    async def queue_frame(self) -> bytes:
        counts = await self._store.counts()
        return frame("queue", {"queued": counts[QUEUED], "running": counts[RUNNING],
                               "max_pending": self._max_pending})

    async def _send_queue(self) -> None:
        try:
            while self._queue_dirty and self._clients:
                self._queue_dirty = False
                self._broadcast(await self.queue_frame())
        except Exception as e:  # the store closing under it at shutdown; the next event retries
            log.debug("events: queue snapshot failed: %s", e)

    # -- the client side ---------------------------------------------------------------------
    def connect(self, last_event_id: str | None, heartbeat_s: float) -> tuple[Client, bytes]:
        """Register a client; returns it and what to write first (hello, reset or the replay,
        the worker snapshot).  Synchronous, so no event falls between replay and live."""
        if self.closed:
            raise ShuttingDown("the daemon is shutting down; reconnect in a few seconds")
        head = [f"retry: {RETRY_MS}\n\n".encode(),
                frame("hello", {"last_id": self.last_id, "heartbeat_s": heartbeat_s})]
        if last_event_id is not None:
            head.extend(self._replay(last_event_id))
        head.append(self.worker_frame())
        client = Client(limit=self._client_limit)
        self._clients.add(client)
        return client, b"".join(head)

    def _replay(self, last_event_id: str) -> list[bytes]:
        try:
            last = int(last_event_id.strip())
        except ValueError:
            return [frame("reset", {"reason": f"Last-Event-ID {last_event_id!r} is not an id"})]
        oldest = self._ring[0][0] if self._ring else self._next_id
        if not oldest - 1 <= last <= self.last_id:
            return [frame("reset", {"reason": f"event {last} is no longer (or never was) in "
                                              "the buffer; re-read the state"})]
        return [data for event_id, data in self._ring if event_id > last]

    def disconnect(self, client: Client) -> None:
        self._clients.discard(client)

    def close(self) -> None:
        """End every stream (on_shutdown) and refuse new ones."""
        self.closed = True
        for client in list(self._clients):
            client.close()

    async def stop(self) -> None:
        self._unsubscribe()
        self.close()
        if self._queue_task is not None:
            self._queue_task.cancel()
            await asyncio.gather(self._queue_task, return_exceptions=True)


EVENTS = web.AppKey("events", EventLog)


async def stream(request: web.Request) -> web.StreamResponse:
    """`GET /v1/events` (Server-Sent Events; `Last-Event-ID` resumes)."""
    events = request.app[EVENTS]
    heartbeat_s = request.app[api.CONFIG].console.events_heartbeat_s
    client, head = events.connect(request.headers.get("Last-Event-ID"), heartbeat_s)
    resp = web.StreamResponse(headers=STREAM_HEADERS)
    try:
        await resp.prepare(request)
        await resp.write(head + await events.queue_frame())
        while True:
            if not client.frames:
                if client.closed:
                    break
                client.wake.clear()
                try:
                    await asyncio.wait_for(client.wake.wait(), heartbeat_s)
                except TimeoutError:
                    await resp.write(b": ping\n\n")
                    continue
            pending = b"".join(client.frames)
            client.frames.clear()
            if pending:
                await resp.write(pending)
    except ConnectionResetError:
        pass  # the client went away (aiohttp's ClientConnectionResetError is one)
    finally:
        events.disconnect(client)
    return resp


def context(cfg: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    """The event log as an app component: build_app lists it after the supervisor (it reads the
    bus, the supervisor and the store), so it stops before them.  Open streams end at shutdown
    (`on_shutdown`, before any cleanup) so they never delay it."""

    async def events_ctx(app: web.Application) -> AsyncIterator[None]:
        events = EventLog(app[api.BUS], app[api.SUPERVISOR], app[api.STORE],
                          buffer=cfg.console.events_buffer, max_pending=cfg.queue.max_pending)
        app[EVENTS] = events
        yield
        await events.stop()

    return events_ctx


def add_routes(app: web.Application) -> None:
    async def end_streams(app: web.Application) -> None:
        if EVENTS in app:
            app[EVENTS].close()

    app.on_shutdown.append(end_streams)
    app.router.add_get("/v1/events", stream)

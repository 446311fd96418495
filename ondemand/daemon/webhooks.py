"""Job callbacks: where they may go, how they are signed, and the task that delivers them.

A job submitted with `callback_url` gets, when it ends (done, failed, cancelled), one POST of
its job document (what `GET /v1/jobs/{id}` answered at its end) to that URL
(docs/webhooks.md).  Invariants:

- Durable, at least once: the delivery row is written in the transaction that ends the job
  (daemon/outbox.py); this task only reads due rows and records each attempt's outcome.  An
  attempt cut short (crash, kill -9, shutdown) is not recorded, so it runs again: receivers
  deduplicate on `Ondemand-Delivery`, which stays the same across retries.
- Attempts: a 2xx ends it (`delivered`); anything else (another status, a redirect, which is
  never followed, a refused or timed-out connection) is retried after backoff_min_s doubling up
  to backoff_max_s, each delay jittered to 50-100 % so a receiver that comes back is not hit by
  every delivery at once; after `max_attempts` the delivery is `failed`.  Each attempt is bounded
  by `timeout_s`.
- Destinations (daemon/destinations.py): checked against `webhooks.allowed_hosts` at submit
  (400 callback_refused: no request ever goes to an arbitrary internal address) and again at
  each connection, so a name that re-resolves elsewhere later (DNS rebinding) is refused too.
- No polling: the task sleeps until the earliest due attempt, and `JobFinished` wakes it.
- Signature: `Ondemand-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>`
  with `Ondemand-Timestamp` (Unix seconds) beside it (`sign`; the SDK's `verify_webhook`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from ondemand import __version__
from ondemand.config import Config, WebhooksConfig
from ondemand.daemon import api
from ondemand.daemon.destinations import CheckedResolver, Destinations
from ondemand.daemon.events import JobFinished
from ondemand.daemon.outbox import DELIVERED, FAILED, PENDING, Delivery
from ondemand.daemon.store import Store
from ondemand.errors import CallbackRefused, StorageUnavailable

log = logging.getLogger(__name__)

DELIVERY_HEADER = "Ondemand-Delivery"
ATTEMPT_HEADER = "Ondemand-Attempt"
EVENT_HEADER = "Ondemand-Event"
TIMESTAMP_HEADER = "Ondemand-Timestamp"
SIGNATURE_HEADER = "Ondemand-Signature"
USER_AGENT = f"ondemand-webhooks/{__version__}"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `Ondemand-Signature` value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def backoff_s(failed_attempts: int, cfg: WebhooksConfig, rng: random.Random) -> float:
    """Delay after the `failed_attempts`-th failure: doubling from backoff_min_s, at most
    backoff_max_s, jittered to 50-100 %."""
    base = min(cfg.backoff_min_s * 2 ** min(failed_attempts - 1, 40), cfg.backoff_max_s)
    return base * rng.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Outcome:
    status: int | None  # the HTTP status, None when there was no answer
    error: str | None  # None when delivered


class Deliverer:
    """The one task that delivers due callbacks, `cfg.concurrency` attempts at a time."""

    def __init__(self, cfg: WebhooksConfig, store: Store, *, retry_min_s: float = 0.5,
                 retry_max_s: float = 30.0, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.destinations = Destinations(cfg.allowed_hosts)
        self._clock = clock
        self._rng = rng or random.Random()
        self._retry = (retry_min_s, retry_max_s)
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=CheckedResolver(self.destinations),
                                         limit=self.cfg.concurrency, force_close=True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers={"User-Agent": USER_AGENT})
        self.task = asyncio.create_task(self._run(), name="webhooks")

    def wake(self, _event: object = None) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Stop at once: an attempt in flight is dropped unrecorded and runs again after the
        next start (at least once)."""
        tasks = [t for t in (self.task, *self._inflight.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                delay = await self._step()
                failures = 0
            except (StorageUnavailable, sqlite3.Error) as e:
                failures += 1
                delay = min(self._retry[0] * 2 ** min(failures - 1, 30), self._retry[1])
                if failures == 1:
                    log.warning("webhooks: the job store fails (%s); retrying after %.1fs", e,
                                delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _step(self) -> float | None:
        """Start the due attempts that fit; returns how long to sleep (None: until woken)."""
        free = self.cfg.concurrency - len(self._inflight)
        if free > 0:
            due = await self.store.due_deliveries(self._clock(), free, tuple(self._inflight))
            for d in due:
                self._inflight[d.job] = asyncio.create_task(self._deliver(d),
                                                            name=f"webhook:{d.job[:8]}")
        if len(self._inflight) >= self.cfg.concurrency:
            return None  # an ending attempt wakes the loop
        at = await self.store.next_delivery_at(tuple(self._inflight))
        return None if at is None else max(0.0, at - self._clock())

    async def _deliver(self, d: Delivery) -> None:
        try:
            attempt = d.attempts + 1
            outcome = await self.attempt(d, attempt)
            now = self._clock()
            if outcome.error is None:
                state, next_at = DELIVERED, None
            elif attempt >= self.cfg.max_attempts:
                state, next_at = FAILED, None
            else:
                state, next_at = PENDING, now + backoff_s(attempt, self.cfg, self._rng)
            log.log(logging.INFO if state != PENDING else logging.WARNING,
                    "webhook job=%s delivery=%s attempt=%d -> %s %s%s", d.job[:8], d.id[:8],
                    attempt, outcome.status or "-", state,
                    f" ({outcome.error})" if outcome.error else "")
            try:
                await self.store.record_delivery(
                    d.job, attempts=attempt, state=state, last_status=outcome.status,
                    last_error=outcome.error, next_attempt_at=next_at, now=now)
            except (StorageUnavailable, sqlite3.Error) as e:  # it stays pending: sent again
                log.warning("webhooks: cannot record delivery %s (%s); it will be sent again",
                            d.id[:8], e)
        finally:
            self._inflight.pop(d.job, None)
            self._wake.set()

    async def attempt(self, d: Delivery, attempt: int) -> Outcome:
        """One POST of the frozen body, signed now."""
        assert self._session is not None
        body = d.payload.encode()
        stamp = str(int(self._clock()))
        try:
            status = json.loads(d.payload).get("status", "")
        except (ValueError, AttributeError):
            status = ""
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: d.id,
                   ATTEMPT_HEADER: str(attempt), EVENT_HEADER: f"job.{status}",
                   TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(self.cfg.key(), stamp, body)}
        try:
            self.destinations.check_literal(d.url)  # names are checked by CheckedResolver
            async with self._session.post(d.url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                code = resp.status
        except CallbackRefused as e:
            return Outcome(None, e.message)
        except TimeoutError:
            return Outcome(None, f"no answer within {self.cfg.timeout_s:g} s (webhooks.timeout_s)")
        except (aiohttp.ClientError, OSError) as e:
            return Outcome(None, _short(e))
        if 200 <= code < 300:
            return Outcome(code, None)
        if 300 <= code < 400:
            return Outcome(code, f"HTTP {code}: redirects are not followed")
        return Outcome(code, f"HTTP {code}")


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__ or e.__context__
    if isinstance(e, aiohttp.ClientConnectorError) and cause is not None and str(cause):
        text = str(cause)
    return text[:300]


DELIVERER = web.AppKey("deliverer", Deliverer)
CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def context(cfg: Config) -> CleanupCtx:
    """The delivery task as a cleanup context (after the store; before the dispatcher, so it
    stops after the dispatcher's last outcomes).  With webhooks off it starts nothing: pending
    deliveries wait in the outbox for a daemon that has them on."""

    async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
        if not cfg.webhooks.enabled:
            yield
            return
        deliverer = Deliverer(cfg.webhooks, app[api.STORE], retry_min_s=cfg.storage.retry_min_s,
                              retry_max_s=cfg.storage.retry_max_s)
        unsubscribe = app[api.BUS].subscribe(deliverer.wake, JobFinished)
        deliverer.start()
        app[DELIVERER] = deliverer
        assert deliverer.task is not None
        try:
            with app[api.GUARD].watching(deliverer.task):
                yield
        finally:
            unsubscribe()
            await deliverer.close()

    return webhooks_ctx

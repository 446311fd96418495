"""Job callbacks (issue 15) against a real receiver on loopback: signed, retried through a receiver
that is down and then failing, durable across kill -9, refused at submit outside
webhooks.allowed_hosts, redirects not followed.  All traffic stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ondemand.daemon.destinations import Destinations
from ondemand.daemon.webhooks import sign
from ondemand.errors import CallbackRefused
from ondemand.sdk import InvalidSignature, verify_webhook
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    run,
    serve_config,
    start_serve,
    wait_for,
    wav_bytes,
)

SECRET = "test-webhook-secret"
HOOKS = {"secret": SECRET, "allowed_hosts": ["127.0.0.1/32"], "backoff_min_s": 0.05,
         "backoff_max_s": 0.2, "timeout_s": 5.0, "max_attempts": 5}
CLIP = wav_bytes(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver on 127.0.0.1: answers with `statuses` in turn (the last one repeats),
    records each request; `hold` keeps a request waiting until released."""

    def __init__(self, statuses: list[int], port: int = 0) -> None:
        self.statuses = list(statuses)
        self.port = port
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()
        self.hold: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((dict(request.headers), body))
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return web.Response(status=status, text="ok")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/elsewhere", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def receiver(statuses: list[int], port: int = 0) -> AsyncIterator[Receiver]:
    r = await Receiver(statuses, port).start()
    try:
        yield r
    finally:
        await r.stop()


def check_signed(headers: dict[str, str], body: bytes) -> None:
    verify_webhook(SECRET, body, headers)


async def callback_of(d: Daemon, job_id: str) -> dict[str, Any]:
    return (await d.job(job_id))["callback"]  # type: ignore[no-any-return]


def test_signed_delivery_of_the_job_document(tmp_path: Path) -> None:
    async def main() -> None:
        async with receiver([200]) as hook, \
                Daemon(daemon_config(tmp_path, webhooks=HOOKS)) as d:
            job = await d.submit(CLIP, key="one", callback_url=hook.url)
            await wait_for(lambda: bool(hook.got), what="the delivery")
            headers, body = hook.got[0]
            check_signed(headers, body)
            doc = json.loads(body)
            assert doc["id"] == job["id"] and doc["status"] == "done" and doc["key"] == "one"
            assert doc["result"]["labels"]
            assert headers["Ondemand-Event"] == "job.done" and headers["Ondemand-Attempt"] == "1"
            assert headers["Content-Type"] == "application/json"

            async def delivered() -> bool:
                return (await callback_of(d, job["id"]))["state"] == "delivered"

            await wait_for(delivered, what="state delivered")
            cb = await callback_of(d, job["id"])
            assert cb == {"url": hook.url, "state": "delivered", "attempts": 1,
                          "last_status": 200, "last_error": None, "next_attempt_at": None}
            # the document GET answers now is the one that was sent, callback aside
            now = await d.job(job["id"])
            assert {k: v for k, v in now.items() if k != "callback"} == \
                {k: v for k, v in doc.items() if k != "callback"}
            # a tampered body or an old timestamp fails verification
            with pytest.raises(InvalidSignature):
                verify_webhook(SECRET, body + b" ", headers)
            with pytest.raises(InvalidSignature):
                verify_webhook(SECRET, body, headers, now=time.time() + 3600)
            with pytest.raises(InvalidSignature):
                verify_webhook("another secret", body, headers)

    run(main())


def test_down_then_500_then_200_is_delivered_after_retries(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: the first attempt is refused

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, webhooks=HOOKS)) as d:
            job = await d.submit(CLIP, callback_url=f"http://127.0.0.1:{port}/hook")

            async def tried(n: int) -> bool:
                return (await callback_of(d, job["id"]))["attempts"] >= n

            await wait_for(lambda: tried(1), what="the first (refused) attempt")
            cb = await callback_of(d, job["id"])
            assert cb["state"] == "pending" and cb["last_status"] is None
            assert cb["last_error"] and cb["next_attempt_at"] is not None
            async with receiver([500, 200], port) as hook:

                async def delivered() -> bool:
                    return (await callback_of(d, job["id"]))["state"] == "delivered"

                await wait_for(delivered, what="delivered after retries")
                assert len(hook.got) == 2
                ids = {h["Ondemand-Delivery"] for h, _ in hook.got}
                assert len(ids) == 1  # the same delivery id on every attempt (idempotency)
                assert [h["Ondemand-Attempt"] for h, _ in hook.got] == ["2", "3"]
                assert hook.got[0][1] == hook.got[1][1]  # the same frozen body
                for headers, body in hook.got:
                    check_signed(headers, body)
            cb = await callback_of(d, job["id"])
            assert cb["attempts"] == 3 and cb["last_status"] == 200

    run(main())


def test_gives_up_after_max_attempts_and_never_follows_redirects(tmp_path: Path) -> None:
    hooks = {**HOOKS, "max_attempts": 2}

    async def main() -> None:
        async with receiver([302]) as hook, \
                Daemon(daemon_config(tmp_path, webhooks=hooks)) as d:
            job = await d.submit(CLIP, callback_url=hook.url)

            async def failed() -> bool:
                return (await callback_of(d, job["id"]))["state"] == "failed"

            await wait_for(failed, what="state failed")
            cb = await callback_of(d, job["id"])
            assert cb["attempts"] == 2 and cb["last_status"] == 302
            assert "redirect" in cb["last_error"]
            assert all(h.get("Ondemand-Delivery") for h, _ in hook.got)
            assert len(hook.got) == 2  # /elsewhere was never asked

    run(main())


def test_cancelled_job_is_delivered_too(tmp_path: Path) -> None:
    gate = tmp_path / "gate"  # the worker never starts: the job stays queued

    async def main() -> None:
        from tests.conftest import gated_worker

        async with receiver([200]) as hook, \
                Daemon(daemon_config(tmp_path, webhooks=HOOKS),
                       worker_cmd=gated_worker(gate)) as d:
            job = await d.submit(CLIP, callback_url=hook.url)
            assert (await callback_of(d, job["id"]))["state"] == "waiting"
            async with d.http.delete(f"/v1/jobs/{job['id']}") as r:
                assert r.status == 200
            await wait_for(lambda: bool(hook.got), what="the delivery")
            assert json.loads(hook.got[0][1])["status"] == "cancelled"
            assert hook.got[0][0]["Ondemand-Event"] == "job.cancelled"
            gate.touch()

    run(main())


@pytest.mark.parametrize("url", [
    "http://127.0.0.2:9/hook",  # loopback, but outside 127.0.0.1/32
    "http://10.0.0.1/hook",  # an address literal: refused without a single packet
    "http://[::1]:9/hook",
    "ftp://127.0.0.1/hook",
    "http://user:pw@127.0.0.1/hook",
    "http:///hook",
    "http://127.0.0.1:99999/hook",
])
def test_callback_outside_the_allowed_hosts_is_refused_at_submit(tmp_path: Path,
                                                                 url: str) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, webhooks=HOOKS)) as d:
            body = await d.submit(CLIP, expect=400, callback_url=url)
            assert body["error"]["code"] == "callback_refused", body
            assert (await d.status())["queue"]["queued"] == 0

    run(main())


def test_callbacks_are_refused_while_webhooks_are_off(tmp_path: Path) -> None:
    async def main() -> None:
        for hooks in ({}, {"secret": SECRET}, {"allowed_hosts": ["127.0.0.1/32"]}):
            async with Daemon(daemon_config(tmp_path, webhooks=hooks)) as d:
                body = await d.submit(CLIP, expect=400, callback_url="http://127.0.0.1:9/h")
                assert body["error"]["code"] == "callback_refused"
                assert "webhooks are off" in body["error"]["message"]

    run(main())


def test_destinations_check_every_resolved_address() -> None:
    dest = Destinations(["10.1.0.0/16", "hooks.example.com", "*.corp.example"])

    def resolver(addresses: list[str]) -> Any:
        async def resolve(host: str, port: int) -> list[str]:
            return addresses

        return resolve

    async def main() -> None:
        await dest.check("https://hooks.example.com/x", resolver(["192.0.2.1"]))  # by name
        await dest.check("https://a.b.corp.example/x", resolver(["192.0.2.1"]))
        await dest.check("http://svc.internal/x", resolver(["10.1.2.3", "10.1.9.9"]))
        with pytest.raises(CallbackRefused, match=r"10\.2\.0\.1"):  # one address outside
            await dest.check("http://svc.internal/x", resolver(["10.1.2.3", "10.2.0.1"]))
        with pytest.raises(CallbackRefused):
            await dest.check("http://corp.example/x", resolver(["192.0.2.1"]))
        with pytest.raises(CallbackRefused):  # IPv4-mapped IPv6 is its IPv4 address
            await dest.check("http://x.test/", resolver(["::ffff:127.0.0.1"]))
        await dest.check("http://x.test/", resolver(["::ffff:10.1.0.1"]))

    run(main())
    assert sign("k", "1", b"{}") == sign("k", "1", b"{}") != sign("k", "2", b"{}")


# -- durability: kill -9 between the job's end and its delivery --------------------------------
def test_kill_9_between_the_end_and_the_delivery_delivers_after_restart(tmp_path: Path) -> None:
    """The receiver holds the first attempt open (the job has ended, the delivery has not);
    the daemon is killed with SIGKILL then; after a restart the same delivery arrives again and
    is recorded as delivered."""

    async def main() -> None:
        async with receiver([200]) as hook:
            hook.hold = asyncio.Event()
            cfg = serve_config(tmp_path, webhooks=HOOKS)
            proc, url = await asyncio.to_thread(start_serve, cfg, fake_env())
            try:
                from ondemand.sdk import AsyncClient

                async with AsyncClient(url) as c:
                    accepted = await c.submit(CLIP, callback_url=hook.url)
                    await asyncio.wait_for(hook.arrived.wait(), 30)
                    assert (await c.job(accepted.id)).status == "done"
                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 20)
            finally:
                if proc.poll() is None:
                    proc.kill()
            first = hook.got[0][0]["Ondemand-Delivery"]
            hook.hold.set()
            hook.hold = None
            db = tmp_path / "var" / "jobs.sqlite3"
            with sqlite3.connect(db) as conn:  # the outbox row survived, still pending
                state, attempts = conn.execute(
                    "SELECT state, attempts FROM deliveries").fetchone()
            assert (state, attempts) == ("pending", 0)
            proc, url = await asyncio.to_thread(start_serve, cfg, fake_env())
            try:
                async with AsyncClient(url) as c:

                    async def delivered() -> bool:
                        job = await c.job(accepted.id)
                        return job.callback is not None and job.callback.state == "delivered"

                    await wait_for(delivered, 30, "delivered after the restart")
                assert len(hook.got) == 2
                assert hook.got[1][0]["Ondemand-Delivery"] == first  # same id: dedupe on it
                check_signed(*hook.got[1])
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 20)

    run(main())

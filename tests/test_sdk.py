"""The typed client (ondemand.sdk) against a real daemon, sync and async: the API, errors as
exceptions, `wait` on the event stream (what finished before it connected, a connection cut
mid-wait resumed by Last-Event-ID, long-poll where there is no stream or after a reset,
progress), the SSE decoder; and the job database's migration from schema 1 (issue 15).

Waits go through `Proxy`, a TCP proxy the test steers (hold, cut, refuse the stream), which
also logs each request: a test tells a stream wait from a long-poll by what it sent."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ondemand import errors
from ondemand.config import TokenConfig
from ondemand.daemon.store import Store
from ondemand.sdk import AsyncClient, Client, Job, JobUpdate, event_stream, long_poll
from ondemand.sdk import aio as sdk_aio
from ondemand.sdk.sse import Decoder, ServerEvent
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    gated_worker,
    run,
    wait_for,
    wav_bytes,
)

CLIP = wav_bytes(0.5)


def test_sync_client_covers_the_api(tmp_path: Path) -> None:
    wav = tmp_path / "hello.wav"
    wav.write_bytes(CLIP)

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path / "d")) as d:
            c = Client(d.url)

            def session() -> None:
                acc = c.submit(wav, embedding=True)
                assert acc.status == "queued" and acc.position >= 0
                job = c.wait(acc.id, timeout_s=20)
                assert isinstance(job, Job) and job.status == "done" and job.key == "hello"
                assert job.result is not None and job.result.label in job.result.labels
                assert job.timings.compute_s is not None and job.callback is None
                emb = c.embedding(acc.id)
                assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
                frame = c.recognize(CLIP, key="bytes", granularity="frame")
                assert frame.final and frame.granularity == "frame"
                st = c.status()
                assert st.max_pending > 0 and st.worker.state
                assert c.ready().ready and c.healthy()
                assert c.load(hold_s=1).state == "ready"
                assert c.unload().state in ("unloading", "unloaded", "ready")
                assert c.cost().generated_at and "ondemand_jobs_total" in c.metrics()
                assert "rules" in c.prewarm() and c.openapi()["openapi"].startswith("3.1")
                assert c.cancel(acc.id).outcome == "deleted"
                with pytest.raises(errors.NotFound):
                    c.job(acc.id)
                with pytest.raises(errors.AudioError) as bad:
                    c.submit(b"not audio", filename="x.wav")
                assert bad.value.status == 400
                with pytest.raises(TimeoutError, match="custom waiter"):
                    _never_final(c)  # a waiter is pluggable

            await asyncio.to_thread(session)
        with pytest.raises(errors.DaemonUnreachable):
            Client(d.url, timeout_s=2).status()

    run(main())


def _never_final(c: Client) -> None:
    def waiter(client: Client, job_id: str, left: float | None) -> Job:
        raise TimeoutError("custom waiter")

    c.wait("anything", waiter=waiter)


def test_async_client_and_errors_as_exceptions(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, server={"token": "sdk-token-0123456789abcdef"})

    async def main() -> None:
        async with Daemon(cfg) as d, \
                AsyncClient(d.url, token="sdk-token-0123456789abcdef") as c:
            acc = await c.submit(CLIP, key="a")
            job = await c.wait(acc.id, timeout_s=20)
            assert job.status == "done" and job.owner == "server"
            assert (await c.status()).worker.state == "ready"
            assert (await c.ready()).ready
            async with AsyncClient(d.url, token="wrong-token-0123456789") as bad:
                with pytest.raises(errors.Unauthorized):
                    await bad.status()
            with pytest.raises(errors.NotFound):
                await c.embedding(acc.id)  # submitted without embedding=true

    run(main())


def test_cli_submit_uses_the_client(tmp_path: Path) -> None:
    wav = tmp_path / "cli.wav"
    wav.write_bytes(CLIP)

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path / "d")) as d:
            out = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "ondemand", "submit", "--wait", "--url", d.url, str(wav)],
                capture_output=True, text=True, env=fake_env(), timeout=60)
            assert out.returncode == 0, out.stderr
            assert '"key": "cli"' in out.stdout and '"labels"' in out.stdout

    run(main())


# -- wait() on the event stream ---------------------------------------------------------------
async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()


class Proxy:
    """A TCP proxy in front of the daemon: logs each request's head; while `passing` is clear,
    holds new `GET /v1/events` connections; `cut()` resets the open ones (a dropped network);
    `refuse` answers them with that (status, error code): 404 is a daemon before the route.
    Requests go upstream with `Connection: close`: a connection is one request, the log is
    complete."""

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.heads: list[str] = []
        self.passing = asyncio.Event()
        self.passing.set()
        self.refuse: tuple[int, str] | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.passing.set()
        self.cut()
        assert self._server is not None
        self._server.close()

    def sent(self, start: str) -> list[str]:
        """The heads of the requests whose request line starts with `start`."""
        return [h for h in self.heads if h.startswith(start)]

    def cut(self) -> None:
        for writer in list(self._streams):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, OSError):
            writer.close()
            return
        self.heads.append(head)
        stream = head.startswith("GET /v1/events")
        if stream and self.refuse:
            status, code = self.refuse
            body = f'{{"error": {{"code": "{code}", "message": "refused"}}}}'
            writer.write((f"HTTP/1.1 {status} Refused\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nRetry-After: 0.1\r\n"
                          f"Connection: close\r\n\r\n{body}").encode())
            writer.close()
            return
        if stream:
            await self.passing.wait()
            self._streams.add(writer)
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        lines = [ln for ln in head.split("\r\n") if ln and not ln.lower().startswith("connection:")]
        up_writer.write(("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1"))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._streams.discard(writer)


def _header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def start_wait(mode: str, url: str, job_id: str, *, token: str = "", timeout_s: float = 30.0,
               **options: Any) -> asyncio.Future[Job]:
    """`wait` for the job on the event stream in the background: a thread for the sync client,
    a task for the async one; `options` go to `event_stream` (None: the client's default)."""
    if mode == "sync":
        c = Client(url, token=token, waiter=event_stream(**options) if options else None)
        return asyncio.ensure_future(asyncio.to_thread(c.wait, job_id, timeout_s=timeout_s))

    async def wait() -> Job:
        waiter = sdk_aio.event_stream(**options) if options else None
        async with AsyncClient(url, token=token, waiter=waiter) as c:
            return await c.wait(job_id, timeout_s=timeout_s)

    return asyncio.ensure_future(wait())


async def connected(proxy: Proxy, job_id: str, reads: int = 2) -> None:
    """The waiter has read `hello` and then the job (its second GET of it)."""
    await wait_for(lambda: len(proxy.sent(f"GET /v1/jobs/{job_id} ")) >= reads,
                   what=f"{reads} reads of job {job_id}")


def test_wait_follows_the_event_stream_sync_and_async(tmp_path: Path) -> None:
    """The default waiter follows GET /v1/events: no long-poll, and `on_update` sees the job's
    events; both clients."""
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), worker_cmd=gated_worker(gate)) as d, \
                Proxy(d.url) as proxy:
            a, b = [(await d.submit(CLIP, key=k))["id"] for k in "ab"]  # queued: gated
            updates: list[JobUpdate] = []
            sync = start_wait("sync", proxy.url, a)  # the default waiter
            asyn = start_wait("async", proxy.url, b, on_update=updates.append)
            await connected(proxy, a)
            await connected(proxy, b)
            gate.touch()
            jobs = await asyncio.wait_for(asyncio.gather(sync, asyn), 30)
            assert [j.status for j in jobs] == ["done", "done"] and jobs[1].result is not None
            assert [(u.job, u.status) for u in updates] == [(b, "running"), (b, "done")]
            assert updates[-1].final and updates[-1].time > 0
            assert len(proxy.sent("GET /v1/events ")) == 2
            assert not [h for h in proxy.heads if "wait=" in h.split("\r\n")[0]]  # no long-poll
            for job_id in (a, b):  # read, read after hello, read the final document
                assert len(proxy.sent(f"GET /v1/jobs/{job_id} ")) == 3

    run(main())


def test_wait_sees_a_job_that_ended_before_the_stream_connected(tmp_path: Path) -> None:
    """Done before `wait`: the first read answers, no stream.  Done between that read and the
    stream's hello (no history to replay on a first connection): the read after hello does."""
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), worker_cmd=gated_worker(gate)) as d, \
                Proxy(d.url) as proxy:
            late = (await d.submit(CLIP, key="late"))["id"]
            proxy.passing.clear()  # the stream connects only once the job is done
            waiting = start_wait("async", proxy.url, late)
            await wait_for(lambda: bool(proxy.sent("GET /v1/events ")), what="stream asked")
            gate.touch()
            await d.final(late)
            proxy.passing.set()
            job = await asyncio.wait_for(waiting, 20)
            assert job.status == "done" and job.id == late
            assert len(proxy.sent(f"GET /v1/jobs/{late} ")) == 2
            assert _header(proxy.sent("GET /v1/events ")[0], "Last-Event-ID") is None

            early = (await d.submit(CLIP, key="early"))["id"]
            await d.final(early)
            job = await asyncio.to_thread(Client(proxy.url).wait, early, timeout_s=10)
            assert job.status == "done"
            assert len(proxy.sent(f"GET /v1/jobs/{early} ")) == 1
            assert len(proxy.sent("GET /v1/events ")) == 1  # no stream for it

    run(main())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_cut_mid_wait_resumes_from_the_last_event_id(tmp_path: Path, mode: str) -> None:
    """The connection is reset while the job is queued; the job finishes while the waiter
    cannot reconnect; the reconnect sends Last-Event-ID and the daemon's replay ends the wait
    (the job is not read again before its final event: the replay, not a check, found it)."""
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), worker_cmd=gated_worker(gate)) as d, \
                Proxy(d.url) as proxy:
            job_id = (await d.submit(CLIP))["id"]
            updates: list[JobUpdate] = []
            waiting = start_wait(mode, proxy.url, job_id, on_update=updates.append)
            await connected(proxy, job_id)
            proxy.passing.clear()
            proxy.cut()
            await wait_for(lambda: len(proxy.sent("GET /v1/events ")) == 2, what="reconnect")
            gate.touch()
            await d.final(job_id)
            proxy.passing.set()
            job = await asyncio.wait_for(waiting, 20)
            assert job.status == "done"
            first, second = proxy.sent("GET /v1/events ")
            assert _header(first, "Last-Event-ID") is None
            resumed = _header(second, "Last-Event-ID")
            assert resumed is not None and resumed.isdigit()
            assert [u.status for u in updates] == ["running", "done"]  # replayed
            assert len(proxy.sent(f"GET /v1/jobs/{job_id} ")) == 3
            assert not [h for h in proxy.heads if "wait=" in h.split("\r\n")[0]]

    run(main())


def test_wait_long_polls_where_there_is_no_stream(tmp_path: Path) -> None:
    """A token without the `read` scope (403) and a daemon without the route (404) long-poll,
    and the waiter remembers it; a wait that runs out raises TimeoutError with the status; a
    stream that keeps answering 503 is retried (after Retry-After), then its error raised."""
    admin, jobs = "sdk-admin-0123456789abcdef", "sdk-jobs-0123456789abcdef"
    cfg = dataclasses.replace(
        daemon_config(tmp_path, server={"token": admin}),
        tokens=(TokenConfig("submitter", hashlib.sha256(jobs.encode()).hexdigest(), ("jobs",)),))
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(cfg, worker_cmd=gated_worker(gate)) as d, \
                Proxy(d.url) as scoped, Proxy(d.url) as older, Proxy(d.url) as closing:
            older.refuse, closing.refuse = (404, "not_found"), (503, "shutting_down")
            own = await asyncio.to_thread(Client(d.url, token=jobs).submit, CLIP)
            other = await asyncio.to_thread(Client(d.url, token=admin).submit, CLIP)
            with pytest.raises(TimeoutError, match=f"job {other.id} is still queued"):
                await asyncio.to_thread(Client(d.url, token=admin).wait, other.id,
                                        timeout_s=0.3)
            with pytest.raises(errors.ShuttingDown):
                await start_wait("async", closing.url, other.id, token=admin, give_up_s=0.3)
            assert len(closing.sent("GET /v1/events ")) >= 3
            forbidden = start_wait("sync", scoped.url, own.id, token=jobs)
            missing = start_wait("async", older.url, other.id, token=admin)
            for proxy, job_id in ((scoped, own.id), (older, other.id)):
                await wait_for(lambda p=proxy, j=job_id: bool(p.sent(f"GET /v1/jobs/{j}?wait=")),
                               what="long-poll")
            gate.touch()
            jobs_done = await asyncio.wait_for(asyncio.gather(forbidden, missing), 30)
            assert [j.status for j in jobs_done] == ["done", "done"]
            for proxy in (scoped, older):
                assert len(proxy.sent("GET /v1/events ")) == 1
            # the same waiter does not ask for the stream again
            waiter = sdk_aio.event_stream()
            async with AsyncClient(older.url, token=admin, waiter=waiter) as c:
                for _ in range(2):
                    job = await c.wait((await c.submit(CLIP)).id, timeout_s=20)
                    assert job.status == "done"
            assert len(older.sent("GET /v1/events ")) <= 2

    run(main())


def test_wait_long_polls_after_a_reset(tmp_path: Path) -> None:
    """Cut off while more events than the daemon keeps (console.events_buffer) went by: the
    resumed stream says `reset`, and the waiter long-polls for the time left."""
    gate = tmp_path / "gate"

    async def main() -> None:
        cfg = daemon_config(tmp_path, console={"events_buffer": 3})
        async with Daemon(cfg, worker_cmd=gated_worker(gate)) as d, Proxy(d.url) as proxy:
            job_id = (await d.submit(CLIP))["id"]
            waiting = start_wait("sync", proxy.url, job_id, fallback=long_poll(poll_s=5))
            await connected(proxy, job_id)
            proxy.passing.clear()
            proxy.cut()
            gate.touch()  # starting, loading, ready, loaded, running, done...: > 3 events
            await d.final(job_id)
            proxy.passing.set()
            job = await asyncio.wait_for(waiting, 20)
            assert job.status == "done"
            assert _header(proxy.sent("GET /v1/events ")[-1], "Last-Event-ID") is not None
            assert proxy.sent(f"GET /v1/jobs/{job_id}?wait=")

    run(main())


def test_on_update_reports_a_segmented_recordings_progress(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), worker_cmd=gated_worker(gate)) as d, \
                Proxy(d.url) as proxy, AsyncClient(proxy.url) as c:
            acc = await c.submit(wav_bytes(60.0), segments="fixed", window_s=3, hop_s=3)
            updates: list[JobUpdate] = []
            waiting = asyncio.ensure_future(c.wait(
                acc.id, timeout_s=30, waiter=sdk_aio.event_stream(on_update=updates.append)))
            await connected(proxy, acc.id)
            gate.touch()
            job = await asyncio.wait_for(waiting, 30)
            assert job.status == "done" and job.result is not None
            progress = [u for u in updates if u.done_s is not None]
            assert len(progress) >= 2 and progress[-1].done_s == pytest.approx(60.0)
            assert [u.done_s for u in progress] == sorted(u.done_s for u in progress)
            assert all(u.status == "running" and u.total_s == pytest.approx(60.0)
                       for u in progress)
            assert updates[-1].status == "done"

    run(main())


def test_sse_decoder_follows_the_event_stream_format() -> None:
    """The HTML standard's parsing rules, fed in awkward chunks."""
    stream = ("\ufeffretry: 2500\n\n: ping\r\n"
              "id: 7\r\nevent: job\r\ndata: {\"a\":\r\ndata:1}\r\n\r\n"
              "event: worker\rdata: é\r\r"
              "data\nid: bad\0id\n\n"
              "id\nevent: nodata\n\n"
              "retry: soon\ndata:  two spaces\nunknown: x\n\n"
              "data: cut off at the end").encode()
    for size in (1, 2, 3, 7, len(stream)):
        d = Decoder()
        got: list[ServerEvent] = []
        for i in range(0, len(stream), size):
            got.extend(d.feed(stream[i:i + size]))
        assert got == [
            ServerEvent("job", '{"a":\n1}', "7", "7"),
            ServerEvent("worker", "é", None, "7"),
            ServerEvent("message", "", None, "7"),
            ServerEvent("message", " two spaces", None, ""),
        ], size
        assert got[0].json() == {"a": 1}
        assert d.retry_ms == 2500 and d.comments == 1 and d.last_id == ""


SCHEMA_1 = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    key TEXT NOT NULL, granularity TEXT NOT NULL, embedding INTEGER NOT NULL,
    duration_s REAL NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT, timings TEXT);
CREATE INDEX jobs_status ON jobs(status, seq);
CREATE INDEX jobs_finished ON jobs(finished) WHERE finished IS NOT NULL;
"""


def test_a_schema_1_database_is_migrated_forward(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA_1)
        conn.execute("PRAGMA application_id = 1869507170")  # store.APP_ID
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO jobs (id, status, key, granularity, embedding, duration_s, "
                     "created) VALUES ('old', 'queued', 'k', 'utterance', 0, 1.0, 1.0)")
    conn.close()

    async def main() -> None:
        store = Store(tmp_path, max_pending=10)
        await store.open()
        try:
            job = await store.get("old")
            assert job.owner == "" and job.callback_url is None and job.callback is None
            assert job.to_json()["key"] == "k"
        finally:
            await store.close()

    run(main())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    conn.close()
    assert {"deliveries", "usage", "jobs_callback", "jobs_usage"} <= tables

"""The console's server side against the real front end (real socket, fake worker): the page and
its files (public, security and cache headers, packaged), `GET /v1/jobs` and `GET /v1/events`
(Server-Sent Events: worker life, job progress, Last-Event-ID resume, heartbeat, shutdown)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import tomllib
from dataclasses import dataclass, fields
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ondemand import config as config_mod
from ondemand.console import routes as console
from ondemand.daemon.events_api import Client
from tests.conftest import Daemon, daemon_config, fake_env, run, wait_for, wav_bytes

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "console-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- the page and its files --------------------------------------------------------------------
def test_page_and_files_load_without_the_token_with_security_and_cache_headers(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, server={"token": TOKEN})) as d:
            assert d.http is not None
            async with d.http.get("/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                page = await r.text()
                index_headers = r.headers
            csp = index_headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert "unsafe-eval" not in csp and "default-src 'none'" in csp
            assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert index_headers["X-Content-Type-Options"] == "nosniff"
            assert index_headers["Cache-Control"] == "no-cache"
            assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"
            assert not re.search(r"\son[a-z]+=", page), "inline event handler"
            assert not re.search(r"\sstyle=", page), "inline style"
            refs = re.findall(r'(?:src|href)="(/console/[^"]+)"', page)
            assert len(refs) >= 10
            version = refs[0].split("/")[2]
            for ref in refs:  # every file the page names exists, versioned and immutable
                async with d.http.get(ref, headers={"Accept-Encoding": "gzip"}) as r:
                    assert r.status == 200, ref
                    assert r.headers["Cache-Control"] == console.IMMUTABLE
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
                    assert "Content-Security-Policy" in r.headers
                    etag = r.headers["ETag"]
                async with d.http.get(ref, headers={"If-None-Match": etag}) as r:
                    assert r.status == 304
            async with d.http.get(f"/console/{version}/app.js",
                                  headers={"Accept-Encoding": "gzip"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                assert r.headers["Content-Type"].startswith("text/javascript")
                assert "import" in await r.text()  # aiohttp inflated it
            # an older page's version: today's file, not cached forever
            async with d.http.get("/console/0ld/app.js") as r:
                assert r.status == 200 and r.headers["Cache-Control"] == "no-cache"
            for missing in (f"/console/{version}/nope.js", f"/console/{version}/../routes.py",
                            f"/console/{version}/%2e%2e/routes.py"):
                async with d.http.get(missing) as r:
                    assert r.status == 404, missing
            # the data behind the page still needs the token
            for path in ("/v1/events", "/v1/jobs", "/v1/status"):
                async with d.http.get(path) as r:
                    assert r.status == 401, path

    run(main())


def test_console_can_be_switched_off(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, console={"enabled": False})) as d:
            assert d.http is not None
            async with d.http.get("/") as r:
                assert r.status == 404
            async with d.http.get("/v1/jobs") as r:
                assert r.status == 200

    run(main())


def test_static_files_are_packaged_reference_each_other_and_no_other_host() -> None:
    static = console.STATIC
    files = [p.relative_to(static.parent).as_posix() for p in static.rglob("*") if p.is_file()]
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["ondemand.console"]
    assert all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)
    bundle = console.load_bundle()
    own = {n: a.body.decode() for n, a in bundle.files.items() if not n.startswith("vendor/")}
    own["index.html"] = bundle.index.body.decode()
    for name, text in own.items():
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a request
        for dep in re.findall(r'from "\./([^"]+)"', text):
            assert dep in bundle.files, (name, dep)
        assert not re.search(r"https?://", text), f"{name} names another host"
    # every module is announced up front (no import discovered late, one round trip later)
    preloaded = set(re.findall(r'rel="modulepreload" href="[^"]*/([^"/]+)"', own["index.html"]))
    modules = {n for n in own if n.endswith(".js")}
    assert preloaded == modules - {"app.js"}, modules ^ preloaded
    # vendored files carry their version in the name and their licence beside them
    vendored = [n for n in bundle.files if n.startswith("vendor/") and "LICENSE" not in n]
    for name in vendored:
        assert re.search(r"-\d+\.\d+\.\d+[.]", name), name
        stem = re.sub(r"\.min\.(js|css)$", "", name)
        assert f"{stem}.LICENSE" in bundle.files, name
    assert "MIT License" in bundle.files["vendor/uplot-1.6.32.LICENSE"].body.decode()
    # the page is small: well under the 300 KB first-visit budget, compressed
    assert sum(len(a.gzipped) for a in bundle.files.values()) + len(bundle.index.gzipped) < 150_000


def test_config_toml_documents_the_console_section() -> None:
    data = tomllib.loads((ROOT / "config.toml").read_text())
    defaults = {f.name: f.default for f in fields(config_mod.ConsoleConfig)}
    assert data["console"] == defaults


# -- GET /v1/jobs ------------------------------------------------------------------------------
def test_jobs_listing_newest_first_with_cursor_filter_top_and_queue_position(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            assert d.http is not None
            done = []
            for i in range(3):
                job = await d.submit(wav_bytes(0.5 + i / 10), key=f"clip{i}")
                done.append((await d.final(job["id"]))["id"])
            async with d.http.get("/v1/jobs", params={"limit": "2"}) as r:
                page1 = await r.json()
            assert [j["key"] for j in page1["jobs"]] == ["clip2", "clip1"]
            assert page1["next"] == done[1]
            first = page1["jobs"][0]
            assert first["status"] == "done" and first["top"]["label"] in ("angry", "happy",
                                                                          "neutral", "sad")
            assert set(first["timings"]) == {"queue_s", "cold_start_s", "compute_s"}
            assert first["position"] is None and first["eta_s"] is None
            assert first["created"] <= first["started"] <= first["finished"]
            async with d.http.get("/v1/jobs", params={"limit": "2",
                                                      "before": page1["next"]}) as r:
                page2 = await r.json()
            assert [j["key"] for j in page2["jobs"]] == ["clip0"] and page2["next"] is None
            for bad in ({"limit": "0"}, {"limit": "x"}, {"status": "done,weird"}):
                async with d.http.get("/v1/jobs", params=bad) as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"

    run(main())


def test_jobs_listing_gives_queued_jobs_their_position_and_eta(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), env=fake_env(load_s="30")) as d:
            assert d.http is not None
            ids = [(await d.submit(wav_bytes(0.5), key=f"q{i}"))["id"] for i in range(3)]
            async with d.http.get("/v1/jobs", params={"status": "queued"}) as r:
                listing = await r.json()
            by_id = {j["id"]: j for j in listing["jobs"]}
            assert [by_id[i]["position"] for i in ids] == [0, 1, 2]
            assert all(by_id[i]["eta_s"] > 0 for i in ids)
            assert by_id[ids[2]]["eta_s"] > by_id[ids[0]]["eta_s"]

    run(main())


# -- GET /v1/events ----------------------------------------------------------------------------
@dataclass
class Sse:
    name: str
    data: dict[str, Any]
    id: str | None


class SseReader:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments = 0

    async def next(self, timeout: float = 10.0) -> Sse:
        name, data, event_id = "message", [], None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no event in time")
            try:
                raw = await asyncio.wait_for(self.resp.content.readline(), left)
            except TimeoutError:
                raise AssertionError("no event in time") from None
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if data:
                    return Sse(name, json.loads("\n".join(data)), event_id)
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                event_id = value

    async def until(self, pred: Any, timeout: float = 10.0) -> list[Sse]:
        """Events up to and including the first one for which pred(event) holds."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(max(0.01, deadline - time.monotonic()))
            seen.append(ev)
            if pred(ev):
                return seen


def test_event_stream_tells_worker_life_and_job_progress(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            assert d.http is not None
            async with d.http.get("/v1/events") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                assert r.headers["Cache-Control"] == "no-cache"
                sse = SseReader(r)
                hello = await sse.next()
                assert hello.name == "hello" and hello.id is None
                assert hello.data["heartbeat_s"] == 15.0
                worker = await sse.next()
                assert worker.name == "worker" and worker.data["worker"]["state"] == "cold"
                queue = await sse.next()
                assert queue.name == "queue" and queue.data == {"queued": 0, "running": 0,
                                                                "max_pending": 1000}
                job = await d.submit(wav_bytes(0.5))
                seen = await sse.until(lambda e: e.name == "job" and e.data["status"] == "done")
                jobs = [(e.data["job"], e.data["status"]) for e in seen if e.name == "job"]
                assert jobs == [(job["id"], "queued"), (job["id"], "running"),
                                (job["id"], "done")]
                states = [e.data["new"] for e in seen if e.name == "state"]
                assert states == ["starting", "loading", "ready"]
                assert any(e.name == "loaded" for e in seen)
                assert any(e.name == "worker" and e.data["worker"]["state"] == "ready"
                           for e in seen)
                assert any(e.name == "queue" and e.data["queued"] == 1 for e in seen)
                ids = [int(e.id) for e in seen if e.id is not None]
                assert ids == sorted(ids) and len(set(ids)) == len(ids)
                snapshots = [e for e in seen if e.name in ("worker", "queue")]
                assert all(e.id is None for e in snapshots)
                # the state event carries the server's time of the change
                change = next(e for e in seen if e.name == "state")
                assert abs(change.data["time"] - time.time()) < 30

    run(main())


def test_event_stream_resumes_after_last_event_id_and_resets_when_too_old(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, console={"events_buffer": 8})
        async with Daemon(cfg) as d:
            assert d.http is not None
            async with d.http.get("/v1/events") as r:
                sse = SseReader(r)
                await sse.next()
                first = await d.submit(wav_bytes(0.5))
                seen = await sse.until(lambda e: e.name == "job" and e.data["status"] == "done")
                last_id = [e.id for e in seen if e.id is not None][-1]
            # while nobody listens: a second job
            second = await d.submit(wav_bytes(0.6))
            await d.final(second["id"])
            await wait_for(lambda: any(getattr(e, "job", None) == second["id"] and
                                       getattr(e, "status", None) == "done" for e in d.events))
            async with d.http.get("/v1/events", headers={"Last-Event-ID": last_id}) as r:
                sse = SseReader(r)
                assert (await sse.next()).name == "hello"
                replay = await sse.until(lambda e: e.id is None)  # up to the fresh snapshot
            replayed = [(e.data["job"], e.data["status"]) for e in replay if e.name == "job"]
            assert replayed == [(second["id"], "queued"), (second["id"], "running"),
                                (second["id"], "done")]
            assert first["id"] not in json.dumps([e.data for e in replay if e.id is not None])
            assert all(int(e.id) > int(last_id) for e in replay if e.id is not None)
            # an id that left the buffer (8 events) or never existed: reset, then fresh state
            for stale in ("1", str(int(last_id) + 10_000), "not-a-number"):
                async with d.http.get("/v1/events", headers={"Last-Event-ID": stale}) as r:
                    sse = SseReader(r)
                    assert (await sse.next()).name == "hello"
                    assert (await sse.next()).name == "reset"
                    assert (await sse.next()).name == "worker"

    run(main())


def test_event_stream_heartbeat_needs_no_activity_and_is_not_activity(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, console={"events_heartbeat_s": 0.2},
                            worker={"unload_after_s": 0.5, "exit_after_s": 1.0})
        async with Daemon(cfg) as d:
            assert d.http is not None
            await d.submit(wav_bytes(0.5))
            await d.wait_state("ready")
            async with d.http.get("/v1/events") as r:
                sse = SseReader(r)
                # reading the stream does not keep the worker warm: it still exits on time
                seen = await sse.until(lambda e: e.name == "state" and e.data["new"] == "cold",
                                       timeout=10)
                assert [e.data["new"] for e in seen if e.name == "state"][-2:] == \
                    ["stopping", "cold"]
                with pytest.raises(AssertionError, match="no event"):
                    while True:  # the snapshots that follow the change
                        await sse.next(timeout=0.5)
                comments = sse.comments
                with pytest.raises(AssertionError, match="no event"):
                    await sse.next(timeout=0.7)  # idle: only heartbeats arrive
                assert sse.comments >= comments + 2

    run(main())


def test_open_streams_end_at_shutdown_without_holding_it_up(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon(daemon_config(tmp_path))
        await d.__aenter__()
        assert d.http is not None
        streams = [await d.http.get("/v1/events") for _ in range(3)]
        for r in streams:
            assert (await SseReader(r).next()).name == "hello"
        t0 = time.monotonic()
        await d.runner.cleanup()  # the runner would wait up to 60 s for open requests
        assert time.monotonic() - t0 < 5
        for r in streams:
            assert await asyncio.wait_for(r.content.read(), 5) is not None  # ended, not hung
            r.release()
        await d.http.close()

    run(main())


def test_a_client_that_falls_behind_is_cut_off_not_buffered_forever() -> None:
    async def main() -> None:
        client = Client(limit=3)
        for i in range(3):
            client.push(f"{i}".encode())
        assert len(client.frames) == 3 and not client.closed
        client.push(b"3")
        assert client.closed and not client.frames  # it resumes by Last-Event-ID
        client.push(b"4")
        assert not client.frames

    run(main())

"""The OpenAPI 3.1 contract (issue 15): a valid document, its paths are exactly the routes the
app serves, and real answers of a running daemon (successes and errors, the console's page and
files, the event stream's frames) validate against it with jsonschema (Draft 2020-12, OpenAPI
3.1's dialect)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate as validate_spec

from ondemand.console import routes as console
from ondemand.daemon import openapi
from ondemand.sdk.sse import Decoder, ServerEvent
from tests.conftest import Daemon, daemon_config, gated_worker, run, wait_for, wav_bytes
from tests.contract import Contract

CLIP = wav_bytes(0.5)
METHODS = ("get", "post", "put", "delete", "patch")


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    validate_spec(doc)


def test_paths_are_exactly_the_served_routes(tmp_path: Path) -> None:
    app = Daemon(daemon_config(tmp_path)).app
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    described = {(m, p) for p, item in openapi.document()["paths"].items()
                 for m in item if m in METHODS}
    assert served == described


def test_every_http_error_code_is_in_the_contract() -> None:
    doc = openapi.document()
    enum = set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
               ["code"]["enum"])
    assert set(openapi.http_codes()) <= enum
    listed = {c for item in doc["paths"].values() for op in item.values()
              for resp in op["responses"].values() for c in resp.get("x-error-codes", ())}
    # every code a route can answer is named on some route (405/404-route come from aiohttp)
    assert set(openapi.http_codes()) - listed <= {"method_not_allowed", "request_too_large",
                                                  "unavailable"}


async def call(d: Daemon, c: Contract, method: str, route: str, *, path: str | None = None,
               expect: int | None = None, **kwargs: Any) -> Any:
    async with d.http.request(method, path or route, **kwargs) as r:
        body = await r.read()
        if expect is not None:
            assert r.status == expect, (method, route, r.status, body[:200])
        c.check(method, route, r.status, r.headers.get("Content-Type", ""), body)
        return json.loads(body) if r.content_type == "application/json" else body


def test_real_answers_validate_against_the_contract(tmp_path: Path) -> None:
    hooks = {"secret": "s", "allowed_hosts": ["127.0.0.1/32"]}
    raw = {"data": CLIP, "headers": {"Content-Type": "audio/wav"}}

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, webhooks=hooks)) as d:
            async with d.http.get("/v1/openapi.json") as r:
                c = Contract(await r.json())
            await call(d, c, "GET", "/v1/openapi.json", expect=200)
            await call(d, c, "GET", "/healthz", expect=200)
            await call(d, c, "GET", "/readyz", expect=200)
            acc = await call(d, c, "POST", "/v1/jobs", expect=202, params={
                "embedding": "true", "callback_url": "http://127.0.0.1:9/h"}, **raw)
            job = f"/v1/jobs/{acc['id']}"
            await call(d, c, "GET", "/v1/jobs/{id}", path=job, expect=200,
                       params={"wait": "10"})
            await call(d, c, "GET", "/v1/jobs/{id}/embedding.npy", path=job + "/embedding.npy",
                       expect=200)
            await call(d, c, "POST", "/v1/recognize", expect=200, params={
                "granularity": "frame"}, **raw)
            form = aiohttp.FormData()
            form.add_field("audio", CLIP, filename="clip.wav", content_type="audio/wav")
            form.add_field("key", "k")
            await call(d, c, "POST", "/v1/jobs", expect=202, data=form)
            await call(d, c, "GET", "/v1/status", expect=200)
            await call(d, c, "GET", "/v1/prewarm", expect=200)
            await call(d, c, "GET", "/v1/cost", expect=200)
            await call(d, c, "GET", "/metrics", expect=200)
            await call(d, c, "POST", "/v1/worker/load", expect=200, json={"hold_s": 1})
            await call(d, c, "POST", "/v1/worker/unload", expect=202, json={"exit": True})
            await call(d, c, "DELETE", "/v1/jobs/{id}", path=job, expect=200)
            # errors
            await call(d, c, "GET", "/v1/jobs/{id}", path=job, expect=404)
            await call(d, c, "DELETE", "/v1/jobs/{id}", path=job, expect=404)
            await call(d, c, "GET", "/v1/jobs/{id}", path=job, expect=400,
                       params={"wait": "soon"})
            await call(d, c, "POST", "/v1/jobs", expect=400, data=b"not audio",
                       headers={"Content-Type": "audio/wav"})
            await call(d, c, "POST", "/v1/jobs", expect=400, params={
                "callback_url": "http://10.0.0.1/h"}, **raw)
            await call(d, c, "POST", "/v1/jobs", expect=415, data=b"x",
                       headers={"Content-Type": "text/plain"})
            await call(d, c, "GET", "/v1/cost", expect=400, params={"since": "yesterday-ish"})
            await call(d, c, "POST", "/v1/worker/load", expect=400, data=b"[",
                       headers={"Content-Type": "application/json"})
            await console_answers(d, c)
        assert len(c.checked) >= 28

    run(main())


async def console_answers(d: Daemon, c: Contract) -> None:
    """The console's routes: the listing (pages, filters, refusals), the page and its files
    (every media type the bundle has, 304, 404)."""
    listing = await call(d, c, "GET", "/v1/jobs", expect=200)
    assert listing["jobs"] and {j["status"] for j in listing["jobs"]} >= {"done"}
    page = await call(d, c, "GET", "/v1/jobs", expect=200, params={"limit": "1"})
    await call(d, c, "GET", "/v1/jobs", expect=200,
               params={"before": page["next"], "status": "done,failed"})
    await call(d, c, "GET", "/v1/jobs", expect=400, params={"limit": "0"})
    await call(d, c, "GET", "/v1/jobs", expect=400, params={"status": "weird"})
    async with d.http.get("/") as r:
        etag = r.headers["ETag"]
    await call(d, c, "GET", "/", expect=200)
    await call(d, c, "GET", "/", expect=304, headers={"If-None-Match": etag})
    bundle = console.load_bundle()
    static = "/console/{version}/{path}"
    by_type = {a.content_type: name for name, a in sorted(bundle.files.items())}
    assert len(by_type) >= 4  # js, css, svg, the licences' text
    for name in by_type.values():
        await call(d, c, "GET", static, path=f"/console/{bundle.version}/{name}", expect=200)
    first = f"/console/{bundle.version}/{next(iter(by_type.values()))}"
    async with d.http.get(first) as r:
        etag = r.headers["ETag"]
    await call(d, c, "GET", static, path=first, expect=304, headers={"If-None-Match": etag})
    await call(d, c, "GET", static, path=f"/console/{bundle.version}/nope.js", expect=404)


def test_event_stream_frames_validate_against_their_schemas(tmp_path: Path) -> None:
    """Every event name, from live streams: a cancelled job, a load with a hold, jobs queued,
    running and done, a segmented recording's progress, an unload with exit, a reset and a
    resume; each frame validates against `ServerEvent`, and ids are on history events only."""
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), worker_cmd=gated_worker(gate)) as d:
            c = Contract(openapi.document())
            frames: list[ServerEvent] = []

            async def read(headers: dict[str, str], until: str) -> None:
                async with d.http.get("/v1/events", headers=headers) as r:
                    c.check("GET", "/v1/events", r.status, r.headers["Content-Type"], b"")
                    decoder = Decoder()
                    async for chunk in r.content.iter_any():
                        for ev in decoder.feed(chunk):
                            c.check_event(ev)
                            frames.append(ev)
                            if ev.event == until:
                                return

            live = asyncio.create_task(read({}, until="exited"))
            await wait_for(lambda: bool(frames), what="hello")
            cancelled = await d.submit(CLIP)  # queued: the worker waits for the gate
            async with d.http.delete(f"/v1/jobs/{cancelled['id']}") as r:
                assert r.status == 200
            gate.touch()
            async with d.http.post("/v1/worker/load", json={"hold_s": 30}) as r:
                assert r.status == 200
            await d.final((await d.submit(CLIP))["id"])
            segmented = await d.submit(wav_bytes(40.0), segments="fixed", window_s=3, hop_s=3)
            await d.final(segmented["id"])
            async with d.http.post("/v1/worker/unload", json={"exit": True}) as r:
                assert r.status == 202
            await asyncio.wait_for(live, 20)
            live_ids = [int(ev.id) for ev in frames if ev.id]
            await asyncio.wait_for(read({"Last-Event-ID": "not-an-id"}, until="queue"), 10)
            assert [ev.event for ev in frames[-4:]] == ["hello", "reset", "worker", "queue"]
            seen = len(frames)
            before_first = str(live_ids[0] - 1)
            await asyncio.wait_for(read({"Last-Event-ID": before_first}, until="queue"), 10)
            replayed = [int(ev.id) for ev in frames[seen:] if ev.id]
            assert replayed[:len(live_ids)] == live_ids  # the whole buffer again, in order
        names = {ev.event for ev in frames}
        assert names == set(openapi.EVENTS), set(openapi.EVENTS) ^ names
        jobs = [ev.json() for ev in frames if ev.event == "job"]
        assert {"done_s", "total_s"} <= {k for j in jobs for k in j}  # progress was seen
        assert "cancelled" in {j["status"] for j in jobs}

    run(main())


def test_auth_and_limit_errors_validate(tmp_path: Path) -> None:
    import dataclasses
    import hashlib

    from ondemand.config import TokenConfig

    token = "reader-token-0123456789abcdef"
    cfg = dataclasses.replace(
        daemon_config(tmp_path, server={"token": "admin-token-0123456789abcdef"}),
        tokens=(TokenConfig("reader", hashlib.sha256(token.encode()).hexdigest(), ("read",)),))
    gate = tmp_path / "gate"

    async def main() -> None:
        async with Daemon(cfg, worker_cmd=gated_worker(gate)) as d:
            c = Contract(openapi.document())
            await call(d, c, "GET", "/v1/status", expect=401)
            await call(d, c, "GET", "/v1/events", expect=401)
            await call(d, c, "GET", "/v1/jobs", expect=401)
            await call(d, c, "POST", "/v1/worker/unload", expect=403,
                       headers={"Authorization": f"Bearer {token}"})
            await call(d, c, "GET", "/readyz", expect=200,
                       headers={"Authorization": f"Bearer {token}"})
            gate.touch()

    run(main())


@pytest.mark.parametrize("route", ["/v1/jobs/{id}", "/v1/recognize"])
def test_job_documents_carry_the_callback_schema(route: str) -> None:
    doc = openapi.document()
    schemas = doc["components"]["schemas"]
    assert "callback" in schemas["Job"]["required"]
    assert schemas["Callback"]["properties"]["state"]["enum"] == ["waiting", "pending",
                                                                  "delivered", "failed"]
    assert route in doc["paths"]

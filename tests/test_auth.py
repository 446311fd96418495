"""Scoped tokens and quotas (issue 15): each scope against each route, job ownership, the
per-token limits (429 + Retry-After), per-token counts in /metrics and the cost report."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from ondemand import config as config_mod
from ondemand.daemon import auth
from ondemand.daemon.auth import ROUTE_SCOPES, check_bind
from ondemand.errors import ConfigError
from tests.conftest import Daemon, daemon_config, gated_worker, run, wav_bytes

SERVER = "server-token-0123456789abcdef"
TOKENS = {name: f"{name}-token-0123456789abcdef" for name in
          ("jobs-a", "jobs-b", "reader", "admin2")}
SCOPES = {"jobs-a": ["jobs"], "jobs-b": ["jobs"], "reader": ["read"], "admin2": ["admin"]}
CLIP = wav_bytes(0.5)


def table(name: str, **limits: int) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest(),
            "scopes": SCOPES[name], **limits}


def cfg(tmp: Path, **limits: dict[str, int]) -> config_mod.Config:
    c = daemon_config(tmp, server={"token": SERVER})
    tokens = tuple(config_mod.build(config_mod.TokenConfig, table(n, **limits.get(n, {})),
                                    f"tokens[{i}].") for i, n in enumerate(TOKENS, 1))
    import dataclasses

    return dataclasses.replace(c, tokens=tokens)


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


# (method, path) -> a request that reaches the handler; the job id is filled in
REQUESTS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/healthz"): {},
    ("GET", "/"): {},
    ("GET", "/console/{version}/{path}"): {},
    ("GET", "/v1/jobs"): {},
    ("GET", "/v1/events"): {},  # a stream: only its refusals are checked here
    ("GET", "/v1/openapi.json"): {},
    ("POST", "/v1/jobs"): {"data": CLIP, "headers": {"Content-Type": "audio/wav"}},
    ("GET", "/v1/jobs/{id}"): {},
    ("GET", "/v1/jobs/{id}/embedding.npy"): {},
    ("DELETE", "/v1/jobs/{id}"): {},
    ("POST", "/v1/recognize"): {"data": CLIP, "headers": {"Content-Type": "audio/wav"}},
    ("GET", "/v1/status"): {},
    ("GET", "/readyz"): {},
    ("GET", "/v1/prewarm"): {},
    ("GET", "/v1/cost"): {},
    ("GET", "/metrics"): {},
    ("POST", "/v1/worker/load"): {"json": {"wait": False}},
    ("POST", "/v1/worker/unload"): {"json": {}},
}
# who -> the scopes that decide; None: no token, "wrong": an unknown token
WHO = {"none": None, "wrong": "not-a-token-0123456789", "jobs": TOKENS["jobs-a"],
       "read": TOKENS["reader"], "admin": TOKENS["admin2"], "server": SERVER}


def expected(who: str, scope: str) -> str:
    if scope == auth.OPEN:
        return "allowed"
    if who in ("none", "wrong"):
        return "unauthorized"
    if who in ("admin", "server") or scope == auth.ANY or scope == who:
        return "allowed"
    return "forbidden"


def test_every_served_route_has_a_scope_and_a_request_here(tmp_path: Path) -> None:
    app = Daemon(daemon_config(tmp_path)).app
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert served == set(ROUTE_SCOPES), "add the route to auth.ROUTE_SCOPES"
    assert served == set(REQUESTS)


def test_each_scope_against_each_route(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg(tmp_path)) as d:
            async with d.http.post("/v1/jobs", data=CLIP, headers={
                    **bearer(TOKENS["jobs-a"]), "Content-Type": "audio/wav"}) as r:
                job_id = (await r.json())["id"]
            failures = []
            for (method, path), kwargs in REQUESTS.items():
                for who, token in WHO.items():
                    want = expected(who, ROUTE_SCOPES[(method, path)])
                    if who == "jobs" and "{id}" in path and method == "DELETE":
                        continue  # checked below (it would cancel the job)
                    if path == "/v1/events" and want == "allowed":
                        continue  # the stream does not end
                    headers = {**kwargs.get("headers", {}), **bearer(token)}
                    url = path.replace("{id}", job_id)
                    async with d.http.request(method, url, headers=headers,
                                              **{k: v for k, v in kwargs.items()
                                                 if k != "headers"}) as r:
                        body = await r.read()
                        got = {401: "unauthorized", 403: "forbidden"}.get(r.status, "allowed")
                        if got != want:
                            failures.append(f"{who} {method} {path}: {r.status} {body[:80]!r}")
                        if r.status in (401, 403):
                            assert (await r.json())["error"]["code"] == got
            assert not failures, "\n".join(failures)

    run(main())


def test_a_jobs_token_sees_only_its_own_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg(tmp_path)) as d:
            a, b = bearer(TOKENS["jobs-a"]), bearer(TOKENS["jobs-b"])
            async with d.http.post("/v1/jobs", data=CLIP, params={"embedding": "true"},
                                   headers={**a, "Content-Type": "audio/wav"}) as r:
                job_id = (await r.json())["id"]
            async with d.http.get(f"/v1/jobs/{job_id}", params={"wait": "10"}, headers=a) as r:
                doc = await r.json()
                assert r.status == 200 and doc["status"] == "done" and doc["owner"] == "jobs-a"
            for method, path in (("GET", f"/v1/jobs/{job_id}"),
                                 ("GET", f"/v1/jobs/{job_id}/embedding.npy"),
                                 ("DELETE", f"/v1/jobs/{job_id}")):
                async with d.http.request(method, path, headers=b) as r:
                    assert r.status == 404, (method, path)
                    assert (await r.json())["error"]["code"] == "not_found"
            for admin in (bearer(SERVER), bearer(TOKENS["admin2"])):  # admin sees every job
                async with d.http.get(f"/v1/jobs/{job_id}", headers=admin) as r:
                    assert r.status == 200
            async with d.http.delete(f"/v1/jobs/{job_id}", headers=a) as r:
                assert r.status == 200 and (await r.json())["deleted"] is True

    run(main())


def test_submits_per_minute_answers_429_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg(tmp_path, **{"jobs-a": {"submits_per_minute": 2}})) as d:
            headers = {**bearer(TOKENS["jobs-a"]), "Content-Type": "audio/wav"}
            for _ in range(2):
                async with d.http.post("/v1/jobs", data=CLIP, headers=headers) as r:
                    assert r.status == 202
            async with d.http.post("/v1/jobs", data=CLIP, headers=headers) as r:
                assert r.status == 429
                assert (await r.json())["error"]["code"] == "rate_limited"
                assert 1 <= int(r.headers["Retry-After"]) <= 60
            async with d.http.post("/v1/jobs", data=CLIP, headers={  # others are not limited
                    **bearer(TOKENS["jobs-b"]), "Content-Type": "audio/wav"}) as r:
                assert r.status == 202

    run(main())


def test_max_pending_answers_429_with_retry_after(tmp_path: Path) -> None:
    gate = tmp_path / "gate"  # the worker never starts: jobs stay queued

    async def main() -> None:
        async with Daemon(cfg(tmp_path, **{"jobs-a": {"max_pending": 2}}),
                          worker_cmd=gated_worker(gate)) as d:
            headers = {**bearer(TOKENS["jobs-a"]), "Content-Type": "audio/wav"}
            for _ in range(2):
                async with d.http.post("/v1/jobs", data=CLIP, headers=headers) as r:
                    assert r.status == 202
            async with d.http.post("/v1/jobs", data=CLIP, headers=headers) as r:
                assert r.status == 429
                assert (await r.json())["error"]["code"] == "too_many_pending"
                assert int(r.headers["Retry-After"]) >= 1
            async with d.http.post("/v1/jobs", data=CLIP, headers={
                    **bearer(TOKENS["jobs-b"]), "Content-Type": "audio/wav"}) as r:
                assert r.status == 202
            gate.touch()

    run(main())


def test_metrics_and_cost_count_jobs_per_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg(tmp_path)) as d:
            for name, n in (("jobs-a", 2), ("jobs-b", 1)):
                for _ in range(n):
                    async with d.http.post("/v1/recognize", data=CLIP, headers={
                            **bearer(TOKENS[name]), "Content-Type": "audio/wav"}) as r:
                        assert (await r.json())["status"] == "done"
            async with d.http.get("/metrics", headers=bearer(TOKENS["reader"])) as r:
                text = await r.text()
            assert 'ondemand_token_jobs_total{status="done",token="jobs-a"} 2.0' in text
            assert 'ondemand_token_jobs_total{status="done",token="jobs-b"} 1.0' in text
            assert 'ondemand_token_audio_seconds_total{token="jobs-a"} 1.0' in text
            async with d.http.get("/v1/cost", headers=bearer(TOKENS["reader"])) as r:
                doc = await r.json()
            tokens = {t["name"]: t for t in doc["periods"][0]["tokens"]}
            assert tokens["jobs-a"]["jobs"] == {"done": 2, "failed": 0, "cancelled": 0}
            assert tokens["jobs-b"]["audio_s"] == pytest.approx(0.5)
            assert tokens["jobs-a"]["audio_share"] == pytest.approx(2 / 3)

    run(main())


def test_tokens_config_and_bind(tmp_path: Path) -> None:
    digest = "0" * 64
    with pytest.raises(ConfigError, match=r"tokens\[2\]\.name: 'a' is used by another token"):
        config_mod.build(config_mod.Config, {"tokens": [
            {"name": "a", "sha256": digest}, {"name": "a", "sha256": "1" * 64}]})
    with pytest.raises(ConfigError, match=r"tokens\[1\]\.scopes"):
        config_mod.build(config_mod.Config, {"tokens": [
            {"name": "a", "sha256": digest, "scopes": ["everything"]}]})
    with pytest.raises(ConfigError, match=r"tokens\[1\]\.name: 'server' is reserved"):
        config_mod.build(config_mod.Config, {"tokens": [{"name": "server", "sha256": digest}]})
    with pytest.raises(ConfigError):
        check_bind(daemon_config(tmp_path, server={"host": "0.0.0.0"}))
    import dataclasses

    tokened = dataclasses.replace(daemon_config(tmp_path, server={"host": "0.0.0.0"}),
                                  tokens=(config_mod.TokenConfig("a", digest),))
    check_bind(tokened)  # [[tokens]] guard a network bind too

"""Security against the real front end on 127.0.0.1 (tests/conftest.py `Daemon`): bearer token on
every endpoint but /healthz (constant-time compare), no non-loopback bind without a token, errors
without tracebacks or server paths, unguessable job ids, no endpoint that reads a server path."""

from __future__ import annotations

import hmac
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import ondemand
from ondemand.console import routes as console
from ondemand.daemon import app as app_mod
from ondemand.daemon import auth as auth_mod
from ondemand.daemon.app import check_bind
from ondemand.errors import ConfigError
from tests.conftest import Daemon, daemon_config, fake_env, run, wav_bytes

TOKEN = "s3cret-token-for-tests_0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PKG_DIR = str(Path(ondemand.__file__).resolve().parent)
URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def routes(d: Daemon) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, with `{id}` filled in: new routes are covered too."""
    out = []
    for r in d.app.router.routes():
        if r.method == "HEAD":
            continue
        info = r.resource.get_info() if r.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        out.append((r.method, path.replace("{id}", "AAAAAAAAAAAAAAAAAAAAAA")))
    return sorted(set(out))


def assert_clean_error(body: dict[str, Any], *, tmp: Path) -> None:
    """The error shape, and nothing an attacker could learn the server's layout from."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message"} and err["code"] and err["message"], err
    text = json.dumps(body)
    for leak in ("Traceback", 'File "', ".py\"", PKG_DIR, str(tmp), "/work/", "/home/",
                 "/var/lib/"):
        assert leak not in text, (leak, body)


def test_every_endpoint_but_healthz_needs_the_token(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, server={"token": TOKEN})
        async with Daemon(cfg) as d:
            table = routes(d)
            assert ("GET", "/healthz") in table and ("POST", "/v1/jobs") in table
            bad_headers: list[dict[str, str]] = [
                {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
                {"Authorization": f"Bearer {TOKEN[:-1]}"},
                {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"bearer  {TOKEN}"},
            ]
            for method, path in table:
                for headers in bad_headers:
                    async with d.http.request(method, path, headers=headers,
                                              data=wav_bytes(0.5)) as r:
                        if path == "/healthz":
                            assert r.status == 200
                            continue
                        if console.is_public(path):  # the page and its files: no data
                            assert r.status != 401, (method, path)
                            continue
                        assert r.status == 401, (method, path, headers, r.status)
                        assert_clean_error(await r.json(), tmp=tmp_path)
                        assert (await r.json())["error"]["code"] == "unauthorized"
            # with the token each endpoint does its job (never 401)
            for method, path in table:
                async with d.http.request(method, path, headers=AUTH) as r:
                    assert r.status != 401, (method, path)
            async with d.http.post("/v1/jobs", data=wav_bytes(0.5),
                                   headers={**AUTH, "Content-Type": "audio/wav"}) as r:
                assert r.status == 202
            # nothing unauthenticated woke the worker
            assert d.sup.spawns <= 1

    run(main())


def test_token_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONDEMAND_TOKEN", TOKEN)

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            async with d.http.get("/v1/status") as r:
                assert r.status == 401
            async with d.http.get("/v1/status", headers=AUTH) as r:
                assert r.status == 200

    run(main())


def test_token_is_compared_in_constant_time(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", spy)

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, server={"token": TOKEN})) as d:
            for headers in ({}, {"Authorization": "Bearer x"}, AUTH):
                async with d.http.get("/v1/status", headers=headers) as r:
                    assert r.status in (200, 401)

    run(main())
    # every check went through hmac.compare_digest, with the full header (no early == on a prefix)
    assert len(calls) == 3
    assert all(b == f"Bearer {TOKEN}".encode() for _, b in calls)
    assert [a for a, _ in calls] == [b"", b"Bearer x", f"Bearer {TOKEN}".encode()]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "10.0.0.1", "example.com"])
def test_non_loopback_bind_refused_without_token(tmp_path: Path, host: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONDEMAND_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"server\.host.*token"):
        check_bind(daemon_config(tmp_path, server={"host": host}))
    check_bind(daemon_config(tmp_path, server={"host": host, "token": TOKEN}))
    check_bind(daemon_config(tmp_path, server={"host": host, "allow_insecure_bind": True}))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_bind_needs_no_token(tmp_path: Path, host: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONDEMAND_TOKEN", raising=False)
    check_bind(daemon_config(tmp_path, server={"host": host}))


def test_serve_refuses_a_public_bind_without_token(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[server]\nhost = "0.0.0.0"\nport = 0\n[storage]\ndir = "{tmp_path / "var"}"\n')
    env = {k: v for k, v in fake_env().items() if k != "ONDEMAND_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    assert "server.host" in out.stderr and "token" in out.stderr
    assert "serving on" not in out.stderr and "Traceback" not in out.stderr


def test_errors_carry_no_traceback_or_path(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, server={"max_upload_mb": 0.05})
        async with Daemon(cfg) as d:
            cases: list[tuple[str, str, dict[str, Any]]] = [
                ("GET", "/nope", {}),
                ("GET", "/v1/jobs/doesnotexist", {}),
                ("GET", "/v1/jobs/doesnotexist/embedding.npy", {}),
                ("DELETE", "/v1/jobs/doesnotexist", {}),
                ("PUT", "/v1/jobs", {}),
                ("GET", "/v1/jobs/x", {"params": {"wait": "soon"}}),
                ("POST", "/v1/worker/load", {"data": b"{not json",
                                             "headers": {"Content-Type": "application/json"}}),
                ("POST", "/v1/worker/load", {"json": {"hold_s": -1}}),
                ("POST", "/v1/jobs", {"data": b"RIFF\x00\x00", "headers": {
                    "Content-Type": "audio/wav"}}),
                ("POST", "/v1/jobs", {"data": wav_bytes(3.0), "headers": {
                    "Content-Type": "audio/wav"}}),
                ("POST", "/v1/jobs", {"data": b"x", "headers": {"Content-Type": "text/html"}}),
            ]
            for method, path, kw in cases:
                async with d.http.request(method, path, **kw) as r:
                    assert 400 <= r.status < 500, (method, path, r.status)
                    assert_clean_error(await r.json(), tmp=tmp_path)

            # an unexpected exception deep inside (its text names a server path) is a bare 500
            async def boom() -> dict[str, int]:
                raise RuntimeError(f"disk I/O error at {tmp_path}/jobs.sqlite3 ({PKG_DIR})")

            d.app[app_mod.api.STORE].counts = boom  # type: ignore[method-assign]
            async with d.http.get("/v1/status") as r:
                assert r.status == 500
                body = await r.json()
                assert_clean_error(body, tmp=tmp_path)
                assert body["error"]["code"] == "internal"

    run(main())


def test_job_ids_are_unguessable(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path), env=fake_env(load_s="5")) as d:
            ids = [(await d.submit(wav_bytes(0.1)))["id"] for _ in range(64)]
        assert len(set(ids)) == len(ids)
        for i in ids:
            # secrets.token_urlsafe(16): 128 random bits, 22 URL-safe characters
            assert len(i) >= 22 and URLSAFE.match(i), i
        # not sequential or time-based: no shared prefix beyond chance, every position varies
        prefixes = {i[:4] for i in ids}
        assert len(prefixes) >= 60
        for pos in range(21):  # the 22nd character carries only 2 bits
            assert len({i[pos] for i in ids}) >= 16, pos

    run(main())


def test_no_endpoint_reads_a_server_side_path(tmp_path: Path) -> None:
    secret = tmp_path / "server-side.wav"
    secret.write_bytes(wav_bytes(1.0))  # a perfectly good clip, if anything would read it

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            p = str(secret)
            attempts: list[dict[str, Any]] = [
                {"data": p.encode(), "headers": {"Content-Type": "audio/wav"}},
                {"json": {"audio": p, "path": p}},
                {"data": {"audio": p}},  # a form field holding a path, not a file
                {"data": b"", "params": {"audio": p, "path": p, "file": p},
                 "headers": {"Content-Type": "audio/wav"}},
            ]
            form = aiohttp.FormData()
            form.add_field("path", p)
            form.add_field("file", p)
            attempts.append({"data": form})
            for kw in attempts:
                for endpoint in ("/v1/jobs", "/v1/recognize"):
                    async with d.http.post(endpoint, **kw) as r:
                        assert 400 <= r.status < 500, (endpoint, kw, r.status)
                        assert_clean_error(await r.json(), tmp=tmp_path)
            for path in ("/v1/jobs/..%2F..%2Fetc%2Fpasswd",
                         "/v1/jobs/..%2Fjobs.sqlite3/embedding.npy",
                         "/v1/jobs/%2Fetc%2Fpasswd/embedding.npy"):
                async with d.http.get(path) as r:
                    assert r.status == 404, path
            assert d.sup.spawns == 0
            st = await d.status()
            assert st["queue"]["queued"] == 0

    run(main())

"""The typed client (ondemand.sdk) against a real daemon, sync and async; and the job database's
migration from schema 1 (issue 15)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondemand import errors
from ondemand.daemon.store import Store
from ondemand.sdk import AsyncClient, Client, Job
from tests.conftest import Daemon, daemon_config, fake_env, run, wav_bytes

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
                    _never_final(c)  # a waiter is pluggable (an event-stream one, later)

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

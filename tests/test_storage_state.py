"""Nothing shared by accident, nothing started on broken state (issue 10).

One daemon per storage.dir (a flock the kernel drops on kill -9); a job database that is empty,
garbage, truncated, corrupt, foreign or newer refuses start-up with one line and the `mv` that
moves it aside; a damaged cost ledger is moved aside with a warning; storage.dir that is a file
and a port in use are one line and exit 2; a database failing at run time turns /readyz
not-ready, logged once; signals during start-up never end in a traceback.  Real `ondemand serve`
processes wherever the process boundary is the point."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondemand.client import Client
from ondemand.cost.ledger import LEDGER_FILE
from ondemand.daemon import lock as storage_lock
from ondemand.daemon.sdnotify import Notifier
from ondemand.daemon.service import ServiceNotifier
from ondemand.daemon.store import DONE, QUEUED, SCHEMA_VERSION, Job, Store
from ondemand.errors import StorageError, StorageLocked
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    fake_log,
    run,
    serve_config,
    start_serve,
    wav_bytes,
)

ERROR = "ondemand: error: "


def serve_refused(cfg: Path, timeout: float = 30.0) -> str:
    """Run `ondemand serve`, expect exit 2 with no traceback; return its one error line."""
    r = subprocess.run([sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, env=fake_env(), timeout=timeout)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(ERROR)]
    assert len(lines) == 1, r.stderr
    return lines[0][len(ERROR):]


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(20)


# -- one daemon per storage directory ----------------------------------------------------------
def test_lock_is_exclusive_names_the_holder_and_is_given_back(tmp_path: Path) -> None:
    held = storage_lock.acquire(tmp_path / "var")
    assert (tmp_path / "var" / storage_lock.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(StorageLocked, match=rf"{tmp_path / 'var'} is in use by another ondemand "
                                            rf"daemon \(pid {os.getpid()}\)"):
        storage_lock.acquire(tmp_path / "var")
    held.release()
    storage_lock.acquire(tmp_path / "var").release()


def test_second_daemon_on_the_same_storage_dir_exits_2_and_the_first_runs_its_job_once(
        tmp_path: Path) -> None:
    log = tmp_path / "fake.log"
    cfg = serve_config(tmp_path)
    var = tmp_path / "var"
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(0.5))
    first, url = start_serve(cfg, fake_env(infer_s="1.5", log=str(log)))
    try:
        client = Client(url)
        job_id = client.submit(clip, key="only")["id"]
        deadline = time.monotonic() + 20
        while client.status()["queue"]["running"] == 0:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)

        line = serve_refused(cfg)
        assert line == (f"storage.dir {var} is in use by another ondemand daemon (pid "
                        f"{first.pid}); stop that daemon first, or give this one its own "
                        "storage.dir")

        # readers need no lock: the cost report from the ledger file, beside the daemon
        r = subprocess.run([sys.executable, "-m", "ondemand", "cost", "--config", str(cfg),
                            "--format", "json"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["periods"]

        job = client.wait(job_id, poll_s=5)
        assert (job["status"], job["attempts"]) == ("done", 1)
        assert first.poll() is None
    finally:
        assert stop(first) == 0
    infers = [e for e in fake_log(log) if e["op"] == "infer"]
    assert [k for e in infers for k in e["keys"]] == ["only"]  # ran once, by the first daemon
    # nobody "recovered" (closed) the first daemon's open cost interval
    with contextlib.closing(sqlite3.connect(var / LEDGER_FILE)) as conn:
        (recovered,) = conn.execute(
            "SELECT COUNT(*) FROM cost_intervals WHERE closed_by = 'recovery'").fetchone()
    assert recovered == 0


def test_kill_9_releases_the_lock_so_a_restart_takes_it(tmp_path: Path) -> None:
    cfg = serve_config(tmp_path)
    lock_file = tmp_path / "var" / storage_lock.LOCK_FILE
    first, _ = start_serve(cfg, fake_env())
    try:
        assert lock_file.read_text() == f"{first.pid}\n"
    finally:
        first.kill()
        first.wait(10)
    second, url = start_serve(cfg, fake_env())
    try:
        assert lock_file.read_text() == f"{second.pid}\n"
        assert Client(url).status()["queue"]["queued"] == 0
    finally:
        assert stop(second) == 0


# -- a damaged or foreign job database ---------------------------------------------------------
def make_jobs_db(var: Path, queued: int = 100, done: int = 40) -> None:
    """A real job database written by the store: `queued` queued and `done` done jobs."""

    async def main() -> None:
        store = Store(var, max_pending=10_000)
        await store.open()
        now = time.time()
        jobs = [Job(id=f"job{i:04d}", status=QUEUED, key="k" * 200, granularity="utterance",
                    embedding=False, duration_s=1.0, created=now) for i in range(queued + done)]
        await asyncio.gather(*(store.add(j) for j in jobs))
        finished = [j.id for j in jobs[:done]]
        await store.mark_running(finished, now)
        await asyncio.gather(*(store.finish(i, DONE, result={}) for i in finished))
        await store.close()

    run(main())


def _truncate(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


def _corrupt_middle(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    middle = (len(data) // page // 2) * page
    data[middle:middle + page] = random.Random(10).randbytes(page)
    db.write_bytes(bytes(data))


def _foreign(db: Path) -> None:
    db.unlink()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()


def _newer(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 99")


def _orphaned_wal(db: Path) -> None:
    """The database moved away without its -wal (which holds commits not yet in the file)."""
    wal = db.with_name(db.name + "-wal")
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("UPDATE jobs SET key = 'changed'")
        kept = wal.read_bytes()
    db.rename(db.with_name("moved-away.sqlite3"))
    wal.write_bytes(kept)


DAMAGE = {
    "empty": (lambda db: db.write_bytes(b""), "is empty (0 bytes): not a database"),
    "garbage": (lambda db: db.write_bytes(random.Random(1).randbytes(20_000)),
                "is not a SQLite database (no SQLite header)"),
    "truncated": (_truncate, "is truncated ("),
    "corrupt_middle": (_corrupt_middle, "is corrupt ("),
    "foreign": (_foreign, "is a SQLite database but not an ondemand job database "
                          "(application_id=0, tables: users)"),
    "newer": (_newer, f"was written by a newer ondemand (schema 99; this one knows "
                      f"{SCHEMA_VERSION})"),
    "orphaned_wal": (_orphaned_wal, "is missing but jobs.sqlite3-wal is still there (the "
                                    "database was moved or deleted without it; a new database "
                                    "would take in its pages)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_job_database_refuses_start_with_one_line_and_the_mv(tmp_path: Path,
                                                                     kind: str) -> None:
    var = tmp_path / "var"
    make_jobs_db(var)
    db = var / "jobs.sqlite3"
    damage, what = DAMAGE[kind]
    damage(db)
    before = {p.name: p.read_bytes() for p in var.glob("jobs.sqlite3*")}
    cfg = serve_config(tmp_path)

    line = serve_refused(cfg)
    assert line.startswith(f"the job database {db} {what}"), line
    assert "the daemon will not start on it" in line
    if kind in ("empty", "garbage", "truncated", "orphaned_wal"):
        assert "; no job can be read from it;" in line
    elif kind in ("corrupt_middle", "newer"):
        assert "still readable" in line and "queued" in line and "pending ids: job" in line
    assert {p.name: p.read_bytes() for p in var.glob("jobs.sqlite3*")} == before  # untouched

    # the printed command moves it aside with its spool; then the daemon starts on a new queue
    command = line[line.index("mkdir "):]
    aside = Path(shlex.split(command)[1])
    subprocess.run(command, shell=True, check=True)
    assert {p.name: p.read_bytes() for p in aside.glob("jobs.sqlite3*")} == before
    assert (aside / "spool").is_dir()
    if kind in ("corrupt_middle", "orphaned_wal"):
        proc, url = start_serve(cfg, fake_env())
        try:
            assert Client(url).status()["queue"]["queued"] == 0
        finally:
            assert stop(proc) == 0


def test_database_held_by_another_program_is_not_called_damaged(tmp_path: Path) -> None:
    # A writer outside the daemon (an operator's sqlite3 shell) holds the write lock: the store
    # cannot recover its jobs, and says so without calling a healthy database damaged.
    make_jobs_db(tmp_path, queued=3, done=0)
    db = tmp_path / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")

        async def main() -> None:
            with pytest.raises(StorageError) as caught:
                await Store(tmp_path, max_pending=10).open()
            assert caught.value.message == (
                f"the job database {db}: cannot open it (database is locked); check the disk, "
                "the file's owner and mode, and that no other program holds it "
                f"(fuser {db})")

        run(main())
        other.execute("ROLLBACK")
    assert not list(tmp_path.glob("jobs.sqlite3.*"))


# -- the cost ledger: moved aside when damaged, refused when foreign ---------------------------
def test_damaged_cost_ledger_is_moved_aside_and_a_new_one_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = tmp_path / LEDGER_FILE
    ledger.write_bytes(random.Random(2).randbytes(10_000))

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            assert d.http is not None
            async with d.http.get("/v1/cost") as r:
                assert r.status == 200

    with caplog.at_level(logging.WARNING, logger="ondemand.cost.ledger"):
        run(main())
    (aside,) = tmp_path.glob(f"{LEDGER_FILE}.not_sqlite-*")
    assert aside.read_bytes()[:16] != b"SQLite format 3\x00"  # the old bytes, kept
    warned = [r.getMessage() for r in caplog.records if "moved it aside" in r.getMessage()]
    assert warned == [f"cost ledger {ledger} is not a SQLite database (no SQLite header): moved "
                      f"it aside to {aside} and started a new ledger; the cost history before "
                      "now is only in that file"]
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cost_intervals").fetchone()[0] >= 1


def test_foreign_cost_ledger_refuses_start(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / LEDGER_FILE)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()

    async def main() -> None:
        d = Daemon(daemon_config(tmp_path))
        try:
            with pytest.raises(StorageError, match=r"not an ondemand cost ledger .* mv "):
                await d.__aenter__()
        finally:
            await d.runner.cleanup()

    run(main())


# -- start-up errors: one line, exit 2 ---------------------------------------------------------
def test_storage_dir_that_is_a_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("not a directory")
    assert serve_refused(serve_config(tmp_path)) == (
        f"storage.dir {tmp_path / 'var'}: is a file, not a directory; set storage.dir to a "
        "directory (it is created if missing), or move the file away")


def test_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = serve_refused(serve_config(tmp_path, server={"port": port}))
    assert line == (f"cannot listen on 127.0.0.1:{port}: address already in use (`ss -ltnp "
                    f"'sport = :{port}'` shows the process); stop it, or set server.port to a "
                    "free port")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_start_up_or_running_stops_in_order(tmp_path: Path, sig: int) -> None:
    cfg = serve_config(tmp_path)
    # during start-up: the components are opening (the ledger is open, the store is next)
    proc = subprocess.Popen([sys.executable, "-m", "ondemand", "serve", "--config", str(cfg)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=fake_env())
    assert proc.stderr is not None
    seen = ""
    while "accounting started" not in seen:
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, seen + err
    assert "Traceback" not in seen + err and "ondemand: error" not in err
    assert "ondemand shutting down" in err
    # while serving
    proc, _ = start_serve(cfg, fake_env())
    proc.send_signal(sig)
    assert proc.wait(20) == 0


# -- a database failing while the daemon runs --------------------------------------------------
def corrupt_under_the_daemon(db: Path) -> None:
    """Overwrite every page but the first (the schema) on disk, then write a page through SQLite
    so the daemon's connection drops its cache and reads the damage."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = bytearray(db.read_bytes())
        page = int.from_bytes(data[16:18], "big")
        rnd = random.Random(3)
        for start in range(page, len(data), page):
            data[start:start + page] = rnd.randbytes(page)
        with open(db, "r+b") as f:
            f.write(bytes(data))
        conn.execute("PRAGMA user_version = 1")


def test_database_failing_at_run_time_is_503_and_not_ready_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            assert d.http is not None
            done = await d.final((await d.submit(wav_bytes(0.5)))["id"])
            async with d.http.get("/readyz") as r:
                assert r.status == 200
            corrupt_under_the_daemon(tmp_path / "jobs.sqlite3")
            for _ in range(3):
                async with d.http.post("/v1/jobs", data=wav_bytes(0.5),
                                       headers={"Content-Type": "audio/wav"}) as r:
                    assert r.status == 503, await r.text()
                    assert (await r.json())["error"]["code"] == "storage_unavailable"
                async with d.http.get(f"/v1/jobs/{done['id']}") as r:
                    assert r.status == 503
                async with d.http.get("/readyz") as r:
                    assert r.status == 503
                    assert await r.json() == {
                        "ready": False,
                        "reason": "job database failing: database disk image is malformed"}
            assert not list((tmp_path / "spool").iterdir())  # refused uploads leave no file
            # systemd's watchdog: no ping while the store fails (so it restarts us), one line
            service = ServiceNotifier(d.app, Notifier())
            assert await service.tick() is False
            assert await service.tick() is False
            await service.close()

    with caplog.at_level(logging.INFO, logger="ondemand"):
        run(main())
    failing = [r for r in caplog.records if "store database failing" in r.getMessage()]
    assert len(failing) == 1
    no_ping = [r for r in caplog.records if "no ping while the job store fails" in r.getMessage()]
    assert len(no_ping) == 1
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere


def test_cost_command_on_a_damaged_ledger_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_bytes(os.urandom(5000))
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path}"\n')
    out = subprocess.run([sys.executable, "-m", "ondemand", "cost", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"cannot read the cost ledger {tmp_path / LEDGER_FILE}" in out.stderr

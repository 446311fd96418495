"""The durable job queue: SQLite (WAL, synchronous=FULL) plus spooled audio files under storage.dir.

Invariants:
- One owner of the connection: a single thread runs every statement.  Callers on the event loop
  `await` an operation; operations that arrive together share one transaction (group commit), each
  inside its own SAVEPOINT so one failure never undoes another.  This keeps the loop free and makes
  hundreds of fsync'd submissions per second cheap.
- A job's audio is written (fsync'd, renamed into place) *before* its row is committed, and the
  caller answers 202 only after the commit: a `kill -9` at any moment loses no accepted job and
  leaves no row without its audio.
- `finish()` only moves a job that is `running`; a result that arrives for a job that was requeued,
  cancelled or purged is dropped, so every job completes exactly once.
- On open, `running` jobs (the previous process died under them) go back to `queued`; their
  `attempts` already count the interrupted run.  Only the daemon holding storage.dir's lock
  (daemon/lock.py, taken by `serve()`) may open the store: recovery assumes no one else runs.
- The database is checked before it is used (ondemand/dbcheck.py): an empty, garbage,
  truncated, corrupt or foreign file refuses start-up with one line naming the jobs that can
  still be read and the exact `mv` that moves it aside, never a traceback or a silent new queue.
- Schema 2 (daemon/outbox.py) adds each job's owner (token name) and callback URL, the webhook
  outbox and per-token usage; an older database is migrated forward at open, in one
  transaction, after the checks.
- At run time a failing database (corrupt, I/O error, read-only) turns `healthy` false with the
  reason in `error`, logged once per change, and callers get 503 `storage_unavailable`;
  corruption stays until a restart, the others clear on the next committed write (issue 10: every
  job request was a 500 while /readyz said ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import shlex
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ondemand import dbcheck
from ondemand.daemon import outbox
from ondemand.dbcheck import Damage
from ondemand.errors import (
    JobNotFound,
    QueueFull,
    StorageError,
    StorageUnavailable,
    TooManyPending,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)
_GROUP_MAX = 512  # operations per shared transaction
DB_FILE = "jobs.sqlite3"
APP_ID = 0x6F6E6A62  # PRAGMA application_id: "onjb", an ondemand job database
SCHEMA_VERSION = outbox.VERSION  # PRAGMA user_version; 2: daemon/outbox.py
# The columns of schema 1: what identifies a job database of ours from before application_id.
_COLUMNS = {"seq", "id", "status", "key", "granularity", "embedding", "duration_s", "created",
            "started", "finished", "attempts", "result", "error", "timings"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    key TEXT NOT NULL,
    granularity TEXT NOT NULL,
    embedding INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished) WHERE finished IS NOT NULL;
"""


@dataclass
class Job:
    id: str
    status: str
    key: str
    granularity: str
    embedding: bool
    duration_s: float
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    timings: dict[str, float | None] = field(default_factory=dict)
    owner: str = ""  # the token's name (daemon/auth.py); "" without auth
    callback_url: str | None = None
    callback: dict[str, Any] | None = None  # delivery state (outbox.callback_json), read only
    # issue 12: {mode: vad|fixed, window_s, hop_s} for a timeline; None = classified whole
    segments: dict[str, Any] | None = None
    progress: dict[str, float] | None = None  # {done_s, total_s} while running (not stored)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "status": self.status,
            "granularity": self.granularity,
            "embedding": self.embedding,
            "duration_s": self.duration_s,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "owner": self.owner,
            "result": self.result,
            "error": self.error,
            "timings": {
                "queue_s": self.timings.get("queue_s"),
                "cold_start_s": self.timings.get("cold_start_s"),
                "compute_s": self.timings.get("compute_s"),
            },
            "attempts": self.attempts,
            "callback": self.callback,
            "segments": self.segments["mode"] if self.segments else "none",
            **({"window_s": self.segments.get("window_s"), "hop_s": self.segments.get("hop_s")}
               if self.segments and self.segments.get("mode") == "fixed" else {}),
            "progress": self.progress,
        }


@dataclass
class JobSummary:
    """A row of the recent-jobs listing: the job without its full result (only the top label),
    and for a pending job how many pending jobs were accepted before it."""

    id: str
    status: str
    key: str
    granularity: str
    embedding: bool
    duration_s: float
    created: float
    started: float | None
    finished: float | None
    attempts: int
    top: dict[str, Any] | None
    error: dict[str, str] | None
    timings: dict[str, float | None]
    position: int | None


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=row["status"],
        key=row["key"],
        granularity=row["granularity"],
        embedding=bool(row["embedding"]),
        duration_s=row["duration_s"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        attempts=row["attempts"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        timings=json.loads(row["timings"]) if row["timings"] else {},
        owner=row["owner"],
        callback_url=row["callback_url"],
        callback=outbox.callback_json(row),
        segments=json.loads(row["segments"]) if row["segments"] else None,
    )


_SELECT_JOB = (f"SELECT jobs.*, {outbox.CALLBACK_SELECT} FROM {outbox.CALLBACK_FROM} "
               "WHERE jobs.id = ?")


def _document(conn: sqlite3.Connection, job_id: str) -> str | None:
    """The job document as JSON text (a webhook's body), or None when the job is gone."""
    row = conn.execute(_SELECT_JOB, (job_id,)).fetchone()
    if row is None:
        return None
    return json.dumps(_row_to_job(row).to_json(), allow_nan=False)


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA application_id = {APP_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.executescript(SCHEMA)
    outbox.migrate(conn, user_version=SCHEMA_VERSION)
    conn.execute("PRAGMA journal_mode=WAL")


def _open_checked(path: Path) -> sqlite3.Connection:
    """The job database's connection, the file created whole when absent; raises Damage when it
    is not a healthy job database of ours (nothing is written to it then)."""
    if not path.exists():
        dbcheck.create(path, _create_schema)
    dbcheck.check_file(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        dbcheck.check_open(conn, app_id=APP_ID, version=SCHEMA_VERSION, table="jobs",
                           columns=_COLUMNS, what="job database")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        outbox.migrate(conn, user_version=SCHEMA_VERSION)  # schema 1 -> 2, idempotent
    except sqlite3.DatabaseError as e:
        conn.close()
        damage = dbcheck.damage_from(e)
        if damage is None:
            raise
        raise damage from e
    except BaseException:
        conn.close()
        raise
    return conn


def _recover(conn: sqlite3.Connection) -> int:
    """running -> queued: the previous process died under them (attempts already count it)."""
    cur = conn.execute("UPDATE jobs SET status=?, started=NULL WHERE status=?", (QUEUED, RUNNING))
    return cur.rowcount


def _readable_jobs(path: Path) -> str:
    """Best effort: what a refused job database still shows (status counts, pending ids)."""
    counts: dict[str, int] = {}
    pending: list[str] = []
    complete = True
    # Without a -wal nothing can be missed by reading the file as immutable, which creates no
    # -wal/-shm beside it; with one, read-only through it.
    wal = path.with_name(f"{path.name}-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)
    except sqlite3.Error:
        return "no job can be read from it"
    try:
        try:
            for job_id, status in conn.execute("SELECT id, status FROM jobs"):
                counts[status] = counts.get(status, 0) + 1
                if status in (QUEUED, RUNNING):
                    pending.append(job_id)
        except sqlite3.Error:
            complete = False
        if not complete:  # a damaged table: count from the status index, look rows up one by one
            counts, pending = {}, []
            with contextlib.suppress(sqlite3.Error):
                for status, seq in conn.execute(
                        "SELECT status, seq FROM jobs INDEXED BY jobs_status").fetchall():
                    counts[status] = counts.get(status, 0) + 1
                    if status in (QUEUED, RUNNING):
                        with contextlib.suppress(sqlite3.Error):
                            pending.extend(r[0] for r in conn.execute(
                                "SELECT id FROM jobs WHERE seq = ?", (seq,)))
    finally:
        conn.close()
    if not counts:
        return "no job can be read from it"
    order = [QUEUED, RUNNING, DONE, FAILED, CANCELLED]
    told = ", ".join(f"{counts[st]} {st}" for st in sorted(
        counts, key=lambda st: order.index(st) if st in order else len(order)))
    ids = ""
    if pending:
        more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
        ids = f"; pending ids: {', '.join(pending[:3])}{more}"
    partial = "" if complete else " (partly: the table is damaged)"
    return f"still readable{partial}: {told}{ids}"


class _DbThread(threading.Thread):
    """Owns the sqlite3 connection; runs submitted functions in group-committed transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="ondemand-store", daemon=True)
        self._path = path
        self._ops: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None]
        self._ops = queue.Queue()
        self.ready: Future[None] = Future()
        # Written only by this thread, read anywhere: None while the database works.
        self.error: str | None = None
        self._corrupt = False

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._ops.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._ops.put(None)

    def run(self) -> None:
        try:
            conn = _open_checked(self._path)
        except Exception as e:
            self.ready.set_exception(e)
            return
        self.ready.set_result(None)
        stopping = False
        while not stopping:
            first = self._ops.get()
            if first is None:
                break
            group = [first]
            while len(group) < _GROUP_MAX:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            self._run_group(conn, group)
        conn.close()

    def _health(self, conn: sqlite3.Connection, outcomes: list[tuple[bool, Any]],
                changes_before: int) -> None:
        """Track whether the database works; log only when that changes."""
        failed = next((v for ok, v in outcomes if not ok and dbcheck.failure(v)), None)
        if failed is not None:
            self._corrupt = self._corrupt or dbcheck.is_corruption(failed)
            reason = dbcheck.failure(failed)
            if self.error is None:
                log.error("store database failing: %s: %s; jobs answer 503 storage_unavailable"
                          " and /readyz is not ready; stop the daemon and start it again to "
                          "have the database checked", self._path, reason)
            self.error = reason
        elif self.error is not None and not self._corrupt and conn.total_changes > changes_before:
            log.warning("store database works again: %s", self._path)
            self.error = None

    def _run_group(
        self,
        conn: sqlite3.Connection,
        group: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]],
    ) -> None:
        # Skip ops whose caller gave up (asyncio wrapper cancelled) before they ran; once RUNNING
        # a future cannot be cancelled, so set_result below cannot raise InvalidStateError (it
        # did, and killed this thread and with it the whole store: issue 6 tests).
        group = [(fn, fut) for fn, fut in group if fut.set_running_or_notify_cancel()]
        if not group:
            return
        outcomes: list[tuple[bool, Any]] = []
        changes_before = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _ in group:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, e))
            conn.execute("COMMIT")
        except Exception as e:  # the commit itself failed: nothing of the group is stored
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            outcomes = [(False, e)] * len(group)
        self._health(conn, outcomes, changes_before)
        for (_, fut), (ok, value) in zip(group, outcomes, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class Store:
    def __init__(self, directory: Path, *, max_pending: int) -> None:
        self.dir = directory
        self.spool_dir = directory / "spool"
        self.results_dir = directory / "results"
        self.db_path = directory / DB_FILE
        self.max_pending = max_pending
        self._db: _DbThread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> int:
        """Open (creating) the database; requeue jobs interrupted by a previous process.
        Returns how many were requeued.  Raises StorageError (one line, what to do) when the
        database is damaged, foreign or cannot be opened."""
        try:
            for d in (self.dir, self.spool_dir, self.results_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._db = _DbThread(self.db_path)
            self._db.start()
            await asyncio.wrap_future(self._db.ready)
            n = await self._call(_recover)
            await self._sweep_spool()
        except Damage as e:
            await self.close()
            raise StorageError(await asyncio.to_thread(self._refusal, e)) from e
        except (OSError, sqlite3.Error, StorageUnavailable) as e:  # busy, locked, no permission
            await self.close()
            raise StorageError(
                f"the job database {self.db_path}: cannot open it ({e}); check the disk, the "
                "file's owner and mode, and that no other program holds it "
                f"(fuser {shlex.quote(str(self.db_path))})") from e
        if n:
            log.info("store recovered %d interrupted job(s) -> queued", n)
        return n

    async def _sweep_spool(self) -> None:
        """Remove spool files no pending job owns (a crash between spooling and commit)."""

        def pending_ids(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT id FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING))
            return {r["id"] for r in rows}

        keep = await self._call(pending_ids)
        swept = 0
        for path in self.spool_dir.iterdir():
            if path.name.endswith(".tmp") or path.name.removesuffix(".npy") not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    swept += 1
        if swept:
            log.info("store removed %d orphaned spool file(s)", swept)

    def _refusal(self, damage: Damage) -> str:
        """One line: the file, what is wrong, what can still be read, the exact command that
        moves it aside (with the spool and results that belong to it)."""
        readable = ("no job can be read from it"
                    if damage.kind in ("empty", "not_sqlite", "orphaned")
                    else _readable_jobs(self.db_path))
        aside = self.dir / f"{DB_FILE}.{damage.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        moved = [*dbcheck.companions(self.db_path),  # after reading: it may have made a -shm
                 *(d for d in (self.spool_dir, self.results_dir) if d.exists())]
        cmd = (f"mkdir {shlex.quote(str(aside))} && mv "
               f"{' '.join(shlex.quote(str(p)) for p in moved)} {shlex.quote(str(aside))}/")
        if damage.kind == "orphaned":
            todo = ("put the database back beside it (its latest commits are in it), or start "
                    f"an empty queue by moving it aside: {cmd}")
        elif damage.kind == "foreign":
            todo = ("check storage.dir (is it the right directory?); to start an empty queue "
                    f"here, move it aside: {cmd}")
        elif damage.kind == "newer":
            todo = f"run that newer ondemand, or start an empty queue by moving it aside: {cmd}"
        else:
            todo = ("to start with an empty queue, move it aside with its spooled audio "
                    f"(keep it to salvage what is readable): {cmd}")
        return (f"the job database {self.db_path} {damage.detail}; {readable}; the daemon will "
                f"not start on it: {todo}")

    @property
    def healthy(self) -> bool:
        """False while the database is failing (the reason is in `error`)."""
        return self.error is None

    @property
    def error(self) -> str | None:
        return self._db.error if self._db is not None else None

    async def close(self) -> None:
        if self._db is not None:
            self._db.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._db.join, 10.0)
            self._db = None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError("store is not open")
        try:
            return await asyncio.wrap_future(self._db.submit(fn))
        except sqlite3.DatabaseError as e:
            reason = dbcheck.failure(e)
            if reason is None:
                raise
            raise StorageUnavailable(
                f"the job database is failing ({reason}); nothing was changed; retry later "
                "(the server log says what the operator must do)") from e

    # -- paths -----------------------------------------------------------------------------
    def audio_path(self, job_id: str) -> Path:
        return self.spool_dir / f"{job_id}.npy"

    def embedding_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.emb.npy"

    # -- operations ------------------------------------------------------------------------
    async def add(self, job: Job, *, owner_max_pending: int = 0) -> int:
        """Insert a queued job whose audio is already spooled.  Returns its position (jobs ahead
        of it).  Raises QueueFull when `max_pending` jobs are queued or running, TooManyPending
        when its owner has `owner_max_pending` (0 = no limit) of them."""
        max_pending = self.max_pending

        def insert(conn: sqlite3.Connection) -> int:
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)
            ).fetchone()
            if pending >= max_pending:
                raise QueueFull(
                    f"the queue is full ({pending} jobs pending, queue.max_pending={max_pending}); "
                    "retry later"
                )
            if owner_max_pending:
                (mine,) = conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)",
                    (job.owner, QUEUED, RUNNING)).fetchone()
                if mine >= owner_max_pending:
                    raise TooManyPending(
                        f"token {job.owner!r} has {mine} jobs queued or running, its limit "
                        f"(max_pending={owner_max_pending}); retry when one has finished")
            conn.execute(
                "INSERT INTO jobs (id, status, key, granularity, embedding, duration_s, created,"
                " owner, callback_url, segments) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, QUEUED, job.key, job.granularity, int(job.embedding), job.duration_s,
                 job.created, job.owner, job.callback_url,
                 json.dumps(job.segments) if job.segments else None),
            )
            return int(pending)

        return await self._call(insert)

    async def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job with its callback state; `owner` (a token name): only that owner's job,
        another's is as unknown (404) as a job that does not exist."""

        def get(conn: sqlite3.Connection) -> sqlite3.Row | None:
            return conn.execute(_SELECT_JOB, (job_id,)).fetchone()

        row = await self._call(get)
        if row is None or (owner is not None and row["owner"] != owner):
            raise JobNotFound(f"no job {job_id!r} (unknown, deleted or purged)")
        return _row_to_job(row)

    async def counts(self) -> dict[str, int]:
        """How many jobs are queued and running."""

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT status, COUNT(*) AS n FROM jobs WHERE status IN (?, ?) GROUP BY status",
                (QUEUED, RUNNING),
            ).fetchall()
            found = {r["status"]: int(r["n"]) for r in rows}
            return {QUEUED: found.get(QUEUED, 0), RUNNING: found.get(RUNNING, 0)}

        return await self._call(count)

    async def queued(self, limit: int) -> list[Job]:
        """The oldest `limit` queued jobs, oldest first."""

        def select(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(
                "SELECT * FROM jobs WHERE status=? ORDER BY seq LIMIT ?", (QUEUED, limit)
            ).fetchall()

        return [_row_to_job(r) for r in await self._call(select)]

    async def recent(
        self, limit: int, *, statuses: Sequence[str] = (), before: str | None = None,
        owner: str | None = None,
    ) -> list[JobSummary]:
        """The newest `limit` jobs (only `statuses` when given, only `owner`'s when given),
        newest first; `before`: only jobs accepted before that job (an unknown id gives none).
        Reads no result but its top."""
        where: list[str] = []
        args: list[str] = []
        if owner is not None:
            where.append("j.owner = ?")
            args.append(owner)
        if statuses:
            where.append(f"j.status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if before is not None:
            where.append("j.seq < (SELECT seq FROM jobs WHERE id=?)")
            args.append(before)
        # Positions in one pass over the pending jobs (at most queue.max_pending rows), not a
        # count per listed row: the page re-reads this while a queue drains.
        sql = (
            "WITH pending AS (SELECT id, ROW_NUMBER() OVER (ORDER BY seq) - 1 AS ahead"
            "  FROM jobs WHERE status IN (?, ?))"
            " SELECT j.id, status, key, granularity, embedding, duration_s, created, started,"
            " finished, attempts, json_extract(result, '$.top') AS top, error, timings, ahead"
            " FROM jobs j LEFT JOIN pending p ON p.id = j.id"
            f" {'WHERE ' + ' AND '.join(where) if where else ''}"
            " ORDER BY seq DESC LIMIT ?"
        )
        params = (QUEUED, RUNNING, *args, limit)

        def select(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, params).fetchall()

        return [
            JobSummary(
                id=r["id"], status=r["status"], key=r["key"], granularity=r["granularity"],
                embedding=bool(r["embedding"]), duration_s=r["duration_s"], created=r["created"],
                started=r["started"], finished=r["finished"], attempts=r["attempts"],
                top=json.loads(r["top"]) if r["top"] else None,
                error=json.loads(r["error"]) if r["error"] else None,
                timings=json.loads(r["timings"]) if r["timings"] else {},
                position=r["ahead"],
            )
            for r in await self._call(select)
        ]

    async def mark_running(self, ids: Sequence[str], started: float) -> list[str]:
        """queued -> running (attempts + 1).  Returns the ids that were still queued."""

        def mark(conn: sqlite3.Connection) -> list[str]:
            moved = []
            for job_id in ids:
                cur = conn.execute(
                    "UPDATE jobs SET status=?, started=?, attempts=attempts+1"
                    " WHERE id=? AND status=?",
                    (RUNNING, started, job_id, QUEUED),
                )
                if cur.rowcount:
                    moved.append(job_id)
            return moved

        return await self._call(mark)

    async def requeue(self, ids: Sequence[str], *, refund: bool = False) -> None:
        """running -> queued; `refund`: the interrupted run does not count as an attempt."""
        back = 1 if refund else 0

        def requeue(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET status=?, started=NULL, attempts=MAX(0, attempts-?)"
                " WHERE id=? AND status=?",
                [(QUEUED, back, i, RUNNING) for i in ids],
            )

        await self._call(requeue)

    async def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        timings: dict[str, float | None] | None = None,
        finished: float | None = None,
    ) -> Job | None:
        """running -> done/failed.  Returns the finished job, or None when it was not running."""
        assert status in (DONE, FAILED)
        when = time.time() if finished is None else finished

        def finish(conn: sqlite3.Connection) -> sqlite3.Row | None:
            cur = conn.execute(
                "UPDATE jobs SET status=?, finished=?, result=?, error=?, timings=?"
                " WHERE id=? AND status=?",
                (status, when, json.dumps(result) if result is not None else None,
                 json.dumps(error) if error is not None else None,
                 json.dumps(timings or {}), job_id, RUNNING),
            )
            if not cur.rowcount:
                return None
            return conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

        row = await self._call(finish)
        return _row_to_job(row) if row is not None else None

    async def cancel_or_delete(self, job_id: str, *, owner: str | None = None) -> str:
        """Cancel a queued or running job (-> cancelled, audio removed) or delete a finished one
        (row and files).  Returns "cancelled" or "deleted".  A running job's result is dropped
        when its batch returns (`finish` only moves running jobs); its batch-mates finish.
        `owner`: only that owner's job (another's is 404).  A pending callback keeps its body."""

        def op(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT status, owner FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or (owner is not None and row["owner"] != owner):
                raise JobNotFound(f"no job {job_id!r} (unknown, deleted or purged)")
            if row["status"] in (QUEUED, RUNNING):
                conn.execute(
                    "UPDATE jobs SET status=?, finished=? WHERE id=?",
                    (CANCELLED, time.time(), job_id),
                )
                return "cancelled"
            outbox.freeze(conn, (job_id,), _document)
            conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            return "deleted"

        outcome = await self._call(op)
        self._remove_files(job_id, embedding=outcome == "deleted")
        return outcome

    async def purge(self, older_than: float) -> int:
        """Delete final jobs finished before `older_than` (wall clock) with their files."""

        def purge(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ? AND status IN"
                " (?, ?, ?)",
                (older_than, *FINAL),
            ).fetchall()
            ids = [r["id"] for r in rows]
            outbox.freeze(conn, ids, _document)
            conn.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])
            outbox.purge(conn, older_than)
            return ids

        ids = await self._call(purge)
        for job_id in ids:
            self._remove_files(job_id, embedding=True)
        if ids:
            log.info("store purged %d finished job(s)", len(ids))
        return len(ids)

    # -- the webhook outbox and usage (daemon/outbox.py) -----------------------------------
    async def due_deliveries(self, now: float, limit: int,
                             exclude: Sequence[str] = ()) -> list[outbox.Delivery]:
        """Pending deliveries due at `now` (bodies frozen), not those in `exclude`."""
        return await self._call(lambda conn: outbox.due(conn, now, limit, tuple(exclude),
                                                        _document))

    async def next_delivery_at(self, exclude: Sequence[str] = ()) -> float | None:
        return await self._call(lambda conn: outbox.next_due(conn, tuple(exclude)))

    async def record_delivery(self, job: str, **outcome: Any) -> None:
        """One attempt's outcome: attempts, state, last_status, last_error, next_attempt_at,
        now (outbox.record)."""
        await self._call(lambda conn: outbox.record(conn, job, **outcome))

    async def usage(self, since: float | None = None,
                    until: float | None = None) -> list[outbox.Usage]:
        return await self._call(lambda conn: outbox.usage(conn, since, until))

    def remove_audio(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.audio_path(job_id).unlink()

    def _remove_files(self, job_id: str, *, embedding: bool) -> None:
        self.remove_audio(job_id)
        if embedding:
            with contextlib.suppress(FileNotFoundError):
                self.embedding_path(job_id).unlink()

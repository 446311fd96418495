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
  `attempts` already count the interrupted run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ondemand.errors import OndemandError

log = logging.getLogger(__name__)
T = TypeVar("T")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)
_GROUP_MAX = 512  # operations per shared transaction

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


class QueueFull(OndemandError):
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobNotFound(OndemandError):
    code = "not_found"


class JobConflict(OndemandError):
    """The job is in a state that does not allow the request (e.g. deleting a running job)."""

    code = "conflict"


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

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "result": self.result,
            "error": self.error,
            "timings": {
                "queue_s": self.timings.get("queue_s"),
                "cold_start_s": self.timings.get("cold_start_s"),
                "compute_s": self.timings.get("compute_s"),
            },
            "attempts": self.attempts,
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
    )


def fsync_write_npy(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` atomically and durably (tmp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full mid-write: leave no half file behind (issue 6)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class _DbThread(threading.Thread):
    """Owns the sqlite3 connection; runs submitted functions in group-committed transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="ondemand-store", daemon=True)
        self._path = path
        self._ops: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None]
        self._ops = queue.Queue()
        self.ready: Future[None] = Future()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._ops.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._ops.put(None)

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
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

    @staticmethod
    def _run_group(
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
        self.db_path = directory / "jobs.sqlite3"
        self.max_pending = max_pending
        self._db: _DbThread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> int:
        """Open (creating) the database; requeue jobs interrupted by a previous process.
        Returns how many were requeued."""
        for d in (self.dir, self.spool_dir, self.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._db = _DbThread(self.db_path)
        self._db.start()
        await asyncio.wrap_future(self._db.ready)

        def recover(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE jobs SET status=?, started=NULL WHERE status=?", (QUEUED, RUNNING)
            )
            return cur.rowcount

        n = await self._call(recover)
        if n:
            log.info("store recovered %d interrupted job(s) -> queued", n)
        await self._sweep_spool()
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

    async def close(self) -> None:
        if self._db is not None:
            self._db.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._db.join, 10.0)
            self._db = None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError("store is not open")
        return await asyncio.wrap_future(self._db.submit(fn))

    # -- paths -----------------------------------------------------------------------------
    def audio_path(self, job_id: str) -> Path:
        return self.spool_dir / f"{job_id}.npy"

    def embedding_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.emb.npy"

    # -- operations ------------------------------------------------------------------------
    async def add(self, job: Job) -> int:
        """Insert a queued job whose audio is already spooled.  Returns its position (jobs ahead
        of it).  Raises QueueFull when `max_pending` jobs are queued or running."""
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
            conn.execute(
                "INSERT INTO jobs (id, status, key, granularity, embedding, duration_s, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, QUEUED, job.key, job.granularity, int(job.embedding), job.duration_s,
                 job.created),
            )
            return int(pending)

        return await self._call(insert)

    async def get(self, job_id: str) -> Job:
        def get(conn: sqlite3.Connection) -> sqlite3.Row | None:
            return conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

        row = await self._call(get)
        if row is None:
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
        self, limit: int, *, statuses: Sequence[str] = (), before: str | None = None
    ) -> list[JobSummary]:
        """The newest `limit` jobs (only `statuses` when given), newest first; `before`: only
        jobs accepted before that job (an unknown id gives none).  Reads no result but its top."""
        where: list[str] = []
        args: list[str] = []
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if before is not None:
            where.append("seq < (SELECT seq FROM jobs WHERE id=?)")
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

    async def cancel_or_delete(self, job_id: str) -> str:
        """Cancel a queued job (-> cancelled, audio removed) or delete a finished one (row and
        files).  Returns "cancelled" or "deleted"; a running job raises JobConflict."""

        def op(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id!r} (unknown, deleted or purged)")
            if row["status"] == QUEUED:
                conn.execute(
                    "UPDATE jobs SET status=?, finished=? WHERE id=?",
                    (CANCELLED, time.time(), job_id),
                )
                return "cancelled"
            if row["status"] == RUNNING:
                raise JobConflict(
                    f"job {job_id} is running and cannot be cancelled; delete it once it finished"
                )
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
            conn.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])
            return ids

        ids = await self._call(purge)
        for job_id in ids:
            self._remove_files(job_id, embedding=True)
        if ids:
            log.info("store purged %d finished job(s)", len(ids))
        return len(ids)

    def remove_audio(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.audio_path(job_id).unlink()

    def _remove_files(self, job_id: str, *, embedding: bool) -> None:
        self.remove_audio(job_id)
        if embedding:
            with contextlib.suppress(FileNotFoundError):
                self.embedding_path(job_id).unlink()

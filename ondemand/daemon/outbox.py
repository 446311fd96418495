"""Schema 2 of the job database: job owners, the webhook outbox and per-token usage.

Pure SQL on a connection (the store's DB thread runs every function here inside its group
commit); no I/O besides SQLite, no clock except what callers pass.

Invariants:
- A job submitted with a `callback_url` gets its delivery row in the *same transaction* that
  makes it final (done, failed, cancelled): the trigger `jobs_callback` inserts it, so no code
  path that finishes a job (dispatcher, cancel, recovery, whatever comes later) can forget it, and
  a `kill -9` right after the job's end still finds it at the next start (issue 15: "never
  lost").  Likewise `jobs_usage` adds the job to its owner's hourly tally, which outlives the
  purge of the job row (the cost report reads 30 days; rows are kept 24 hours).
- A delivery's body is frozen once (`payload`): before its first attempt, or when its job row
  is deleted or purged first.  Every retry sends the same bytes under the same delivery id.
- A delivery row outlives its job row; it is purged with the finished jobs once it is no
  longer pending.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

VERSION = 2
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
WAITING = "waiting"  # shown for a job with a callback that has not ended yet (no row)
_FINAL = "('done', 'failed', 'cancelled')"

# Columns a schema-1 `jobs` table gets; (name, declaration).
JOB_COLUMNS = (
    ("owner", "TEXT NOT NULL DEFAULT ''"),
    ("callback_url", "TEXT"),
    ("segments", "TEXT"),  # issue 12: a segmented job's option as JSON {mode, window_s, hop_s}
)

SCHEMA = f"""
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, status);
CREATE TABLE IF NOT EXISTS deliveries (
    job TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    next_attempt_at REAL,
    created REAL NOT NULL,
    finished REAL,
    payload TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at)
    WHERE state = '{PENDING}';
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    jobs INTEGER NOT NULL,
    audio_s REAL NOT NULL,
    compute_s REAL NOT NULL,
    PRIMARY KEY (hour, owner, status)
);
CREATE TRIGGER IF NOT EXISTS jobs_callback AFTER UPDATE OF status ON jobs
WHEN NEW.callback_url IS NOT NULL AND NEW.status IN {_FINAL} AND OLD.status NOT IN {_FINAL}
BEGIN
    INSERT OR IGNORE INTO deliveries (job, id, url, state, next_attempt_at, created)
    VALUES (NEW.id, lower(hex(randomblob(16))), NEW.callback_url, '{PENDING}',
            COALESCE(NEW.finished, 0), COALESCE(NEW.finished, 0));
END;
CREATE TRIGGER IF NOT EXISTS jobs_usage AFTER UPDATE OF status ON jobs
WHEN NEW.status IN {_FINAL} AND OLD.status NOT IN {_FINAL}
BEGIN
    INSERT INTO usage (hour, owner, status, jobs, audio_s, compute_s)
    VALUES (CAST(COALESCE(NEW.finished, 0) / 3600 AS INTEGER) * 3600, NEW.owner, NEW.status, 1,
            NEW.duration_s, COALESCE(json_extract(NEW.timings, '$.compute_s'), 0))
    ON CONFLICT (hour, owner, status) DO UPDATE SET jobs = jobs + 1,
        audio_s = audio_s + excluded.audio_s, compute_s = compute_s + excluded.compute_s;
END;
"""

# The callback's state beside a job row: `SELECT jobs.*, {CALLBACK_SELECT} FROM {CALLBACK_FROM}`.
CALLBACK_SELECT = ("d.state AS cb_state, d.attempts AS cb_attempts, d.last_status AS "
                   "cb_last_status, d.last_error AS cb_last_error, d.next_attempt_at AS "
                   "cb_next_attempt_at")
CALLBACK_FROM = "jobs LEFT JOIN deliveries AS d ON d.job = jobs.id"


def migrate(conn: sqlite3.Connection, *, user_version: int) -> None:
    """Bring a job database of schema 1 (or older) to schema 2 in one transaction; idempotent.
    Columns are added by inspection, not by the version number: dbcheck stamps a database from
    before `application_id` with the current version before this runs.  A database that is
    current is not written to at all."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    wanted = {"jobs_owner", "deliveries", "deliveries_due", "usage", "jobs_callback",
              "jobs_usage"}
    if found == user_version and wanted <= names and {n for n, _ in JOB_COLUMNS} <= have:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name, decl in JOB_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {int(user_version)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """The script's statements (triggers hold `;` inside BEGIN ... END)."""
    out: list[str] = []
    buf = ""
    for line in script.strip().splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


@dataclass(frozen=True)
class Delivery:
    job: str
    id: str
    url: str
    attempts: int
    payload: str


def callback_json(row: sqlite3.Row) -> dict[str, Any] | None:
    """The `callback` object of a job document from a row selected with CALLBACK_SELECT."""
    keys = row.keys()
    if "callback_url" not in keys or row["callback_url"] is None:
        return None
    state = row["cb_state"] if "cb_state" in keys else None
    if state is None:
        return {"url": row["callback_url"], "state": WAITING, "attempts": 0,
                "last_status": None, "last_error": None, "next_attempt_at": None}
    return {"url": row["callback_url"], "state": state, "attempts": row["cb_attempts"],
            "last_status": row["cb_last_status"], "last_error": row["cb_last_error"],
            "next_attempt_at": row["cb_next_attempt_at"] if state == PENDING else None}


Render = Callable[[sqlite3.Connection, str], str | None]


def freeze(conn: sqlite3.Connection, jobs: Iterable[str], render: Render) -> None:
    """Freeze the body of each pending delivery of `jobs` that has none yet (render: the job
    document as JSON text, or None when the job row is gone)."""
    for job in jobs:
        row = conn.execute("SELECT payload FROM deliveries WHERE job = ? AND state = ?",
                           (job, PENDING)).fetchone()
        if row is None or row["payload"] is not None:
            continue
        body = render(conn, job)
        if body is None:  # the row went without a freeze (cannot happen through the store)
            conn.execute("UPDATE deliveries SET state = ?, last_error = ? WHERE job = ?",
                         (FAILED, "the job was gone before its document was kept", job))
            continue
        conn.execute("UPDATE deliveries SET payload = ? WHERE job = ?", (body, job))


def due(conn: sqlite3.Connection, now: float, limit: int, exclude: Sequence[str],
        render: Render) -> list[Delivery]:
    """Up to `limit` pending deliveries due at `now`, oldest due first, bodies frozen."""
    marks = ",".join("?" * len(exclude))
    rows = conn.execute(
        f"SELECT job FROM deliveries WHERE state = ? AND next_attempt_at <= ? "
        f"AND job NOT IN ({marks}) ORDER BY next_attempt_at LIMIT ?",
        (PENDING, now, *exclude, limit)).fetchall()
    jobs = [r["job"] for r in rows]
    freeze(conn, jobs, render)
    out = []
    for job in jobs:
        r = conn.execute("SELECT * FROM deliveries WHERE job = ? AND state = ?",
                         (job, PENDING)).fetchone()
        if r is not None:
            out.append(Delivery(job=r["job"], id=r["id"], url=r["url"], attempts=r["attempts"],
                                payload=r["payload"]))
    return out


def next_due(conn: sqlite3.Connection, exclude: Sequence[str]) -> float | None:
    marks = ",".join("?" * len(exclude))
    (at,) = conn.execute(
        f"SELECT MIN(next_attempt_at) FROM deliveries WHERE state = ? AND job NOT IN ({marks})",
        (PENDING, *exclude)).fetchone()
    return None if at is None else float(at)


def record(conn: sqlite3.Connection, job: str, *, attempts: int, state: str,
           last_status: int | None, last_error: str | None, next_attempt_at: float | None,
           now: float) -> None:
    """One attempt's outcome (only a pending delivery moves)."""
    conn.execute(
        "UPDATE deliveries SET attempts = ?, state = ?, last_status = ?, last_error = ?, "
        "next_attempt_at = ?, finished = ? WHERE job = ? AND state = ?",
        (attempts, state, last_status, last_error, next_attempt_at,
         None if state == PENDING else now, job, PENDING))


def purge(conn: sqlite3.Connection, older_than: float) -> int:
    """Delivered or failed deliveries that ended before `older_than`."""
    cur = conn.execute("DELETE FROM deliveries WHERE state != ? AND finished < ?",
                       (PENDING, older_than))
    return cur.rowcount


def pending_count(conn: sqlite3.Connection) -> int:
    (n,) = conn.execute("SELECT COUNT(*) FROM deliveries WHERE state = ?", (PENDING,)).fetchone()
    return int(n)


@dataclass(frozen=True)
class Usage:
    """Finished jobs of one owner (token name) and status: count, audio and compute seconds."""

    owner: str
    status: str
    jobs: int
    audio_s: float
    compute_s: float


def usage(conn: sqlite3.Connection, since: float | None = None,
          until: float | None = None) -> list[Usage]:
    """Tallies of the jobs that finished in [since, until), to the hour (an hour bucket counts
    when it overlaps the period); without bounds, all time."""
    lo = -1.0 if since is None else since - 3600 + 1e-9
    hi = float("inf") if until is None else until
    rows = conn.execute(
        "SELECT owner, status, SUM(jobs) AS jobs, SUM(audio_s) AS audio_s, "
        "SUM(compute_s) AS compute_s FROM usage WHERE hour > ? AND hour < ? "
        "GROUP BY owner, status ORDER BY owner, status", (lo, hi)).fetchall()
    return [Usage(r["owner"], r["status"], int(r["jobs"]), float(r["audio_s"]),
                  float(r["compute_s"])) for r in rows]

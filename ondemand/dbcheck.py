"""Is a SQLite file under storage.dir ours, and whole?  Asked when the job store and the cost
ledger open, before anything is read or written.

Issue 10: a job database corrupted mid-file let the daemon start, answer 500 to every job
request and call itself ready; a truncated or garbage file ended start-up in a traceback; a
0-byte file was silently taken for a new, empty queue.  So:

- A database is created complete or not at all (`create`: a temporary file, set up, fsync'd and
  renamed into place): a 0-byte or header-only file is never our doing, and is refused.  Nor is
  one created beside a `-wal` whose database was moved or deleted without it: SQLite would
  replay that WAL's pages into the new file (tried: the new database showed the old tables).
- An existing file must start with the SQLite header, be as long as its header says (unless a
  WAL holds the rest), pass `PRAGMA quick_check`, and carry our `application_id` (or be a
  database of ours from before the id: no id and our table).  Anything else raises `Damage`,
  which the caller turns into one line that says what to do.
- At run time `failure(e)` tells a failing database (corrupt, I/O error, disk full, read-only)
  from an ordinary statement error, so the store can turn not-ready once, not per request.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

HEADER = b"SQLite format 3\x00"

# Error codes (the low byte of sqlite_errorcode) that mean the database file itself is failing.
_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_FAILING = _CORRUPT | {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY,
                       sqlite3.SQLITE_CANTOPEN}


class Damage(Exception):
    """Why a database file cannot be used.  `kind`: empty | not_sqlite | truncated | corrupt |
    foreign | newer; `detail` reads after the file name ("is empty (0 bytes)")."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def companions(path: Path) -> list[Path]:
    """The file and SQLite's files beside it (`-wal`, `-shm`, `-journal`) that exist."""
    names = (path.name, f"{path.name}-wal", f"{path.name}-shm", f"{path.name}-journal")
    return [p for p in (path.with_name(n) for n in names) if p.exists()]


def check_file(path: Path) -> None:
    """Before connecting: refuse an empty, non-SQLite or truncated file."""
    size = path.stat().st_size
    if size == 0:
        raise Damage("empty", "is empty (0 bytes): not a database")
    with open(path, "rb") as f:
        head = f.read(100)
    if not head.startswith(HEADER):
        if HEADER.startswith(head):
            raise Damage("truncated", f"is truncated ({size} bytes, not even a SQLite header)")
        raise Damage("not_sqlite", "is not a SQLite database (no SQLite header)")
    if len(head) < 100:
        raise Damage("truncated", f"is truncated ({size} bytes, not even a SQLite header)")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    # The header's page count is valid when its version-valid-for number matches the change
    # counter; pages a crash left only in the WAL are not in the main file yet.
    wal = path.with_name(f"{path.name}-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if head[92:96] == head[24:28] and not wal_size and size < pages * page_size:
        raise Damage("truncated",
                     f"is truncated ({size} bytes; its header says {pages * page_size})")


def damage_from(e: sqlite3.DatabaseError) -> Damage | None:
    """The Damage an error from SQLite reports, or None when it says nothing about the file's
    contents (busy, locked, cannot open, I/O): those are not a reason to move a database aside."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        return Damage("not_sqlite", f"is not a SQLite database ({e})")
    if code == sqlite3.SQLITE_CORRUPT:
        return Damage("corrupt", f"is corrupt ({e})")
    return None


def check_open(conn: sqlite3.Connection, *, app_id: int, version: int, table: str,
               columns: set[str], what: str) -> None:
    """On an open connection: integrity (quick_check) and identity.  A database of ours from
    before `application_id` (no id, our table with our columns, or no table at all) is stamped
    with the id and `version` here."""
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as e:
        damage = damage_from(e)
        if damage is None:
            raise
        raise damage from e
    if rows != ["ok"]:
        more = f" and {len(rows) - 1} more problem(s)" if len(rows) > 1 else ""
        raise Damage("corrupt", f"is corrupt (quick_check: {rows[0]}{more})")
    try:
        (found_id,) = conn.execute("PRAGMA application_id").fetchone()
        (found_version,) = conn.execute("PRAGMA user_version").fetchone()
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
        have = ({r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if table in tables else set())
    except sqlite3.DatabaseError as e:
        damage = damage_from(e)
        if damage is None:
            raise
        raise damage from e
    if found_id == app_id:
        if found_version > version:
            raise Damage("newer", f"was written by a newer ondemand (schema {found_version}; "
                                  f"this one knows {version})")
        return
    if found_id == 0 and (not tables or columns <= have):
        conn.execute(f"PRAGMA application_id = {int(app_id)}")
        conn.execute(f"PRAGMA user_version = {int(version)}")
        return
    listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
    raise Damage("foreign", f"is a SQLite database but not an ondemand {what} "
                            f"(application_id={found_id}, tables: {listed or 'none'})")


def _orphans(path: Path) -> list[Path]:
    """A `-wal` or `-journal` without its database (a `-shm` alone is only rebuilt)."""
    return [p for p in companions(path) if p.name.endswith(("-wal", "-journal"))]


def _orphaned(path: Path) -> str:
    left = " and ".join(p.name for p in _orphans(path))
    return (f"is missing but {left} is still there (the database was moved or deleted without "
            "it; a new database would take in its pages)")


def create(path: Path, setup: Callable[[sqlite3.Connection], None]) -> None:
    """Create the database at `path` whole: set up a temporary file, fsync it, rename it into
    place, fsync the directory.  A crash leaves either no file or a complete one.  Raises
    Damage("orphaned") when a `-wal` or `-journal` of a vanished database is still there."""
    if _orphans(path):
        raise Damage("orphaned", _orphaned(path))
    tmp = path.with_name(f"{path.name}.new")
    for stale in companions(tmp):
        stale.unlink()
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        setup(conn)
    finally:
        conn.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def failure(e: BaseException) -> str | None:
    """The reason when `e` says the database file itself is failing, else None (an ordinary
    statement error such as a constraint, or one of our own errors)."""
    if isinstance(e, sqlite3.DatabaseError):
        code = getattr(e, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _FAILING:
            return str(e)
    return None


def is_corruption(e: BaseException) -> bool:
    """Corruption does not heal while the daemon runs (unlike a full disk or an I/O error)."""
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, sqlite3.DatabaseError) and code is not None and code & 0xFF in _CORRUPT


def move_aside(path: Path, suffix: str) -> Path:
    """Rename the database and its companions to `<name><suffix>` (`-wal` etc. kept after it, so
    the moved copy still opens with its WAL).  Returns the new path of the main file."""
    target = path.with_name(path.name + suffix)
    for p in companions(path):
        with contextlib.suppress(FileNotFoundError):
            p.rename(p.with_name(target.name + p.name[len(path.name):]))
    return target

"""The cost ledger: every worker interval, durably, in SQLite (WAL) under `storage.dir`.

An interval is a stretch of time in one `Phase` (loading, ready_busy, ready_idle, unloaded_alive,
standby, yielded, exited) with what started the worker session (`trigger`: job / schedule /
manual), for idle intervals why the worker was kept (`idle_cause`: schedule_hold / manual_hold /
idle_timeout, with `hold_until` — time after it is idle-timeout tail), the GPU index and the
PID.  Exactly one interval is open (end NULL) while the daemon runs; `record()` closes it and
opens the next in one transaction, so the intervals tile time with no gap and no overlap while
the daemon is up.

Samples add to the open interval (energy, memory peaks, CPU) and move its `last_seen`.

Restart rule: an interval still open when the ledger is opened was cut by a crash (kill -9, power
loss).  It is closed at its `last_seen` — the last sample or record written for it — never at the
restart time, because the worker dies with the front end (its stdin pipe closes) and we do not
know it held the GPU any longer.  The time between `last_seen` and the restart belongs to no
interval: the report counts it as not covered, neither on-demand nor always-on.  The error is at
most one sampling interval (`cost.sample_interval_s` while a worker is alive).

The ledger is the only writer of its tables (`cost_*`); it is called from the event loop thread.
Only the daemon holding storage.dir's lock opens it for writing (daemon/lock.py): the restart
rule above assumes no other daemon is recording (issue 10: a second daemon closed the first
one's open interval).

A damaged ledger at open (empty, garbage, truncated, failing `PRAGMA quick_check`:
ondemand/dbcheck.py) is renamed aside (`cost.sqlite3.<what>-<time>`, such as
`cost.sqlite3.corrupt-20250101-120000`, its `-wal` with it) and a new ledger starts, with one
warning: cost history is not job data, and refusing to serve jobs over it would be the worse
outage.  Nothing is deleted; the old file can still be read.  A SQLite file that is not our
ledger (another program's, or a newer ondemand's) is not ours to move: start-up is refused with
the `mv` that would do it.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ondemand import dbcheck
from ondemand.dbcheck import Damage
from ondemand.errors import StorageError

log = logging.getLogger(__name__)

LEDGER_FILE = "cost.sqlite3"
_SCHEMA_VERSION = "1"
APP_ID = 0x6F6E6374  # PRAGMA application_id: "onct", an ondemand cost ledger


class Phase(StrEnum):
    LOADING = "loading"  # spawning the interpreter and/or loading the model (a cold start)
    READY_BUSY = "ready_busy"  # model loaded, at least one batch in flight
    READY_IDLE = "ready_idle"  # model loaded, nothing in flight: idle-warm
    UNLOADED_ALIVE = "unloaded_alive"  # process alive (CUDA context held), model dropped
    STANDBY = "standby"  # a standby process: weights in host memory, CUDA never initialised
    YIELDED = "yielded"  # stepped aside for other GPU work (a standby process may exist)
    EXITED = "exited"  # no worker process: nothing of ours on the GPU

    @property
    def alive(self) -> bool:
        """A worker process (may) exist: sampled at `cost.sample_interval_s`, PID recorded."""
        return self is not Phase.EXITED

    @property
    def billed(self) -> bool:
        """Our worker holds the GPU (a CUDA context at least): billed at `gpu_hour_usd`.
        Standby and yielded hold none (docs/ladder.md), so they are not."""
        return self not in (Phase.EXITED, Phase.STANDBY, Phase.YIELDED)


class Trigger(StrEnum):
    JOB = "job"
    SCHEDULE = "schedule"
    MANUAL = "manual"


class IdleCause(StrEnum):
    SCHEDULE_HOLD = "schedule_hold"  # kept warm by a schedule window
    MANUAL_HOLD = "manual_hold"  # kept warm by `POST /v1/worker/load` with hold_s
    IDLE_TIMEOUT = "idle_timeout"  # the unload_after_s / exit_after_s tail after the last job


@dataclass(frozen=True)
class Interval:
    id: int
    state: Phase
    start: float
    end: float | None  # None while open
    last_seen: float
    trigger: Trigger | None = None
    idle_cause: IdleCause | None = None
    hold_until: float | None = None
    gpu: int | None = None
    pid: int | None = None
    reason: str = ""  # the supervisor's reason for entering this state (free text)
    from_state: Phase | None = None  # None: first interval, or first after a restart
    next_state: Phase | None = None  # None while open or when closed by shutdown/recovery
    closed_by: str | None = None  # next | shutdown | recovery
    energy_j: float = 0.0
    power_s: float = 0.0  # seconds covered by power readings (energy_j / power_s = mean watts)
    gpu_mem_max: int | None = None
    rss_max: int | None = None
    cpu_s: float = 0.0
    samples: int = 0

    def end_or(self, now: float) -> float:
        return self.end if self.end is not None else max(now, self.start)


_COLUMNS = [f.name for f in dataclasses.fields(Interval)]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cost_intervals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL,
    last_seen REAL NOT NULL,
    trigger TEXT,
    idle_cause TEXT,
    hold_until REAL,
    gpu INTEGER,
    pid INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    from_state TEXT,
    next_state TEXT,
    closed_by TEXT,
    energy_j REAL NOT NULL DEFAULT 0,
    power_s REAL NOT NULL DEFAULT 0,
    gpu_mem_max INTEGER,
    rss_max INTEGER,
    cpu_s REAL NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cost_intervals_start ON cost_intervals(start);
CREATE INDEX IF NOT EXISTS cost_intervals_end ON cost_intervals(end);
CREATE TABLE IF NOT EXISTS cost_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _row_to_interval(row: sqlite3.Row) -> Interval:
    d = dict(row)
    d["state"] = Phase(d["state"])
    for key, enum in (
        ("trigger", Trigger),
        ("idle_cause", IdleCause),
        ("from_state", Phase),
        ("next_state", Phase),
    ):
        if d[key] is not None:
            d[key] = enum(d[key])
    return Interval(**d)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA application_id = {APP_ID}")
    conn.execute(f"PRAGMA user_version = {int(_SCHEMA_VERSION)}")
    conn.executescript(_SCHEMA)
    conn.execute("PRAGMA journal_mode=WAL")


def _check(path: Path) -> None:
    """Raise Damage unless `path` is a healthy ledger of ours."""
    dbcheck.check_file(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        dbcheck.check_open(conn, app_id=APP_ID, version=int(_SCHEMA_VERSION),
                           table="cost_intervals", columns=set(_COLUMNS), what="cost ledger")
    except sqlite3.DatabaseError as e:
        damage = dbcheck.damage_from(e)
        if damage is None:
            raise
        raise damage from e
    finally:
        conn.close()


def open_for_writing(path: Path) -> sqlite3.Connection:
    """The daemon's connection to its ledger: created whole when absent; a damaged one moved
    aside with a warning; a foreign or newer one, or one that cannot be opened, refused
    (StorageError)."""
    try:
        return _open_for_writing(path)
    except (OSError, sqlite3.Error) as e:  # busy, locked, no permission, I/O: not damage
        raise StorageError(
            f"the cost ledger {path}: cannot open it ({e}); check the disk, the file's owner and "
            f"mode, and that no other program holds it (fuser {shlex.quote(str(path))})") from e


def _open_for_writing(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            _check(path)
        except Damage as e:
            _set_aside(path, e)
    if not path.exists():
        try:
            dbcheck.create(path, _create)
        except Damage as e:  # a -wal whose ledger is gone
            _set_aside(path, e)
            dbcheck.create(path, _create)
    return connect(path)


def _set_aside(path: Path, e: Damage) -> None:
    """Move a damaged ledger aside with one warning; refuse (StorageError) one not ours."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if e.kind in ("foreign", "newer"):
        aside = shlex.quote(f"{path}.{e.kind}-{stamp}")
        raise StorageError(
            f"the cost ledger {path} {e.detail}; the daemon will not write to it: check "
            f"storage.dir (is it the right directory?), or move it aside and a new "
            f"ledger starts: mv {shlex.quote(str(path))} {aside}") from e
    aside_path = dbcheck.move_aside(path, f".{e.kind}-{stamp}")
    log.warning("cost ledger %s %s: moved it aside to %s and started a new ledger; the "
                "cost history before now is only in that file", path, e.detail, aside_path)


def read_intervals(conn: sqlite3.Connection, since: float, until: float) -> list[Interval]:
    """Intervals overlapping [since, until), oldest first; an open one overlaps up to now."""
    rows = conn.execute(
        "SELECT * FROM cost_intervals WHERE start < ? AND (end IS NULL OR end > ?)"
        " ORDER BY start, id",
        (until, since),
    ).fetchall()
    return [_row_to_interval(r) for r in rows]


class Ledger:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open (creating) the ledger at `path` and close any interval a crash left open."""
        self.path = path
        self._clock = clock
        self._conn = open_for_writing(path)
        self._conn.executescript(_SCHEMA)
        self._conn.execute(
            "INSERT OR IGNORE INTO cost_meta(key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,)
        )
        self._conn.commit()
        self.recovered: list[Interval] = self._recover()
        self._open: Interval | None = None

    @classmethod
    def in_dir(cls, storage_dir: Path, *, clock: Callable[[], float] = time.time) -> Ledger:
        return cls(storage_dir / LEDGER_FILE, clock=clock)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._conn:  # commits, or rolls back on an exception
            yield self._conn

    def _recover(self) -> list[Interval]:
        rows = self._conn.execute("SELECT * FROM cost_intervals WHERE end IS NULL").fetchall()
        closed: list[Interval] = []
        with self._tx() as c:
            for row in rows:
                iv = _row_to_interval(row)
                end = max(iv.start, iv.last_seen)
                c.execute(
                    "UPDATE cost_intervals SET end = ?, closed_by = 'recovery' WHERE id = ?",
                    (end, iv.id),
                )
                closed.append(dataclasses.replace(iv, end=end, closed_by="recovery"))
                log.warning(
                    "ledger recovered interval id=%d state=%s closed at last_seen=%.3f"
                    " (open when the daemon stopped)",
                    iv.id,
                    iv.state,
                    end,
                )
        return closed

    @property
    def current(self) -> Interval | None:
        return self._open

    def record(
        self,
        state: Phase,
        *,
        at: float | None = None,
        trigger: Trigger | None = None,
        idle_cause: IdleCause | None = None,
        hold_until: float | None = None,
        gpu: int | None = None,
        pid: int | None = None,
        reason: str = "",
    ) -> Interval:
        """Enter `state` at `at` (default: now): close the open interval there, open a new one.

        Recording what is already open (same state, trigger, idle cause, hold and GPU) only fills
        in a PID that was unknown: a supervisor state that maps to the same phase (spawning ->
        loading) is not a new interval, and is not a second cold start."""
        at = self._clock() if at is None else at
        cur = self._open
        if cur is not None:
            same = (cur.state, cur.trigger, cur.idle_cause, cur.hold_until, cur.gpu) == (
                state,
                trigger,
                idle_cause,
                hold_until,
                gpu,
            )
            if same:
                if pid is not None and pid != cur.pid:
                    with self._tx() as c:
                        c.execute("UPDATE cost_intervals SET pid = ? WHERE id = ?", (pid, cur.id))
                    self._open = dataclasses.replace(cur, pid=pid)
                return self._open  # type: ignore[return-value]
            # A wall clock stepped back must not make a negative interval.
            at = max(at, cur.start)
        with self._tx() as c:
            if cur is not None:
                c.execute(
                    "UPDATE cost_intervals SET end = ?, last_seen = ?, next_state = ?,"
                    " closed_by = 'next' WHERE id = ?",
                    (at, max(cur.last_seen, at), state.value, cur.id),
                )
            new = Interval(
                id=0,
                state=state,
                start=at,
                end=None,
                last_seen=at,
                trigger=trigger,
                idle_cause=idle_cause,
                hold_until=hold_until,
                gpu=gpu,
                pid=pid,
                reason=reason,
                from_state=cur.state if cur is not None else None,
            )
            values = dataclasses.asdict(new)
            del values["id"]
            cursor = c.execute(
                f"INSERT INTO cost_intervals({', '.join(values)})"
                f" VALUES ({', '.join('?' for _ in values)})",
                [v.value if isinstance(v, StrEnum) else v for v in values.values()],
            )
        self._open = dataclasses.replace(new, id=int(cursor.lastrowid or 0))
        return self._open

    def add_sample(
        self,
        at: float,
        *,
        energy_j: float = 0.0,
        power_s: float = 0.0,
        gpu_mem: int | None = None,
        rss: int | None = None,
        cpu_s: float = 0.0,
    ) -> None:
        """Add one sample's figures to the open interval and move its last_seen (the heartbeat
        the restart rule closes at).  Without an open interval it is dropped."""
        cur = self._open
        if cur is None:
            return
        new = dataclasses.replace(
            cur,
            last_seen=max(cur.last_seen, at),
            energy_j=cur.energy_j + energy_j,
            power_s=cur.power_s + power_s,
            gpu_mem_max=_max(cur.gpu_mem_max, gpu_mem),
            rss_max=_max(cur.rss_max, rss),
            cpu_s=cur.cpu_s + cpu_s,
            samples=cur.samples + 1,
        )
        with self._tx() as c:
            c.execute(
                "UPDATE cost_intervals SET last_seen = ?, energy_j = ?, power_s = ?,"
                " gpu_mem_max = ?, rss_max = ?, cpu_s = ?, samples = ? WHERE id = ?",
                (
                    new.last_seen,
                    new.energy_j,
                    new.power_s,
                    new.gpu_mem_max,
                    new.rss_max,
                    new.cpu_s,
                    new.samples,
                    cur.id,
                ),
            )
        self._open = new

    def close(self, at: float | None = None) -> None:
        """Clean shutdown: close the open interval at `at` (default: now).  The ledger stays
        usable for reading."""
        cur = self._open
        if cur is None:
            return
        at = max(self._clock() if at is None else at, cur.start)
        with self._tx() as c:
            c.execute(
                "UPDATE cost_intervals SET end = ?, last_seen = ?, closed_by = 'shutdown'"
                " WHERE id = ?",
                (at, max(cur.last_seen, at), cur.id),
            )
        self._open = None

    def intervals(self, since: float, until: float) -> list[Interval]:
        return read_intervals(self._conn, since, until)

    def prune(self, before: float) -> int:
        """Delete closed intervals that ended before `before`; returns how many."""
        with self._tx() as c:
            n = c.execute(
                "DELETE FROM cost_intervals WHERE end IS NOT NULL AND end < ?", (before,)
            ).rowcount
        return int(n)

    def close_db(self) -> None:
        self._conn.close()


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)

"""Cost of the Ray replicas (`cluster.backend = "ray"`, docs/cluster.md, "Costs"): each replica's
lifetime in the ledger, the report's `cluster` section, and its /metrics series.

The local ledger (ledger.py) tiles time for the one local worker.  Replicas are many and
overlap, so they get a table of their own in the same file, `cost_replica_intervals`: one row
per stretch of one replica in one phase (loading, ready_busy, ready_idle), with its node, device
and `units` (GPUs per replica, or 1 for a CPU-only replica: what a replica-second is billed as,
at cost.gpu_hour_usd per unit-hour).  A replica's rows tile its life, from its first report to
its exit; at most one row per replica is open.  Idle rows carry `hold_until` while a cluster hold
kept them (the report splits hold time from the idle tail as the local report does).

Restart rule (as the local ledger's): a row still open when the ledger opens was cut by a crash;
it is closed at its `last_seen`, moved every `cost.sample_interval_s` while open.  A clean
shutdown closes the open rows at the shutdown: the replicas live on in Ray, but the daemon no
longer knows about them; the next start records them afresh from the agent's report.

`ReplicaAccounting` listens to the cluster's bus events (ReplicaChanged, ClusterHold) and owns
the table's writes; it runs on the event loop thread.  The report functions are pure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from ondemand.cluster.link import ClusterHold, ReplicaChanged
from ondemand.config import ClusterConfig, CostConfig
from ondemand.cost.ledger import IdleCause, Phase, connect
from ondemand.daemon.events import EventBus

log = logging.getLogger(__name__)

TABLE = "cost_replica_intervals"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    replica TEXT NOT NULL,
    node TEXT NOT NULL,
    node_ip TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    units REAL NOT NULL,
    state TEXT NOT NULL,
    idle_cause TEXT,
    hold_until REAL,
    start REAL NOT NULL,
    end REAL,
    last_seen REAL NOT NULL,
    closed_by TEXT
);
CREATE INDEX IF NOT EXISTS {TABLE}_start ON {TABLE}(start);
CREATE INDEX IF NOT EXISTS {TABLE}_end ON {TABLE}(end);
"""
PHASES = {"loading": Phase.LOADING, "busy": Phase.READY_BUSY, "idle": Phase.READY_IDLE}
REPLICA_PHASES = (Phase.LOADING, Phase.READY_BUSY, Phase.READY_IDLE)


@dataclass(frozen=True)
class ReplicaInterval:
    id: int
    replica: str
    node: str
    node_ip: str
    device: str
    units: float
    state: Phase
    idle_cause: IdleCause | None
    hold_until: float | None
    start: float
    end: float | None
    last_seen: float
    closed_by: str | None = None

    def end_or(self, now: float) -> float:
        return self.end if self.end is not None else max(now, self.start)


def units(cfg: ClusterConfig) -> float:
    """What one replica-second is billed as, in GPU-seconds: its GPUs, or 1 without any."""
    return cfg.gpus_per_replica if cfg.gpus_per_replica > 0 else 1.0


def _row(row: sqlite3.Row) -> ReplicaInterval:
    d = dict(row)
    d["state"] = Phase(d["state"])
    d["idle_cause"] = IdleCause(d["idle_cause"]) if d["idle_cause"] else None
    return ReplicaInterval(**d)


def read_replica_intervals(conn: sqlite3.Connection, since: float,
                           until: float) -> list[ReplicaInterval]:
    """Rows overlapping [since, until), oldest first; [] on a ledger from before this table."""
    try:
        rows = conn.execute(
            f"SELECT * FROM {TABLE} WHERE start < ? AND (end IS NULL OR end > ?)"
            " ORDER BY start, id", (until, since)).fetchall()
    except sqlite3.OperationalError:  # no such table: never ran with backend = "ray"
        return []
    return [_row(r) for r in rows]


class ReplicaLedger:
    """The table's only writer (its own connection to the ledger file)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        with self._conn:
            n = self._conn.execute(
                f"UPDATE {TABLE} SET end = MAX(start, last_seen), closed_by = 'recovery'"
                " WHERE end IS NULL").rowcount
        if n:
            log.warning("replica ledger: closed %d interval(s) left open by a crash at their "
                        "last_seen", n)
        self.open: dict[str, ReplicaInterval] = {}

    def record(self, replica: str, state: Phase | None, at: float, *, node: str, node_ip: str,
               device: str, units: float, idle_cause: IdleCause | None = None,
               hold_until: float | None = None) -> None:
        """Close the replica's open row at `at` and open one in `state` (None: it exited)."""
        cur = self.open.pop(replica, None)
        with self._conn as c:
            if cur is not None:
                at = max(at, cur.start)  # another node's clock must not make a negative row
                c.execute(f"UPDATE {TABLE} SET end = ?, last_seen = ?, closed_by = ?"
                          " WHERE id = ?", (at, max(cur.last_seen, at),
                                            "next" if state else "exit", cur.id))
            if state is None:
                return
            row = ReplicaInterval(0, replica, node, node_ip, device, units, state, idle_cause,
                                  hold_until, at, None, at)
            values = dataclasses.asdict(row)
            del values["id"]
            values["state"] = state.value
            values["idle_cause"] = idle_cause.value if idle_cause else None
            cursor = c.execute(
                f"INSERT INTO {TABLE}({', '.join(values)}) VALUES "
                f"({', '.join('?' for _ in values)})", list(values.values()))
        self.open[replica] = dataclasses.replace(row, id=int(cursor.lastrowid or 0))

    def set_node(self, replica: str, node: str, node_ip: str) -> None:
        cur = self.open.get(replica)
        if cur is None or cur.node == node:
            return
        with self._conn as c:
            c.execute(f"UPDATE {TABLE} SET node = ?, node_ip = ? WHERE id = ?",
                      (node, node_ip, cur.id))
        self.open[replica] = dataclasses.replace(cur, node=node, node_ip=node_ip)

    def touch(self, at: float) -> None:
        """Move the open rows' last_seen (what the restart rule closes them at)."""
        if not self.open:
            return
        with self._conn as c:
            c.execute(f"UPDATE {TABLE} SET last_seen = ? WHERE end IS NULL", (at,))
        self.open = {k: dataclasses.replace(v, last_seen=at) for k, v in self.open.items()}

    def close(self, at: float | None = None) -> None:
        at = self._clock() if at is None else at
        with self._conn as c:
            c.execute(f"UPDATE {TABLE} SET end = MAX(start, ?), last_seen = MAX(last_seen, ?),"
                      " closed_by = 'shutdown' WHERE end IS NULL", (at, at))
        self.open = {}

    def intervals(self, since: float, until: float) -> list[ReplicaInterval]:
        return read_replica_intervals(self._conn, since, until)

    def close_db(self) -> None:
        self._conn.close()


class ReplicaAccounting:
    """Bus events -> the replica ledger and the replica metrics."""

    def __init__(self, cost: CostConfig, cluster: ClusterConfig, ledger: ReplicaLedger,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.cost = cost
        self.units = units(cluster)
        self.ledger = ledger
        self._clock = clock
        self._hold_until = 0.0
        self._hold_trigger = ""
        self._closed: dict[tuple[str, str], float] = {}  # (node, phase) -> closed seconds
        self._unsubscribe: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._failing = False
        self.metrics = ReplicaMetrics(self)

    def start(self, bus: EventBus) -> None:
        self._unsubscribe = [bus.subscribe(self._on_replica, ReplicaChanged),
                             bus.subscribe(self._on_hold, ClusterHold)]
        self._arm()

    def close(self) -> None:
        for u in self._unsubscribe:
            u()
        if self._timer is not None:
            self._timer.cancel()
        now = self._clock()
        for r in list(self.ledger.open.values()):
            self._count(r, now)
        self._write(lambda: self.ledger.close(now))

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.cost.sample_interval_s,
                                                            self._tick)

    def _tick(self) -> None:
        self._write(lambda: self.ledger.touch(self._clock()))
        self._arm()

    def _write(self, write: Callable[[], object]) -> None:
        """A failing ledger (full disk) must not break the cluster's events: logged once."""
        try:
            write()
        except sqlite3.Error as e:
            if not self._failing:
                log.warning("replica ledger: write failed (%s); replica cost misses what "
                            "happens until writes work again (logged once)", e)
            self._failing = True
            return
        self._failing = False

    def _count(self, r: ReplicaInterval, at: float) -> None:
        key = (r.node, r.state.value)
        self._closed[key] = self._closed.get(key, 0.0) + max(0.0, at - r.start)

    def _idle(self, at: float) -> tuple[IdleCause, float | None]:
        if self._hold_until > at:
            sched = self._hold_trigger.startswith("schedule")
            return (IdleCause.SCHEDULE_HOLD if sched else IdleCause.MANUAL_HOLD,
                    self._hold_until)
        return IdleCause.IDLE_TIMEOUT, None

    def _on_replica(self, ev: ReplicaChanged) -> None:
        cur = self.ledger.open.get(ev.replica)
        if ev.old == ev.new and cur is not None:
            self._write(lambda: self.ledger.set_node(ev.replica, ev.node, ev.node_ip))
            return
        phase = PHASES.get(ev.new)  # None: exited
        if cur is not None:
            self._count(cur, max(ev.at, cur.start))
        cause, until = self._idle(ev.at) if phase is Phase.READY_IDLE else (None, None)
        self._write(lambda: self.ledger.record(
            ev.replica, phase, ev.at, node=ev.node, node_ip=ev.node_ip, device=ev.device,
            units=self.units, idle_cause=cause, hold_until=until))

    def _on_hold(self, ev: ClusterHold) -> None:
        self._hold_until, self._hold_trigger = ev.until, ev.trigger
        for r in list(self.ledger.open.values()):  # idle rows change cause with the hold
            if r.state is Phase.READY_IDLE:
                self._count(r, ev.time)
                self._write(self._reidle(r, ev.time))

    def _reidle(self, r: ReplicaInterval, at: float) -> Callable[[], None]:
        cause, until = self._idle(at)

        def write() -> None:
            self.ledger.record(r.replica, Phase.READY_IDLE, at, node=r.node, node_ip=r.node_ip,
                               device=r.device, units=r.units, idle_cause=cause,
                               hold_until=until)

        return write

    # -- what the metrics read ---------------------------------------------------------------
    def seconds_by_node(self) -> dict[tuple[str, str], float]:
        now = self._clock()
        out = dict(self._closed)
        for r in self.ledger.open.values():
            key = (r.node, r.state.value)
            out[key] = out.get(key, 0.0) + max(0.0, now - r.start)
        return out

    def live(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for r in self.ledger.open.values():
            key = (r.node, r.state.value)
            out[key] = out.get(key, 0) + 1
        return out


class ReplicaMetrics:
    """`/metrics` series of the replicas, computed at scrape time (docs/cost.md):

        ondemand_cluster_replicas{node,phase}                live replicas per phase
        ondemand_cluster_replica_seconds_total{node,phase}   replica time since start
        ondemand_cluster_cost_dollars_total{node}            that time x units x gpu_hour_usd
    """

    def __init__(self, acc: ReplicaAccounting) -> None:
        self.acc = acc
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return self._families({}, {})

    def collect(self) -> Iterable[Metric]:
        return self._families(self.acc.live(), self.acc.seconds_by_node())

    def _families(self, live: dict[tuple[str, str], int],
                  seconds: dict[tuple[str, str], float]) -> list[Metric]:
        replicas = GaugeMetricFamily("ondemand_cluster_replicas",
                                     "Live Ray replicas by node and phase.",
                                     labels=["node", "phase"])
        for (node, phase), n in sorted(live.items()):
            replicas.add_metric([node, phase], n)
        secs = CounterMetricFamily("ondemand_cluster_replica_seconds",
                                   "Ray replica time by node and phase since the daemon started.",
                                   labels=["node", "phase"])
        cost = CounterMetricFamily("ondemand_cluster_cost_dollars",
                                   "Replica time x units x cost.gpu_hour_usd, by node.",
                                   labels=["node"])
        per_node: dict[str, float] = {}
        for (node, phase), s in sorted(seconds.items()):
            secs.add_metric([node, phase], s)
            per_node[node] = per_node.get(node, 0.0) + s
        rate = self.acc.cost.gpu_hour_usd / 3600.0 * self.acc.units
        for node, s in sorted(per_node.items()):
            cost.add_metric([node], s * rate)
        return [replicas, secs, cost]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# -- the report (pure) -------------------------------------------------------------------------
def _clip(iv: ReplicaInterval, since: float, until: float, now: float) -> float:
    s, e = max(iv.start, since), min(iv.end_or(now), until)
    return max(0.0, e - s)


def _held(iv: ReplicaInterval, since: float, until: float, now: float) -> float:
    if iv.hold_until is None:
        return 0.0
    s, e = max(iv.start, since), min(iv.end_or(now), until, iv.hold_until)
    return max(0.0, e - s)


def _summary(ivs: Sequence[ReplicaInterval], since: float, until: float, now: float,
             cost: CostConfig) -> dict[str, Any]:
    seconds = {p: 0.0 for p in REPLICA_PHASES}
    unit_s = held_s = 0.0
    starts, start_s = 0, 0.0
    replicas = set()
    for iv in ivs:
        dur = _clip(iv, since, until, now)
        if dur <= 0 and not (iv.state is Phase.LOADING and since <= iv.start < until):
            continue
        replicas.add(iv.replica)
        seconds[iv.state] += dur
        unit_s += dur * iv.units
        if iv.state is Phase.READY_IDLE:
            held_s += _held(iv, since, until, now)
        if iv.state is Phase.LOADING and since <= iv.start < until:
            starts += 1
            start_s += iv.end_or(now) - iv.start
    rate = cost.gpu_hour_usd / 3600.0
    idle_unit_s = sum(_clip(iv, since, until, now) * iv.units for iv in ivs
                      if iv.state is Phase.READY_IDLE)
    return {
        "replicas": len(replicas),
        "hours": {**{p.value: seconds[p] / 3600.0 for p in REPLICA_PHASES},
                  "alive": sum(seconds.values()) / 3600.0},
        "idle_warm_hours": {"total": seconds[Phase.READY_IDLE] / 3600.0,
                            "hold": held_s / 3600.0,
                            "idle_timeout": (seconds[Phase.READY_IDLE] - held_s) / 3600.0},
        "gpu_hours": unit_s / 3600.0,
        "cold_starts": {"count": starts, "seconds": start_s,
                        "mean_s": start_s / starts if starts else None},
        "on_demand_usd": unit_s * rate,
        "idle_usd": idle_unit_s * rate,
    }


def cluster_report(ivs: Sequence[ReplicaInterval], since: float, until: float, now: float,
                   cost: CostConfig, *, covered_hours: float, max_replicas: int,
                   units: float) -> dict[str, Any]:
    """The period's replica figures, summed and per node.  `always_on_usd` prices
    max_replicas replicas kept all the covered time (what a fixed fleet would cost)."""
    doc = _summary(ivs, since, until, now, cost)
    doc["always_on_usd"] = covered_hours * max_replicas * units * cost.gpu_hour_usd
    doc["always_on_replicas"] = max_replicas
    nodes = sorted({iv.node for iv in ivs})
    doc["by_node"] = {node or "unknown": _summary([iv for iv in ivs if iv.node == node], since,
                                                  until, now, cost) for node in nodes}
    return doc

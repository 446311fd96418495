"""Cost per team: jobs, audio and compute seconds per token name, in the cost report and
`/metrics` (issue 15).

The tallies are the job database's `usage` table (daemon/outbox.py), written in the transaction
that ends each job, so they outlive the purge of the job rows.  In the report each period gets
`tokens`: per token, its jobs by status, audio seconds, compute seconds (each job's batch time:
jobs that share a batch each count it), its share of the period's audio and that share of the
period's on-demand cost (`attributed_usd`: GPU time is split by the audio each team sent).
Metrics (counters since the database began):

    ondemand_token_jobs_total{token,status}      finished jobs
    ondemand_token_audio_seconds_total{token}    audio seconds of finished jobs
    ondemand_token_compute_seconds_total{token}  compute seconds of finished jobs
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from ondemand.daemon.outbox import Usage, usage
from ondemand.daemon.store import DB_FILE

STATUSES = ("done", "failed", "cancelled")
ReadUsage = Callable[[float, float], Sequence[Usage]]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def per_token(rows: Iterable[Usage], on_demand_usd: float | None) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = by.setdefault(r.owner, {"name": r.owner, "jobs": dict.fromkeys(STATUSES, 0),
                                    "audio_s": 0.0, "compute_s": 0.0})
        t["jobs"][r.status] = t["jobs"].get(r.status, 0) + r.jobs
        t["audio_s"] += r.audio_s
        t["compute_s"] += r.compute_s
    total_audio = sum(t["audio_s"] for t in by.values())
    out = []
    for name in sorted(by):
        t = by[name]
        share = t["audio_s"] / total_audio if total_audio > 0 else None
        t["audio_share"] = share
        t["attributed_usd"] = (share * on_demand_usd
                               if share is not None and on_demand_usd is not None else None)
        out.append(t)
    return out


def add_tokens(doc: dict[str, Any], read: ReadUsage) -> dict[str, Any]:
    """Give every period of the cost document its `tokens` (read: usage in [since, until))."""
    for period in doc.get("periods", []):
        rows = read(_ts(period["since"]), _ts(period["until"]))
        period["tokens"] = per_token(rows, period.get("cost", {}).get("on_demand_usd"))
    return doc


def read_file(storage_dir: Path) -> ReadUsage:
    """Usage from the job database file, read-only (`ondemand cost` beside a running daemon);
    nothing when there is none (or it predates schema 2)."""
    path = storage_dir / DB_FILE

    def read(since: float, until: float) -> list[Usage]:
        if not path.is_file():
            return []
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            return usage(conn, since, until)
        except sqlite3.OperationalError:  # no usage table yet
            return []
        finally:
            conn.close()

    return read


class _Collector:
    def __init__(self) -> None:
        self.rows: list[Usage] = []

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(self.rows)

    @staticmethod
    def _families(rows: Sequence[Usage]) -> list[Metric]:
        jobs = CounterMetricFamily("ondemand_token_jobs", "Finished jobs per token and status.",
                                   labels=["token", "status"])
        audio = CounterMetricFamily("ondemand_token_audio_seconds",
                                    "Audio seconds of finished jobs per token.", labels=["token"])
        compute = CounterMetricFamily("ondemand_token_compute_seconds",
                                      "Compute seconds of finished jobs per token.",
                                      labels=["token"])
        for t in per_token(rows, None):
            for status, n in t["jobs"].items():
                jobs.add_metric([t["name"], status], n)
            audio.add_metric([t["name"]], t["audio_s"])
            compute.add_metric([t["name"]], t["compute_s"])
        return [jobs, audio, compute]


class TokenMetrics:
    """The per-token counters, exposed after the daemon's own registry at each scrape."""

    def __init__(self) -> None:
        self._collector = _Collector()
        self.registry = CollectorRegistry()
        self.registry.register(self._collector)

    def exposition(self, rows: Sequence[Usage]) -> bytes:
        self._collector.rows = list(rows)
        return generate_latest(self.registry)

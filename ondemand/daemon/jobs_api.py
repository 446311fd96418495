"""`GET /v1/jobs`: the recent-jobs listing, newest first (the console's table, any client's
"what ran lately" and "where is my job in the queue").

    GET /v1/jobs[?limit=50][&status=queued,running][&before=<job id>]
    -> {"jobs": [summary, ...], "next": <job id to pass as `before`> | null}

A summary is a job without its full result: `id, key, status, granularity, embedding,
duration_s, created, started, finished` (Unix seconds), `attempts, top` ({label, score} once
done), `error, timings`, and for a pending job `position` (pending jobs accepted before it) and,
while queued, `eta_s` (the same estimate as `POST /v1/jobs` gives).  Reading it is not activity.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ondemand.daemon import api, auth
from ondemand.daemon.store import FINAL, QUEUED, RUNNING, JobSummary
from ondemand.errors import BadRequest

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
STATUSES = (QUEUED, RUNNING, *FINAL)


def _limit(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be a whole number, got {raw!r}") from None
    if not 1 <= n <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, got {n}")
    return n


def _statuses(raw: str) -> tuple[str, ...]:
    wanted = tuple(s.strip() for s in raw.split(",") if s.strip())
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown:
        raise BadRequest(f"status must be one or more of {', '.join(STATUSES)} "
                         f"(comma-separated), got {', '.join(unknown)}")
    return wanted


def summary_json(job: JobSummary, eta_s: float | None) -> dict[str, Any]:
    return {
        "id": job.id, "key": job.key, "status": job.status, "granularity": job.granularity,
        "embedding": job.embedding, "duration_s": job.duration_s, "created": job.created,
        "started": job.started, "finished": job.finished, "attempts": job.attempts,
        "top": job.top, "error": job.error,
        "timings": {k: job.timings.get(k) for k in ("queue_s", "cold_start_s", "compute_s")},
        "position": job.position, "eta_s": eta_s,
    }


async def list_jobs(request: web.Request) -> web.Response:
    q = request.query
    limit = _limit(q.get("limit", str(DEFAULT_LIMIT)))
    rows = await request.app[api.STORE].recent(
        limit + 1, statuses=_statuses(q.get("status", "")), before=q.get("before") or None,
        owner=auth.principal(request).owner_filter)  # a `jobs` token sees its own jobs only
    disp = request.app[api.DISPATCHER]
    jobs = [
        summary_json(j, disp.eta_s(j.position)
                     if j.status == QUEUED and j.position is not None else None)
        for j in rows[:limit]
    ]
    return web.json_response({"jobs": jobs, "next": rows[limit - 1].id if len(rows) > limit
                              else None})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/jobs", list_jobs)

"""The HTTP API's contract: an OpenAPI 3.1 document, served at `GET /v1/openapi.json`.

Built from the code's own tables, so it cannot drift from them: the error codes and their
statuses from errors.py, each route's scope from auth.ROUTE_SCOPES, the worker states from
worker_status.WorkerState, exit kinds from process.ExitKind, the console's media types from
console/routes.py.  tests/test_openapi.py holds the rest: the paths and methods here are exactly
the routes the app serves (a new route fails it until it is described here), the document is
valid OpenAPI 3.1, and real answers of a running daemon validate against its schemas, the event
stream's frames included.

`GET /v1/events` is `text/event-stream`: OpenAPI 3.1 has no schema for a stream's items, so each
event's data object is a component (`Event<Name>`, listed in `EVENTS` with whether it carries an
id), `ServerEvent` is one parsed frame `{event, id?, data}`, and the media type points at it as
`x-item-schema` (what OpenAPI 3.2 calls `itemSchema`).  Data objects are closed
(`additionalProperties: false`): a field added to an event fails the stream test until it is
described here.

To describe a new route: add its operation to `PATHS` (`_op(...)`, with its parameters, its
answers and the error codes it can give), and its scope to auth.ROUTE_SCOPES.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from aiohttp import web

from ondemand import __version__, errors
from ondemand.cluster.link import ClusterState
from ondemand.cluster.messages import REPLICA_STATES
from ondemand.console import routes as console
from ondemand.daemon import auth, events_api
from ondemand.daemon.http import json_response
from ondemand.daemon.process import ExitKind
from ondemand.daemon.worker_status import WorkerState

Schema = dict[str, Any]
JSON = "application/json"
OPENAPI_VERSION = "3.1.0"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None,
         *, closed: bool = False, description: str = "") -> Schema:
    out: Schema = {"type": "object", "required": list(required),
                   "properties": {**required, **(optional or {})}}
    if closed:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


NUM, INT, STR, BOOL = ({"type": "number"}, {"type": "integer"}, {"type": "string"},
                       {"type": "boolean"})
NUM_OR_NULL, INT_OR_NULL, STR_OR_NULL = (_nullable(NUM), _nullable(INT), _nullable(STR))
JOB_STATUSES = ["queued", "running", "done", "failed", "cancelled"]
FINAL_STATUSES = JOB_STATUSES[2:]
CALLBACK_STATES = ["waiting", "pending", "delivered", "failed"]
TOP = _obj({"label": STR, "score": NUM}, closed=True)
TIME = {**NUM, "description": "The server's wall clock (Unix seconds) at the change."}
EVENT_ID = {"type": "string", "pattern": "^[0-9]+$",
            "description": "Increases by one per event; starts at the daemon's start time in ms."}


def http_codes() -> dict[str, int]:
    """Every error code a client can receive, with its status (errors.py; codes without an
    HTTP status never reach a client)."""
    return {code: cls.status for code, cls in errors.by_code().items()
            if cls.status != 500 or code == "internal"}


def _schemas() -> dict[str, Schema]:
    codes = sorted(http_codes())
    error_info = _obj({"code": STR, "message": STR}, closed=True)
    prediction = _obj(
        {"key": STR, "labels": {"type": "array", "items": STR},
         "scores": {"type": "array", "items": {"anyOf": [NUM, {"type": "array", "items": NUM}]},
                    "description": "Per label (utterance); per frame, per label (frame)."},
         "top": _nullable(_obj({"label": STR, "score": NUM})),
         "frames": INT, "duration_s": NUM},
        {"segments": {"type": "array", "items": _obj(
            {"start_s": NUM, "end_s": NUM, "top": _nullable(_obj({"label": STR, "score": NUM})),
             "scores": {"type": "array", "items": NUM}}, closed=True),
            "description": "segments=vad|fixed: one result per segment, in time order."},
         "summary": _obj({"scores": {"type": "array", "items": NUM},
                          "top": _nullable(_obj({"label": STR, "score": NUM})),
                          "label_share": {"type": "object", "additionalProperties": NUM},
                          "speech_s": NUM},
                         description="Duration-weighted mean scores, the dominant label, each "
                                     "label's share of the time (sums to 1).")},
        description="The engine's prediction (docs/engine.md); a worker may add keys; a "
                    "segmented job's adds segments and summary (docs/recordings.md).")
    return {
        "Error": _obj({"error": _obj(
            {"code": {"type": "string", "enum": [*codes, "http_error"],
                      "description": "errors.py; `http_error`: an HTTP status without a class."},
             "message": STR}, closed=True)}, closed=True),
        "ErrorInfo": error_info,
        "Prediction": prediction,
        "Callback": _obj(
            {"url": STR, "state": {"type": "string", "enum": CALLBACK_STATES},
             "attempts": INT, "last_status": INT_OR_NULL, "last_error": STR_OR_NULL,
             "next_attempt_at": NUM_OR_NULL}, closed=True,
            description="waiting: the job has not ended; pending: an attempt is due at "
                        "next_attempt_at (Unix time); delivered: a 2xx came back; failed: "
                        "webhooks.max_attempts attempts failed (docs/webhooks.md)."),
        "Job": _obj(
            {"id": STR, "key": STR, "status": {"type": "string", "enum": JOB_STATUSES},
             "granularity": {"type": "string", "enum": ["utterance", "frame"]},
             "embedding": BOOL, "duration_s": NUM, "created": NUM, "started": NUM_OR_NULL,
             "finished": NUM_OR_NULL, "owner": {**STR, "description": "The submitting token's "
                                                "name; empty without auth."},
             "result": _nullable(_ref("Prediction")), "error": _nullable(_ref("ErrorInfo")),
             "timings": _obj({"queue_s": NUM_OR_NULL, "cold_start_s": NUM_OR_NULL,
                              "compute_s": NUM_OR_NULL}),
             "attempts": INT, "callback": _nullable(_ref("Callback"))},
            optional={"position": INT,
                      "segments": {"type": "string", "enum": ["none", "vad", "fixed"]},
                      "window_s": NUM, "hop_s": NUM,
                      "progress": _nullable(_obj({"done_s": NUM, "total_s": NUM,
                                                  "eta_s": NUM}))}),
        "JobAccepted": _obj({"id": STR, "status": {"const": "queued"}, "position": INT,
                             "worker": {"type": "string", "enum": [s.value for s in WorkerState]},
                             "eta_s": NUM_OR_NULL}),
        "Cancelled": _obj({"id": STR, "status": {"const": "cancelled"}}, closed=True),
        "Deleted": _obj({"id": STR, "deleted": {"const": True}}, closed=True),
        "WorkerStatus": _obj(
            {"state": {"type": "string", "enum": [s.value for s in WorkerState]},
             "pid": INT_OR_NULL, "device": STR, "dtype": STR, "model": STR,
             "trigger": STR_OR_NULL, "in_flight": INT, "last_load_s": NUM_OR_NULL,
             "last_load": _nullable({"type": "object"}), "loads": INT, "spawns": INT,
             "unload_in_s": NUM_OR_NULL, "exit_in_s": NUM_OR_NULL, "hold_s": NUM_OR_NULL,
             "hold_trigger": STR_OR_NULL, "warm_because": STR_OR_NULL, "load_failures": INT,
             "last_error": _nullable(_ref("ErrorInfo")), "backoff_s": NUM_OR_NULL,
             "gpu_memory_mb": NUM_OR_NULL},
            {"batch_s": NUM_OR_NULL, "batch_deadline_s": NUM_OR_NULL, "stalled_s": NUM_OR_NULL,
             "last_exit": _nullable({"type": "object"}),
             "standby": _nullable(_ref("Standby")), "yielded": _nullable(_ref("Yielded"))}),
        "Standby": _obj(
            {"pid": INT, "prepared": BOOL, "seconds": NUM_OR_NULL, "weights_mb": NUM_OR_NULL,
             "host_mb": NUM_OR_NULL, "cuda_initialized": _nullable(BOOL),
             "gpu_memory_mb": NUM_OR_NULL, "timings": {"type": "object"}},
            description="The standby process: weights in host memory, CUDA never initialised "
                        "(docs/ladder.md)."),
        "Yielded": _obj(
            {"reason": {"type": "string", "enum": ["other_processes", "insufficient_memory"]},
             "pending": BOOL, "for_s": NUM, "need_mb": NUM, "resume_at_free_mb": NUM,
             "settle_s": NUM, "settled_s": NUM, "gpu": _nullable({"type": "object"}),
             "trigger_gpu": _nullable({"type": "object"})},
            description="Stepped aside for other GPU work; loads wait (docs/ladder.md)."),
        "Status": _obj({"worker": _ref("WorkerStatus"),
                        "queue": _obj({"queued": INT, "running": INT, "max_pending": INT}),
                        "idle": _obj({"unload_after_s": NUM, "exit_after_s": NUM},
                                     {"standby": BOOL, "yield_gpu": BOOL}),
                        "cluster": _cluster_status()}),
        "Prewarm": _obj({"rules": {"type": "array", "items": {"type": "object"}},
                         "lead": {"type": "object"}, "holds": {"type": "array"},
                         "worker": {"type": "object"}, "timezone": STR},
                        description="docs/prewarm.md"),
        "Cost": _obj({"generated_at": STR, "settings": {"type": "object"},
                      "periods": {"type": "array", "items": _obj(
                          {"tokens": {"type": "array", "items": _ref("TokenUsage")}})},
                      "recommendation": {"type": "object"}},
                     description="docs/cost.md"),
        "TokenUsage": _obj(
            {"name": STR, "jobs": _obj({s: INT for s in ("done", "failed", "cancelled")}),
             "audio_s": NUM, "compute_s": NUM, "audio_share": NUM_OR_NULL,
             "attributed_usd": NUM_OR_NULL},
            description="Jobs that finished in the period, per token name (docs/cost.md)."),
        "Ready": _obj({"ready": {"const": True}, "worker": STR}),
        "NotReady": _obj({"ready": {"const": False}, "reason": STR}),
        "Health": _obj({"ok": {"const": True}}, closed=True),
        "JobSummary": _obj(
            {"id": STR, "key": STR, "status": {"type": "string", "enum": JOB_STATUSES},
             "granularity": {"type": "string", "enum": ["utterance", "frame"]},
             "embedding": BOOL, "duration_s": NUM, "created": NUM, "started": NUM_OR_NULL,
             "finished": NUM_OR_NULL, "attempts": INT,
             "top": {**_nullable(TOP), "description": "The result's top label once done."},
             "error": _nullable(_ref("ErrorInfo")),
             "timings": _obj({"queue_s": NUM_OR_NULL, "cold_start_s": NUM_OR_NULL,
                              "compute_s": NUM_OR_NULL}, closed=True),
             "position": {**INT_OR_NULL, "description": "Queued or running: pending jobs "
                                                       "accepted before it; else null."},
             "eta_s": {**NUM_OR_NULL, "description": "Queued: the estimate POST /v1/jobs "
                                                     "gives; else null."}},
            closed=True, description="A job without its full result (GET /v1/jobs/{id})."),
        "JobList": _obj({"jobs": {"type": "array", "items": _ref("JobSummary")},
                         "next": {**STR_OR_NULL, "description": "Pass as `before` for the "
                                                                "next page; null on the last."}},
                        closed=True),
        **_event_schemas(),
    }


def _cluster_status() -> Schema:
    """`/v1/status` `cluster` (docs/api.md, docs/cluster.md): local mode has `backend` and
    `replicas` only; ray mode adds the cluster's state, its agent and its scaling."""
    replica = _obj(
        {"id": STR, "node": STR, "node_ip": STR, "pid": INT_OR_NULL,
         "state": {"type": "string", "enum": sorted(
             {*REPLICA_STATES, *(s.value for s in WorkerState)} - {"exited"})},
         "device": STR, "since": NUM_OR_NULL, "started": NUM_OR_NULL,
         "loaded_since": {**NUM_OR_NULL, "description": "Unix time the model was loaded; "
                                                        "null until then (and locally)."}},
        closed=True, description="One live replica (ray), or the worker process (local).")
    return _obj(
        {"backend": {"type": "string", "enum": ["local", "ray"]},
         "replicas": {"type": "array", "items": replica,
                      "description": "Empty when scaled to zero."}},
        {"state": {"type": "string", "enum": [s.value for s in ClusterState]},
         "reason": STR_OR_NULL, "address": STR, "ray_version": STR_OR_NULL,
         "nodes": INT_OR_NULL, "app": STR, "url": STR, "app_status": STR_OR_NULL,
         "app_message": STR_OR_NULL, "min_replicas": INT, "max_replicas": INT,
         "target_min_replicas": INT, "hold_s": NUM_OR_NULL, "hold_trigger": STR_OR_NULL,
         "agent_pid": INT_OR_NULL, "agent_starts": INT, "in_flight": INT},
        closed=True, description="The backend and its live replicas (the local worker process, "
                                 "or Ray Serve's: docs/cluster.md).")


# -- GET /v1/events: each event's name, whether it carries an id, and its data ----------------
def _job_event(status: Schema, fields: dict[str, Schema], title: str) -> Schema:
    out = _obj({"job": STR, "status": status, **fields, "time": TIME}, closed=True)
    out["title"] = title
    return out


EVENTS: dict[str, tuple[bool, str, Schema]] = {
    "hello": (False, "First on every connection: the newest id so far, the heartbeat period.",
              _obj({"last_id": INT, "heartbeat_s": NUM}, closed=True)),
    "reset": (False, "The Last-Event-ID is no longer in the buffer (or is not an id): "
                     "re-read the state (GET /v1/status, GET /v1/jobs).",
              _obj({"reason": STR}, closed=True)),
    "worker": (False, "The supervisor snapshot (GET /v1/status's `worker`): at every "
                      "(re)connect and after worker events, coalesced.",
               _obj({"worker": _ref("WorkerStatus"), "time": NUM}, closed=True)),
    "queue": (False, "Queue counts: at every (re)connect and after job events, coalesced.",
              _obj({"queued": INT, "running": INT, "max_pending": INT}, closed=True)),
    "state": (True, "The worker moved (docs/design.md lists states and triggers).",
              _obj({"old": {"type": "string", "enum": [s.value for s in WorkerState]},
                    "new": {"type": "string", "enum": [s.value for s in WorkerState]},
                    "reason": STR, "trigger": STR, "pid": INT_OR_NULL, "device": STR,
                    "time": TIME}, closed=True)),
    "loaded": (True, "A load finished: seconds from the request, per-phase timings.",
               _obj({"seconds": NUM, "trigger": STR, "pid": INT_OR_NULL, "device": STR,
                     "fresh_process": BOOL,
                     "kind": {"type": "string", "enum": ["spawn", "reload", "activate"]},
                     "timings": {"type": "object", "additionalProperties": NUM},
                     "time": TIME}, closed=True)),
    "exited": (True, "A worker process ended, and why (`kind`).",
               _obj({"pid": INT, "returncode": INT_OR_NULL,
                     "kind": {"type": "string", "enum": [k.value for k in ExitKind]},
                     "detail": STR, "time": TIME}, closed=True)),
    "activity": (True, "Work or a hold started or ended (in flight 0 -> 1+ or back; "
                       "hold_s 0: no hold).",
                 _obj({"inflight": INT, "hold_s": NUM, "hold_trigger": STR, "time": TIME},
                      closed=True)),
    "job": (True, "A job moved: queued (with `position`, pending jobs ahead), running (a "
                  "segmented recording repeats it with `done_s` of `total_s`), then final "
                  "(with `queue_s`, `compute_s`, `attempts`).",
            {"oneOf": [
                _job_event({"const": "queued"}, {"position": INT}, "queued"),
                _job_event({"const": "running"}, {}, "running"),
                _job_event({"const": "running"}, {"done_s": NUM, "total_s": NUM}, "progress"),
                _job_event({"type": "string", "enum": FINAL_STATUSES},
                           {"queue_s": NUM_OR_NULL, "compute_s": NUM_OR_NULL, "attempts": INT},
                           "final")]}),
}


def event_schema_name(event: str) -> str:
    return "Event" + event.capitalize()


def _event_schemas() -> dict[str, Schema]:
    """Each event's data object (`Event<Name>`), and `ServerEvent`: one parsed frame
    `{event, id?, data}` (id present exactly on history events)."""
    out: dict[str, Schema] = {}
    frames = []
    for name, (has_id, description, data) in EVENTS.items():
        out[event_schema_name(name)] = {**data, "description": description}
        fields = {"event": {"const": name}, **({"id": EVENT_ID} if has_id else {}),
                  "data": _ref(event_schema_name(name))}
        frames.append(_obj(fields, closed=True))
    out["ServerEvent"] = {"oneOf": frames, "description": "One event of GET /v1/events as a "
                          "client parses it: its name, its id (history events only) and its "
                          "data (JSON)."}
    return out


# -- operations --------------------------------------------------------------------------------
def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    out: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                               "schema": {"type": "integer", "minimum": 1}}}
LOCATION = {"Location": {"description": "The job's URL.", "schema": STR}}


def _errors(*codes: str) -> dict[str, Schema]:
    """Error answers, grouped by status; `x-error-codes` lists the codes each may carry."""
    table = http_codes()
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(table[code], []).append(code)
    out: dict[str, Schema] = {}
    for status, group in sorted(by_status.items()):
        resp = _json(_ref("Error"), "Error: " + ", ".join(f"`{c}`" for c in group),
                     RETRY_AFTER if status in (429, 503) else None)
        resp["x-error-codes"] = group
        out[str(status)] = resp
    return out


def _param(name: str, where: str, schema: Schema, description: str,
           required: bool = False) -> Schema:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


JOB_ID = _param("id", "path", STR, "The job id (from POST /v1/jobs).")
SUBMIT_OPTIONS = [
    _param("granularity", "query", {"type": "string", "enum": ["utterance", "frame"]},
           "One prediction for the clip (default) or one per frame."),
    _param("embedding", "query", {"type": "string", "enum": ["true", "false"]},
           "Keep the embedding (GET /v1/jobs/{id}/embedding.npy)."),
    _param("key", "query", {"type": "string", "maxLength": 200},
           "Your name for the clip (default: the file name's stem)."),
    _param("segments", "query", {"type": "string", "enum": ["none", "vad", "fixed"]},
           "none: one result for the clip (at most audio.max_seconds); vad: one per stretch of "
           "speech; fixed: one per window; both up to audio.max_segmented_seconds "
           "(docs/recordings.md)."),
    _param("window_s", "query", NUM, "segments=fixed: window length, seconds."),
    _param("hop_s", "query", NUM, "segments=fixed: seconds between window starts."),
    _param("callback_url", "query", {"type": "string", "maxLength": 2048},
           "POST the final job document here, signed (docs/webhooks.md); the host must be in "
           "webhooks.allowed_hosts."),
]
AUDIO_BODY = {
    "required": True,
    "description": "The clip: a multipart field `audio` (options may be form fields), or the "
                   "raw file with an audio/* or application/octet-stream content type.",
    "content": {
        "multipart/form-data": {"schema": _obj(
            {"audio": {"type": "string", "contentMediaType": "application/octet-stream"}},
            {"granularity": STR, "embedding": STR, "key": STR, "callback_url": STR,
             "segments": STR, "window_s": STR, "hop_s": STR})},
        "audio/*": {"schema": {"type": "string", "contentMediaType": "audio/*"}},
        "application/octet-stream": {"schema": {"type": "string"}},
    },
}
# Every audio refusal (each AudioError subclass: a new one is described here by itself).
AUDIO_ERRORS = tuple(dict.fromkeys(cls.code for cls in errors.all_errors()
                                   if issubclass(cls, errors.AudioError)))
SUBMIT_ERRORS = ("bad_request", *AUDIO_ERRORS, "callback_refused", "request_timeout",
                 "rate_limited", "too_many_pending", "queue_full", "shutting_down",
                 "insufficient_storage", "storage_unavailable")
STORE_ERRORS = ("storage_unavailable",)


def _op(method: str, path: str, summary: str, responses: dict[str, Schema], *errs: str,
        parameters: list[Schema] | None = None, body: Schema | None = None) -> Schema:
    scope = auth.ROUTE_SCOPES.get((method.upper(), path), auth.ADMIN)
    op: Schema = {"operationId": _operation_id(method, path), "summary": summary,
                  "responses": dict(responses)}
    if scope == auth.OPEN:
        op["security"] = []
    else:
        op["security"] = [{"bearer": [] if scope == auth.ANY else [scope]}]
        extra = ("unauthorized",) if scope == auth.ANY else ("unauthorized", "forbidden")
        errs = (*errs, *extra)
    op["responses"].update(_errors(*errs, "internal"))
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    return op


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}").replace(".", "_") for w in path.split("/") if w and w != "v1"]
    return method.lower() + "_" + "_".join(words).replace("-", "_")


STATUS_LIST = "^(" + "|".join(JOB_STATUSES) + ")(,(" + "|".join(JOB_STATUSES) + "))*$"
EVENTS_TEXT = "\n".join(
    [f"Frames `[id: N]`, `event: NAME`, `data: JSON`, a blank line; "
     f"`retry: {events_api.RETRY_MS}` first; a `: ping` comment after "
     "console.events_heartbeat_s without an event. Events (the `Event<Name>` schemas hold "
     "each data object, `ServerEvent` a parsed frame):", ""]
    + [f"- `{name}`{' (id)' if has_id else ''}: {text}"
       for name, (has_id, text, _) in EVENTS.items()])
STATIC_TYPES = sorted({t.split(";")[0] for t in console.TYPES.values()})
CONSOLE_HEADERS = {name: {"schema": STR, "description": text} for name, text in (
    ("ETag", "The file's hash."),
    ("Cache-Control", "`no-cache` for the page (and an older version's files), a year and "
                      "`immutable` for the current version's files."),
    ("Content-Security-Policy", "No inline script or style, no other host."))}
IF_NONE_MATCH = _param("If-None-Match", "header", STR, "An ETag seen before: 304 if unchanged.")


def _paths() -> dict[str, dict[str, Schema]]:
    job = _json(_ref("Job"), "The job document.")
    worker_body = {"content": {JSON: {"schema": _obj({}, {"hold_s": NUM, "wait": BOOL})}}}
    post_jobs = _op("post", "/v1/jobs", "Submit a clip",
                    {"202": _json(_ref("JobAccepted"), "Decoded, spooled, queued.", LOCATION)},
                    *SUBMIT_ERRORS, parameters=SUBMIT_OPTIONS, body=AUDIO_BODY)
    return {
        "/v1/jobs/{id}": {
            "get": _op("get", "/v1/jobs/{id}", "A job, long-polled with `wait`", {"200": job},
                       "bad_request", "not_found", *STORE_ERRORS, parameters=[
                           JOB_ID, _param("wait", "query", {"type": "number", "minimum": 0},
                                          "Seconds to wait for a final status (capped by "
                                          "server.max_wait_s).")]),
            "delete": _op("delete", "/v1/jobs/{id}", "Cancel or delete a job", {
                "200": {"description": "Cancelled (queued or running) or deleted (final).",
                        "content": {JSON: {"schema": {"oneOf": [_ref("Cancelled"),
                                                                _ref("Deleted")]}}}}},
                "not_found", *STORE_ERRORS, parameters=[JOB_ID])},
        "/v1/jobs/{id}/embedding.npy": {"get": _op(
            "get", "/v1/jobs/{id}/embedding.npy", "A done job's embedding (NumPy .npy)",
            {"200": {"description": "float32, (D,) or (T, D).", "content": {
                "application/octet-stream": {"schema": {"type": "string"}}}}},
            "not_found", "conflict", *STORE_ERRORS, parameters=[JOB_ID])},
        "/v1/recognize": {"post": _op(
            "post", "/v1/recognize", "Submit and wait (up to server.max_wait_s)",
            {"200": job, "202": _json(_ref("Job"), "Not final yet: the job with `position`.",
                                      LOCATION)},
            *SUBMIT_ERRORS, parameters=SUBMIT_OPTIONS, body=AUDIO_BODY)},
        "/v1/status": {"get": _op("get", "/v1/status", "Worker and queue state",
                                  {"200": _json(_ref("Status"), "The status.")},
                                  *STORE_ERRORS)},
        "/v1/worker/load": {"post": _op(
            "post", "/v1/worker/load", "Load the model now (optionally hold it)",
            {"200": _json(_ref("WorkerStatus"), "Loaded."),
             "202": _json(_ref("WorkerStatus"), "Loading (wait=false).")},
            "bad_request", "request_timeout", "shutting_down", "worker_unavailable",
            "load_failed", "cluster_unavailable", parameters=[
                _param("hold_s", "query", {"type": "number", "minimum": 0},
                       "Keep it loaded at least this long."),
                _param("wait", "query", {"type": "string", "enum": ["true", "false"]},
                       "Answer once loaded (default true).")], body=worker_body)},
        "/v1/worker/unload": {"post": _op(
            "post", "/v1/worker/unload", "Drop the model after in-flight work",
            {"202": _json(_ref("WorkerStatus"), "Unloading.")},
            "bad_request", "request_timeout", parameters=[
                _param("exit", "query", {"type": "string", "enum": ["true", "false"]},
                       "End the worker process too.")],
            body={"content": {JSON: {"schema": _obj({}, {"exit": BOOL})}}})},
        "/v1/prewarm": {"get": _op("get", "/v1/prewarm", "Prewarm rules, next fires, holds",
                                   {"200": _json(_ref("Prewarm"), "The prewarm document.")})},
        "/v1/cost": {"get": _op(
            "get", "/v1/cost", "The cost report (per token too)",
            {"200": _json(_ref("Cost"), "The cost document.")}, "bad_request", *STORE_ERRORS,
            parameters=[_param(k, "query", STR, "A duration before now (30d), now, a Unix time "
                                                "or an ISO date.") for k in ("since", "until")])},
        "/metrics": {"get": _op("get", "/metrics", "Prometheus metrics", {"200": {
            "description": "Prometheus text format 0.0.4.",
            "content": {"text/plain": {"schema": STR}}}}, *STORE_ERRORS)},
        "/healthz": {"get": _op("get", "/healthz", "Liveness (no token)",
                                {"200": _json(_ref("Health"), "The process serves.")})},
        "/readyz": {"get": _op("get", "/readyz", "Readiness", {
            "200": _json(_ref("Ready"), "Ready."),
            "503": _json(_ref("NotReady"), "Not ready: draining, queue full, storage failing, "
                                           "a hung worker or a failed task.", RETRY_AFTER)})},
        "/v1/jobs": {
            "post": post_jobs,
            "get": _op("get", "/v1/jobs", "Recent jobs, newest first (a jobs token: its own)", {
                "200": _json(_ref("JobList"), "A page of job summaries.")},
                "bad_request", *STORE_ERRORS, parameters=[
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500,
                                              "default": 50}, "Jobs per page."),
                    _param("status", "query", {"type": "string", "pattern": STATUS_LIST},
                           "Only these statuses, comma-separated (default: all)."),
                    _param("before", "query", STR, "The `next` of the previous page: jobs "
                                                   "accepted before that job.")])},
        "/v1/events": {"get": _op(
            "get", "/v1/events", "Server-Sent Events: the worker's life, job progress (the "
            "console's feed; not activity)", {"200": {
                "description": "A stream that does not end until the daemon stops (or the "
                               "client falls console.events_buffer events behind).",
                "content": {"text/event-stream": {
                    "schema": {**STR, "description": EVENTS_TEXT},
                    "x-item-schema": _ref("ServerEvent")}}}},
            "shutting_down", parameters=[_param(
                "Last-Event-ID", "header", EVENT_ID, "Resume: the events after this id are "
                "replayed; an id no longer in the buffer gives `reset`.")])},
        "/": {"get": _op("get", "/", "The web console (no data in it; no token)", {
            "200": {"description": "The page.", "headers": CONSOLE_HEADERS,
                    "content": {"text/html": {"schema": STR}}},
            "304": {"description": "Not modified (If-None-Match).", "headers": CONSOLE_HEADERS}},
            parameters=[IF_NONE_MATCH])},
        "/console/{version}/{path}": {"get": _op(
            "get", "/console/{version}/{path}", "The console's static files (no token)", {
                "200": {"description": "A file of the page; immutable under the current "
                                       "version, revalidated under another.",
                        "headers": CONSOLE_HEADERS,
                        "content": {media: {"schema": STR} for media in STATIC_TYPES}},
                "304": {"description": "Not modified (If-None-Match).",
                        "headers": CONSOLE_HEADERS}},
            "not_found", parameters=[
                _param("version", "path", STR, "The console's build (a hash of its files)."),
                _param("path", "path", STR, "The file, e.g. app.js, vendor/x.min.css."),
                IF_NONE_MATCH])},
        "/v1/openapi.json": {"get": _op("get", "/v1/openapi.json", "This document",
                                        {"200": _json({"type": "object"}, "OpenAPI 3.1.")})},
    }


def document() -> dict[str, Any]:
    """The whole contract (a fresh copy: callers may change it)."""
    return copy.deepcopy({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ondemand",
            "version": __version__,
            "summary": "Scale-to-zero speech emotion recognition (emotion2vec+).",
            "description": "docs/api.md is the reference, docs/webhooks.md the callbacks. With "
                           "no server.token and no [[tokens]] configured, no token is needed; "
                           "otherwise every route but /healthz needs `Authorization: Bearer`, "
                           "and the scope its `security` names (admin covers all).",
        },
        "servers": [{"url": "/"}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "server.token (admin) or a [[tokens]] token; scopes: jobs, read, "
                               "admin."}},
        },
    })


@functools.cache
def _served() -> dict[str, Any]:
    return document()


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(_served())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/openapi.json", get_openapi)

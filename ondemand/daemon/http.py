"""The one place where errors become HTTP responses: `{"error": {"code", "message"}}`.

Every OndemandError code maps to a status here; anything else is a 500 with a generic message
(the traceback goes to the log, never to the client, and neither do server paths)."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ondemand.errors import OndemandError

log = logging.getLogger(__name__)

STATUS_BY_CODE: dict[str, int] = {
    # request problems
    "bad_request": 400,
    "bad_audio": 400,
    "empty": 400,
    "too_short": 400,
    "too_long": 400,
    "non_finite": 400,
    "undecodable": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    # the service cannot take it now
    "queue_full": 503,
    "worker_unavailable": 503,
    "load_failed": 503,
    "shutting_down": 503,
    "insufficient_storage": 507,  # spooling hit a full disk: nothing was queued
}

STATUS_CODES_FOR_HTTP: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


class BadRequest(OndemandError):
    code = "bad_request"


class Unauthorized(OndemandError):
    code = "unauthorized"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)


def response_for(exc: OndemandError) -> web.Response:
    status = STATUS_BY_CODE.get(exc.code, 500)
    headers = None
    retry: Any = getattr(exc, "retry_after_s", None)
    if status == 503:
        headers = {"Retry-After": str(max(1, math.ceil(retry if retry is not None else 5)))}
    message = exc.message if status < 500 or status in (503, 507) else "internal error"
    return error_response(status, exc.code, message, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OndemandError as e:
        if STATUS_BY_CODE.get(e.code, 500) == 500:
            log.error("%s %s failed: %s: %s", request.method, request.path, e.code, e.message)
        return response_for(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = STATUS_CODES_FOR_HTTP.get(e.status, "http_error")
        message = e.reason if e.status != 413 else (
            "the upload is larger than server.max_upload_mb allows"
        )
        return error_response(e.status, code, message)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the server log")

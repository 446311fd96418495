"""The one place where errors become HTTP responses: `{"error": {"code", "message"}}`.

The status comes from the error's class (ondemand/errors.py); nothing here maps codes by hand.
Anything that is not an OndemandError is a 500 with a generic message (the traceback goes to the
log, never to the client, and neither do server paths).  Errors aiohttp raises itself (unknown
route, wrong method, body too large) are rendered through the class for their status."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from ondemand.errors import OndemandError, UploadTooLarge, for_status

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)


def response_for(exc: OndemandError) -> web.Response:
    headers = None
    if exc.retry_after_s is not None or exc.status == 503:
        retry = exc.retry_after_s if exc.retry_after_s is not None else 5.0
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    message = exc.message if exc.status < 500 or exc.status in (503, 507) else "internal error"
    return error_response(exc.status, exc.code, message, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OndemandError as e:
        if e.status == 500:
            log.error("%s %s failed: %s: %s", request.method, request.path, e.code, e.message)
        return response_for(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            return response_for(UploadTooLarge(
                "the upload is larger than server.max_upload_mb allows"))
        cls = for_status(e.status)
        code = cls.code if cls.status == e.status else "http_error"
        return error_response(e.status, code, e.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the server log")

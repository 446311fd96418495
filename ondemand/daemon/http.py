"""The one place where errors become HTTP responses: `{"error": {"code", "message"}}`.

The status comes from the error's class (ondemand/errors.py); nothing here maps codes by hand.
Anything that is not an OndemandError is a 500 with a generic message (the traceback goes to the
log, never to the client, and neither do server paths).  Errors aiohttp raises itself (unknown
route, wrong method, body too large) are rendered through the class for their status.

Requests aiohttp's parser refuses (request line or header too long, too many headers, garbage)
never reach a handler or middleware: `make_runner()` gives every connection `JsonErrorHandler`,
which answers them in the same JSON shape (issue 10: a 100 KB job id got aiohttp's text/plain
400).

Every JSON answer goes through `json_response`, whose encoder refuses NaN and Infinity (they are
not JSON; issue 10 found a bare `NaN` in a job document): such a value becomes a logged 500.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from ondemand.config import ServerConfig
from ondemand.errors import (
    BadRequest,
    InternalError,
    OndemandError,
    RequestTimeout,
    RequestTooLarge,
    UploadTooLarge,
    for_status,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's parser limits (its defaults), named so the error table can quote them.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128

# NaN and Infinity are not JSON: refuse them instead of writing them.
dumps = functools.partial(json.dumps, allow_nan=False)


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Every JSON answer of the daemon.  A non-finite number raises ValueError here, in the
    handler, so error_middleware logs it and answers 500 internal (never invalid JSON)."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status,
                         headers=headers)


def response_for(exc: OndemandError) -> web.Response:
    headers = None
    if exc.retry_after_s is not None or exc.status == 503:
        retry = exc.retry_after_s if exc.retry_after_s is not None else 5.0
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    message = exc.message if exc.status < 500 or exc.status in (503, 507) else "internal error"
    response = error_response(exc.status, exc.code, message, headers)
    if isinstance(exc, RequestTimeout):
        # The rest of a stalled body will not come: close instead of lingering to read it.
        response.force_close()
    return response


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response` now, then close the connection.  For a stalled body: aiohttp would
    otherwise linger (up to 10 s) reading the rest of a body that is not coming."""
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the answer is written; the transport flushes it, then closes
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OndemandError as e:
        if e.status == 500:
            log.error("%s %s failed: %s: %s", request.method, request.path, e.code, e.message)
        if isinstance(e, RequestTimeout):
            return await _answer_and_close(request, response_for(e))
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


# -- errors aiohttp answers before any handler ---------------------------------------------------
def protocol_error(status: int, exc: BaseException | None) -> OndemandError:
    """Our error for a request aiohttp refused itself (`RequestHandler.handle_error`)."""
    if isinstance(exc, http_exceptions.LineTooLong) or (
        isinstance(exc, http_exceptions.BadHttpMessage) and "headers" in exc.message.lower()
        and "too many" in exc.message.lower()
    ):
        return RequestTooLarge(
            f"the request line or a header line is longer than {MAX_LINE_BYTES} bytes, or there "
            f"are more than {MAX_HEADERS} headers; shorten it (job ids are 22 characters)")
    if status == 400:
        detail = exc.message if isinstance(exc, http_exceptions.HttpProcessingError) else ""
        detail = " ".join(detail.split())[:120]
        return BadRequest("malformed HTTP request; the server could not parse its request line "
                          f"or headers{f' ({detail})' if detail else ''}")
    if status >= 500:
        return InternalError("internal error; see the server log")
    cls = for_status(status)
    return cls(f"the request was refused ({status})")


class JsonErrorHandler(RequestHandler):
    """aiohttp's per-connection protocol, answering its own errors in our JSON shape.

    aiohttp calls `handle_error` for requests its parser refused and for exceptions that
    escape the application (none should: error_middleware catches them).  Like aiohttp's own,
    the answer closes the connection: after a parse error the byte stream is out of step."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # the same guard as aiohttp's: too late to answer
            raise ConnectionError("response already started; cannot send the error")
        error = protocol_error(status, exc)
        if error.status >= 500:
            log.error("request from %s failed: %s", request.remote, exc, exc_info=exc)
        else:
            log.info("refused a malformed request from %s: %s (%s)", request.remote, error.code,
                     type(exc).__name__ if exc is not None else status)
        response = response_for(error)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's low-level server, making `JsonErrorHandler` connections."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class DaemonRunner(web.AppRunner):
    """`web.AppRunner` whose server answers protocol errors in JSON (see JsonErrorHandler)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # AppRunner builds a plain web.Server (Application._make_handler); JsonErrorServer only
        # changes which protocol class it makes, so re-class it rather than rebuild it from
        # aiohttp's private application hooks.
        server.__class__ = JsonErrorServer
        return server


def make_runner(app: web.Application, server: ServerConfig, **kwargs: Any) -> web.AppRunner:
    """The daemon's runner: JSON protocol errors, aiohttp's parser limits stated, and
    `server.read_timeout_s` as the keep-alive timeout: an idle connection, or one that has not
    finished its request line and headers, is closed after it (aiohttp's default is an hour)."""
    return DaemonRunner(
        app, keepalive_timeout=server.read_timeout_s, max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_FIELD_BYTES, max_headers=MAX_HEADERS, **kwargs)

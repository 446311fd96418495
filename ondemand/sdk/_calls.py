"""What a call sends and how its answer is read: shared by the sync and the async client, so the
API surface is written once and each client only moves bytes."""

from __future__ import annotations

import io
import json
import math
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any

from ondemand import errors
from ondemand.errors import OndemandError, RemoteError

Audio = str | Path | bytes | bytearray | memoryview | IO[bytes]
OCTETS = "application/octet-stream"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    content_type: str | None = None
    extra_timeout_s: float = 0.0  # a long-poll's wait on top of the client's timeout
    timeout_s: float | None = None  # instead of the client's timeout
    raw: bool = False  # the answer's bytes, not JSON
    accept: tuple[int, ...] = ()  # error statuses whose JSON body is the answer (readyz: 503)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def audio_bytes(audio: Audio, filename: str | None) -> tuple[bytes, str, str]:
    """(data, content type, name) of a path, bytes or binary file."""
    if isinstance(audio, str | Path):
        path = Path(audio)
        data, name = path.read_bytes(), filename or path.name
    elif isinstance(audio, bytes | bytearray | memoryview):
        data, name = bytes(audio), filename or ""
    else:
        data, name = audio.read(), filename or str(getattr(audio, "name", "") or "")
    ctype = mimetypes.guess_type(name)[0] or "" if name else ""
    if not ctype.startswith("audio/"):
        ctype = OCTETS
    return data, ctype, name


def submit(path: str, audio: Audio, *, filename: str | None, granularity: str, embedding: bool,
           key: str | None, callback_url: str | None, segments: str = "none",
           window_s: float | None = None, hop_s: float | None = None) -> Call:
    data, ctype, name = audio_bytes(audio, filename)
    query = {"granularity": granularity, "embedding": _flag(embedding)}
    if segments != "none":  # issue 12: a timeline (docs/recordings.md)
        query["segments"] = segments
    for opt, value in (("window_s", window_s), ("hop_s", hop_s)):
        if value is not None:
            query[opt] = f"{value:g}"
    stem = PurePath(name).stem if name else ""
    if key is not None or stem:
        query["key"] = key if key is not None else stem
    if callback_url:
        query["callback_url"] = callback_url
    return Call("POST", path, query, body=data, content_type=ctype)


def job(job_id: str, wait_s: float) -> Call:
    query = {"wait": f"{wait_s:g}"} if wait_s > 0 else {}
    return Call("GET", f"/v1/jobs/{job_id}", query, extra_timeout_s=max(0.0, wait_s))


EVENTS = "/v1/events"


def events_headers(token: str, last_event_id: str | None) -> dict[str, str]:
    """The request headers of `GET /v1/events` (resumed after `last_event_id`)."""
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return headers


def json_body(method: str, path: str, body: dict[str, Any], timeout_s: float | None = None
              ) -> Call:
    return Call(method, path, body=json.dumps(body).encode(), content_type="application/json",
                timeout_s=timeout_s)


def error_from(status: int, body: bytes, retry_after: str | None) -> OndemandError:
    """An error answer as the API's own exception class (ondemand/errors.py: the class is the
    code), `retry_after_s` from Retry-After; a code this client does not know (or an answer that
    is not ours) is a RemoteError with the code and status as data."""
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except Exception:
        code, message = "http_error", f"HTTP {status}"
    retry: float | None = None
    if retry_after:
        try:
            retry = float(retry_after)
        except ValueError:
            retry = None
        if retry is not None and not math.isfinite(retry):
            retry = None
    cls = errors.by_code().get(code)
    if cls is None or cls.status != status:
        out: OndemandError = RemoteError(message, remote_code=code, http_status=status)
        out.retry_after_s = retry
        return out
    return cls(message, retry_after_s=retry)


def read_npy(data: bytes) -> Any:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)

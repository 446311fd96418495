"""An upload's way in: read the body (bounded in size and in stall time), then decode it in a
thread (bounded in how many run at once).  The front end's only expensive input path.

Invariants (each cites the issue-10 break it prevents):
- A body that stalls longer than `server.read_timeout_s` between chunks is answered 408
  `request_timeout` and its connection closed (an upload declaring 4 MB, sending 5 KB and
  stalling was held open indefinitely).  The deadline moves with every chunk: a slow but moving
  upload is fine, a stopped one is not.
- The bodies held in memory at once (being received, or read and waiting for their decode) are
  bounded by `server.max_buffered_uploads_mb`: each upload reserves its Content-Length (or
  `server.max_upload_mb` when none is declared) before its body is read and keeps it until its
  decode ends; the others wait their turn, first come first served, unread.  A body is read
  under `server.max_upload_mb` into one buffer whose bytes the decode thread takes over, so they
  are freed there, as soon as the decode ends (refusals included: an AudioError's traceback
  would keep them alive).  A multipart form holds one `audio` file field and at most
  `MAX_FIELDS` short option fields, each named once; anything else is 400 `bad_request` (a big
  option field answered 413, two `audio` fields were accepted and the last used silently).
- At most `server.max_concurrent_decodes` decodes run at once, and a slot is held until its
  decode *thread* ends, even when the request is cancelled meanwhile (else cancelled uploads
  would let more decodes run than the memory bound allows).  Six 655 kHz FLACs at once took the
  front end from 1.1 GB to 7.1 GB; docs/operations.md states the bound and the measurements.
- After a decode, glibc is asked to return freed heap pages (`malloc_trim`): the decode's
  blocks are freed, but glibc keeps freed pages of its per-thread arenas, and RSS stayed at
  3.1 GB after the burst.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from ondemand.audio import Decoded, decode
from ondemand.config import AudioConfig, Config, ServerConfig
from ondemand.errors import (
    AudioError,
    AudioTooShort,
    BadRequest,
    RequestTimeout,
    UnsupportedMediaType,
    UploadTooLarge,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 16
MAX_FIELD_BYTES = 4096  # an option field (granularity, embedding, key) is a short value
MAX_FIELDS = 16
FIELD_NAME_CHARS = 40  # of a client's field name quoted back in a message


@dataclass
class Upload:
    audio: bytes  # emptied by Decoder.decode, which takes the bytes over
    filename: str  # the client's file name ("" for a raw body)
    fields: dict[str, str]  # the multipart option fields


class UploadBudget:
    """Bytes of upload bodies held at once (server.max_buffered_uploads_mb), first come first
    served.  A reservation is taken whole before the body is read, never grown: two uploads
    can never each hold half and wait for the other."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.capacity)
        await self._acquire(size)
        try:
            yield
        finally:
            self.used -= size
            self._wake()

    async def _acquire(self, size: int) -> None:
        if not self._queue and self.used + size <= self.capacity:
            self.used += size
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._queue.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted as the request was dropped
                self.used -= size
            else:
                self._queue.remove(entry)
            self._wake()
            raise

    def _wake(self) -> None:
        while self._queue and self.used + self._queue[0][0] <= self.capacity:
            size, granted = self._queue.popleft()
            if not granted.done():
                self.used += size
                granted.set_result(None)


def reservation(request: web.Request, server: ServerConfig) -> int:
    """The bytes an upload reserves: its Content-Length, else the most it may send."""
    limit = int(server.max_upload_mb * 1024 * 1024)
    declared = request.content_length
    return limit if declared is None else min(declared, limit)


def _too_large(limit_mb: float) -> UploadTooLarge:
    return UploadTooLarge(
        f"the upload is larger than the limit of {limit_mb:g} MB (server.max_upload_mb); "
        "send a shorter or compressed clip")


def _field(name: str) -> str:
    return repr(name[:FIELD_NAME_CHARS])


class _Body:
    """Reads a request body chunk by chunk, moving the stall deadline with every chunk."""

    def __init__(self, deadline: asyncio.Timeout, stall_s: float) -> None:
        self._deadline = deadline
        self._stall_s = stall_s
        self._loop = asyncio.get_running_loop()

    def moved(self) -> None:
        self._deadline.reschedule(self._loop.time() + self._stall_s)

    async def read(self, read: Callable[[int], Awaitable[bytes]], limit: int,
                   too_big: Exception) -> bytes:
        buf = io.BytesIO()  # getvalue() hands over its buffer: no second copy of the upload
        size = 0
        while True:
            chunk = await read(CHUNK)
            self.moved()
            if not chunk:
                return buf.getvalue()
            size += len(chunk)
            if size > limit:
                raise too_big
            buf.write(chunk)


async def read_upload(request: web.Request, server: ServerConfig) -> Upload:
    """The audio, its file name and the form fields, from a multipart or raw audio/* body."""
    limit = int(server.max_upload_mb * 1024 * 1024)
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise _too_large(server.max_upload_mb)
    ctype = request.content_type
    multipart = ctype == "multipart/form-data"
    if not (multipart or ctype.startswith("audio/") or ctype == "application/octet-stream"):
        raise UnsupportedMediaType(
            f"unsupported content type {ctype or '(none)'!r}: send the audio as a multipart "
            "field `audio` or as a raw body with an audio/* content type")
    try:
        async with asyncio.timeout(server.read_timeout_s) as deadline:
            body = _Body(deadline, server.read_timeout_s)
            if multipart:
                return await _read_form(request, body, limit, server.max_upload_mb)
            audio = await body.read(request.content.read, limit,
                                    _too_large(server.max_upload_mb))
            return Upload(audio, "", {})
    except TimeoutError:
        raise RequestTimeout(
            f"the request body stalled for more than {server.read_timeout_s:g} s "
            "(server.read_timeout_s); send the whole body without pausing") from None


async def _read_form(request: web.Request, body: _Body, limit: int, limit_mb: float) -> Upload:
    audio: bytes | None = None
    filename = ""
    fields: dict[str, str] = {}
    try:
        reader = await request.multipart()
        async for part in reader:
            body.moved()
            if not isinstance(part, BodyPartReader) or not part.name:
                raise BadRequest("every part of the multipart form must be a named field "
                                 "(`audio`, and options such as `granularity`)")
            name = part.name
            if name == "audio":
                if audio is not None:
                    raise BadRequest("the multipart form has more than one `audio` field; "
                                     "send one clip per request")
                audio = await body.read(part.read_chunk, limit, _too_large(limit_mb))
                filename = part.filename or ""
                continue
            if name in fields:
                raise BadRequest(f"the multipart form has more than one {_field(name)} field")
            if len(fields) >= MAX_FIELDS:
                raise BadRequest(f"the multipart form has more than {MAX_FIELDS} option fields")
            raw = await body.read(part.read_chunk, MAX_FIELD_BYTES, BadRequest(
                f"the form field {_field(name)} is longer than {MAX_FIELD_BYTES} bytes; "
                "option fields are short values, and the clip goes in the file field `audio`"))
            fields[name] = raw.decode("utf-8", "replace")
    except ValueError as e:  # aiohttp: no/unknown boundary, truncated body (was a 500)
        raise BadRequest(
            "malformed multipart/form-data body (missing or wrong boundary, or cut short); "
            "send the clip as the file field `audio`") from e
    if audio is None:
        raise BadRequest("the multipart form has no `audio` file field")
    return Upload(audio, filename, fields)


class Intake:
    """An upload's way in, as one component: reserve its bytes, read it, decode it.

        async with intake.receive(request) as upload:   # reserved and read
            ...                                          # validate the options
            decoded = await intake.decode(upload)        # a slot, a thread
    """

    def __init__(self, cfg: Config) -> None:
        self._server = cfg.server
        self.budget = UploadBudget(int(cfg.server.max_buffered_uploads_mb * 1024 * 1024))
        self.decoder = Decoder(cfg.audio, cfg.server.max_concurrent_decodes)

    @contextlib.asynccontextmanager
    async def receive(self, request: web.Request) -> AsyncIterator[Upload]:
        """The upload, read under its reservation, which is held until the block ends."""
        async with self.budget.reserve(reservation(request, self._server)):
            yield await read_upload(request, self._server)

    async def decode(self, upload: Upload) -> Decoded:
        return await self.decoder.decode(upload)


class Decoder:
    """Decodes uploads in threads, `slots` at a time (server.max_concurrent_decodes)."""

    def __init__(self, audio: AudioConfig, slots: int) -> None:
        self._audio = audio
        self._slots = asyncio.Semaphore(slots)
        self.running = 0  # decode threads alive (a cancelled request's thread included)
        self.waiting = 0  # uploads read, waiting for a slot

    async def decode(self, upload: Upload) -> Decoded:
        """The validated 16 kHz clip, or an AudioError.  Takes `upload.audio` over (leaves b"")
        so that the decode thread holds the only reference and frees it."""
        box = [upload.audio]
        upload.audio = b""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            thread = asyncio.get_running_loop().run_in_executor(None, self._decode, box)
        except BaseException:
            self._slots.release()
            raise
        self.running += 1
        thread.add_done_callback(self._release)
        # shield: a cancelled request stops waiting, but its slot is held until the thread ends
        decoded = await asyncio.shield(thread)
        if decoded.duration_s < self._audio.min_seconds:
            raise AudioTooShort(
                f"the audio is too short: {decoded.duration_s * 1000:.1f} ms; the minimum is "
                f"{self._audio.min_seconds * 1000:g} ms (audio.min_seconds)")
        return decoded

    def _release(self, thread: asyncio.Future[Decoded]) -> None:
        self.running -= 1
        self._slots.release()
        if not thread.cancelled():
            thread.exception()  # retrieved: a cancelled request's failure is not "never retrieved"

    def _decode(self, box: list[bytes]) -> Decoded:
        data = box.pop()
        try:
            return decode(data, max_seconds=self._audio.max_seconds,
                          max_decode_mb=self._audio.max_decode_mb)
        except AudioError as e:
            _drop_frames(e)  # the frames of a refusal hold `data` (and the file object over it)
            raise
        finally:
            del data  # the last reference: the upload's bytes are freed here, then trimmed
            trim_heap()


def _drop_frames(exc: BaseException) -> None:
    """Clear the tracebacks of `exc` and of every exception chained to it."""
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__cause__, e.__context__]


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc keeps them in its arenas otherwise)."""
    if _TRIM is not None:
        _TRIM(0)

"""An upload's way in: stream the body to a file (bounded in size and in stall time), then decode
it from that file into the job's spool file in a thread (bounded in how many run at once).  The
front end's only expensive input path; its memory follows neither the upload nor the recording.

Invariants (each cites the break it prevents):
- A body that stalls longer than `server.read_timeout_s` between chunks is answered 408
  `request_timeout` and its connection closed (an upload declaring 4 MB, sending 5 KB and
  stalling was held open indefinitely).  The deadline moves with every chunk: a slow but moving
  upload is fine, a stopped one is not.
- A body is never held whole in memory (issue 12: an hour-long recording is 600 MB): it is
  written as it arrives to a file in `storage.dir/incoming`, through one write buffer of
  `WRITE_BUFFER` bytes flushed from a thread, under `server.max_upload_mb`; the decode reads that
  file block by block and writes the 16 kHz samples block by block into the spool
  (`audio.decode_to`).  The file is removed when the decode ends, refusals included, and files
  left by a previous process are swept at the first upload.
- The bodies held at once (being received, or waiting for their decode) are bounded by
  `server.max_buffered_uploads_mb`: each upload reserves its Content-Length (or
  `server.max_upload_mb` when none is declared) before its body is read and keeps it until its
  decode ends; the others wait their turn, first come first served, unread.  A multipart form
  holds one `audio` file field and at most `MAX_FIELDS` short option fields, each named once;
  anything else is 400 `bad_request` (a big option field answered 413, two `audio` fields were
  accepted and the last used silently).
- At most `server.max_concurrent_decodes` decodes run at once, and a slot is held until its
  decode *thread* ends, even when the request is cancelled meanwhile (else cancelled uploads
  would let more decodes run than the memory bound allows).  Six 655 kHz FLACs at once took the
  front end from 1.1 GB to 7.1 GB; docs/operations.md states the bound and the measurements.
- After a decode, glibc is asked to return freed heap pages (`malloc_trim`): glibc keeps freed
  pages of its per-thread arenas, and RSS stayed at 3.1 GB after the burst.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import BodyPartReader, web

from ondemand.audio import Limits, Spooled, decode_to
from ondemand.config import AudioConfig, Config, ServerConfig
from ondemand.errors import (
    AudioError,
    AudioTooShort,
    BadRequest,
    RequestTimeout,
    StorageFull,
    UnsupportedMediaType,
    UploadTooLarge,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 16
WRITE_BUFFER = 1 << 20  # body bytes held in memory per upload before they go to its file
INCOMING = "incoming"  # under storage.dir: upload bodies being received or decoded
MAX_FIELD_BYTES = 4096  # an option field (granularity, embedding, key) is a short value
MAX_FIELDS = 16
FIELD_NAME_CHARS = 40  # of a client's field name quoted back in a message


@dataclass
class Upload:
    path: Path  # the body, in storage.dir/incoming; removed when the upload is done with
    filename: str  # the client's file name ("" for a raw body)
    fields: dict[str, str]  # the multipart option fields
    size: int = 0

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


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
        """A short body part (an option field), in memory."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await read(CHUNK)
            self.moved()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise too_big
            parts.append(chunk)

    async def save(self, read: Callable[[int], Awaitable[bytes]], fh: BinaryIO, limit: int,
                   too_big: Exception) -> int:
        """The audio, into `fh` through one WRITE_BUFFER flushed from a thread (a slow disk
        must not stall the event loop).  Returns its size."""
        buf = bytearray()
        size = 0
        while True:
            chunk = await read(CHUNK)
            self.moved()
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise too_big
                buf += chunk
            if len(buf) >= WRITE_BUFFER:
                data, buf = bytes(buf), bytearray()
                await asyncio.to_thread(fh.write, data)
                self.moved()  # a slow write is not a stalled client
            elif buf and not chunk:
                fh.write(buf)  # the tail: less than one buffer
            if not chunk:
                return size


def _disk_error(e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageFull("the server's storage is full, so the upload was not stored and no "
                           "job was queued; retry later (operators: free space in storage.dir)")
    return e


async def read_upload(request: web.Request, server: ServerConfig, incoming: Path) -> Upload:
    """The audio (in a file under `incoming`), its file name and the form fields, from a
    multipart or raw audio/* body.  On any failure the file is removed."""
    limit = int(server.max_upload_mb * 1024 * 1024)
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise _too_large(server.max_upload_mb)
    ctype = request.content_type
    multipart = ctype == "multipart/form-data"
    if not (multipart or ctype.startswith("audio/") or ctype == "application/octet-stream"):
        raise UnsupportedMediaType(
            f"unsupported content type {ctype or '(none)'!r}: send the audio as a multipart "
            "field `audio` or as a raw body with an audio/* content type")
    upload = Upload(incoming / f"{secrets.token_hex(12)}.part", "", {})
    try:
        with open(upload.path, "wb") as fh:
            async with asyncio.timeout(server.read_timeout_s) as deadline:
                body = _Body(deadline, server.read_timeout_s)
                if multipart:
                    await _read_form(request, body, fh, upload, limit, server.max_upload_mb)
                else:
                    upload.size = await body.save(request.content.read, fh, limit,
                                                  _too_large(server.max_upload_mb))
    except TimeoutError:
        upload.discard()
        raise RequestTimeout(
            f"the request body stalled for more than {server.read_timeout_s:g} s "
            "(server.read_timeout_s); send the whole body without pausing") from None
    except OSError as e:
        upload.discard()
        raise _disk_error(e) from e
    except BaseException:
        upload.discard()
        raise
    return upload


async def _read_form(request: web.Request, body: _Body, fh: BinaryIO, upload: Upload,
                     limit: int, limit_mb: float) -> None:
    seen_audio = False
    fields = upload.fields
    try:
        reader = await request.multipart()
        async for part in reader:
            body.moved()
            if not isinstance(part, BodyPartReader) or not part.name:
                raise BadRequest("every part of the multipart form must be a named field "
                                 "(`audio`, and options such as `granularity`)")
            name = part.name
            if name == "audio":
                if seen_audio:
                    raise BadRequest("the multipart form has more than one `audio` field; "
                                     "send one clip per request")
                seen_audio = True
                upload.size = await body.save(part.read_chunk, fh, limit, _too_large(limit_mb))
                upload.filename = part.filename or ""
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
    if not seen_audio:
        raise BadRequest("the multipart form has no `audio` file field")


class Intake:
    """An upload's way in, as one component: reserve its bytes, stream it to a file, decode it
    into the spool.

        async with intake.receive(request) as upload:   # reserved and received (a file)
            ...                                          # validate the options
            spooled = await intake.decode(upload, spool_path, limits)   # a slot, a thread
    """

    def __init__(self, cfg: Config) -> None:
        self._server = cfg.server
        self.incoming = Path(cfg.storage.dir) / INCOMING
        self._swept = False
        self.budget = UploadBudget(int(cfg.server.max_buffered_uploads_mb * 1024 * 1024))
        self.decoder = Decoder(cfg.audio, cfg.server.max_concurrent_decodes)

    def _sweep(self) -> None:
        """Bodies left by a process that died mid-upload: nobody's now (one daemon per dir)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        if self._swept:
            return
        self._swept = True
        stale = 0
        for path in self.incoming.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
                stale += 1
        if stale:
            log.info("upload removed %d stale incoming file(s)", stale)

    @contextlib.asynccontextmanager
    async def receive(self, request: web.Request) -> AsyncIterator[Upload]:
        """The upload, read under its reservation, which is held until the block ends; its
        file is removed then."""
        async with self.budget.reserve(reservation(request, self._server)):
            try:
                self._sweep()
            except OSError as e:
                raise _disk_error(e) from e
            upload = await read_upload(request, self._server, self.incoming)
            try:
                yield upload
            finally:
                upload.discard()

    async def decode(self, upload: Upload, spool: Path, limits: Limits) -> Spooled:
        return await self.decoder.decode(upload, spool, limits)


class Decoder:
    """Decodes uploads in threads, `slots` at a time (server.max_concurrent_decodes)."""

    def __init__(self, audio: AudioConfig, slots: int) -> None:
        self._audio = audio
        self._slots = asyncio.Semaphore(slots)
        self.running = 0  # decode threads alive (a cancelled request's thread included)
        self.waiting = 0  # uploads read, waiting for a slot

    async def decode(self, upload: Upload, spool: Path, limits: Limits) -> Spooled:
        """Decode the upload's file into `spool` (fsynced, renamed into place whole); the
        validated clip's facts, or an AudioError (then nothing is left at `spool`)."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            thread = asyncio.get_running_loop().run_in_executor(
                None, self._decode, upload.path, spool, limits)
        except BaseException:
            self._slots.release()
            raise
        self.running += 1
        thread.add_done_callback(self._release)
        # shield: a cancelled request stops waiting, but its slot is held until the thread ends
        spooled = await asyncio.shield(thread)
        if spooled.duration_s < self._audio.min_seconds:
            with contextlib.suppress(OSError):
                os.unlink(spool)
            raise AudioTooShort(
                f"the audio is too short: {spooled.duration_s * 1000:.1f} ms; the minimum is "
                f"{self._audio.min_seconds * 1000:g} ms (audio.min_seconds)")
        return spooled

    def _release(self, thread: asyncio.Future[Spooled]) -> None:
        self.running -= 1
        self._slots.release()
        if not thread.cancelled():
            thread.exception()  # retrieved: a cancelled request's failure is not "never retrieved"

    def _decode(self, src: Path, spool: Path, limits: Limits) -> Spooled:
        try:
            return decode_to(src, spool, limits, durable=True)
        except AudioError as e:
            _drop_frames(e)  # a refusal's frames hold the decode's blocks
            raise
        finally:
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

"""Decode, validate and resample input audio to mono float32 16 kHz (the model's input).

No torch here: the HTTP front end calls `decode_to` at submit time (the upload's file -> the
job's spool file, block by block), so a bad upload is refused with a typed `AudioError` before
any job exists; `decode` is the same pipeline into memory (the engine CLI, tests).  The pipeline
reproduces the reference exactly: soundfile reads float64 -> mean over channels -> soxr "HQ" to
16 kHz -> float32.  Content libsndfile refuses (WebM, MP4/M4A, a video's sound track) is read by
FFmpeg through PyAV (ondemand/decoders.py, imported only then) as float64 at the source rate and
goes through the same mixing and streaming soxr.

Invariants:
- Everything a decode will cost is checked from the header before a single sample is read: the
  length against `max_seconds` (a 40-byte header claiming hours must not allocate hours), the
  sample rate against `MAX_SOURCE_RATE`, and the source samples (rate x channels x duration, as
  float64) against `max_decode_mb` (`Limits`: the caller scales both for segmented jobs).
  The cost follows the *source*: a 283 KB FLAC declaring 655,350 Hz for 119 s passed a
  duration-only check and took 1.2 GB to decode (issue 10).
- Samples stream: source blocks of about `BLOCK_BYTES` whatever the channel count, mixed to
  mono per block, fed to one `soxr.ResampleStream`, written to a sink (the spool file for
  `decode_to`, whose peak memory is one block whatever the recording's length).  The result
  is bit for bit the reference's whole-file `soxr.resample` (soxr's output does not depend on
  how its input is chunked; tests/test_audio.py and tests/test_hostile_input.py hold this).
- Every block is checked before it is mixed: NaN/inf -> `non_finite`; a magnitude above
  `MAX_ABS_SAMPLE` -> `out_of_range` (3e38 floats are finite, but overflow to NaN scores).
- No raw soundfile/libsndfile error or server path ever reaches a message.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import soundfile as sf
import soxr

from ondemand.errors import (
    AudioBadSampleRate,
    AudioEmpty,
    AudioError,
    AudioNonFinite,
    AudioOutOfRange,
    AudioTooLong,
    AudioTooManySamples,
    AudioTooShort,
    AudioUndecodable,
)
from ondemand.spool import NpyWriter

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one model frame: 25 ms at 16 kHz
# Source samples read per block, as float64 bytes: frames per block = BLOCK_BYTES / (8 x channels),
# so a 1024-channel WAV reads 64 frames at a time instead of 512 MB.
BLOCK_BYTES = 1 << 19
# Highest source rate accepted: 384 kHz is the top of what audio interfaces record (FLAC can
# declare up to 655,350 Hz; nothing records it).
MAX_SOURCE_RATE = 384_000
# Largest |sample| accepted.  Integer PCM reads within [-1, 1]; float formats may exceed it a
# little (clipping); beyond this the file is broken or hostile.
MAX_ABS_SAMPLE = 1e3
# Default for `audio.max_decode_mb`: source samples x 8 bytes.  512 MB admits 120 s of 192 kHz
# stereo, 384 kHz mono or 48 kHz 8-channel audio.
MAX_DECODE_MB = 512.0
# A read that ends more than this fraction before the header's frame count is a truncated file.
# (libsndfile already clamps WAV data sizes to the file; FLAC errors itself; this catches MP3
# and friends, with slack for encoders whose length fields are slightly off.)
TRUNCATION_SLACK = 0.01
RIFF_SCAN_BYTES = 1 << 16  # chunks before `data` (fmt, LIST, ...) fit in this
ACCEPTED = ("WAV, FLAC, Ogg (Vorbis/Opus), MP3 and the other formats libsndfile reads; WebM, "
            "Matroska and MP4/M4A/MOV (a video's sound track too) with Opus, AAC or MP3 audio")


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # float32, mono, 16 kHz, finite, |x| <= MAX_ABS_SAMPLE, >= MIN_SAMPLES
    source_rate: int
    channels: int
    duration_s: float  # of the 16 kHz signal


@dataclass(frozen=True)
class Spooled:
    """What `decode_to` wrote: the same as Decoded, the samples being in the file."""

    samples: int  # at 16 kHz
    source_rate: int
    channels: int
    duration_s: float
    container: str  # "libsndfile" or what FFmpeg found ("WebM/Matroska", ...)


@dataclass(frozen=True)
class Limits:
    """What one decode may cost: its duration (`max_seconds`) and its source samples as float64
    MB (`max_decode_mb`); `long_hint` ends the too_long message (what to do instead)."""

    max_seconds: float
    max_decode_mb: float = MAX_DECODE_MB
    long_hint: str = "Split it into shorter clips."


class _Sink(Protocol):
    def write(self, block: np.ndarray) -> None: ...


class _Memory:
    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.size = 0

    def write(self, block: np.ndarray) -> None:
        self.blocks.append(block)
        self.size += block.size


def decode(
    data: bytes | os.PathLike[str] | str,
    *,
    max_seconds: float,
    max_decode_mb: float = MAX_DECODE_MB,
) -> Decoded:
    """Decode `data` (the file's bytes, or a path to it) or raise `AudioError(code=...)`.

    A path that cannot be opened raises the plain `OSError`: that is the server's fault, not the
    client's."""
    limits = Limits(max_seconds, max_decode_mb)
    sink = _Memory()
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise _empty()
        info = _decode_file(io.BytesIO(data), limits, sink)
    else:
        with open(data, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise _empty()
            info = _decode_file(fh, limits, sink)
    samples = np.concatenate(sink.blocks) if sink.blocks else np.zeros(0, np.float32)
    return Decoded(samples, info.source_rate, info.channels, info.duration_s)


def decode_to(src: os.PathLike[str] | str, dst: Path, limits: Limits, *,
              durable: bool = True) -> Spooled:
    """Decode the file at `src` block by block into the spool file `dst` (a float32 `.npy`,
    fsynced and renamed into place when whole), never holding the recording in memory.  The
    same checks and refusals as `decode`; nothing is left at `dst` after a refusal."""
    with open(src, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise _empty()
        with NpyWriter(dst, durable=durable) as sink:
            return _decode_file(fh, limits, sink)


def decode_bytes(channels: int, frames: int) -> int:
    """What decoding the source would take whole, as float64: the `max_decode_mb` measure."""
    return frames * channels * 8


def _decode_file(fh: BinaryIO, limits: Limits, sink: _Sink) -> Spooled:
    """libsndfile first (the reference's reader, bit for bit); FFmpeg (ondemand/decoders.py)
    only for content libsndfile refuses."""
    _check_wav_data_size(fh)
    try:
        f = sf.SoundFile(fh)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as e:
        refusal = e.error_string if isinstance(e, sf.LibsndfileError) else type(e).__name__
        return _decode_av(fh, limits, sink, refusal)
    with f:
        rate, channels, announced = int(f.samplerate), int(f.channels), int(f.frames)
        _check_header(rate, channels, announced, limits)
        written, frames = _stream(_sf_blocks(f, channels), rate, channels, limits, sink)
    if announced - frames > TRUNCATION_SLACK * announced:
        raise AudioUndecodable(
            f"the audio data ends early ({frames} of the {announced} frames its header "
            f"announces): the file is truncated or corrupt. Send the complete file ({ACCEPTED}).",
        )
    return _finish(written, frames, rate, channels, "libsndfile")


def _decode_av(fh: BinaryIO, limits: Limits, sink: _Sink, refusal: str) -> Spooled:
    from ondemand import decoders

    try:
        src = decoders.open_source(fh)
    except decoders.Unrecognised as e:
        raise _undecodable(f"libsndfile: {refusal}; FFmpeg: {e}") from e
    try:
        announced = src.frames
        _check_header(src.rate, src.channels, announced or 0, limits)
        written, frames = _stream(src.blocks(_block_frames(src.channels)), src.rate,
                                  src.channels, limits, sink)
    finally:
        src.close()
    # Codec delay and priming make a compressed stream's count differ slightly from its claim.
    if announced and announced - frames > TRUNCATION_SLACK * announced + 0.1 * src.rate:
        raise AudioUndecodable(
            f"the {src.container} file's {src.codec} audio ends early ({frames / src.rate:.2f} s "
            f"of the {announced / src.rate:.2f} s it announces): the file is truncated or "
            "corrupt. Send the complete file.",
        )
    return _finish(written, frames, src.rate, src.channels, f"{src.container} {src.codec}")


def _finish(written: int, frames: int, rate: int, channels: int, container: str) -> Spooled:
    if frames == 0:
        raise _empty()
    if written < MIN_SAMPLES:
        raise AudioTooShort(
            f"the audio is too short: {written / SAMPLE_RATE * 1000:.1f} ms "
            f"({written} samples at 16 kHz); the minimum is "
            f"{MIN_SAMPLES * 1000 // SAMPLE_RATE} ms ({MIN_SAMPLES} samples at 16 kHz).",
        )
    log.debug("audio decoded via=%s rate=%d channels=%d samples=%d", container, rate, channels,
              written)
    return Spooled(written, rate, channels, written / SAMPLE_RATE, container)


def _check_wav_data_size(fh: BinaryIO) -> None:
    """Refuse a RIFF/WAVE file whose `data` chunk announces more bytes than the file holds.

    libsndfile silently clamps such a chunk to the file and decodes what is there; for an
    upload that means a truncated transfer or a lying header, which we refuse rather than
    classify half a clip.  Streamed WAVs (size 0 or 0xFFFFFFFF) are accepted."""
    head = fh.read(RIFF_SCAN_BYTES)
    total = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(head):
        chunk, size = head[offset : offset + 4], struct.unpack_from("<I", head, offset + 4)[0]
        if chunk == b"data":
            present = total - (offset + 8)
            if size not in (0, 0xFFFFFFFF) and size > present:
                if present <= 0:
                    raise _empty()
                raise AudioUndecodable(
                    f"the WAV header announces {size} bytes of audio data but the file holds "
                    f"only {present}: the upload is truncated or the header is wrong. Send the "
                    "complete file.",
                )
            return
        offset += 8 + size + (size & 1)


def _check_header(rate: int, channels: int, frames: int, limits: Limits) -> None:
    if rate <= 0:
        raise _undecodable(f"invalid sample rate {rate}")
    if channels <= 0:
        raise _undecodable(f"invalid channel count {channels}")
    seconds = frames / rate
    if seconds > limits.max_seconds:
        raise AudioTooLong(
            f"the audio is too long: {seconds:.1f} s; the maximum is {limits.max_seconds:g} s. "
            f"{limits.long_hint}",
        )
    if rate > MAX_SOURCE_RATE:
        raise AudioBadSampleRate(
            f"the audio's sample rate is {rate} Hz; the highest accepted is {MAX_SOURCE_RATE} Hz. "
            "Resample it (the model listens at 16 kHz, so 16000 Hz loses nothing).",
        )
    cost = decode_bytes(channels, frames)
    if cost > limits.max_decode_mb * 2**20:
        raise _too_many_samples(rate, channels, seconds, cost, limits)


def _too_many_samples(rate: int, channels: int, seconds: float, cost: int,
                      limits: Limits) -> AudioError:
    return AudioTooManySamples(
        f"the audio holds too many samples to decode: {rate} Hz x {channels} channel(s) x "
        f"{seconds:.1f} s = {cost / 2**20:.0f} MB as float64; the limit is "
        f"{limits.max_decode_mb:g} MB (audio.max_decode_mb). Send fewer channels, a lower "
        "sample rate (16 kHz mono is what the model uses) or a shorter clip.",
    )


def _block_frames(channels: int) -> int:
    return max(1, BLOCK_BYTES // (8 * channels))


def _sf_blocks(f: sf.SoundFile, channels: int) -> Iterator[np.ndarray]:
    block_frames = _block_frames(channels)
    try:
        while True:
            block = f.read(block_frames, dtype="float64", always_2d=True)
            if len(block) == 0:
                return
            yield block
    except sf.LibsndfileError as e:
        raise _undecodable(f"{e.error_string}; the file is truncated or corrupt") from e
    except (RuntimeError, ValueError, EOFError) as e:
        raise _undecodable(f"{type(e).__name__}; the file is truncated or corrupt") from e


def _stream(blocks: Iterator[np.ndarray], rate: int, channels: int, limits: Limits,
            sink: _Sink) -> tuple[int, int]:
    """Mix each source block to mono, resample it and hand it to `sink`.  Returns (16 kHz
    samples written, source frames read).

    The limits hold even when the header under-announces the length (a streamed file, a WebM
    that says nothing): past them the clip is refused, whatever the header said."""
    limit = int(limits.max_seconds * rate) + 1
    budget = int(limits.max_decode_mb * 2**20) // (8 * channels)
    resampler = (
        None if rate == SAMPLE_RATE
        else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float64", quality="HQ")
    )
    frames = written = 0
    for block in itertools.chain(blocks, [None]):
        last = block is None
        if block is None:
            mono = np.zeros(0, np.float64)
        else:
            frames += len(block)
            if frames > limit:
                raise AudioTooLong(
                    f"the audio is longer than its header says, and too long: more than "
                    f"{limits.max_seconds:g} s. {limits.long_hint}",
                )
            if frames > budget:
                raise _too_many_samples(rate, channels, frames / rate,
                                        decode_bytes(channels, frames), limits)
            _check_values(block)
            # The per-block channel mean equals the whole-file mean row for row.
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
        if resampler is not None:
            mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
        if mono.size:
            sink.write(mono.astype(np.float32))
            written += mono.size
        if last:
            break
    return written, frames


def _check_values(block: np.ndarray) -> None:
    peak = float(np.abs(block).max())  # NaN propagates through max; inf stays inf
    if not np.isfinite(peak):
        raise AudioNonFinite(
            "the audio contains NaN or infinite sample values; send finite samples "
            "(float audio is expected in [-1, 1]).",
        )
    if peak > MAX_ABS_SAMPLE:
        raise AudioOutOfRange(
            f"the audio contains sample values as large as {peak:.3g}; float audio is expected "
            f"in [-1, 1] (at most {MAX_ABS_SAMPLE:g} is accepted). Normalise the clip.",
        )


def _empty() -> AudioError:
    return AudioEmpty(
        f"the audio is empty (no samples); send a non-empty {ACCEPTED} file."
    )


def _undecodable(reason: str) -> AudioError:
    reason = " ".join(str(reason).split())[:200]
    return AudioUndecodable(
        f"could not decode the audio ({reason}); accepted: {ACCEPTED}."
    )


"""Decode, validate and resample input audio to mono float32 16 kHz (the model's input).

No torch here: the HTTP front end calls `decode` at submit time, so a bad upload is refused with
a typed `AudioError` before any job exists.  The pipeline reproduces the reference exactly:
soundfile reads float64 -> mean over channels -> soxr "HQ" to 16 kHz -> float32.

Invariants:
- Everything a decode will cost is checked from the header before a single sample is read: the
  length against `max_seconds` (a 40-byte header claiming hours must not allocate hours), the
  sample rate against `MAX_SOURCE_RATE`, and the source samples (rate x channels x duration, as
  float64) against `max_decode_mb`.  The cost follows the *source*: a 283 KB FLAC declaring
  655,350 Hz for 119 s passed a duration-only check and took 1.2 GB to decode (issue 10).
- Samples stream: soundfile blocks of about `BLOCK_BYTES` whatever the channel count, mixed to
  mono per block, fed to one `soxr.ResampleStream`.  Peak memory is the 16 kHz float32 output
  (twice, while it is joined) plus one block, not the decoded source.  The result is bit for bit
  the reference's whole-file `soxr.resample` (soxr's output does not depend on how its input is
  chunked; tests/test_audio.py and tests/test_hostile_input.py hold this).
- Every block is checked before it is mixed: NaN/inf -> `non_finite`; a magnitude above
  `MAX_ABS_SAMPLE` -> `out_of_range` (3e38 floats are finite, but overflow to NaN scores).
- No raw soundfile/libsndfile error or server path ever reaches a message.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

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
ACCEPTED = "WAV, FLAC, OGG (Vorbis/Opus), MP3 and the other formats libsndfile reads"


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # float32, mono, 16 kHz, finite, |x| <= MAX_ABS_SAMPLE, >= MIN_SAMPLES
    source_rate: int
    channels: int
    duration_s: float  # of the 16 kHz signal


def decode(
    data: bytes | os.PathLike[str] | str,
    *,
    max_seconds: float,
    max_decode_mb: float = MAX_DECODE_MB,
) -> Decoded:
    """Decode `data` (the file's bytes, or a path to it) or raise `AudioError(code=...)`.

    A path that cannot be opened raises the plain `OSError`: that is the server's fault, not the
    client's."""
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise _empty()
        return _decode_file(io.BytesIO(data), max_seconds, max_decode_mb)
    with open(data, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise _empty()
        return _decode_file(fh, max_seconds, max_decode_mb)


def decode_bytes(channels: int, frames: int) -> int:
    """What decoding the source would take whole, as float64: the `max_decode_mb` measure."""
    return frames * channels * 8


def _decode_file(fh: BinaryIO, max_seconds: float, max_decode_mb: float) -> Decoded:
    _check_wav_data_size(fh)
    with _open(fh) as f:
        rate, channels, announced = int(f.samplerate), int(f.channels), int(f.frames)
        _check_header(rate, channels, announced, max_seconds, max_decode_mb)
        samples, frames = _stream(f, rate, channels, limit=int(max_seconds * rate) + 1)
    if announced - frames > TRUNCATION_SLACK * announced:
        raise AudioUndecodable(
            f"the audio data ends early ({frames} of the {announced} frames its header "
            f"announces): the file is truncated or corrupt. Send the complete file ({ACCEPTED}).",
        )
    if frames == 0:
        raise _empty()
    if samples.size < MIN_SAMPLES:
        raise AudioTooShort(
            f"the audio is too short: {samples.size / SAMPLE_RATE * 1000:.1f} ms "
            f"({samples.size} samples at 16 kHz); the minimum is "
            f"{MIN_SAMPLES * 1000 // SAMPLE_RATE} ms ({MIN_SAMPLES} samples at 16 kHz).",
        )
    log.debug("audio decoded rate=%d channels=%d samples=%d", rate, channels, samples.size)
    return Decoded(samples, rate, channels, samples.size / SAMPLE_RATE)


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


def _open(fh: BinaryIO) -> sf.SoundFile:
    try:
        return sf.SoundFile(fh)
    except sf.LibsndfileError as e:
        raise _undecodable(e.error_string) from e
    except (RuntimeError, ValueError, TypeError, EOFError) as e:
        raise _undecodable(type(e).__name__) from e


def _check_header(
    rate: int, channels: int, frames: int, max_seconds: float, max_decode_mb: float
) -> None:
    if rate <= 0:
        raise _undecodable(f"invalid sample rate {rate}")
    if channels <= 0:
        raise _undecodable(f"invalid channel count {channels}")
    seconds = frames / rate
    if seconds > max_seconds:
        raise AudioTooLong(
            f"the audio is too long: {seconds:.1f} s; the maximum is {max_seconds:g} s. "
            "Split it into shorter clips.",
        )
    if rate > MAX_SOURCE_RATE:
        raise AudioBadSampleRate(
            f"the audio's sample rate is {rate} Hz; the highest accepted is {MAX_SOURCE_RATE} Hz. "
            "Resample it (the model listens at 16 kHz, so 16000 Hz loses nothing).",
        )
    cost = decode_bytes(channels, frames)
    if cost > max_decode_mb * 2**20:
        raise AudioTooManySamples(
            f"the audio holds too many samples to decode: {rate} Hz x {channels} channel(s) x "
            f"{seconds:.1f} s = {cost / 2**20:.0f} MB as float64; the limit is "
            f"{max_decode_mb:g} MB (audio.max_decode_mb). Send fewer channels, a lower sample "
            "rate (16 kHz mono is what the model uses) or a shorter clip.",
        )


def _stream(f: sf.SoundFile, rate: int, channels: int, *, limit: int) -> tuple[np.ndarray, int]:
    """(mono float32 16 kHz samples, source frames read), block by block.

    `limit` bounds the frames read when the header under-announces them (a streamed file):
    past it the clip is too long, whatever the header said."""
    block_frames = max(1, BLOCK_BYTES // (8 * channels))
    resampler = (
        None if rate == SAMPLE_RATE
        else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float64", quality="HQ")
    )
    out: list[np.ndarray] = []
    frames = 0
    try:
        while True:
            block = f.read(block_frames, dtype="float64", always_2d=True)
            last = len(block) == 0
            if not last:
                frames += len(block)
                if frames > limit:
                    raise AudioTooLong(
                        f"the audio is longer than its header says, and too long: more than "
                        f"{limit / rate:.1f} s. Split it into shorter clips.",
                    )
                _check_values(block)
            # The per-block channel mean equals the whole-file mean row for row.
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            if resampler is not None:
                mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
            if mono.size:
                out.append(mono.astype(np.float32))
            if last:
                break
    except sf.LibsndfileError as e:
        raise _undecodable(f"{e.error_string}; the file is truncated or corrupt") from e
    except (RuntimeError, ValueError, EOFError) as e:
        raise _undecodable(f"{type(e).__name__}; the file is truncated or corrupt") from e
    samples = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return samples, frames


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


"""Decode, validate and resample input audio to mono float32 16 kHz (the model's input).

No torch here: the HTTP front end calls `decode` at submit time, so a bad upload is refused with
a typed `AudioError` before any job exists.  The pipeline reproduces the reference exactly:
soundfile reads float64 -> mean over channels -> soxr "HQ" to 16 kHz -> float32.

Invariants: the header's length is checked against `max_seconds` before a single sample is read
(a 40-byte header claiming hours must not allocate hours), samples are read in blocks and mixed
to mono block by block (memory ~ one mono float64 copy), and no raw soundfile/libsndfile error
or server path ever reaches a message.
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
    AudioEmpty,
    AudioError,
    AudioNonFinite,
    AudioTooLong,
    AudioTooShort,
    AudioUndecodable,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one model frame: 25 ms at 16 kHz
BLOCK_FRAMES = 1 << 16
# A read that ends more than this fraction before the header's frame count is a truncated file.
# (libsndfile already clamps WAV data sizes to the file; FLAC errors itself; this catches MP3
# and friends, with slack for encoders whose length fields are slightly off.)
TRUNCATION_SLACK = 0.01
RIFF_SCAN_BYTES = 1 << 16  # chunks before `data` (fmt, LIST, ...) fit in this
ACCEPTED = "WAV, FLAC, OGG (Vorbis/Opus), MP3 and the other formats libsndfile reads"


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # float32, mono, 16 kHz, finite, >= MIN_SAMPLES
    source_rate: int
    channels: int
    duration_s: float  # of the 16 kHz signal


def decode(data: bytes | os.PathLike[str] | str, *, max_seconds: float) -> Decoded:
    """Decode `data` (the file's bytes, or a path to it) or raise `AudioError(code=...)`.

    A path that cannot be opened raises the plain `OSError`: that is the server's fault, not the
    client's."""
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise _empty()
        return _decode_file(io.BytesIO(data), max_seconds)
    with open(data, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise _empty()
        return _decode_file(fh, max_seconds)


def _decode_file(fh: BinaryIO, max_seconds: float) -> Decoded:
    _check_wav_data_size(fh)
    with _open(fh) as f:
        rate, channels, announced = int(f.samplerate), int(f.channels), int(f.frames)
        _check_length(announced, rate, max_seconds)
        mono = _read_mono(f)
    if announced - mono.size > TRUNCATION_SLACK * announced:
        raise AudioUndecodable(
            f"the audio data ends early ({mono.size} of the {announced} frames its header "
            f"announces): the file is truncated or corrupt. Send the complete file ({ACCEPTED}).",
        )
    if mono.size == 0:
        raise _empty()
    if not np.isfinite(mono).all():
        raise AudioNonFinite(
            "the audio contains NaN or infinite sample values; send finite samples "
            "(float audio is expected in [-1, 1]).",
        )
    samples = _resample(mono, rate)
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


def _check_length(frames: int, rate: int, max_seconds: float) -> None:
    if rate <= 0:
        raise _undecodable(f"invalid sample rate {rate}")
    seconds = frames / rate
    if seconds > max_seconds:
        raise AudioTooLong(
            f"the audio is too long: {seconds:.1f} s; the maximum is {max_seconds:g} s. "
            "Split it into shorter clips.",
        )


def _read_mono(f: sf.SoundFile) -> np.ndarray:
    """All samples as float64 mono; the per-block channel mean equals the whole-file mean."""
    chunks: list[np.ndarray] = []
    try:
        while True:
            block = f.read(BLOCK_FRAMES, dtype="float64", always_2d=True)
            if len(block) == 0:
                break
            chunks.append(block.mean(axis=1) if block.shape[1] > 1 else block[:, 0])
    except sf.LibsndfileError as e:
        raise _undecodable(f"{e.error_string}; the file is truncated or corrupt") from e
    except (RuntimeError, ValueError, EOFError) as e:
        raise _undecodable(f"{type(e).__name__}; the file is truncated or corrupt") from e
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)


def _resample(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return mono.astype(np.float32)
    try:
        out = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    except (ValueError, RuntimeError) as e:
        raise _undecodable(f"cannot resample from {rate} Hz to 16 kHz") from e
    return np.asarray(out, dtype=np.float32)


def _empty() -> AudioError:
    return AudioEmpty(
        f"the audio is empty (no samples); send a non-empty {ACCEPTED} file."
    )


def _undecodable(reason: str) -> AudioError:
    reason = " ".join(str(reason).split())[:200]
    return AudioUndecodable(
        f"could not decode the audio ({reason}); accepted: {ACCEPTED}."
    )


# --- spooled audio: the validated 16 kHz float32 samples the daemon hands to the worker --------

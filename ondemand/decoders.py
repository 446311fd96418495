"""Containers libsndfile does not read -- WebM, Matroska, MP4/M4A/MOV, ADTS AAC -- through PyAV,
whose wheel bundles FFmpeg's libraries (no system ffmpeg; licence notes: docs/recordings.md).

`audio.py` tries libsndfile first (the path that matches the reference bit for bit) and comes
here only when libsndfile refuses the content.  This module imports `av` inside `open_source`,
never at import time: the front end pays the ~17 MB of FFmpeg libraries only once someone
uploads such a file (docs/recordings.md, "Memory").

What it gives `audio.py` is the same as libsndfile gives: float64 blocks (frames x channels) at
the source rate, which `audio._stream` mixes to mono and resamples with the same streaming soxr.

Invariants:
- Only containers in `CONTAINERS` and audio codecs in `CODECS` are decoded (a smaller FFmpeg
  surface for hostile uploads); anything else FFmpeg recognises is `unsupported_format`, and
  a file with no audio stream (a video without sound, a subtitle file) is `no_audio_stream`;
  both messages name what was found.
- Only the chosen audio stream's packets are decoded: a video's pictures are demuxed past,
  never decoded.
- No FFmpeg message or server path reaches a client: refusals name the container and codec.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from ondemand.errors import (
    AudioNoStream,
    AudioUndecodable,
    AudioUnsupportedFormat,
)

log = logging.getLogger(__name__)

# FFmpeg demuxer names we accept (as `container.format.name` reports them).
CONTAINERS = {
    "matroska,webm": "WebM/Matroska",
    "mov,mp4,m4a,3gp,3g2,mj2": "MP4/M4A/MOV",
    "ogg": "Ogg",
    "mp3": "MP3",
    "aac": "AAC (ADTS)",
}
# Formats libsndfile reads: when libsndfile refused such a file, its refusal is the answer
# (a WAV with a bad format tag is a broken WAV, not an unsupported container).
LIBSNDFILE_FORMATS = {"wav", "w64", "aiff", "flac", "au", "caf", "voc", "rf64", "sds",
                      "ircam", "nistsphere", "wv", "mpc", "mpc8"}
# Audio codecs we decode, by FFmpeg decoder name (several decoders share a codec).
CODECS = {
    "opus": "Opus", "libopus": "Opus",
    "aac": "AAC", "aac_fixed": "AAC",
    "mp3": "MP3", "mp3float": "MP3",
    "vorbis": "Vorbis", "libvorbis": "Vorbis",
    "flac": "FLAC", "alac": "ALAC",
}
ACCEPTED = ("WebM, Matroska, Ogg and MP4/M4A/MOV (a video's sound track included) with Opus, "
            "AAC, MP3, Vorbis, FLAC, ALAC or PCM audio")


def codec_accepted(name: str) -> bool:
    return name in CODECS or name.startswith("pcm_")


class Unrecognised(Exception):
    """FFmpeg cannot open the file either (or leaves it to libsndfile); `audio.py` answers
    `undecodable` with both readers' reasons."""


@dataclass
class AvSource:
    """One audio stream of an open container, read as float64 blocks at the source rate."""

    rate: int
    channels: int
    frames: int | None  # announced by the container (None: not said, e.g. a MediaRecorder WebM)
    container: str  # what was found, for messages: "WebM/Matroska"
    codec: str
    _container: Any
    _stream: Any

    def blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        """(n, channels) float64 blocks of about `block_frames` frames, in order.  A codec frame
        is ~20 ms: they are joined into blocks so the resampler runs on large chunks."""
        av = _av()
        pending: list[np.ndarray] = []
        held = 0
        try:
            for frame in self._container.decode(self._stream):
                if frame.sample_rate != self.rate or frame.layout.nb_channels != self.channels:
                    raise AudioUndecodable(
                        f"the {self.codec} audio changes its sample rate or channel count "
                        f"mid-stream ({self.rate} Hz x {self.channels} -> {frame.sample_rate} "
                        f"Hz x {frame.layout.nb_channels}); send a file with one format")
                block = _as_float64(frame.to_ndarray(), frame.format.is_planar, self.channels)
                pending.append(block)
                held += len(block)
                if held >= block_frames:
                    yield np.concatenate(pending)
                    pending, held = [], 0
        except av.error.FFmpegError as e:
            raise AudioUndecodable(
                f"the {self.container} file's {self.codec} audio is corrupt or cut short "
                f"({_ffmpeg_reason(e)}); send the complete file") from e
        if pending:
            yield np.concatenate(pending)

    def close(self) -> None:
        self._container.close()


def _as_float64(array: np.ndarray, planar: bool, channels: int) -> np.ndarray:
    """A decoded frame as (frames, channels) float64 in [-1, 1] (integer PCM scaled the way
    libsndfile scales it: by 2^(bits - 1))."""
    x = array.T if planar else array.reshape(-1, channels)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        scale = float(-int(info.min)) if info.min < 0 else float(info.max // 2 + 1)
        offset = 0.0 if info.min < 0 else scale  # unsigned 8-bit: 128 is silence
        return (x.astype(np.float64) - offset) / scale
    return x.astype(np.float64)


def open_source(fh: BinaryIO) -> AvSource:
    """Open `fh` with FFmpeg and pick its audio stream, or raise an AudioError naming what the
    file holds (no audio stream, a container or codec we do not accept, not media at all)."""
    av = _av()
    fh.seek(0)
    try:
        container = av.open(fh, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise Unrecognised(_ffmpeg_reason(e)) from e
    try:
        return _pick(container)
    except BaseException:
        container.close()
        raise


def _pick(container: Any) -> AvSource:
    fmt = container.format.name
    if fmt in LIBSNDFILE_FORMATS:
        raise Unrecognised(f"a {fmt} file that libsndfile refused")
    kind = CONTAINERS.get(fmt)
    if kind is None:
        raise AudioUnsupportedFormat(
            f"the file is a {_format_name(container)} container, which is not accepted; "
            f"accepted: {ACCEPTED}")
    audio = [s for s in container.streams if s.type == "audio"]
    if not audio:
        raise AudioNoStream(
            f"the {kind} file has no audio stream (it holds {_describe(container)}); send a "
            "recording with sound")
    stream = audio[0]
    ctx = stream.codec_context
    codec = _codec_name(stream)
    if ctx is None or not codec_accepted(codec):
        raise AudioUnsupportedFormat(
            f"the {kind} file's audio codec is {codec} ({_codec_long_name(ctx)}), which is not "
            f"accepted; accepted: {ACCEPTED}")
    rate = int(ctx.sample_rate or 0)
    channels = int(ctx.channels or 0)
    if rate <= 0 or channels <= 0:
        raise AudioUndecodable(f"the {kind} file's {CODECS.get(codec, codec)} audio stream "
                               f"declares {rate} Hz and {channels} channel(s)")
    return AvSource(rate=rate, channels=channels, frames=_announced(container, stream, rate),
                    container=kind, codec=CODECS.get(codec, codec), _container=container,
                    _stream=stream)


def _announced(container: Any, stream: Any, rate: int) -> int | None:
    """The frame count the file claims: the stream's duration, else the container's."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return int(stream.duration * stream.time_base * rate)
    if container.duration is not None and container.duration > 0:
        return int(container.duration * rate / 1_000_000)  # AV_TIME_BASE: microseconds
    return None


def _codec_name(stream: Any) -> str:
    ctx = stream.codec_context
    return str(ctx.name) if ctx is not None else "unknown (no decoder)"


def _describe(container: Any) -> str:
    kinds = [f"{s.type} ({_codec_name(s)})" for s in container.streams]
    return ", ".join(kinds) if kinds else "no streams at all"


def _format_name(container: Any) -> str:
    long_name = str(getattr(container.format, "long_name", "") or "")
    name = str(container.format.name)
    return f"{long_name} ({name})" if long_name else name


def _codec_long_name(ctx: Any) -> str:
    if ctx is None:
        return "no decoder"
    try:
        return str(ctx.codec.long_name)
    except Exception:  # a codec FFmpeg describes but cannot decode
        return "no decoder"


def _ffmpeg_reason(e: BaseException) -> str:
    # FFmpegError's str() may carry the file name PyAV was given: keep only FFmpeg's words.
    strerror = getattr(e, "strerror", None)
    reason = str(strerror) if strerror else type(e).__name__
    return " ".join(reason.split())[:120]


_AV: Any = None


def _av() -> Any:
    """`av`, imported on first use (tests/test_formats.py holds the front end to that)."""
    global _AV
    if _AV is None:
        import av
        import av.logging

        av.logging.set_level(None)  # FFmpeg's own stderr chatter off; our messages say it
        _AV = av
    return _AV


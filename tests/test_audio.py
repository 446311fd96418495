"""ondemand.audio: parity with the reference pipeline and every refusal, with real bytes."""

from __future__ import annotations

import io
import struct
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondemand.audio import MIN_SAMPLES, SAMPLE_RATE, decode
from ondemand.errors import AudioError
from ondemand.spool import read_npy, write_npy
from tests import golden

MAX_S = 60.0


def encode(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(n: int, rate: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / rate
    cols = [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)]
    return np.stack(cols, axis=1) if channels > 1 else cols[0]


def code_of(data: bytes | Path, max_seconds: float = MAX_S) -> str:
    with pytest.raises(AudioError) as info:
        decode(data, max_seconds=max_seconds)
    return info.value.code


def reference(data: bytes) -> np.ndarray:
    """The reference pipeline, in one piece: soundfile float64 -> mean -> soxr HQ -> float32."""
    x, rate = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
    mono = x.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return mono.astype(np.float32)


# --- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", golden.clip_names())
def test_golden_clips_give_the_reference_frame_count(name: str) -> None:
    clip = golden.expected()["clips"][name]
    d = decode(golden.AUDIO / name, max_seconds=MAX_S)
    assert d.samples.dtype == np.float32 and d.samples.ndim == 1
    assert (d.source_rate, d.channels) == (clip["sr"], clip["channels"])
    assert (d.samples.size - 400) // 320 + 1 == clip["frames"]
    assert d.duration_s == d.samples.size / SAMPLE_RATE
    np.testing.assert_array_equal(d.samples, reference((golden.AUDIO / name).read_bytes()))


def test_stereo_44k_is_mixed_then_resampled() -> None:
    data = encode(tone(44100 * 2, 44100, channels=2), 44100, subtype="PCM_24")
    d = decode(data, max_seconds=MAX_S)
    assert (d.source_rate, d.channels) == (44100, 2)
    assert abs(d.samples.size - 2 * SAMPLE_RATE) <= 1
    np.testing.assert_array_equal(d.samples, reference(data))


def test_many_channels_long_file_matches_whole_file_mean() -> None:
    # more than one read block: the block-wise mix must equal the whole-file mean bit for bit
    data = encode(np.random.default_rng(1).uniform(-1, 1, (150_000, 6)), 22050, subtype="FLOAT")
    np.testing.assert_array_equal(decode(data, max_seconds=MAX_S).samples, reference(data))


def test_float_8k_is_upsampled() -> None:
    data = encode(tone(8000, 8000).astype(np.float32), 8000, subtype="FLOAT")
    d = decode(data, max_seconds=MAX_S)
    assert (d.source_rate, d.channels, d.samples.size) == (8000, 1, SAMPLE_RATE)
    np.testing.assert_array_equal(d.samples, reference(data))


def test_flac_and_ogg_decode() -> None:
    x = tone(SAMPLE_RATE)
    for fmt, subtype in (("FLAC", None), ("OGG", "VORBIS")):
        d = decode(encode(x, SAMPLE_RATE, fmt, subtype), max_seconds=MAX_S)
        assert d.samples.size == SAMPLE_RATE and np.abs(d.samples).max() > 0.2


def test_bytes_and_path_give_the_same_result(tmp_path: Path) -> None:
    data = encode(tone(30000, 44100, channels=2), 44100)
    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    by_bytes, by_path = decode(data, max_seconds=MAX_S), decode(path, max_seconds=MAX_S)
    by_str = decode(str(path), max_seconds=MAX_S)
    for d in (by_path, by_str):
        np.testing.assert_array_equal(d.samples, by_bytes.samples)
        assert (d.source_rate, d.channels, d.duration_s) == (
            by_bytes.source_rate,
            by_bytes.channels,
            by_bytes.duration_s,
        )


def test_min_samples_is_accepted() -> None:
    d = decode(encode(tone(MIN_SAMPLES), SAMPLE_RATE), max_seconds=MAX_S)
    assert d.samples.size == MIN_SAMPLES


# --- refusals -----------------------------------------------------------------------------------


def wav_16k(n: int = SAMPLE_RATE) -> bytes:
    data = encode(tone(n), SAMPLE_RATE, subtype="PCM_16")
    assert data[36:40] == b"data"  # canonical 44-byte header: offsets below rely on it
    return data


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_empty() -> None:
    assert code_of(b"") == "empty"
    assert code_of(wav_16k(0)) == "empty"
    assert code_of(wav_16k()[:44]) == "empty"  # header only, no data


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    assert code_of(tmp_path / "empty.wav") == "empty"


def test_too_short_says_the_minimum() -> None:
    for n in (1, MIN_SAMPLES - 1):
        with pytest.raises(AudioError) as info:
            decode(wav_16k(n), max_seconds=MAX_S)
        assert info.value.code == "too_short"
        assert "25 ms" in info.value.message
    # 8 kHz: 250 source samples become 500 at 16 kHz (fine), 150 become 300 (too short)
    assert decode(encode(tone(250, 8000), 8000), max_seconds=MAX_S).samples.size == 500
    assert code_of(encode(tone(150, 8000), 8000)) == "too_short"


def test_too_long() -> None:
    with pytest.raises(AudioError) as info:
        decode(wav_16k(3 * SAMPLE_RATE), max_seconds=2.0)
    assert info.value.code == "too_long" and "3.0 s" in info.value.message


def flac_claiming(total_samples: int) -> bytes:
    data = bytearray(encode(tone(3 * SAMPLE_RATE), SAMPLE_RATE, "FLAC"))
    info = data.index(b"fLaC") + 8  # STREAMINFO body; total samples: 36 bits at bytes 13..17
    data[info + 13] = (data[info + 13] & 0xF0) | (total_samples >> 32)
    struct.pack_into(">I", data, info + 14, total_samples & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(flac_claiming(5 * 3600 * SAMPLE_RATE), id="flac-5h"),
        pytest.param(patched(wav_16k(), 24, "<I", 1), id="wav-1hz-4.4h"),  # 16000 frames at 1 Hz
    ],
)
def test_header_claiming_hours_is_refused_before_reading(data: bytes) -> None:
    tracemalloc.start()
    try:
        assert code_of(data, max_seconds=600) == "too_long"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # reading 5 h of float64 would take 2.3 GB


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite(value: float) -> None:
    x = tone(SAMPLE_RATE).astype(np.float32)
    x[1234] = value
    assert code_of(encode(x, SAMPLE_RATE, subtype="FLOAT")) == "non_finite"
    stereo = np.stack([tone(SAMPLE_RATE), x], axis=1).astype(np.float32)
    assert code_of(encode(stereo, 44100, subtype="FLOAT")) == "non_finite"


UNDECODABLE = {
    "random": np.random.default_rng(0).bytes(4000),
    "text": b"this is not audio, just a text file\n" * 20,
    "wav-truncated-in-header": wav_16k()[:30],
    "wav-zero-channels": patched(wav_16k(), 22, "<H", 0),
    "wav-zero-rate": patched(wav_16k(), 24, "<I", 0),
    "wav-bad-format-tag": patched(wav_16k(), 20, "<H", 0x99),
    "flac-truncated": encode(tone(3 * SAMPLE_RATE), SAMPLE_RATE, "FLAC")[:5000],
    "flac-header-longer-than-data": flac_claiming(10 * SAMPLE_RATE),
    "ogg-truncated-in-header": encode(tone(SAMPLE_RATE), SAMPLE_RATE, "OGG", "VORBIS")[:100],
}


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable(name: str) -> None:
    with pytest.raises(AudioError) as info:
        decode(UNDECODABLE[name], max_seconds=MAX_S)
    assert info.value.code == "undecodable"
    assert "WAV, FLAC" in info.value.message  # says what is accepted
    assert "<_io" not in info.value.message


def test_truncated_mp3_is_undecodable() -> None:
    try:
        data = encode(tone(3 * SAMPLE_RATE), SAMPLE_RATE, "MP3")
    except (sf.LibsndfileError, TypeError, ValueError):
        pytest.skip("this libsndfile cannot write MP3")
    assert decode(data, max_seconds=MAX_S).samples.size == 3 * SAMPLE_RATE
    assert code_of(data[: len(data) // 2]) == "undecodable"


def test_wav_header_lying_about_data_length_is_refused() -> None:
    # libsndfile would clamp the data chunk to the file and decode half a clip; we refuse it.
    lying = patched(wav_16k(), 40, "<I", 10 * 2 * SAMPLE_RATE)
    assert code_of(lying) == "undecodable"
    assert code_of(wav_16k()[: 44 + 2 * 1000 + 1]) == "undecodable"  # cut inside the data
    # streamed WAVs carry 0xFFFFFFFF there: accepted, exactly the samples present
    d = decode(patched(wav_16k(), 40, "<I", 0xFFFFFFFF), max_seconds=MAX_S)
    np.testing.assert_array_equal(d.samples, decode(wav_16k(), max_seconds=MAX_S).samples)


def test_messages_never_name_server_paths(tmp_path: Path) -> None:
    for i, data in enumerate([b"", *UNDECODABLE.values(), wav_16k(10)]):
        path = tmp_path / f"upload-{i}.bin"
        path.write_bytes(data)
        with pytest.raises(AudioError) as info:
            decode(path, max_seconds=MAX_S)
        assert str(tmp_path) not in info.value.message and "upload-" not in info.value.message


# --- property: hostile bytes only ever raise AudioError -----------------------------------------

WAV_HEADER = wav_16k()[:44]
FLAC_BYTES = encode(tone(2000), SAMPLE_RATE, "FLAC")


def mutate(base: bytes) -> st.SearchStrategy[bytes]:
    edit = st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255))
    return st.tuples(st.lists(edit, max_size=8), st.integers(0, len(base))).map(
        lambda e: bytes(_apply(base, e[0]))[: e[1]]
    )


def _apply(base: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(base)
    for pos, value in edits:
        out[pos] = value
    return out


hostile = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=2048).map(lambda tail: WAV_HEADER + tail),
    mutate(WAV_HEADER + wav_16k(600)[44:]),
    mutate(FLAC_BYTES),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile)
def test_hostile_bytes_only_raise_audio_error(data: bytes) -> None:
    try:
        d = decode(data, max_seconds=30.0)
    except AudioError as e:
        assert e.code in {"empty", "too_short", "too_long", "non_finite", "undecodable",
                          "out_of_range", "bad_sample_rate", "too_many_samples"}
        return
    assert d.samples.dtype == np.float32 and d.samples.size >= MIN_SAMPLES
    assert np.isfinite(d.samples).all()


# --- spooled .npy -------------------------------------------------------------------------------


def test_npy_round_trip_at_the_exact_path(tmp_path: Path) -> None:
    x = decode(wav_16k(), max_seconds=MAX_S).samples
    path = tmp_path / "job-1.spool"  # no .npy suffix: must not become job-1.spool.npy
    write_npy(path, x, durable=True)
    assert path.is_file() and not (tmp_path / "job-1.spool.npy").exists()
    assert not list(tmp_path.glob("*.tmp"))
    np.testing.assert_array_equal(read_npy(path), x)


def test_write_npy_failure_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    with pytest.raises(ValueError):  # object arrays need pickles, which we never write
        write_npy(path, np.array([{"a": 1}], dtype=object), durable=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(lambda fh: np.save(fh, np.zeros(10, np.float64)), id="float64"),
        pytest.param(lambda fh: np.save(fh, np.zeros((2, 5), np.float32)), id="2d"),
        pytest.param(lambda fh: np.save(fh, np.array([{"a": 1}]), allow_pickle=True), id="pickle"),
        pytest.param(lambda fh: fh.write(b"\x93NUMPY garbage"), id="garbage"),
        pytest.param(lambda fh: np.savez(fh, x=np.zeros(3, np.float32)), id="npz"),
        pytest.param(lambda fh: None, id="empty-file"),
    ],
)
def test_read_npy_refuses_anything_but_1d_float32(
    tmp_path: Path, writer: Callable[[BinaryIO], object]
) -> None:
    path = tmp_path / "spool.npy"
    with path.open("wb") as fh:
        writer(fh)
    with pytest.raises(AudioError) as info:
        read_npy(path)
    assert info.value.code == "undecodable"


def test_audio_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, ondemand.audio; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

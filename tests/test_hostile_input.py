"""Hostile-but-valid input (issue 10), against ondemand.audio and the real front end on real
sockets: audio whose decode costs more than its size says, absurd sample values, NaN in a JSON
answer, stalled bodies, parser-level refusals, odd multipart forms, the bearer scheme's case
and the token's strength.  Every hostile file is built here with soundfile/numpy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest
import soundfile as sf
import soxr

from ondemand import audio
from ondemand.audio import MAX_SOURCE_RATE, SAMPLE_RATE, decode
from ondemand.daemon import api
from ondemand.daemon import upload as upload_mod
from ondemand.daemon.app import check_bind
from ondemand.daemon.http import json_response
from ondemand.errors import AudioError, ConfigError, RequestTimeout
from tests.conftest import (
    Daemon,
    daemon_config,
    fake_env,
    run,
    run_virtual,
    serve_config,
    start_serve,
    wait_for,
    wav_bytes,
)

TOKEN = "s3cret-token-for-tests_0123456789"


# -- builders -----------------------------------------------------------------------------------
def encode(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def noise(frames: int, channels: int = 1, *, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels))
    return x[:, 0] if channels == 1 else x


def huge_floats(value: float = 3e38, seconds: float = 1.0) -> bytes:
    """A float WAV whose samples are all `value`: finite, valid, and NaN scores downstream."""
    return encode(np.full(int(seconds * SAMPLE_RATE), value, np.float32), SAMPLE_RATE,
                  subtype="FLOAT")


def silent_flac(rate: int, seconds: float) -> bytes:
    """Silence compresses to almost nothing: a few hundred KB may declare minutes at any rate."""
    buf = io.BytesIO()
    frames = int(rate * seconds)
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(min(frames, 1 << 20), np.int16)
        for start in range(0, frames, block.size):
            f.write(block[: frames - start])
    return buf.getvalue()


def reference(data: bytes) -> np.ndarray:
    """The reference pipeline, whole-file: soundfile float64 -> mean -> soxr HQ -> float32."""
    x, rate = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
    mono = x.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return mono.astype(np.float32)


def code_of(data: bytes, **kw: Any) -> str:
    with pytest.raises(AudioError) as info:
        decode(data, max_seconds=kw.pop("max_seconds", 120.0), **kw)
    return info.value.code


def peak_alloc(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (numpy's buffers included) while `fn` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity, as any strict client does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# -- raw HTTP over a real socket -----------------------------------------------------------------
class RawResponse:
    def __init__(self, raw: bytes, closed: bool, elapsed: float) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines and lines[0] else 0
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        self.body = body
        self.closed = closed  # the server closed the connection after answering
        self.elapsed = elapsed

    def error(self) -> dict[str, str]:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc = strict_json(self.body.decode())
        assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, doc
        err: dict[str, str] = doc["error"]
        return err


async def raw_http(url: str, data: bytes, *, timeout: float = 15.0) -> RawResponse:
    """Send `data` as is, then read until the server closes (or `timeout`)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    start = time.monotonic()
    try:
        writer.write(data)
        await writer.drain()
        got = bytearray()
        closed = False
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                got += chunk
        return RawResponse(bytes(got), closed, time.monotonic() - start)
    finally:
        writer.close()


def request(method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# == audio: cost, rate, magnitude ================================================================
@pytest.mark.parametrize("value", [3e38, -3e38, 1e4, 1001.0])
def test_float_samples_of_absurd_magnitude_are_out_of_range(value: float) -> None:
    assert code_of(huge_floats(value)) == "out_of_range"
    stereo = np.stack([noise(SAMPLE_RATE), np.full(SAMPLE_RATE, value)], axis=1)
    assert code_of(encode(stereo.astype(np.float32), 44100, subtype="FLOAT")) == "out_of_range"


def test_loud_but_sane_float_audio_is_accepted() -> None:
    for peak in (1.0, 1.5, 999.0):  # clipped float audio exists; 1e3 is the line
        x = (peak * np.sin(np.linspace(0, 200, SAMPLE_RATE))).astype(np.float32)
        d = decode(encode(x, SAMPLE_RATE, subtype="FLOAT"), max_seconds=60)
        assert np.isfinite(d.samples).all()


def test_out_of_range_message_says_what_is_expected() -> None:
    with pytest.raises(AudioError) as info:
        decode(huge_floats(), max_seconds=60)
    assert "3e+38" in info.value.message and "[-1, 1]" in info.value.message


def test_rate_above_384k_is_refused_before_reading() -> None:
    data = silent_flac(655_350, 10.0)  # FLAC's highest rate; 52 MB as float64
    assert len(data) < 1 << 20
    with pytest.raises(AudioError) as info:
        peak = peak_alloc(lambda: decode(data, max_seconds=120))
    assert info.value.code == "bad_sample_rate"
    assert "655350 Hz" in info.value.message and "384000" in info.value.message
    peak = peak_alloc(lambda: code_of(data))
    assert peak < 2 << 20


def test_384k_is_accepted_and_bit_identical() -> None:
    data = encode(noise(MAX_SOURCE_RATE // 2), MAX_SOURCE_RATE, subtype="PCM_24")
    d = decode(data, max_seconds=60)
    assert d.source_rate == MAX_SOURCE_RATE and d.samples.size == SAMPLE_RATE // 2
    np.testing.assert_array_equal(d.samples, reference(data))


def test_source_samples_over_the_budget_are_refused_before_reading() -> None:
    data = encode(noise(3 * 48000, 8).astype(np.float32), 48000, subtype="FLOAT")  # 9.2 MB f64
    with pytest.raises(AudioError) as info:
        decode(data, max_seconds=60, max_decode_mb=5)
    assert info.value.code == "too_many_samples"
    assert "48000 Hz x 8 channel(s)" in info.value.message and "audio.max_decode_mb" in (
        info.value.message)
    assert peak_alloc(lambda: code_of(data, max_decode_mb=5)) < 1 << 20
    assert decode(data, max_seconds=60, max_decode_mb=10).channels == 8


# == audio: blockwise decode + streaming resample = the whole-file reference, bit for bit ========
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000, 192000, 384000])
@pytest.mark.parametrize("channels", [1, 2, 5])
def test_streaming_decode_is_bit_identical_to_whole_file(rate: int, channels: int) -> None:
    frames = 3 * (audio.BLOCK_BYTES // (8 * channels)) + 12345  # several blocks and a tail
    data = encode(noise(frames, channels, seed=rate + channels), rate, subtype="PCM_24")
    np.testing.assert_array_equal(decode(data, max_seconds=600).samples, reference(data))


def test_tiny_blocks_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(30011, 3), 44100, subtype="FLOAT")
    want = reference(data)
    for block_bytes in (24, 8 * 3 * 7, 1000):  # 1 frame, 7 frames, a ragged size
        monkeypatch.setattr(audio, "BLOCK_BYTES", block_bytes)
        np.testing.assert_array_equal(decode(data, max_seconds=60).samples, want)


@pytest.mark.parametrize(("rate", "channels", "seconds"), [
    (MAX_SOURCE_RATE, 1, 20.0),  # 7.7 M frames: 61 MB as one float64 array
    (48000, 32, 5.0),  # 32 channels: a 65536-frame block alone would be 16 MB
])
def test_decode_memory_follows_the_output_not_the_source(
    rate: int, channels: int, seconds: float
) -> None:
    frames = int(rate * seconds)
    data = encode(np.zeros((frames, channels), np.int16), rate, subtype="PCM_16")
    whole = frames * channels * 8
    output = int(seconds * SAMPLE_RATE) * 4
    peak = peak_alloc(lambda: decode(data, max_seconds=60))
    assert peak < 2 * output + 4 * audio.BLOCK_BYTES + (1 << 20), (peak, whole)
    assert peak < whole / 8


# == the daemon: refusals, concurrency, JSON =====================================================
def test_daemon_refuses_hostile_audio_and_queues_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, audio={"max_seconds": 10.0, "max_decode_mb": 2.0})
        async with Daemon(cfg) as d:
            stereo_9s = encode(noise(9 * SAMPLE_RATE, 2), SAMPLE_RATE, subtype="PCM_16")
            cases = [
                (huge_floats(), "out_of_range"),
                (silent_flac(655_350, 1.0), "bad_sample_rate"),
                (stereo_9s, "too_many_samples"),  # 2.2 MB of float64 > 2
            ]
            for data, code in cases:
                async with d.http.post("/v1/jobs", data=data,
                                       headers={"Content-Type": "audio/flac"}) as r:
                    body = strict_json(await r.text())
                    assert r.status == 400 and body["error"]["code"] == code, body
            assert d.sup.spawns == 0 and (await d.status())["queue"]["queued"] == 0
            # the limits leave a clip of max_seconds at 16 kHz mono alone
            await d.submit(encode(noise(10 * SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16"))

    run(main())


class GatedDecode:
    """Wraps ondemand.daemon.upload.decode_to: counts decodes running at once, holds each at a
    gate until the test opens it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.active = self.most = self.entered = 0
        self.real = upload_mod.decode_to

    def __call__(self, *data: Any, **kw: Any) -> Any:
        with self.lock:
            self.active += 1
            self.entered += 1
            self.most = max(self.most, self.active)
        try:
            assert self.gate.wait(30)
            return self.real(*data, **kw)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedDecode]:
    g = GatedDecode()
    monkeypatch.setattr(upload_mod, "decode_to", g)
    yield g
    g.gate.set()


def test_decodes_run_at_most_max_concurrent_decodes_at_once(
    tmp_path: Path, gated: GatedDecode
) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, server={"max_concurrent_decodes": 2})
        async with Daemon(cfg) as d:
            decoder = d.app[api.INTAKE].decoder
            posts = [asyncio.create_task(d.submit(wav_bytes(0.5))) for _ in range(6)]
            # two decode, four have read their upload and wait for a slot
            await wait_for(lambda: gated.entered == 2 and decoder.waiting == 4,
                           what="2 decoding, 4 waiting")
            assert gated.active == 2
            gated.gate.set()
            await asyncio.gather(*posts)
            assert gated.most == 2 and gated.entered == 6
            assert decoder.running == 0 and decoder.waiting == 0

    run(main())


def test_upload_bodies_held_at_once_stay_within_max_buffered_uploads_mb(
    tmp_path: Path, gated: GatedDecode
) -> None:
    clip = wav_bytes(1.0)  # 64 KB
    budget_mb = 2.5 * len(clip) / 2**20  # room for two such bodies, not three

    async def main() -> None:
        cfg = daemon_config(tmp_path, server={
            "max_concurrent_decodes": 8, "max_upload_mb": budget_mb / 2,
            "max_buffered_uploads_mb": budget_mb})
        async with Daemon(cfg) as d:
            intake = d.app[api.INTAKE]
            posts = [asyncio.create_task(d.submit(clip)) for _ in range(5)]
            # two are read and decoding; three wait for room, their bodies unread
            await wait_for(lambda: gated.entered == 2 and intake.budget.waiting == 3,
                           what="2 bodies held, 3 waiting")
            assert intake.budget.used == 2 * len(clip) and intake.decoder.waiting == 0
            gated.gate.set()
            await asyncio.gather(*posts)
            assert gated.entered == 5 and intake.budget.used == 0

    run(main())


def test_a_cancelled_wait_for_room_gives_its_place_up() -> None:
    async def main() -> None:
        budget = upload_mod.UploadBudget(100)
        done = asyncio.Event()
        held: list[int] = []

        async def hold(size: int) -> None:
            async with budget.reserve(size):
                held.append(size)
                await done.wait()

        first = asyncio.create_task(hold(60))
        await wait_for(lambda: held == [60], what="60 held")
        big = asyncio.create_task(hold(80))
        small = asyncio.create_task(hold(30))
        await wait_for(lambda: budget.waiting == 2, what="both waiting")
        assert held == [60]  # first come first served: 30 would fit, but waits behind 80
        big.cancel()  # first in line leaves: the small one behind it fits now
        await wait_for(lambda: held == [60, 30], what="30 held")
        assert budget.used == 90 and budget.waiting == 0
        done.set()
        await asyncio.gather(first, small)
        assert budget.used == 0

    run(main())


def test_a_cancelled_upload_keeps_its_slot_until_its_decode_ends(
    tmp_path: Path, gated: GatedDecode
) -> None:
    body = tmp_path / "body.wav"
    body.write_bytes(wav_bytes(0.5))
    limits = audio.Limits(120.0)

    async def main() -> None:
        decoder = upload_mod.Decoder(daemon_config(tmp_path).audio, slots=1)
        first = asyncio.create_task(decoder.decode(upload_mod.Upload(body, "", {}),
                                                   tmp_path / "1.npy", limits))
        await wait_for(lambda: gated.entered == 1, what="first decode running")
        first.cancel()
        second = asyncio.create_task(decoder.decode(upload_mod.Upload(body, "", {}),
                                                    tmp_path / "2.npy", limits))
        await wait_for(lambda: first.done() and decoder.waiting == 1, what="second waiting")
        # the first request is gone, but its thread still decodes: the second may not start
        assert decoder.running == 1 and gated.entered == 1
        gated.gate.set()
        assert (await second).samples == SAMPLE_RATE // 2
        assert gated.most == 1 and decoder.running == 0

    run(main())


def test_a_non_finite_value_never_reaches_a_client_as_invalid_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError):
        json_response({"score": float("nan")})

    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            async def counts() -> dict[str, float]:
                return {"queued": float("nan"), "running": 0, "done": float("inf"),
                        "failed": 0, "cancelled": 0}

            d.app[api.STORE].counts = counts  # type: ignore[method-assign,assignment]
            with caplog.at_level(logging.ERROR):
                async with d.http.get("/v1/status") as r:
                    text = await r.text()
            assert r.status == 500, text
            assert strict_json(text)["error"]["code"] == "internal"
            assert "NaN" not in text and "Infinity" not in text
            assert any("/v1/status failed" in rec.getMessage() for rec in caplog.records)

    run(main())


# == HTTP edges ==================================================================================
def test_a_stalled_body_gets_408_and_the_connection_is_closed(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, server={"read_timeout_s": 1.0})
        async with Daemon(cfg) as d:
            raw = request("POST", "/v1/jobs", {"Content-Type": "audio/wav",
                                               "Content-Length": str(4 << 20)}, b"\0" * 5000)
            r = await raw_http(d.url, raw)
            assert r.status == 408 and r.error()["code"] == "request_timeout", r.body
            assert "server.read_timeout_s" in r.error()["message"]
            assert r.closed and 0.9 <= r.elapsed < 10, r.elapsed
            # multipart: stalled inside the audio part
            head = (b'--XX\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"'
                    b"\r\n\r\n" + b"\0" * 5000)
            raw = request("POST", "/v1/jobs", {
                "Content-Type": "multipart/form-data; boundary=XX",
                "Content-Length": str(4 << 20)}, head)
            r = await raw_http(d.url, raw)
            assert r.status == 408 and r.error()["code"] == "request_timeout" and r.closed
            st = await d.status()
            assert st["queue"]["queued"] == 0 and d.sup.spawns == 0

    run(main())


class PacedBody:
    """A raw audio request whose body arrives in pieces `gap_s` apart (run on virtual time)."""

    content_type = "audio/wav"

    def __init__(self, data: bytes, gap_s: float, piece: int = 4096) -> None:
        self.content_length = len(data)
        self.content = self
        self._pieces = [data[i:i + piece] for i in range(0, len(data), piece)] + [b""]
        self._gap_s = gap_s

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(self._gap_s)
        return self._pieces.pop(0)


def test_the_stall_limit_is_between_chunks_not_for_the_whole_body(tmp_path: Path) -> None:
    server = daemon_config(tmp_path, server={"read_timeout_s": 1.0}).server
    data = wav_bytes(1.0)  # 16 pieces

    async def read(gap_s: float) -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        got = await upload_mod.read_upload(PacedBody(data, gap_s), server,  # type: ignore[arg-type]
                                           tmp_path)
        return got.path.read_bytes(), loop.time() - start

    audio_, took = run_virtual(read(0.9))  # slow but moving: 16 s in all, never 1 s silent
    assert audio_ == data and took > 10
    with pytest.raises(RequestTimeout):
        run_virtual(read(1.1))


def test_form_fields_are_refused_with_400(tmp_path: Path) -> None:
    wav = wav_bytes(0.5)

    def form(*fields: tuple[str, Any]) -> aiohttp.FormData:
        f = aiohttp.FormData()
        for name, value in fields:
            if isinstance(value, bytes):
                f.add_field(name, value, filename="a.wav", content_type="audio/wav")
            else:
                f.add_field(name, value)
        return f

    cases: list[tuple[str, aiohttp.FormData, str]] = [
        ("big option field", form(("key", "k" * 10_000), ("audio", wav)), "'key'"),
        ("big field after audio", form(("audio", wav), ("notes", "n" * 10_000)), "'notes'"),
        ("two audio fields", form(("audio", wav), ("audio", wav)), "more than one `audio`"),
        ("repeated option", form(("audio", wav), ("granularity", "frame"),
                                 ("granularity", "utterance")), "more than one 'granularity'"),
        ("many fields", form(("audio", wav), *[(f"f{i}", "1") for i in range(17)]),
         "more than 16"),
    ]

    async def main() -> None:
        cfg = daemon_config(tmp_path, server={"max_upload_mb": 0.2})
        async with Daemon(cfg) as d:
            for what, data, says in cases:
                async with d.http.post("/v1/jobs", data=data) as r:
                    body = strict_json(await r.text())
                    assert r.status == 400, (what, r.status, body)
                    assert body["error"]["code"] == "bad_request", (what, body)
                    assert says in body["error"]["message"], (what, body)
            # an unnamed part
            raw = (b"--XX\r\nContent-Disposition: form-data\r\n\r\nhello\r\n--XX--\r\n")
            async with d.http.post("/v1/jobs", data=raw, headers={
                    "Content-Type": "multipart/form-data; boundary=XX"}) as r:
                assert r.status == 400
                assert "named field" in (await r.json())["error"]["message"]
            # the audio field itself over the limit stays 413
            async with d.http.post("/v1/jobs", data=form(("audio", b"\0" * 300_000))) as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
            assert (await d.status())["queue"]["queued"] == 0

    run(main())


@pytest.mark.parametrize(("what", "raw", "code"), [
    ("100 KB job id", request("GET", "/v1/jobs/" + "A" * 100_000), "request_too_large"),
    ("10 KB header", request("GET", "/v1/status", {"X-Big": "b" * 10_000}),
     "request_too_large"),
    ("10 KB header name", request("GET", "/v1/status", {"X-" + "b" * 10_000: "1"}),
     "request_too_large"),
    ("200 headers", request("GET", "/v1/status", {f"X-{i}": "1" for i in range(200)}),
     "request_too_large"),
    ("bad method", b"G@T /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    ("bad content-length", request("POST", "/v1/jobs", {"Content-Length": "abc"}),
     "bad_request"),
])
def test_parser_refusals_answer_our_json(tmp_path: Path, what: str, raw: bytes,
                                         code: str) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            r = await raw_http(d.url, raw)
            assert r.status == 400, (what, r.status, r.body[:200])
            err = r.error()
            assert err["code"] == code, (what, err)
            assert r.closed  # after a parse error the stream is out of step
            assert "aaaa" not in err["message"] and len(err["message"]) < 400
            # the daemon is fine afterwards
            async with d.http.get("/healthz") as h:
                assert h.status == 200

    run(main())


def test_a_long_job_id_below_the_parser_limit_is_our_404(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            for method in ("GET", "DELETE"):
                r = await raw_http(d.url, request(method, "/v1/jobs/" + "A" * 5000,
                                                  {"Connection": "close"}))
                assert r.status == 404 and r.error()["code"] == "not_found"

    run(main())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ondemand serve` as an operator runs it, with a 1 s read timeout."""
    tmp = tmp_path_factory.mktemp("serve")
    proc, url = start_serve(serve_config(tmp, server={"read_timeout_s": 1.0}), fake_env())
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_answers_parser_refusals_in_json(served: str) -> None:
    async def main() -> None:
        r = await raw_http(served, request("GET", "/v1/jobs/" + "A" * 100_000))
        assert r.status == 400 and r.error()["code"] == "request_too_large" and r.closed
        r = await raw_http(served, request("GET", "/v1/jobs/" + "A" * 5000,
                                           {"Connection": "close"}))
        assert r.status == 404 and r.error()["code"] == "not_found"

    run(main())


@pytest.mark.parametrize("sent", [b"", b"GET /v1/status HTTP/1.1\r\nHost: te"])
def test_serve_closes_an_idle_or_half_sent_connection_after_read_timeout(
    served: str, sent: bytes
) -> None:
    async def main() -> None:
        r = await raw_http(served, sent, timeout=15)
        assert r.closed and r.status == 0 and 0.9 <= r.elapsed < 10, (r.elapsed, r.body)

    run(main())


# == the bearer token ============================================================================
def test_bearer_scheme_is_case_insensitive(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, server={"token": TOKEN})) as d:
            for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
                async with d.http.get("/v1/status",
                                      headers={"Authorization": f"{scheme} {TOKEN}"}) as r:
                    assert r.status == 200, scheme
            for bad in (f"bearer  {TOKEN}", f"bearer{TOKEN}", f"bearer {TOKEN.upper()}",
                        f"Basic {TOKEN}"):
                async with d.http.get("/v1/status", headers={"Authorization": bad}) as r:
                    assert r.status == 401, bad
            # bytes that are not UTF-8: refused, not a 500
            raw = (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Authorization: Bearer \xff\xfe\x80\r\n\r\n")
            resp = await raw_http(d.url, raw)
            assert resp.status == 401 and resp.error()["code"] == "unauthorized"

    run(main())


WEAK = [
    ("x", "1 characters long"),
    (" ", "whitespace"),
    (" " * 20, "whitespace"),
    ("short-token-123", "15 characters long"),
    (f" {TOKEN}", "whitespace"),
    (f"{TOKEN}\n", "whitespace"),
    ("tab\tinside-0123456789", "control"),
    ("é" * 20, "non-ASCII"),
]


@pytest.mark.parametrize(("token", "why"), WEAK)
def test_a_weak_token_is_refused_for_a_public_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str, why: str
) -> None:
    monkeypatch.delenv("ONDEMAND_TOKEN", raising=False)
    for host in ("0.0.0.0", "192.168.1.10"):
        with pytest.raises(ConfigError) as info:
            check_bind(daemon_config(tmp_path, server={"host": host, "token": token}))
        msg = str(info.value)
        assert msg.startswith("server.token:") and why in msg, msg
        assert "secrets.token_urlsafe(32)" in msg
        # allow_insecure_bind waives a missing token, never a weak one
        with pytest.raises(ConfigError):
            check_bind(daemon_config(tmp_path, server={
                "host": host, "token": token, "allow_insecure_bind": True}))
    # loopback needs no token, so a weak one is the operator's business
    check_bind(daemon_config(tmp_path, server={"host": "127.0.0.1", "token": token}))


def test_token_strength_names_its_source(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONDEMAND_TOKEN", "abc")
    with pytest.raises(ConfigError, match=r"^ONDEMAND_TOKEN: is 3 characters"):
        check_bind(daemon_config(tmp_path, server={"host": "0.0.0.0"}))
    monkeypatch.setenv("ONDEMAND_TOKEN", "a" * 16)
    check_bind(daemon_config(tmp_path, server={"host": "0.0.0.0"}))
    check_bind(daemon_config(tmp_path, server={"host": "::", "token": TOKEN}))


def test_no_token_message_says_how_to_make_one(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONDEMAND_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=re.escape("secrets.token_urlsafe(32)")):
        check_bind(daemon_config(tmp_path, server={"host": "0.0.0.0"}))


def _flac_rate_field(data: bytes) -> int:
    info = data.index(b"fLaC") + 8
    return int.from_bytes(data[info + 10:info + 13], "big") >> 4


def test_flac_builder_really_declares_655350_hz() -> None:
    data = silent_flac(655_350, 0.1)
    assert _flac_rate_field(data) == 655_350
    assert struct.unpack(">I", data[:4]) == struct.unpack(">I", b"fLaC")

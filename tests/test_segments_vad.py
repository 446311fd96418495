"""Timelines on real speech (issue 12): Silero VAD (the model inside the silero-vad wheel) on
espeak-ng speech with pauses of known length (tests/fixtures/media/dialogue.flac, made by
make_speech.py), the golden tiny model classifying each segment; the engine directly, the CLI
and the real worker behind the daemon."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ondemand import segments as seg
from ondemand.audio import decode
from ondemand.model.engine import Engine
from ondemand.model.vad import SileroVad
from ondemand.protocol import Segmenting
from ondemand.timeline import ArraySource
from tests import golden
from tests.conftest import Daemon, daemon_config, fake_env

MEDIA = Path(__file__).resolve().parent / "fixtures" / "media"
TRUTH = json.loads((MEDIA / "dialogue.json").read_text())
VAD = Segmenting(mode="vad")  # the [segments] defaults


def truth_segments(merge_pause_s: float = VAD.merge_pause_s) -> list[tuple[float, float]]:
    """The known speech spans, merged across pauses shorter than merge_pause_s."""
    out: list[list[float]] = []
    for a, b in TRUTH["speech"]:
        if out and a - out[-1][1] < merge_pause_s:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


@pytest.fixture(scope="module")
def dialogue() -> np.ndarray:
    return decode(MEDIA / "dialogue.flac", max_seconds=600).samples


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(golden.MODEL, device="cpu")


def spans_of(result: dict) -> list[tuple[float, float]]:
    return [(s["start_s"], s["end_s"]) for s in result["segments"]]


def test_vad_segments_match_the_known_speech(engine: Engine, dialogue: np.ndarray) -> None:
    result = engine.infer_recording(dialogue, VAD, key="dialogue")
    want = truth_segments()
    got = spans_of(result)
    assert len(want) == 4  # 5 sentences, two of them 0.2 s apart: merged
    assert len(got) == len(want), got
    for (a, b), (wa, wb) in zip(got, want, strict=True):
        assert abs(a - wa) <= 0.25 and abs(b - wb) <= 0.25, (got, want)
    assert got == sorted(got) and all(b0 <= a1 for (_, b0), (a1, _) in pairwise(got))
    assert result["duration_s"] == pytest.approx(TRUTH["seconds"], abs=1e-3)
    assert result["labels"] == engine.labels and len(result["labels"]) == 9


def test_each_segment_is_classified_as_that_clip_alone(engine: Engine,
                                                       dialogue: np.ndarray) -> None:
    result = engine.infer_recording(dialogue, VAD)
    for s in result["segments"]:
        a, b = round(s["start_s"] * 16000), round(s["end_s"] * 16000)
        (alone,) = engine.infer([engine_clip(dialogue[a:b])])
        np.testing.assert_allclose(s["scores"], alone.scores, atol=1e-5)
        assert s["top"]["label"] == alone.top["label"]  # type: ignore[index]


def engine_clip(x: np.ndarray) -> object:
    from ondemand.model.engine import Clip

    return Clip("seg", np.ascontiguousarray(x))


def test_the_summary_is_the_duration_weighted_arithmetic(engine: Engine,
                                                         dialogue: np.ndarray) -> None:
    result = engine.infer_recording(dialogue, VAD)
    segs = result["segments"]
    d = np.array([s["end_s"] - s["start_s"] for s in segs])
    scores = np.array([s["scores"] for s in segs])
    summary = result["summary"]
    np.testing.assert_allclose(summary["scores"], (d[:, None] * scores).sum(0) / d.sum(),
                               atol=1e-4)
    assert summary["top"]["label"] == result["labels"][int(np.argmax(summary["scores"]))]
    share = summary["label_share"]
    assert set(share) == set(result["labels"]) and sum(share.values()) == pytest.approx(1.0)
    for label in result["labels"]:
        mine = d[[s["top"]["label"] == label for s in segs]].sum()
        assert share[label] == pytest.approx(mine / d.sum(), abs=1e-4)
    assert summary["speech_s"] == pytest.approx(d.sum(), abs=1e-3)


def test_embeddings_hold_one_row_per_segment(engine: Engine, dialogue: np.ndarray,
                                             tmp_path: Path) -> None:
    path = tmp_path / "emb.npy"
    result = engine.infer_recording(dialogue, VAD, embedding_path=path)
    emb = np.load(path)
    assert emb.shape == (len(result["segments"]), engine.dim) and emb.dtype == np.float32
    s = result["segments"][1]
    a, b = round(s["start_s"] * 16000), round(s["end_s"] * 16000)
    (alone,) = engine.infer([engine_clip(dialogue[a:b])], embeddings=True)  # type: ignore[list-item]
    np.testing.assert_allclose(emb[1], alone.embedding, atol=1e-4)


def test_parallel_vad_streams_agree_with_one_stream(dialogue: np.ndarray) -> None:
    x = np.tile(dialogue, 4)  # 68 s: many streams per block
    vad = SileroVad()
    model = vad.model
    model.reset_states()
    ref = []
    with torch.inference_mode():
        for i in range(0, len(x), 512):
            chunk = torch.from_numpy(np.pad(x[i:i + 512], (0, max(0, i + 512 - len(x)))))
            ref.append(float(model(chunk.unsqueeze(0), 16000)))
    src = ArraySource(x)
    block = 40 * 16384  # ~41 s: the second block starts mid-recording
    got = np.concatenate([vad.probs(src, s, min(len(x), s + block))
                          for s in range(0, len(x), block)])
    ref_a = np.asarray(ref)
    assert got.shape == ref_a.shape
    assert np.mean(np.abs(got - ref_a)) < 0.01
    assert ((got >= 0.5) != (ref_a >= 0.5)).mean() < 0.01
    runs = []
    for probs in (ref_a, got):
        s = seg.VadSegmenter(VAD, len(x))
        runs.append(s.feed(probs) + s.finish())
    assert len(runs[0]) == len(runs[1]) == 16
    for (a0, b0), (a1, b1) in zip(*runs, strict=True):
        assert abs(a0 - a1) <= 0.1 * 16000 and abs(b0 - b1) <= 0.1 * 16000


def test_fixed_windows_through_the_engine(engine: Engine, dialogue: np.ndarray) -> None:
    spec = Segmenting(mode="fixed", window_s=4.0, hop_s=2.0)
    result = engine.infer_recording(dialogue, spec)
    starts = [s["start_s"] for s in result["segments"]]
    assert starts[:3] == [0.0, 2.0, 4.0] and result["segments"][-1]["end_s"] == pytest.approx(
        TRUTH["seconds"], abs=1e-3)
    assert result["summary"]["speech_s"] == pytest.approx(TRUTH["seconds"], abs=1e-3)


def test_infer_cli_with_segments(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ondemand", "infer", str(MEDIA / "dialogue.flac"),
         str(MEDIA / "video-only.mp4"), "--model", str(golden.MODEL), "--device", "cpu",
         "--segments", "vad", "--embeddings-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stderr  # the video without sound fails, alone
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines[0]["segments"]) == 4 and lines[0]["key"] == "dialogue"
    assert lines[1]["error"]["code"] == "no_audio_stream"
    assert np.load(tmp_path / "dialogue.npy").shape[0] == 4


def test_real_worker_vad_job_end_to_end(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(
            tmp_path, model={"path": str(golden.MODEL)},
            worker={"device": "cpu", "load_timeout_s": 60.0},
            audio={"max_seconds": 5.0})
        async with Daemon(cfg, worker_cmd=[sys.executable, "-m", "ondemand.worker"],
                          env=fake_env()) as d:
            data = (MEDIA / "dialogue.flac").read_bytes()
            async with d.http.post("/v1/jobs", data=data, params={"segments": "vad"},
                                   headers={"Content-Type": "audio/flac"}) as r:
                sub = await r.json()
                assert r.status == 202, sub
            job = await d.final(sub["id"], timeout=90)
            assert job["status"] == "done", job
            got = spans_of(job["result"])
            want = truth_segments()
            assert len(got) == len(want)
            for (a, b), (wa, wb) in zip(got, want, strict=True):
                assert abs(a - wa) <= 0.25 and abs(b - wb) <= 0.25

    asyncio.run(main())


def test_dialogue_fixture_is_what_make_speech_says() -> None:
    info = sf.info(MEDIA / "dialogue.flac")
    assert info.samplerate == 16000 and info.channels == 1
    assert info.frames / 16000 == pytest.approx(TRUTH["seconds"], abs=1e-3)
    assert TRUTH["pauses_s"] == [0.8, 1.5, 0.2, 3.0, 1.5]

"""Long recordings through the daemon (issue 12), with the fake worker (tests/fake_worker.py: an
energy "VAD" and deterministic scores): streamed uploads, the whole-clip limit that names the
`segments` option, segmented jobs' timelines, embeddings one row per segment, progress, a crash
mid-recording retried as any job, the limits as settings."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from ondemand.daemon import api
from ondemand.daemon.events import JobProgress
from tests.conftest import Daemon, daemon_config, fake_env, fake_log, run, wait_for

RATE = 16000


def bursts(pattern: list[tuple[float, bool]], *, rate: int = RATE) -> bytes:
    """A WAV of loud noise (True) and silence (False) stretches, in order."""
    rng = np.random.default_rng(3)
    parts = [0.3 * rng.standard_normal(int(s * rate)) if loud else np.zeros(int(s * rate))
             for s, loud in pattern]
    buf = io.BytesIO()
    sf.write(buf, np.concatenate(parts).astype(np.float32), rate, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def tone(seconds: float, rate: int = RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def cfg_for(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    sections.setdefault("audio", {}).update({"max_seconds": 10.0,
                                             "max_segmented_seconds": 600.0})
    return daemon_config(tmp_path, **sections)


def test_a_recording_over_the_whole_clip_limit_names_the_segments_option(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            body = await d.submit(tone(12.0), expect=400)
            assert body["error"]["code"] == "too_long"
            assert "segments=vad" in body["error"]["message"]
            assert "segments=fixed" in body["error"]["message"]
            # the same recording with segments is accepted, up to max_segmented_seconds
            await d.submit(tone(12.0), segments="fixed")
            big = await d.submit(tone(12.0), segments="vad", expect=202)
            assert big["status"] == "queued"
            assert not list((tmp_path / "incoming").iterdir())  # upload files are gone

    run(main())


@pytest.mark.parametrize(("params", "needle"), [
    ({"segments": "sliding"}, "segments must be one of none, vad, fixed"),
    ({"segments": "vad", "window_s": 2}, "apply to segments=fixed"),
    ({"segments": "fixed", "window_s": 0.1}, "window_s must be between 0.5"),
    ({"segments": "fixed", "window_s": 60}, "window_s must be between 0.5 and 15"),
    ({"segments": "fixed", "window_s": 3, "hop_s": 0.05}, "hop_s must be at least"),
    ({"segments": "fixed", "hop_s": "soon"}, "hop_s must be a number"),
    ({"segments": "vad", "granularity": "frame"}, "use granularity=utterance"),
    ({"window_s": 2}, "apply to segments=fixed only"),
])
def test_bad_segment_options_are_400(tmp_path: Path, params: dict[str, Any],
                                     needle: str) -> None:
    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            body = await d.submit(tone(1.0), expect=400, **params)
            assert body["error"]["code"] == "bad_request" and needle in body["error"]["message"]
            assert d.sup.spawns == 0

    run(main())


def test_vad_job_gives_an_ordered_timeline_and_a_summary(tmp_path: Path) -> None:
    # speech 1-3 s, 3.2-4 s (a 0.2 s pause: merged), 6-9 s; silence elsewhere; 12 s in all
    audio = bursts([(1, False), (2, True), (0.2, False), (0.8, True), (2, False), (3, True),
                    (3, False)])

    async def main() -> None:
        async with Daemon(cfg_for(tmp_path, segments={"pad_s": 0.0})) as d:
            sub = await d.submit(audio, segments="vad", embedding="true", key="call")
            job = await d.final(sub["id"])
            assert job["status"] == "done", job
            assert job["segments"] == "vad" and job["duration_s"] == pytest.approx(12.0)
            res = job["result"]
            spans = [(s["start_s"], s["end_s"]) for s in res["segments"]]
            assert len(spans) == 2
            for (a, b), (want_a, want_b) in zip(spans, [(1.0, 4.0), (6.0, 9.0)], strict=True):
                assert abs(a - want_a) <= 0.25 and abs(b - want_b) <= 0.25, spans
            assert spans == sorted(spans)
            labels = res["labels"]
            for s in res["segments"]:
                assert set(s) == {"start_s", "end_s", "top", "scores"}
                assert s["top"]["label"] == labels[int(np.argmax(s["scores"]))]
            summary = res["summary"]
            assert sum(summary["label_share"].values()) == pytest.approx(1.0)
            assert set(summary["label_share"]) == set(labels)
            durations = np.array([b - a for a, b in spans])
            mean = (durations[:, None] * np.array([s["scores"] for s in res["segments"]])).sum(0)
            np.testing.assert_allclose(summary["scores"], mean / durations.sum(), atol=1e-4)
            assert res["scores"] == summary["scores"] and res["top"] == summary["top"]
            async with d.http.get(f"/v1/jobs/{sub['id']}/embedding.npy") as r:
                emb = np.load(io.BytesIO(await r.read()))
            assert emb.shape == (2, 4) and emb.dtype == np.float32

    run(main())


def test_fixed_windows_cover_the_recording_every_hop(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            sub = await d.submit(tone(10.0), segments="fixed", window_s=3, hop_s=1)
            job = await d.final(sub["id"])
            assert job["status"] == "done" and job["window_s"] == 3 and job["hop_s"] == 1
            spans = [(s["start_s"], s["end_s"]) for s in job["result"]["segments"]]
            assert spans == [(float(k), float(k + 3)) for k in range(8)]
            assert job["result"]["summary"]["speech_s"] == pytest.approx(10.0)

    run(main())


def test_no_speech_is_an_empty_timeline(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            sub = await d.submit(bursts([(5, False)]), segments="vad")
            job = await d.final(sub["id"])
            res = job["result"]
            assert job["status"] == "done" and res["segments"] == []
            assert res["summary"] == {"scores": [], "top": None, "label_share": {},
                                      "speech_s": 0.0}

    run(main())


def test_progress_is_reported_while_a_segmented_job_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def main() -> None:
        env = fake_env(gate=str(gate))
        async with Daemon(cfg_for(tmp_path), env=env) as d:
            # 100 s of 3 s windows: pools of 30 s of audio, so several model calls
            sub = await d.submit(tone(100.0), segments="fixed", window_s=3, hop_s=3)
            await wait_for(lambda: d.sup.state.value == "ready", what="ready")
            gate.touch()
            job = await d.final(sub["id"])
            assert job["status"] == "done" and job["progress"] is None
            seen = [e for e in d.events if isinstance(e, JobProgress) and e.job == sub["id"]]
            assert len(seen) >= 2 and seen[-1].done_s == pytest.approx(100.0)
            assert [e.done_s for e in seen] == sorted(e.done_s for e in seen)
            assert all(e.total_s == pytest.approx(100.0) for e in seen)

    run(main())


def test_progress_shows_in_the_job_document(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            disp = d.app[api.DISPATCHER]
            sub = await d.submit(tone(20.0), segments="fixed", window_s=2, hop_s=2)
            assert sub["eta_s"] > 0
            job = await d.final(sub["id"])
            assert job["status"] == "done"
            # what a running job shows: the dispatcher's record of the worker's last report
            disp._running = [type("J", (), {"id": "x"})()]  # type: ignore[list-item]
            d.app[api.BUS].publish(JobProgress(job="x", done_s=5.0, total_s=20.0))
            got = disp.progress_of("x")
            assert got is not None and got["done_s"] == 5.0 and got["total_s"] == 20.0
            assert got["eta_s"] > 0
            disp._running = []

    run(main())


def test_a_worker_crash_mid_recording_retries_the_job(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"

    async def main() -> None:
        async with Daemon(cfg_for(tmp_path), env=fake_env(crash_once=str(marker))) as d:
            sub = await d.submit(tone(40.0), segments="fixed", window_s=3, hop_s=3)
            job = await d.final(sub["id"])
            assert marker.exists() and job["status"] == "done" and job["attempts"] == 2
            assert len(job["result"]["segments"]) == 14

    run(main())


def test_segmented_jobs_share_batches_and_model_calls(tmp_path: Path) -> None:
    log_path = tmp_path / "fake.log"
    gate = tmp_path / "gate"

    async def main() -> None:
        cfg = cfg_for(tmp_path, worker={"batch_audio_s": 6.0})
        async with Daemon(cfg, env=fake_env(log=str(log_path), gate=str(gate))) as d:
            a = await d.submit(tone(6.0), segments="fixed", window_s=3, hop_s=3, key="a")
            b = await d.submit(tone(6.0), segments="fixed", window_s=3, hop_s=3, key="b")
            c = await d.submit(tone(2.0), key="c")  # a whole clip: never batched with them
            gate.touch()
            for sub in (a, b, c):
                assert (await d.final(sub["id"]))["status"] == "done"
        calls = [e for e in fake_log(log_path) if e["op"] == "infer"]
        keys = [sorted(k.split("@")[0] for k in e["keys"]) for e in calls]
        assert ["a", "a", "b", "b"] in keys  # one model call over both recordings' windows
        assert ["c"] in keys

    run(main())


def test_a_streamed_upload_never_holds_the_body_in_memory(tmp_path: Path) -> None:
    """A body of many MB arrives in chunks and lands in storage.dir/incoming, then the spool;
    a chunked (no Content-Length) raw body works too."""
    audio = tone(60.0)

    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            async def chunks() -> Any:
                for i in range(0, len(audio), 100_000):
                    yield audio[i:i + 100_000]
                    await asyncio.sleep(0)

            async with d.http.post("/v1/jobs", data=chunks(), params={"segments": "vad"},
                                   headers={"Content-Type": "audio/wav"}) as r:
                body = await r.json()
                assert r.status == 202, body
            job = await d.final(body["id"])
            assert job["status"] == "done" and job["duration_s"] == pytest.approx(60.0)

    run(main())


def test_job_documents_say_how_they_were_segmented(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(cfg_for(tmp_path)) as d:
            plain = await d.final((await d.submit(tone(1.0)))["id"])
            assert plain["segments"] == "none" and "window_s" not in plain
            assert "segments" not in (plain["result"] or {})
            json.dumps(plain, allow_nan=False)

    run(main())


def test_cli_submit_with_segments(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import serve_config, start_serve

    proc, url = start_serve(serve_config(tmp_path), fake_env())
    try:
        f = tmp_path / "call.wav"
        f.write_bytes(tone(7.0))
        emb = tmp_path / "emb"
        out = subprocess.run(
            [sys.executable, "-m", "ondemand", "submit", str(f), "--segments", "fixed",
             "--window-s", "2", "--hop-s", "2", "--embeddings-dir", str(emb), "--url", url],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert [(s["start_s"], s["end_s"]) for s in doc["segments"]] == [
            (0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (5.0, 7.0)]
        assert np.load(emb / "call.npy").shape == (4, 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0

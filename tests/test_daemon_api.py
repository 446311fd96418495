"""HTTP API v1 contract against the real front end (real socket) and the fake worker."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
import numpy as np

from tests.conftest import Daemon, daemon_config, gated_worker, run, wait_for, wav_bytes


def test_submit_poll_result_and_timings(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            accepted = await d.submit(wav_bytes(1.0), key="clip1")
            assert set(accepted) == {"id", "status", "position", "worker", "eta_s"}
            assert accepted["status"] == "queued" and len(accepted["id"]) >= 20
            job = await d.final(accepted["id"])
            assert job["status"] == "done", job
            assert job["attempts"] == 1 and job["error"] is None
            res = job["result"]
            assert res["key"] == "clip1" and res["duration_s"] == 1.0
            assert res["top"]["label"] in res["labels"]
            assert abs(sum(res["scores"]) - 1) < 1e-6
            assert set(job["timings"]) == {"queue_s", "cold_start_s", "compute_s"}
            assert job["timings"]["cold_start_s"] > 0  # this job woke the worker
            # the spooled audio is gone once the job is done
            assert not list((tmp_path / "spool").iterdir())

    run(main())


def test_multipart_options_embedding_and_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            form = aiohttp.FormData()
            form.add_field("audio", wav_bytes(0.5), filename="hello.wav",
                           content_type="audio/wav")
            form.add_field("granularity", "frame")
            form.add_field("embedding", "true")
            async with d.http.post("/v1/jobs", data=form) as r:
                assert r.status == 202
                job_id = (await r.json())["id"]
            job = await d.final(job_id)
            assert job["result"]["key"] == "hello"
            async with d.http.get(f"/v1/jobs/{job_id}/embedding.npy") as r:
                assert r.status == 200
                emb = np.load(io.BytesIO(await r.read()))
                assert emb.shape == (4,)
            async with d.http.delete(f"/v1/jobs/{job_id}") as r:
                assert r.status == 200 and (await r.json())["deleted"] is True
            async with d.http.get(f"/v1/jobs/{job_id}") as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "not_found"

    run(main())


def test_bad_input_never_wakes_the_worker(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, server={"max_upload_mb": 0.05})
        async with Daemon(cfg) as d:
            cases = [
                (b"not audio at all", "audio/wav", 400, "undecodable"),
                (b"", "audio/wav", 400, "empty"),
                (wav_bytes(0.01), "audio/wav", 400, "too_short"),
                (wav_bytes(2.0), "audio/wav", 413, "too_large"),
                (wav_bytes(0.5), "text/plain", 415, "unsupported_media_type"),
            ]
            for body, ctype, status, code in cases:
                async with d.http.post("/v1/jobs", data=body,
                                       headers={"Content-Type": ctype}) as r:
                    err = (await r.json())["error"]
                    assert (r.status, err["code"]) == (status, code), err
                    assert "Traceback" not in err["message"] and str(tmp_path) not in err["message"]
            async with d.http.post("/v1/jobs", data=wav_bytes(0.5), params={"granularity": "x"},
                                   headers={"Content-Type": "audio/wav"}) as r:
                assert r.status == 400
            async with d.http.get("/v1/nope") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
            assert d.sup.spawns == 0
            assert d.sup.state.value == "cold"

    run(main())


def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, queue={"max_pending": 2})
        gate = tmp_path / "gate"
        async with Daemon(cfg, worker_cmd=gated_worker(gate)) as d:  # jobs wait for the gate
            accepted = [await d.submit(wav_bytes(0.5)) for _ in range(2)]
            async with d.http.post("/v1/jobs", data=wav_bytes(0.5),
                                   headers={"Content-Type": "audio/wav"}) as r:
                assert r.status == 503
                assert int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "queue_full"
            async with d.http.get("/readyz") as r:
                assert r.status == 503
            gate.touch()
            for a in accepted:
                await d.final(a["id"])
            async with d.http.get("/readyz") as r:
                assert r.status == 200

    run(main())


def test_recognize_status_and_manual_load_unload(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path)) as d:
            async with d.http.get("/healthz") as r:
                assert r.status == 200
            st = await d.status()
            assert st["worker"]["state"] == "cold" and st["worker"]["pid"] is None
            assert st["queue"] == {"queued": 0, "running": 0, "max_pending": 1000}
            async with d.http.post("/v1/recognize", data=wav_bytes(0.8),
                                   headers={"Content-Type": "audio/wav"}) as r:
                assert r.status == 200
                job = await r.json()
                assert job["status"] == "done" and job["result"]["duration_s"] == 0.8
            async with d.http.post("/v1/worker/load", json={"hold_s": 60}) as r:
                assert r.status == 200
                st = await r.json()
                assert st["state"] == "ready" and st["hold_s"] > 50
                assert st["hold_trigger"] == "manual"
            async with d.http.post("/v1/worker/load", json={"hold_s": -1}) as r:
                assert r.status == 400
            async with d.http.post("/v1/worker/unload", json={}) as r:
                assert r.status == 202
            await d.wait_state("unloaded")
            st = (await d.status())["worker"]
            assert st["pid"] is not None and st["hold_s"] is None

    run(main())


def test_auth_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with Daemon(daemon_config(tmp_path, server={"token": "s3cret"})) as d:
            async with d.http.get("/v1/status") as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "unauthorized"
            async with d.http.get("/v1/status",
                                  headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
            async with d.http.get("/healthz") as r:
                assert r.status == 200

    run(main())


def test_cancel_queued_job(tmp_path: Path) -> None:
    async def main() -> None:
        gate = tmp_path / "gate"
        async with Daemon(daemon_config(tmp_path), worker_cmd=gated_worker(gate)) as d:
            first = await d.submit(wav_bytes(0.5))
            second = await d.submit(wav_bytes(0.5))  # both queued until the gate opens
            waiter = asyncio.create_task(d.job(second["id"], wait=10))
            async with d.http.delete(f"/v1/jobs/{second['id']}") as r:
                assert (await r.json()) == {"id": second["id"], "status": "cancelled"}
            assert (await asyncio.wait_for(waiter, 10))["status"] == "cancelled"
            gate.touch()
            assert (await d.final(first["id"]))["status"] == "done"
            assert (await d.job(second["id"]))["status"] == "cancelled"

    run(main())


def test_finished_jobs_are_purged_with_their_files(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(tmp_path, queue={"retain_results_h": 0.0003, "purge_interval_s": 0.2})
        async with Daemon(cfg) as d:
            job = await d.submit(wav_bytes(0.5), embedding="true")
            await d.final(job["id"])

            async def gone() -> bool:
                async with d.http.get(f"/v1/jobs/{job['id']}") as r:
                    return r.status == 404

            await wait_for(gone, 20, "purge")
            assert not list((tmp_path / "results").iterdir())
            assert not list((tmp_path / "spool").iterdir())

    run(main())

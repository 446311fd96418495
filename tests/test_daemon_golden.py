"""API contract end to end: the real front end and the real worker (`python -m ondemand.worker`)
on the golden tiny model; results equal the reference scores."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import aiohttp
import numpy as np

from tests import golden
from tests.conftest import Daemon, daemon_config, fake_env


def test_real_worker_matches_golden_scores(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = daemon_config(
            tmp_path,
            model={"path": str(golden.MODEL)},
            worker={"device": "cpu", "load_timeout_s": 60.0, "unload_after_s": 0.3,
                    "exit_after_s": -1},
            audio={"max_seconds": 30.0},
        )
        async with Daemon(cfg, worker_cmd=[sys.executable, "-m", "ondemand.worker"],
                          env=fake_env()) as d:
            ids: dict[str, str] = {}
            for name in golden.clip_names():
                form = aiohttp.FormData()
                form.add_field("audio", (golden.AUDIO / name).read_bytes(), filename=name,
                               content_type="application/octet-stream")
                form.add_field("embedding", "true")
                async with d.http.post("/v1/jobs", data=form) as r:
                    assert r.status == 202, await r.text()
                    ids[name] = (await r.json())["id"]
            for name, job_id in ids.items():
                exp = golden.expected()["clips"][name]
                job = await d.final(job_id, timeout=60)
                assert job["status"] == "done", job
                res = job["result"]
                assert res["key"] == exp["key"] and res["frames"] == exp["frames"]
                assert res["labels"] == exp["labels"]
                np.testing.assert_allclose(res["scores"], exp["scores"], atol=1e-5)
                assert res["top"]["label"] == exp["top"]
                async with d.http.get(f"/v1/jobs/{job_id}/embedding.npy") as r:
                    emb = np.load(io.BytesIO(await r.read()))
                np.testing.assert_allclose(emb, golden.expected_feats(exp["key"], "utterance"),
                                           atol=1e-4)
            st = d.sup.status()
            assert st.device == "cpu" and st.last_load_s is not None and st.last_load_s > 0
            # the real worker drops the model and reloads in the same process
            pid = st.pid
            await d.wait_state("unloaded", timeout=10)
            async with d.http.post("/v1/recognize", params={"granularity": "frame"},
                                   data=(golden.AUDIO / "short_16k.wav").read_bytes(),
                                   headers={"Content-Type": "audio/wav"}) as r:
                job = await r.json()
            assert job["status"] == "done" and d.sup.status().pid == pid
            exp = golden.expected()["clips"]["short_16k.wav"]
            np.testing.assert_allclose(job["result"]["scores"], exp["scores"], atol=1e-5)

    asyncio.run(main())

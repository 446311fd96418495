"""The CLI client against `ondemand serve`: submit (JSON lines), status, load --hold, unload."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import fake_env, serve_config, start_serve, wav_bytes


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ondemand", *args, "--url", url],
                          capture_output=True, text=True, timeout=60)


def test_cli_submit_status_load_unload(tmp_path: Path) -> None:
    proc, url = start_serve(serve_config(tmp_path), fake_env())
    try:
        files = []
        for i in range(3):
            f = tmp_path / f"c{i}.wav"
            f.write_bytes(wav_bytes(0.5 + 0.1 * i))
            files.append(str(f))
        bad = tmp_path / "bad.wav"
        bad.write_bytes(b"nope")
        emb = tmp_path / "emb"
        out = cli("submit", *files, str(bad), "--embeddings-dir", str(emb), url=url)
        assert out.returncode == 1, out.stderr  # one file failed
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert [x["key"] for x in lines] == ["c0", "c1", "c2", "bad"]
        assert [x["duration_s"] for x in lines[:3]] == [0.5, 0.6, 0.7]
        assert lines[3]["error"]["code"] == "undecodable"
        assert np.load(emb / "c1.npy").shape == (4,)

        out = cli("submit", files[0], url=url)
        accepted = json.loads(out.stdout)
        assert out.returncode == 0 and accepted["status"] == "queued" and accepted["id"]

        out = cli("load", "--hold", "10m", url=url)
        st = json.loads(out.stdout)
        assert out.returncode == 0 and st["state"] == "ready" and st["hold_s"] > 590
        status = json.loads(cli("status", url=url).stdout)
        assert status["worker"]["hold_trigger"] == "manual"
        out = cli("unload", "--exit", url=url)
        assert out.returncode == 0 and json.loads(out.stdout)["hold_s"] is None

        out = cli("load", "--hold", "soon", url=url)
        assert out.returncode == 2 and "--hold" in out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    out = cli("status", url=url)
    assert out.returncode == 2 and "cannot reach the daemon" in out.stderr

"""`ondemand infer` as users run it (a real subprocess), and model resolution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ondemand.errors import ModelNotFoundError
from ondemand.model.resolve import resolve_model
from tests import golden


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ondemand", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_infer_prints_one_line_per_file_and_flags_bad_ones(tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    files = [str(golden.AUDIO / n) for n in golden.clip_names()]
    emb = tmp_path / "emb"
    proc = run_cli(
        "infer",
        "--model",
        str(golden.MODEL),
        "--device",
        "cpu",
        "--embeddings-dir",
        str(emb),
        files[0],
        str(bad),
        *files[1:],
    )
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(files) + 1
    assert lines[1]["key"] == "broken" and lines[1]["error"]["code"] == "undecodable"
    assert "Traceback" not in proc.stderr
    by_key = {c["key"]: c for c in golden.expected()["clips"].values()}
    for line in lines[:1] + lines[2:]:
        want = by_key[line["key"]]
        assert set(line) == {"key", "labels", "scores", "top", "frames", "duration_s"}
        assert line["labels"] == want["labels"] and line["frames"] == want["frames"]
        np.testing.assert_allclose(line["scores"], want["scores"], atol=1e-5, rtol=0)
        assert line["top"]["label"] == want["top"]
        saved = np.load(emb / f"{line['key']}.npy")
        np.testing.assert_allclose(
            saved, golden.expected_feats(line["key"], "utterance"), atol=1e-4
        )


def test_infer_frame_granularity_embeddings(tmp_path: Path) -> None:
    name = golden.clip_names()[0]
    key = golden.expected()["clips"][name]["key"]
    proc = run_cli(
        "infer",
        "--model",
        str(golden.MODEL),
        "--granularity",
        "frame",
        "--embeddings-dir",
        str(tmp_path),
        str(golden.AUDIO / name),
    )
    assert proc.returncode == 0, proc.stderr
    saved = np.load(tmp_path / f"{key}.npy")
    np.testing.assert_allclose(saved, golden.expected_feats(key, "frame"), atol=1e-4)


def test_infer_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    proc = run_cli("infer", "--model", str(tmp_path / "nope"), str(golden.AUDIO / "mid_16k.wav"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_infer_cuda_without_gpu_is_clear(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli(
        "infer", "--model", str(golden.MODEL), "--device", "cuda", str(golden.AUDIO / "mid_16k.wav")
    )
    assert proc.returncode == 2 and "no usable CUDA GPU" in proc.stderr


def test_make_test_model_round_trip(tmp_path: Path) -> None:
    proc = run_cli("make-test-model", str(tmp_path / "m"), "--preset", "tiny", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" in proc.stderr
    proc = run_cli("infer", "--model", str(tmp_path / "m"), str(golden.AUDIO / "mid_16k.wav"))
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert len(line["scores"]) == 9 and abs(sum(line["scores"]) - 1) < 1e-5


# ---- model resolution -------------------------------------------------------------------------


def test_resolve_local_directory() -> None:
    assert resolve_model(str(golden.MODEL)) == golden.MODEL


def test_resolve_bad_specs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="neither an existing directory nor a ModelScope"):
        resolve_model("not-an-id")


def test_resolve_offline_uncached_fails_fast_without_network(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="not in the cache"):
        resolve_model("iic/emotion2vec_plus_large", cache_dir=str(tmp_path), offline=True)
    assert time.monotonic() - t0 < 30


def test_resolve_cached_id_needs_no_network(tmp_path: Path) -> None:
    """A model already in the ModelScope cache resolves offline (no download attempted)."""
    target = tmp_path / "models" / "iic" / "emotion2vec_plus_large"
    shutil.copytree(golden.MODEL, target)
    got = resolve_model("iic/emotion2vec_plus_large", cache_dir=str(tmp_path), offline=True)
    assert got.resolve() == target.resolve()
    assert (got / "model.pt").is_file()

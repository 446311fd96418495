"""The engine against the reference: golden parity, batching, loader errors, labels, devices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ondemand.audio import decode
from ondemand.errors import AudioError, CheckpointError, DeviceError, ModelError
from ondemand.model.engine import Clip, Engine
from tests import golden


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(golden.MODEL, device="cpu")


@pytest.fixture(scope="module")
def clips() -> list[Clip]:
    out = []
    for name in golden.clip_names():
        key = golden.expected()["clips"][name]["key"]
        out.append(Clip(key, decode(golden.AUDIO / name, max_seconds=60).samples))
    return out


@pytest.mark.parametrize("granularity", ["utterance", "frame"])
@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "one-padded-batch"])
def test_golden_parity(engine: Engine, clips: list[Clip], granularity: str, batched: bool) -> None:
    budget = 10_000.0 if batched else 0.0
    preds = engine.infer(clips, granularity=granularity, embeddings=True, batch_audio_s=budget)
    by_key = {c["key"]: c for c in golden.expected()["clips"].values()}
    assert [p.key for p in preds] == [c.key for c in clips]
    for pred in preds:
        want = by_key[pred.key]
        assert pred.labels == want["labels"]
        assert pred.frames == want["frames"]
        np.testing.assert_allclose(pred.scores, want["scores"], atol=1e-5, rtol=0)
        assert pred.top is not None and pred.top["label"] == want["top"]
        feats = golden.expected_feats(pred.key, granularity)
        assert pred.embedding is not None and pred.embedding.shape == feats.shape
        np.testing.assert_allclose(pred.embedding, feats, atol=1e-4, rtol=0)


def test_all_golden_clips_really_share_one_batch(engine: Engine, clips: list[Clip]) -> None:
    """The batched parity above must not silently fall back to one-by-one."""
    calls: list[int] = []
    real = engine.forward

    def spy(batch, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        return real(batch, *a, **kw)

    engine.forward = spy  # type: ignore[method-assign]
    try:
        engine.infer(clips, batch_audio_s=10_000.0)
    finally:
        del engine.forward
    assert calls == [len(clips)]


def test_batch_equals_single_on_very_different_lengths(engine: Engine) -> None:
    rng = np.random.default_rng(7)
    lengths = [400, 401, 3_000, 16_000 * 12, 7_777, 16_000 * 3 + 123]
    clips = [
        Clip(f"c{i}", (0.3 * rng.standard_normal(n)).astype(np.float32) + 0.05)
        for i, n in enumerate(lengths)
    ]
    single = engine.infer(clips, granularity="frame", embeddings=True, batch_audio_s=0.0)
    batched = engine.infer(clips, granularity="frame", embeddings=True, batch_audio_s=1e6)
    for s, b in zip(single, batched, strict=True):
        assert s.key == b.key and s.frames == b.frames
        np.testing.assert_allclose(s.scores, b.scores, atol=1e-5, rtol=0)
        assert s.embedding is not None and b.embedding is not None
        np.testing.assert_allclose(s.embedding, b.embedding, atol=1e-4, rtol=0)


def test_too_short_clip_is_a_typed_error(engine: Engine) -> None:
    with pytest.raises(AudioError) as err:
        engine.infer([Clip("x", np.zeros(399, np.float32))])
    assert err.value.code == "too_short"


def _copy_model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(golden.MODEL, d)
    for f in d.iterdir():
        f.chmod(0o644)
    d.chmod(0o755)
    return d


def _edit_checkpoint(model_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = model_dir / "model.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    edit(ckpt["model"])
    torch.save(ckpt, path)


def test_missing_tensors_are_named(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    _edit_checkpoint(d, lambda sd: sd.pop("d2v_model.blocks.1.mlp.fc2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: blocks\.1\.mlp\.fc2\.weight"):
        Engine.load(d, device="cpu")


def test_misshaped_tensors_are_named(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)

    def shrink(sd: dict[str, torch.Tensor]) -> None:
        sd["d2v_model.blocks.0.attn.proj.bias"] = torch.zeros(63)

    _edit_checkpoint(d, shrink)
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: blocks\.0\.attn\.proj\.bias"):
        Engine.load(d, device="cpu")


def test_extra_keys_are_ignored_and_wrappers_accepted(tmp_path: Path, clips: list[Clip]) -> None:
    d = _copy_model(tmp_path)
    ckpt = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    sd = {k.replace("d2v_model.", "module."): v for k, v in ckpt["model"].items()}
    sd["_ema.blocks.0.weight"] = torch.zeros(3)
    sd["d2v_model.modality_encoders.AUDIO.decoder.proj.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": sd}, d / "model.pt")
    pred = Engine.load(d, device="cpu").infer(clips[:1])[0]
    want = golden.expected()["clips"]
    by_key = {c["key"]: c for c in want.values()}
    np.testing.assert_allclose(pred.scores, by_key[pred.key]["scores"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.97])
def test_truncated_checkpoint_says_how_to_fix(tmp_path: Path, keep_fraction: float) -> None:
    d = _copy_model(tmp_path)
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError) as err:
        Engine.load(d, device="cpu")
    assert "truncated or corrupt" in err.value.message
    assert str(d) in err.value.message and "--force" in err.value.message


def test_garbage_checkpoint(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    (d / "model.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Engine.load(d, device="cpu")


def test_missing_directory_and_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        Engine.load(tmp_path / "nope", device="cpu")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Engine.load(tmp_path, device="cpu")


def test_tokens_must_match_classifier(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    (d / "tokens.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokens\.txt has 2 labels but the classifier has 9"):
        Engine.load(d, device="cpu")
    (d / "tokens.txt").unlink()
    with pytest.raises(CheckpointError, match=r"tokens\.txt is missing"):
        Engine.load(d, device="cpu")


def test_unuse_labels_are_dropped(tmp_path: Path, engine: Engine, clips: list[Clip]) -> None:
    """Old 5-class revisions: `unuse*` rows get logit -inf and vanish from the output."""
    d = _copy_model(tmp_path)
    labels = (d / "tokens.txt").read_text(encoding="utf-8").split()
    hidden = {1, 2, 5, 8}
    for i in hidden:
        labels[i] = f"unuse{i}"
    (d / "tokens.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    five = Engine.load(d, device="cpu").infer(clips)
    nine = engine.infer(clips)
    for p5, p9 in zip(five, nine, strict=True):
        assert p5.labels == [lab for i, lab in enumerate(labels) if i not in hidden]
        kept = np.array([s for i, s in enumerate(p9.scores) if i not in hidden])
        np.testing.assert_allclose(p5.scores, kept / kept.sum(), atol=1e-6, rtol=0)
        assert p5.top is not None and not p5.top["label"].startswith("unuse")


def test_base_model_without_head_gives_features_only(tmp_path: Path, clips: list[Clip]) -> None:
    d = _copy_model(tmp_path)
    _edit_checkpoint(d, lambda sd: [sd.pop("proj.weight"), sd.pop("proj.bias")])
    (d / "model.pt").rename(d / "emotion2vec_base.pt")
    (d / "tokens.txt").unlink()
    eng = Engine.load(d, device="cpu")
    assert eng.labels == []
    pred = eng.infer(clips[:1], embeddings=True)[0]
    assert pred.labels == [] and pred.scores == [] and pred.top is None
    want = golden.expected_feats(pred.key, "utterance")
    assert pred.embedding is not None
    np.testing.assert_allclose(pred.embedding, want, atol=1e-4, rtol=0)


def test_device_and_dtype_errors() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no usable CUDA GPU"):
            Engine.load(golden.MODEL, device="cuda")
    with pytest.raises(DeviceError, match="float16 is only supported on a GPU"):
        Engine.load(golden.MODEL, device="cpu", dtype="float16")
    auto = Engine.load(golden.MODEL, device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_reduced_precision_runs_and_stays_close(clips: list[Clip], dtype: str) -> None:
    """Agreement is measured on real-size models in bench/; here: sane probabilities."""
    eng = Engine.load(golden.MODEL, device="cpu", dtype=dtype)
    preds = eng.infer(clips)
    by_key = {c["key"]: c for c in golden.expected()["clips"].values()}
    for p in preds:
        assert abs(sum(p.scores) - 1) < 1e-4
        assert np.abs(np.array(p.scores) - by_key[p.key]["scores"]).max() < 0.1


def test_unload_frees_the_model(clips: list[Clip]) -> None:
    eng = Engine.load(golden.MODEL, device="cpu")
    eng.infer(clips[:1])
    eng.unload()
    with pytest.raises(ModelError, match="unloaded"):
        eng.infer(clips[:1])


@pytest.mark.parametrize("preset", ["tiny", "base", "plus_base", "plus_large"])
def test_make_test_model_load_infer_round_trip(tmp_path: Path, preset: str) -> None:
    """Every preset's official layout loads through the real loader and runs."""
    from ondemand.model.testmodel import PRESETS, make_test_model

    d = make_test_model(tmp_path / preset, preset=preset, seed=1)
    eng = Engine.load(d, device="cpu")
    p = PRESETS[preset]
    assert eng.dim == p.dim
    samples = (0.1 * np.random.default_rng(0).standard_normal(16_000)).astype(np.float32)
    pred = eng.infer([Clip("one", samples)], embeddings=True)[0]
    assert pred.embedding is not None and pred.embedding.shape == (p.dim,)
    assert np.isfinite(pred.embedding).all()
    if p.head:
        assert len(pred.scores) == 9 and abs(sum(pred.scores) - 1) < 1e-5
    else:
        assert pred.scores == [] and pred.top is None

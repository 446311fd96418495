"""ondemand.model.testmodel: official layout (checked against the golden model), every preset's
shapes (checked against our own loader, without allocating), determinism."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ondemand.model import checkpoint
from ondemand.model.engine import Clip, Engine
from ondemand.model.network import expected_shapes
from ondemand.model.testmodel import (
    LABELS,
    PRESETS,
    build_checkpoint,
    config_yaml,
    make_test_model,
    weight_layout,
)
from tests import golden

FILES = ("config.yaml", "configuration.json", "tokens.txt")


def golden_weights() -> dict[str, torch.Tensor]:
    obj = torch.load(golden.MODEL / "model.pt", map_location="cpu", weights_only=True)
    return obj["model"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)


def load(model_dir: Path) -> dict[str, Any]:
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


# --- tiny: the golden fixture's layout ----------------------------------------------------------


def test_tiny_layout_is_the_golden_layout() -> None:
    want = {k: tuple(v.shape) for k, v in golden_weights().items()}
    got = weight_layout("tiny")
    assert list(got) == list(want)  # same names, same order
    assert got == want  # same shapes


def test_tiny_files_are_the_golden_files(tiny_dir: Path) -> None:
    for name in FILES:
        assert (tiny_dir / name).read_bytes() == (golden.MODEL / name).read_bytes(), name
    assert (tiny_dir / "tokens.txt").read_text(encoding="utf-8").split("\n") == list(LABELS)


def test_model_pt_is_official_shaped(tiny_dir: Path) -> None:
    obj = load(tiny_dir)
    assert {"model", "optimizer_history", "extra_state"} <= set(obj)
    model = obj["model"]
    inference = weight_layout("tiny")
    # the inference tensors, plus the decoder tensors and the nested EMA dict the real files carry
    assert {k: tuple(v.shape) for k, v in model.items() if k in inference} == inference
    extra = set(model) - set(inference)
    assert extra == set(weight_layout("tiny", extras=True)) - set(inference) | {"d2v_model._ema"}
    assert all(".AUDIO.decoder." in k for k in extra - {"d2v_model._ema"})
    assert isinstance(model["d2v_model._ema"], dict)
    for name in inference:
        t = model[name]
        assert t.dtype == torch.float32 and torch.isfinite(t).all() and t.std() > 0, name


def test_weights_are_sane(tiny_dir: Path) -> None:
    model = load(tiny_dir)["model"]
    a = "d2v_model.modality_encoders.AUDIO."
    qkv = model["d2v_model.blocks.0.attn.qkv.weight"]
    assert abs(float(qkv.std()) - 1 / math.sqrt(64)) < 0.02
    assert abs(float(model["d2v_model.blocks.1.norm2.weight"].mean()) - 1) < 0.1
    assert float(model[a + "alibi_scale"].min()) > 0
    assert abs(float(model["d2v_model.blocks.0.mlp.fc1.bias"].mean())) < 0.02


def test_readme_and_warning_say_random(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ondemand.model.testmodel"):
        out = make_test_model(tmp_path / "m")
    assert out == tmp_path / "m"
    assert "RANDOM" in (out / "README.md").read_text(encoding="utf-8")
    assert "MEAN NOTHING" in (out / "README.md").read_text(encoding="utf-8")
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)
    assert not (out / "model.pt.partial").exists()


def test_tiny_loads_and_predicts(tiny_dir: Path) -> None:
    engine = Engine.load(tiny_dir, device="cpu")
    x = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    (pred,) = engine.infer([Clip("noise", x)])
    assert pred.labels == list(LABELS) and abs(sum(pred.scores) - 1) < 1e-5
    assert max(pred.scores) < 0.999  # non-trivial: not a one-hot
    engine.unload()


# --- determinism --------------------------------------------------------------------------------


def flat(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in obj["model"].items():
        if isinstance(v, dict):
            out.update({f"{k}/{n}": t for n, t in v.items()})
        else:
            out[k] = v
    return out


def test_same_seed_same_file(tmp_path: Path, tiny_dir: Path) -> None:
    again = make_test_model(tmp_path / "again", "tiny", seed=0)
    a, b = flat(load(tiny_dir)), flat(load(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "model.pt").read_bytes() == (tiny_dir / "model.pt").read_bytes()


def test_other_seed_other_weights(tiny_dir: Path) -> None:
    a, b = flat(load(tiny_dir)), flat(build_checkpoint("tiny", seed=1))
    assert a.keys() == b.keys() and not any(torch.equal(a[k], b[k]) for k in a)


# --- every preset -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_layout_loads_with_our_checkpoint_reader(name: str) -> None:
    """The layout (meta tensors: nothing allocated) passes the real loader path unchanged."""
    p = PRESETS[name]
    state = {k: torch.empty(s, device="meta") for k, s in weight_layout(p, extras=True).items()}
    stripped = checkpoint.strip(state)
    conf = yaml.safe_load(config_yaml(p))["model_conf"]
    arch = checkpoint.derive_arch(stripped, conf)
    got = (arch.dim, arch.heads, arch.prenet_blocks, arch.blocks)
    assert got == (p.dim, p.heads, p.prenet_blocks, p.blocks)
    assert arch.classes == (p.classes if p.head else 0)
    c = p.conv_channels
    assert arch.conv == (
        (c, 10, 5),
        (c, 3, 2),
        (c, 3, 2),
        (c, 3, 2),
        (c, 3, 2),
        (c, 2, 2),
        (c, 2, 2),
    )
    assert (arch.pos_layers, arch.pos_kernel, arch.pos_groups) == (5, 19, 16)
    expected = expected_shapes(arch)
    inference = checkpoint.strip(
        {k: torch.empty(s, device="meta") for k, s in weight_layout(p).items()}
    )
    assert {k: v.shape for k, v in inference.items()} == expected
    checkpoint.check_tensors(expected, stripped)  # decoder keys ignored, nothing missing


@pytest.mark.parametrize(
    ("name", "millions"), [("base", 93.2), ("plus_base", 93.2), ("plus_large", 162.1)]
)
def test_real_presets_have_the_published_parameter_counts(name: str, millions: float) -> None:
    layout = weight_layout(name)
    assert ("proj.weight" in layout) == PRESETS[name].head
    count = sum(math.prod(s) for s in layout.values())
    assert abs(count / 1e6 - millions) < 0.05


def test_base_generates_without_head() -> None:
    obj = build_checkpoint("base")  # real size (93 M floats, ~1-2 s), in memory only
    model = obj["model"]
    assert not any(k.startswith("proj.") for k in model)
    shapes = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)}
    assert shapes == weight_layout("base", extras=True)
    extra = model["d2v_model.modality_encoders.AUDIO.extra_tokens"]
    assert extra.shape == (1, 10, 768) and torch.isfinite(extra).all()


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="tiny, base, plus_base, plus_large"):
        weight_layout("huge")

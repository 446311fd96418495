"""Read an official emotion2vec checkpoint: only the weights, every shape derived from the tensors.

The official `model.pt` is mostly training state; we `mmap` it so only the tensors we use are ever
read.  Prefixes (`d2v_model.`, `module.`) are stripped, decoder/EMA/other keys ignored, and every
expected tensor must be present with the expected shape (FunASR silently leaves missing weights
random — we fail and name them)."""

from __future__ import annotations

import ast
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ondemand.errors import CheckpointError

log = logging.getLogger(__name__)

A = "modality_encoders.AUDIO."
PREFIXES = ("d2v_model.", "module.")
WRAPPERS = ("model", "state_dict", "model_state_dict")
DEFAULT_STRIDES = (5, 2, 2, 2, 2, 2, 2)
CHECKPOINT_NAMES = ("model.pt", "emotion2vec_base.pt")


@dataclass(frozen=True)
class Arch:
    """Everything needed to build the network; all but strides/eps/normalize comes from tensors."""

    dim: int
    heads: int
    extra_tokens: int
    conv: tuple[tuple[int, int, int], ...]  # (channels, kernel, stride) per stem layer
    pos_layers: int
    pos_kernel: int
    pos_groups: int
    prenet_blocks: int
    blocks: int
    mlp_dim: int
    classes: int  # 0: no head (emotion2vec_base)
    eps: float = 1e-5
    normalize: bool = True


def find_checkpoint(model_dir: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise CheckpointError(
        f"no checkpoint in model directory {model_dir.name}: expected one of "
        f"{', '.join(CHECKPOINT_NAMES)}. Re-download the model or pass the right directory."
    )


def corrupt_hint(path: Path) -> str:
    return (
        f"the checkpoint {path.name} is truncated or corrupt (an interrupted download?). "
        f"Delete the model directory {path.parent} and download it again "
        "(or run with --force to re-download)."
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load the checkpoint's tensors (mmap, weights only) and return the stripped state dict."""
    try:
        # mmap needs the zip format (every torch.save since 1.6); older files load in full.
        mmap = zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (FileNotFoundError, PermissionError) as e:
        raise CheckpointError(f"cannot read {path.name}: {e.strerror}") from e
    except Exception as e:  # torch raises assorted errors on damaged archives
        raise CheckpointError(corrupt_hint(path)) from e
    return strip(unwrap(obj, path))


def unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        f"{path.name} does not hold an emotion2vec state dict (no 'model' entry and no tensors)."
    )


def strip(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = key
        for prefix in PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = value
    return out


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    found = {int(m.group(1)) for key in state if (m := rx.match(key))}
    return sorted(found)


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(
            f"checkpoint is missing tensor {key!r}; it is not an emotion2vec model"
        )
    return state[key]


def derive_arch(state: dict[str, torch.Tensor], config: dict[str, Any] | None) -> Arch:
    """Derive the architecture from tensor shapes; strides/eps/normalize from the config."""
    extra = _require(state, A + "extra_tokens")
    scale = _require(state, A + "alibi_scale")
    dim, n_extra, heads = int(extra.shape[2]), int(extra.shape[1]), int(scale.shape[2])
    conv_ids = _indices(state, A + "local_encoder.conv_layers.{}.0.weight")
    pos_ids = _indices(state, A + "relative_positional_encoder.{}.0.weight")
    prenet = _indices(state, A + "context_encoder.blocks.{}.norm1.weight")
    blocks = _indices(state, "blocks.{}.norm1.weight")
    if not conv_ids or not pos_ids or not blocks:
        raise CheckpointError("checkpoint lacks the conv stem, positional conv or blocks")
    conf = config or {}
    strides = _strides(conf, len(conv_ids))
    conv = []
    for i, stride in zip(range(len(conv_ids)), strides, strict=True):
        w = _require(state, f"{A}local_encoder.conv_layers.{i}.0.weight")
        conv.append((int(w.shape[0]), int(w.shape[2]), stride))
    pos_w = _require(state, f"{A}relative_positional_encoder.{pos_ids[0]}.0.weight")
    fc1 = _require(state, "blocks.0.mlp.fc1.weight")
    head = state.get("proj.weight")
    return Arch(
        dim=dim,
        heads=heads,
        extra_tokens=n_extra,
        conv=tuple(conv),
        pos_layers=len(pos_ids),
        pos_kernel=int(pos_w.shape[2]),
        pos_groups=dim // int(pos_w.shape[1]),
        prenet_blocks=len(prenet),
        blocks=len(blocks),
        mlp_dim=int(fc1.shape[0]),
        classes=int(head.shape[0]) if head is not None else 0,
        eps=float(conf.get("norm_eps", 1e-5)),
        normalize=bool(conf.get("normalize", True)),
    )


def _strides(conf: dict[str, Any], layers: int) -> tuple[int, ...]:
    spec = conf.get("modalities", {}).get("audio", {}).get("feature_encoder_spec")
    if isinstance(spec, str):
        try:
            parsed = _eval_spec(ast.parse(spec, mode="eval").body)
            strides = tuple(int(s) for _, _, s in parsed)
            if len(strides) == layers:
                return strides
        except (ValueError, TypeError, SyntaxError):
            log.warning("config feature_encoder_spec unreadable; using the default strides")
    if layers != len(DEFAULT_STRIDES):
        raise CheckpointError(f"conv stem has {layers} layers and the config gives no strides")
    return DEFAULT_STRIDES


def _eval_spec(node: ast.expr) -> list[tuple[int, int, int]]:
    """Evaluate `[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...` without eval()."""
    if isinstance(node, ast.List):
        return [tuple(ast.literal_eval(e)) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _eval_spec(node.left) + _eval_spec(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _eval_spec(node.left) * int(ast.literal_eval(node.right))
    raise ValueError("unsupported feature_encoder_spec")


def read_config(model_dir: Path) -> dict[str, Any] | None:
    """`model_conf` from config.yaml when present and readable (layout differs between models)."""
    path = model_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as e:  # a broken config only costs us the defaults
        log.warning("config.yaml unreadable (%s); using defaults for strides/eps/normalize", e)
        return None
    if not isinstance(data, dict):
        return None
    conf = data.get("model_conf", data)
    return conf if isinstance(conf, dict) else None


def check_tensors(
    expected: dict[str, torch.Size], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Keep exactly the expected tensors; fail naming every missing or mis-shaped one."""
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}")
            if len(missing) > 10:
                parts.append(f"... and {len(missing) - 10} more missing")
        if wrong:
            parts.append(f"mis-shaped tensors: {', '.join(wrong[:10])}")
        raise CheckpointError("checkpoint does not match emotion2vec: " + "; ".join(parts))
    ignored = len(state) - len(expected)
    if ignored:
        log.debug("checkpoint: ignored %d extra tensors (decoder, EMA, training state)", ignored)
    return {k: state[k] for k in expected}

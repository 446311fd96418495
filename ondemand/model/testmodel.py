"""Random-weight emotion2vec model directories in the official ModelScope layout.

For tests, benchmarks and demos without downloading 1-2 GB: `model.pt` (a dict whose "model"
entry holds the `d2v_model.`-prefixed backbone, the unprefixed `proj.*` head, decoder and EMA
tensors, next to small training state, as the real files do), `config.yaml`, `configuration.json`,
`tokens.txt` and a README.  The weights are RANDOM: the predictions mean NOTHING.

Shapes follow docs/emotion2vec.md; `tiny` reproduces the golden fixture's layout and config.
Tensors are drawn in float32 straight from one seeded generator in a fixed order (no nn.Module
init), so a (preset, seed) pair always gives the same weights and `plus_large` takes seconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

P = "d2v_model."
A = P + "modality_encoders.AUDIO."
STEM = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))  # (kernel, stride) per conv
EXTRA_TOKENS = 10
POS_LAYERS, POS_KERNEL, POS_GROUPS = 5, 19, 16
DECODER_LAYERS, DECODER_KERNEL, DECODER_GROUPS = 4, 7, 16
LABELS = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)


@dataclass(frozen=True)
class Preset:
    dim: int
    heads: int
    prenet_blocks: int
    blocks: int
    conv_channels: int
    head: bool  # emotion2vec_base has no classifier: no proj.* keys
    classes: int = 9
    decoder_dim: int = 384


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 4, 1, 2, 32, head=True, decoder_dim=32),
    "base": Preset(768, 12, 4, 8, 512, head=False),
    "plus_base": Preset(768, 12, 4, 8, 512, head=True),
    "plus_large": Preset(1024, 16, 4, 8, 512, head=True),
}

Spec = tuple[tuple[int, ...], str]  # shape, init kind (see _draw)
# init kind -> (std, mean) of the normal draw; "weight", "head_weight", "alibi" are special
AFFINE_INITS = {
    "bias": (0.05, 0.0),
    "norm_weight": (0.2, 1.0),
    "norm_bias": (0.1, 0.0),
    "token": (0.5, 0.0),
    "head_bias": (0.2, 0.0),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown test-model preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


def _block(p: Preset) -> dict[str, Spec]:
    d, m = p.dim, 4 * p.dim
    return {
        "norm1.weight": ((d,), "norm_weight"),
        "norm1.bias": ((d,), "norm_bias"),
        "attn.qkv.weight": ((3 * d, d), "weight"),
        "attn.qkv.bias": ((3 * d,), "bias"),
        "attn.proj.weight": ((d, d), "weight"),
        "attn.proj.bias": ((d,), "bias"),
        "norm2.weight": ((d,), "norm_weight"),
        "norm2.bias": ((d,), "norm_bias"),
        "mlp.fc1.weight": ((m, d), "weight"),
        "mlp.fc1.bias": ((m,), "bias"),
        "mlp.fc2.weight": ((d, m), "weight"),
        "mlp.fc2.bias": ((d,), "bias"),
    }


def _encoder_specs(p: Preset) -> dict[str, Spec]:
    """The modality encoder's inference tensors, in the official state-dict order."""
    d, c = p.dim, p.conv_channels
    out: dict[str, Spec] = {
        A + "extra_tokens": ((1, EXTRA_TOKENS, d), "token"),
        A + "alibi_scale": ((1, 1, p.heads, 1, 1), "alibi"),
    }
    for i, (kernel, _) in enumerate(STEM):
        conv = A + f"local_encoder.conv_layers.{i}."
        out[conv + "0.weight"] = ((c, 1 if i == 0 else c, kernel), "weight")
        out[conv + "2.1.weight"] = ((c,), "norm_weight")
        out[conv + "2.1.bias"] = ((c,), "norm_bias")
    out[A + "project_features.1.weight"] = ((c,), "norm_weight")
    out[A + "project_features.1.bias"] = ((c,), "norm_bias")
    out[A + "project_features.2.weight"] = ((d, c), "weight")
    out[A + "project_features.2.bias"] = ((d,), "bias")
    for j in range(1, POS_LAYERS + 1):  # index 0 of the Sequential is a (weightless) SamePad
        out[A + f"relative_positional_encoder.{j}.0.weight"] = (
            (d, d // POS_GROUPS, POS_KERNEL),
            "weight",
        )
        out[A + f"relative_positional_encoder.{j}.0.bias"] = ((d,), "bias")
    for b in range(p.prenet_blocks):
        for name, spec in _block(p).items():
            out[A + f"context_encoder.blocks.{b}.{name}"] = spec
    out[A + "context_encoder.norm.weight"] = ((d,), "norm_weight")
    out[A + "context_encoder.norm.bias"] = ((d,), "norm_bias")
    return out


def _decoder_specs(p: Preset) -> dict[str, Spec]:
    """The pre-training decoder (Decoder1d): in the real files, useless for inference."""
    out: dict[str, Spec] = {}
    for i in range(DECODER_LAYERS):
        fan_in = (p.dim if i == 0 else p.decoder_dim) // DECODER_GROUPS
        conv = A + f"decoder.blocks.{i}.0."
        out[conv + "weight"] = ((p.decoder_dim, fan_in, DECODER_KERNEL), "weight")
        out[conv + "bias"] = ((p.decoder_dim,), "bias")
    out[A + "decoder.proj.weight"] = ((p.dim, p.decoder_dim), "weight")
    out[A + "decoder.proj.bias"] = ((p.dim,), "bias")
    return out


def _head_specs(p: Preset) -> dict[str, Spec]:
    if not p.head:
        return {}
    return {
        "proj.weight": ((p.classes, p.dim), "head_weight"),
        "proj.bias": ((p.classes,), "head_bias"),
    }


def _specs(p: Preset, *, extras: bool) -> dict[str, Spec]:
    out = _encoder_specs(p)
    if extras:
        out |= _decoder_specs(p)
    for b in range(p.blocks):
        for name, spec in _block(p).items():
            out[P + f"blocks.{b}.{name}"] = spec
    return out | _head_specs(p)


def weight_layout(preset: str | Preset, *, extras: bool = False) -> dict[str, tuple[int, ...]]:
    """name -> shape of the "model" dict, without allocating anything.  `extras=False`: only the
    inference tensors (what a loader must find); `extras=True`: plus decoder tensors (EMA is a
    nested dict under `d2v_model._ema`, see `_ema`)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return {name: shape for name, (shape, _) in _specs(p, extras=extras).items()}


def _draw(shape: tuple[int, ...], kind: str, p: Preset, gen: torch.Generator) -> torch.Tensor:
    """Random but sane: unit-ish activations through every layer, non-trivial softmax."""
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "weight":  # std 1/sqrt(fan_in): variance-preserving linears and convs
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        return t.mul_(fan_in**-0.5)
    if kind == "head_weight":  # logits of std ~2: scores neither flat nor one-hot at any width
        return t.mul_(2.0 / p.dim**0.5)
    if kind == "alibi":  # positive, around the trained 1.0 (<= 0 would switch a head's bias off)
        return t.mul_(0.25).add_(0.9).clamp_(min=0.05)
    scale, shift = AFFINE_INITS[kind]
    return t.mul_(scale).add_(shift)


def _ema(p: Preset, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """data2vec's `state["_ema"] = ema.fp32_params`: a nested dict.  Kept tiny on purpose."""
    d = p.dim
    return {
        "blocks.0.norm1.weight": _draw((d,), "norm_weight", p, gen),
        "blocks.0.norm1.bias": _draw((d,), "norm_bias", p, gen),
        "blocks.0.attn.proj.bias": _draw((d,), "bias", p, gen),
    }


def _training_state(p: Preset, gen: torch.Generator) -> dict[str, Any]:
    """Small stand-ins for the real files' optimizer history / state and fairseq extras."""
    return {
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 12345,
            }
        ],
        "extra_state": {"epoch": 3, "step": 12345, "previous_training_time": 4321.5},
        "last_optimizer_state": {
            "state": {0: {"step": 12345, "exp_avg": _draw((p.dim,), "bias", p, gen)}},
            "param_groups": [{"lr": 5e-5, "betas": [0.9, 0.98], "params": [0]}],
        },
    }


def build_checkpoint(preset: str | Preset, seed: int = 0) -> dict[str, Any]:
    """The object `model.pt` holds (all weights_only-loadable types)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    gen = torch.Generator().manual_seed(seed)
    specs = _specs(p, extras=True)
    model: dict[str, Any] = {}
    for name, (shape, kind) in specs.items():
        if not name.startswith("proj."):
            model[name] = _draw(shape, kind, p, gen)
    model[P + "_ema"] = _ema(p, gen)  # data2vec appends it after the backbone's own tensors
    for name, (shape, kind) in _head_specs(p).items():
        model[name] = _draw(shape, kind, p, gen)
    return {"model": model, **_training_state(p, gen)}


def make_test_model(out_dir: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model directory in the official layout; returns `out_dir`."""
    p = get_preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.pt.partial"
    torch.save(build_checkpoint(p, seed), tmp)
    os.replace(tmp, out_dir / "model.pt")  # a crash never leaves a truncated model.pt behind
    (out_dir / "config.yaml").write_text(config_yaml(p), encoding="utf-8")
    (out_dir / "configuration.json").write_text(CONFIGURATION_JSON, encoding="utf-8")
    (out_dir / "tokens.txt").write_text("\n".join(LABELS), encoding="utf-8")
    (out_dir / "README.md").write_text(readme(preset, seed), encoding="utf-8")
    log.warning(
        "test model written dir=%s preset=%s seed=%d: RANDOM weights, predictions mean NOTHING",
        out_dir,
        preset,
        seed,
    )
    return out_dir


def readme(preset: str, seed: int) -> str:
    return f"""# RANDOM-WEIGHT TEST MODEL — PREDICTIONS MEAN NOTHING

**The weights in `model.pt` are random numbers.** This is NOT emotion2vec: every label, score and
embedding this model produces is meaningless noise. Use it only to test, benchmark or demo the
serving machinery (shapes, batching, memory, throughput, cold starts).

- generated by `ondemand make-test-model` (preset `{preset}`, seed {seed})
- layout: the official ModelScope/FunASR one (`model.pt`, `config.yaml`, `configuration.json`,
  `tokens.txt`), so it loads like a downloaded model
- for real predictions use `iic/emotion2vec_plus_large`, `iic/emotion2vec_plus_base` or
  `iic/emotion2vec_base` (revision `master`)
"""


def config_yaml(p: Preset) -> str:
    spec = f"[({p.conv_channels}, 10, 5)] + [({p.conv_channels}, 3, 2)] * 4"
    spec += f" + [({p.conv_channels},2,2)] + [({p.conv_channels},2,2)]"
    return CONFIG_YAML.format(
        depth=p.blocks,
        heads=p.heads,
        dim=p.dim,
        prenet=p.prenet_blocks,
        decoder_dim=p.decoder_dim,
        feature_encoder_spec=spec,
    )


CONFIGURATION_JSON = """{
 "framework": "pytorch",
 "task": "emotion-recognition",
 "pipeline": {
  "type": "funasr-pipeline"
 },
 "model": {
  "type": "funasr"
 },
 "file_path_metas": {
  "init_param": "model.pt",
  "tokenizer_conf": {
   "token_list": "tokens.txt"
  },
  "config": "config.yaml"
 }
}"""

# FunASR's config for emotion2vec+ (`model_conf` is data2vec 2.0's); only sizes are filled in.
CONFIG_YAML = """model: Emotion2vec
model_conf:
  loss_beta: 0.0
  loss_scale: null
  depth: {depth}
  start_drop_path_rate: 0.0
  end_drop_path_rate: 0.0
  num_heads: {heads}
  norm_eps: 1e-05
  norm_affine: true
  encoder_dropout: 0.1
  post_mlp_drop: 0.1
  attention_dropout: 0.1
  activation_dropout: 0.0
  dropout_input: 0.0
  layerdrop: 0.05
  embed_dim: {dim}
  mlp_ratio: 4.0
  layer_norm_first: false
  average_top_k_layers: {depth}
  end_of_block_targets: false
  clone_batch: 8
  layer_norm_target_layer: false
  batch_norm_target_layer: false
  instance_norm_target_layer: true
  instance_norm_targets: false
  layer_norm_targets: false
  ema_decay: 0.999
  ema_same_dtype: true
  log_norms: true
  ema_end_decay: 0.99999
  ema_anneal_end_step: 20000
  ema_encoder_only: false
  max_update: 100000
  extractor_mode: layer_norm
  shared_decoder: null
  min_target_var: 0.1
  min_pred_var: 0.01
  supported_modality: AUDIO
  mae_init: false
  seed: 1
  skip_ema: false
  cls_loss: 1.0
  recon_loss: 0.0
  d2v_loss: 1.0
  decoder_group: false
  adversarial_training: false
  adversarial_hidden_dim: 128
  adversarial_weight: 0.1
  cls_type: chunk
  normalize: true
  modalities:
    audio:
      type: AUDIO
      prenet_depth: {prenet}
      prenet_layerdrop: 0.05
      prenet_dropout: 0.1
      start_drop_path_rate: 0.0
      end_drop_path_rate: 0.0
      num_extra_tokens: 10
      init_extra_token_zero: true
      mask_noise_std: 0.01
      mask_prob_min: null
      mask_prob: 0.5
      inverse_mask: false
      mask_prob_adjust: 0.05
      keep_masked_pct: 0.0
      mask_length: 5
      add_masks: false
      remove_masks: false
      mask_dropout: 0.0
      encoder_zero_mask: true
      mask_channel_prob: 0.0
      mask_channel_length: 64
      ema_local_encoder: false
      local_grad_mult: 1.0
      use_alibi_encoder: true
      alibi_scale: 1.0
      learned_alibi: false
      alibi_max_pos: null
      learned_alibi_scale: true
      learned_alibi_scale_per_head: true
      learned_alibi_scale_per_layer: false
      num_alibi_heads: {heads}
      model_depth: {depth}
      decoder:
        decoder_dim: {decoder_dim}
        decoder_groups: 16
        decoder_kernel: 7
        decoder_layers: 4
        input_dropout: 0.1
        add_positions_masked: false
        add_positions_all: false
        decoder_residual: true
        projection_layers: 1
        projection_ratio: 2.0
      extractor_mode: layer_norm
      feature_encoder_spec: '{feature_encoder_spec}'
      conv_pos_width: 95
      conv_pos_groups: 16
      conv_pos_depth: 5
      conv_pos_pre_ln: false
tokenizer: CharTokenizer
tokenizer_conf:
  unk_symbol: <unk>
  split_with_space: true
scope_map:
- d2v_model.
- none
"""

"""The emotion2vec network (data2vec 2.0 audio encoder + linear head), batched and masked.

Module names mirror the official checkpoint keys (after stripping `d2v_model.`), so the state dict
loads with `assign=True` into modules built on the meta device: no time spent on random init.

Batched results equal one-clip-at-a-time results because (emotion2vec #37): each clip is normalised
on its own samples, T_i is computed per clip, padded frames are zeroed before every positional
conv, padded keys are masked in every attention (extra tokens never), pooling averages the valid
frames only.  The ALiBi bias is computed per batch (never cached, so memory does not grow with the
longest clip ever seen — FunASR #2695)."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ondemand.model.checkpoint import Arch


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class Block(nn.Module):
    """Post-LN transformer block (`layer_norm_first: false`)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x: the float32 residual stream; only the matmuls run in the weights' dtype."""
        b, n, d = x.shape
        qkv = linear(self.attn.qkv, x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.norm1(x + linear(self.attn.proj, a.transpose(1, 2).reshape(b, n, d)))
        return self.norm2(x + linear(self.mlp.fc2, F.gelu(linear(self.mlp.fc1, x))))


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)` computed in the layer's weight dtype (bf16/fp16 or float32, or an int8 dynamic
    quantized layer, which takes float32), returned as float32."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor) and weight.dtype != x.dtype:
        return cast(Tensor, layer(x.to(weight.dtype))).float()
    return cast(Tensor, layer(x))


class ContextEncoder(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(arch.dim, eps=arch.eps)
        self.blocks = nn.ModuleList(
            Block(arch.dim, arch.heads, arch.mlp_dim, arch.eps) for _ in range(arch.prenet_blocks)
        )


class LocalEncoder(nn.Module):
    def __init__(self, conv_layers: list[nn.Module]) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(conv_layers)


class AudioEncoder(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        d, c_last = arch.dim, arch.conv[-1][0]
        self.extra_tokens = nn.Parameter(torch.empty(1, arch.extra_tokens, d))
        self.alibi_scale = nn.Parameter(torch.empty(1, 1, arch.heads, 1, 1))
        layers: list[nn.Module] = []
        c_in = 1
        for channels, kernel, stride in arch.conv:
            # Named like the checkpoint: .0 conv (no bias), .2.1 LayerNorm over channels.
            norm = nn.Sequential(nn.Identity(), nn.LayerNorm(channels, eps=arch.eps))
            layers.append(
                nn.Sequential(
                    nn.Conv1d(c_in, channels, kernel, stride=stride, bias=False),
                    nn.Identity(),
                    norm,
                )
            )
            c_in = channels
        self.local_encoder = LocalEncoder(layers)
        self.project_features = nn.Sequential(
            nn.Identity(), nn.LayerNorm(c_last, eps=arch.eps), nn.Linear(c_last, d)
        )
        k, g = arch.pos_kernel, arch.pos_groups
        self.relative_positional_encoder = nn.Sequential(
            nn.Identity(),
            *[
                nn.Sequential(nn.Conv1d(d, d, k, padding=k // 2, groups=g))
                for _ in range(arch.pos_layers)
            ],
        )
        self.context_encoder = ContextEncoder(arch)


class Emotion2vec(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.modality_encoders = nn.ModuleDict({"AUDIO": AudioEncoder(arch)})
        self.blocks = nn.ModuleList(
            Block(arch.dim, arch.heads, arch.mlp_dim, arch.eps) for _ in range(arch.blocks)
        )
        self.proj = nn.Linear(arch.dim, arch.classes) if arch.classes else None

    @property
    def audio(self) -> AudioEncoder:
        return self.modality_encoders["AUDIO"]  # type: ignore[return-value]

    def frame_counts(self, lengths: Tensor) -> Tensor:
        """Frames per clip after the conv stem (no padding): l <- floor((l - k) / s) + 1."""
        t = lengths.clone()
        for _, kernel, stride in self.arch.conv:
            t = torch.div(t - kernel, stride, rounding_mode="floor") + 1
        return t

    def forward(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """wav (B, L) zero-padded raw audio, lengths (B,) -> (features (B, T, D), frames (B,)).

        Frames at or past a clip's length are padding and hold garbage."""
        arch, enc = self.arch, self.audio
        valid = torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths[:, None]
        x = wav.float()
        if arch.normalize:
            n = lengths[:, None].to(x.dtype)
            mean = (x * valid).sum(1, keepdim=True) / n
            var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
            x = (x - mean) / torch.sqrt(var + 1e-5)
        x = (x * valid).unsqueeze(-1)  # (B, L, 1)
        for layer in enc.local_encoder.conv_layers:
            conv, ln = stem_layer(layer)
            x = strided_conv(x, conv)
            x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            x = F.gelu(x)
        x = linear(enc.project_features[2], enc.project_features[1](x))

        frames = self.frame_counts(lengths)
        t_max = x.shape[1]
        pad = torch.arange(t_max, device=x.device)[None, :] >= frames[:, None]  # (B, T)
        keep = (~pad).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        y = x.transpose(1, 2)
        for block in list(enc.relative_positional_encoder)[1:]:
            conv = cast(nn.Conv1d, cast(nn.Sequential, block)[0])
            y = linear(conv, y * keep)
            if conv.kernel_size[0] % 2 == 0:
                y = y[:, :, :-1]
            y = F.gelu(F.layer_norm(y.transpose(1, 2), (arch.dim,), eps=arch.eps)).transpose(1, 2)
        x = x + y.transpose(1, 2)

        b = x.shape[0]
        x = torch.cat([enc.extra_tokens.expand(b, -1, -1), x], dim=1)
        bias = self.attention_bias(pad)
        x = enc.context_encoder.norm(x)
        for blk in enc.context_encoder.blocks:
            x = blk(x, bias)
        for blk in self.blocks:
            x = blk(x, bias)
        return x[:, arch.extra_tokens :], frames

    def attention_bias(self, pad: Tensor) -> Tensor:
        """ALiBi over real frames, zero rows/cols for the extra tokens, -inf on padded keys.

        Returns (B, H, N, N) with N = extra + T."""
        arch = self.arch
        t = pad.shape[1]
        pos = torch.arange(t, device=pad.device, dtype=torch.float32)
        dist = -(pos[None, :] - pos[:, None]).abs()  # (T, T)
        slopes = alibi_slopes(arch.heads).to(pad.device)
        scale = self.audio.alibi_scale.detach().float().reshape(-1).clamp_min(0)
        alibi = dist[None] * (slopes * scale)[:, None, None]  # (H, T, T)
        alibi = F.pad(alibi, (arch.extra_tokens, 0, arch.extra_tokens, 0))
        key_pad = F.pad(pad, (arch.extra_tokens, 0), value=False)  # (B, N)
        bias = alibi[None].masked_fill(key_pad[:, None, None, :], float("-inf"))
        return bias

    def pool(self, feats: Tensor, frames: Tensor) -> Tensor:
        """Mean over each clip's valid frames -> (B, D)."""
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None]
        m = mask.unsqueeze(-1).to(feats.dtype)
        return (feats * m).sum(1) / frames[:, None].to(feats.dtype)


def strided_conv(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """Conv1d without padding or bias on channels-last input, as one matmul: (B, L, C_in) ->
    (B, T, C_out).  Same numbers as `conv`, but stays in (B, T, C) layout: on CPU the layout
    reorders around mkldnn's conv1d cost more than the arithmetic (docs/benchmarks.md)."""
    (kernel,), (stride,) = conv.kernel_size, conv.stride
    b, length, c_in = x.shape
    t = (length - kernel) // stride + 1
    x = x.contiguous()
    windows = x.as_strided((b, t, kernel * c_in), (length * c_in, stride * c_in, 1))
    weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, kernel * c_in)
    return (windows.to(weight.dtype) @ weight.t()).float()


def stem_layer(layer: nn.Module) -> tuple[nn.Conv1d, nn.LayerNorm]:
    """(conv, LayerNorm) of a conv-stem layer named like the checkpoint (.0 and .2.1)."""
    seq = cast(nn.Sequential, layer)
    return cast(nn.Conv1d, seq[0]), cast(nn.LayerNorm, cast(nn.Sequential, seq[2])[1])


def alibi_slopes(heads: int) -> Tensor:
    """Standard ALiBi slopes; non powers of two interleave from the next power (Press et al.)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_2(heads)
    else:
        c = 2 ** math.floor(math.log2(heads))
        slopes = power_of_2(c) + power_of_2(2 * c)[0::2][: heads - c]
    return torch.tensor(slopes, dtype=torch.float32)


def expected_shapes(arch: Arch) -> dict[str, torch.Size]:
    """Names and shapes of every tensor the network needs (on the meta device: free)."""
    with torch.device("meta"):
        net = Emotion2vec(arch)
    return {k: v.shape for k, v in net.state_dict().items()}


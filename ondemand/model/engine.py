"""The inference engine: load an official model directory, run batched inference, unload.

Imported only by the worker process and `ondemand infer`: this is where torch lives."""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ondemand import timeline
from ondemand.audio import MIN_SAMPLES, SAMPLE_RATE
from ondemand.batching import default_budget_s, plan_batches
from ondemand.errors import (
    AudioTooShort,
    AudioUndecodable,
    DeviceError,
    ModelError,
    NonFiniteOutput,
    OutOfMemory,
)
from ondemand.model import checkpoint
from ondemand.model.labels import Labels, read_labels
from ondemand.model.network import Emotion2vec
from ondemand.protocol import GRANULARITIES, Segmenting

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Clip:
    key: str
    samples: np.ndarray  # mono float32, 16 kHz


@dataclass
class Prediction:
    key: str
    labels: list[str]
    scores: list[float]
    top: dict[str, Any] | None
    frames: int
    duration_s: float
    embedding: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "labels": self.labels,
            "scores": self.scores,
            "top": self.top,
            "frames": self.frames,
            "duration_s": round(self.duration_s, 6),
        }


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA when present and usable, else CPU), `cpu`, `cuda`, `cuda:N`."""
    if spec == "auto":
        return torch.device("cuda:0") if _cuda_usable() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not _cuda_usable():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"device {spec!r} requested but no usable CUDA GPU (torch {torch.__version__}, "
                f"{build}); use --device cpu or auto, or install a CUDA build of torch"
            )
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def _cuda_usable() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver must not crash auto-detection
        return False


def check_dtype(dtype: str, device: torch.device) -> None:
    if dtype == "float16" and device.type == "cpu":
        raise DeviceError("dtype float16 is only supported on a GPU; on CPU use bfloat16 or int8")
    if dtype == "int8" and device.type != "cpu":
        raise DeviceError("dtype int8 (dynamic quantization) is CPU-only; on a GPU use bfloat16")
    if dtype not in DTYPES and dtype != "int8":
        raise DeviceError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or int8")


class Engine:
    """A loaded model.  Not thread-safe: one owner (the worker loop) calls it."""

    def __init__(
        self,
        net: Emotion2vec,
        labels: Labels | None,
        device: torch.device,
        dtype: str,
        timings: dict[str, float],
    ) -> None:
        self.net: Emotion2vec | None = net
        self._labels = labels
        self.device = device
        self.dtype = dtype
        self.timings = timings
        keep = labels.keep if labels else ()
        self._vad: Any = None
        self._drop = torch.tensor([not k for k in keep], dtype=torch.bool, device=device)

    @property
    def labels(self) -> list[str]:
        return self._labels.shown if self._labels else []

    @property
    def dim(self) -> int:
        assert self.net is not None
        return self.net.arch.dim

    @classmethod
    def load(cls, model_dir: Path, *, device: str = "auto", dtype: str = "float32") -> Engine:
        """Read weights, build modules without random init, move/convert. Raises ModelError."""
        t0 = time.perf_counter()
        dev = resolve_device(device)
        check_dtype(dtype, dev)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelError(f"model directory {model_dir} does not exist")
        path = checkpoint.find_checkpoint(model_dir)
        state = checkpoint.read_weights(path)
        arch = checkpoint.derive_arch(state, checkpoint.read_config(model_dir))
        labels = read_labels(model_dir, arch.classes) if arch.classes else None
        t1 = time.perf_counter()
        with torch.device("meta"):
            net = Emotion2vec(arch)
        expected = {k: v.shape for k, v in net.state_dict().items()}
        weights = checkpoint.check_tensors(expected, state)
        del state
        low = _matmul_weights(net) if dtype in ("bfloat16", "float16") else set()
        # Copy out of the mmap (owned memory: a file replaced under us cannot SIGBUS us) and
        # convert in the same pass; this is where the weight bytes are actually read.  Only the
        # matmul/conv weights go to bf16/fp16: norms, biases of the stream and the head stay fp32.
        weights = {
            k: v.to(device=dev, dtype=DTYPES[dtype] if k in low else torch.float32, copy=True)
            for k, v in weights.items()
        }
        t2 = time.perf_counter()
        net.load_state_dict(weights, strict=True, assign=True)
        net.eval().requires_grad_(False)
        if dtype == "int8":
            net = _quantize_int8(net)
        t3 = time.perf_counter()
        timings = {"parse_s": t1 - t0, "weights_s": t2 - t1, "build_s": t3 - t2}
        log.info(
            "model loaded dir=%s device=%s dtype=%s dim=%d heads=%d blocks=%d+%d classes=%d "
            "seconds=%.3f",
            model_dir.name,
            dev,
            dtype,
            arch.dim,
            arch.heads,
            arch.prenet_blocks,
            arch.blocks,
            arch.classes,
            t3 - t0,
        )
        return cls(net, labels, dev, dtype, timings)

    def warm_up(self, seconds: float = 0.5) -> float:
        """One inference on a synthetic clip so the first real request is not the slow one."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        samples = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
        self.infer([Clip("warmup", samples)])
        self.timings["warmup_s"] = time.perf_counter() - t0
        return self.timings["warmup_s"]

    def unload(self) -> None:
        """Drop the weights and give cached GPU memory back (the CUDA context stays)."""
        self.net = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def infer(
        self,
        clips: Sequence[Clip],
        *,
        granularity: str = "utterance",
        embeddings: bool = False,
        batch_audio_s: float | None = None,
    ) -> list[Prediction]:
        """Predictions in the order of `clips`; batches planned under a padded-audio budget."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be utterance or frame, got {granularity!r}")
        for clip in clips:
            _check_clip(clip)
        budget = default_budget_s(self.device.type) if batch_audio_s is None else batch_audio_s
        lengths = [len(c.samples) for c in clips]
        out: list[Prediction | None] = [None] * len(clips)
        for batch in plan_batches(lengths, int(budget * SAMPLE_RATE)):
            preds = self.forward([clips[i] for i in batch], granularity, embeddings)
            for i, pred in zip(batch, preds, strict=True):
                out[i] = pred
        return [p for p in out if p is not None]

    def infer_recording(
        self,
        audio: np.ndarray | timeline.Source,
        segments: Segmenting,
        *,
        key: str = "recording",
        embedding_path: Path | None = None,
        batch_audio_s: float | None = None,
        on_progress: Callable[[float, float], None] | None = None,
    ) -> dict[str, Any]:
        """A timeline of a long recording (issue 12): the same result a segmented job gets
        from the daemon (`segments`, `summary`, and the whole-clip fields).  `audio` is mono
        float32 16 kHz samples, or a `timeline.Source` read a slice at a time (a
        `spool.SpoolReader`: memory then follows the batch, not the recording).  With
        `embedding_path` one row per segment is written there."""
        source = timeline.ArraySource(audio) if isinstance(audio, np.ndarray) else audio
        budget = default_budget_s(self.device.type) if batch_audio_s is None else batch_audio_s

        def infer(clips: Sequence[tuple[str, np.ndarray]], embeddings: bool) -> list[Prediction]:
            return self.infer([Clip(k, x) for k, x in clips], embeddings=embeddings,
                              batch_audio_s=batch_audio_s)

        (out,) = timeline.run(
            [timeline.Recording(key, source, segments, embedding_path)], infer=infer,
            speech_probs=self.speech_probs, pool_s=4 * max(budget, 1.0), labels=self.labels,
            on_progress=None if on_progress is None else (lambda _i, d, t: on_progress(d, t)))
        if isinstance(out, timeline.NonFinite):
            raise NonFiniteOutput(f"{key}: the model produced NaN or infinite values ({out})")
        if isinstance(out, BaseException):
            raise out
        return out

    def speech_probs(self, source: timeline.Source, start: int, stop: int) -> np.ndarray:
        """Silero VAD speech probabilities (model/vad.py), the detector loaded on first use."""
        if self._vad is None:
            from ondemand.model.vad import SileroVad

            self._vad = SileroVad()
        return self._vad.probs(source, start, stop)

    def forward(
        self, clips: Sequence[Clip], granularity: str, embeddings: bool
    ) -> list[Prediction]:
        """One padded batch through the network.  Raises OutOfMemory if it does not fit."""
        if self.net is None:
            raise ModelError("the model is unloaded")
        try:
            return self._forward(self.net, clips, granularity, embeddings)
        except torch.cuda.OutOfMemoryError as e:
            raise OutOfMemory(f"batch of {len(clips)} clips does not fit in GPU memory") from e
        except RuntimeError as e:
            if "out of memory" in str(e) or "can't allocate memory" in str(e):
                raise OutOfMemory(f"batch of {len(clips)} clips does not fit in memory") from e
            raise

    @torch.inference_mode()
    def _forward(
        self, net: Emotion2vec, clips: Sequence[Clip], granularity: str, embeddings: bool
    ) -> list[Prediction]:
        lengths = torch.tensor([len(c.samples) for c in clips])
        wav = torch.zeros(len(clips), int(lengths.max()))
        for row, clip in enumerate(clips):
            wav[row, : len(clip.samples)] = torch.from_numpy(clip.samples)
        feats, frames = net(wav.to(self.device), lengths.to(self.device))
        feats = feats.float()
        pooled = net.pool(feats, frames)
        probs = self._scores(net, pooled)
        frames_l = frames.tolist()
        pooled_np = pooled.cpu().numpy() if embeddings and granularity == "utterance" else None
        feats_np = feats.cpu().numpy() if embeddings and granularity == "frame" else None
        probs_np = probs.cpu().numpy() if probs is not None else None
        preds = []
        for row, clip in enumerate(clips):
            emb = None
            if pooled_np is not None:
                emb = pooled_np[row].copy()
            elif feats_np is not None:
                emb = feats_np[row, : frames_l[row]].copy()
            labels, scores, top = self._label_scores(
                probs_np[row] if probs_np is not None else None
            )
            preds.append(
                Prediction(
                    key=clip.key,
                    labels=labels,
                    scores=scores,
                    top=top,
                    frames=frames_l[row],
                    duration_s=len(clip.samples) / SAMPLE_RATE,
                    embedding=emb,
                )
            )
        return preds

    def _scores(self, net: Emotion2vec, pooled: torch.Tensor) -> torch.Tensor | None:
        if net.proj is None:
            return None
        w, b = net.proj.weight.float(), net.proj.bias.float()
        logits = F.linear(pooled, w, b).masked_fill(self._drop, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def _label_scores(
        self, probs: np.ndarray | None
    ) -> tuple[list[str], list[float], dict[str, Any] | None]:
        if probs is None or self._labels is None:
            return [], [], None
        keep = self._labels.keep
        scores = [float(p) for p, k in zip(probs, keep, strict=True) if k]
        labels = self._labels.shown
        best = int(np.argmax(scores))
        return labels, scores, {"label": labels[best], "score": scores[best]}


def _check_clip(clip: Clip) -> None:
    s = clip.samples
    if not isinstance(s, np.ndarray) or s.ndim != 1 or s.dtype != np.float32:
        raise AudioUndecodable(f"{clip.key}: samples must be a 1-D float32 array")
    if len(s) < MIN_SAMPLES:
        raise AudioTooShort(
            f"{clip.key}: {len(s)} samples is too short; at least {MIN_SAMPLES} samples "
            f"({1000 * MIN_SAMPLES // SAMPLE_RATE} ms at 16 kHz) are needed",
        )


def _matmul_weights(net: Emotion2vec) -> set[str]:
    """State-dict names of the linear and conv layers' parameters, the classifier excepted."""
    return {
        f"{name}.{param}"
        for name, module in net.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv1d) and name != "proj"
        for param, _ in module.named_parameters(recurse=False)
    }


def _quantize_int8(net: Emotion2vec) -> Emotion2vec:
    """Dynamic int8 quantization of the transformer blocks' linear layers (CPU only); the
    feature projection and the classifier head stay float32."""
    from torch.ao.quantization import quantize_dynamic

    names = {
        name
        for name, module in net.named_modules()
        if isinstance(module, torch.nn.Linear) and "blocks." in name
    }
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which has no CPU dynamic-int8
        # path for this torch build; it still works and is measured in docs/benchmarks.md.
        warnings.simplefilter("ignore")
        return quantize_dynamic(net, names, dtype=torch.qint8)

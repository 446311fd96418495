"""GPU check, engine: load time and throughput per dtype (one clip at a time and batched under
several padded-audio budgets, with the peak device memory of each), agreement with float32, and
whether torch.compile (default and CUDA-graph `reduce-overhead` modes) pays on bucketed lengths.

Runs in the bench's own process (torch imported here; the daemon parts spawn their own workers).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def engine_part(model: Path, device: str, dtypes: list[str], clips: list[tuple[str, np.ndarray]],
                budgets: list[float], left: Callable[[], float]) -> dict[str, Any]:
    import torch

    from ondemand.model.engine import Clip, Engine

    out: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        t0 = time.perf_counter()
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
        out["cuda_init_s"] = round(time.perf_counter() - t0, 4)
        out["gpu_name"] = torch.cuda.get_device_name(0)
    cs = [Clip(k, x) for k, x in clips]
    audio_s = sum(len(c.samples) for c in cs) / 16000
    out.update(clips=len(cs), audio_s=round(audio_s, 2), budgets_s=budgets, dtypes={})
    reference: list[Any] | None = None
    for dtype in dtypes:
        if left() < 10:
            out["dtypes"][dtype] = {"skipped": "out of time"}
            continue
        if device == "cpu" and dtype == "float16":
            continue
        row: dict[str, Any] = {}
        _sync(device)
        t0 = time.perf_counter()
        eng = Engine.load(model, device=device, dtype=dtype)
        _sync(device)
        row["load_s"] = round(time.perf_counter() - t0, 4)
        row["load_timings"] = {k: round(v, 4) for k, v in eng.timings.items()}
        row["warmup_s"] = round(eng.warm_up(), 4)
        row["weights_mb"] = round(eng.weights_bytes / 2**20, 1)
        # One clip at a time, then each budget; the first pass also gives the predictions.
        _sync(device)
        t0 = time.perf_counter()
        preds = [eng.infer([c])[0] for c in cs]
        _sync(device)
        row["one_at_a_time_audio_s_per_s"] = round(audio_s / (time.perf_counter() - t0), 2)
        batched: dict[str, Any] = {}
        for b in budgets:
            if left() < 5:
                break
            _peak_reset(device)
            _sync(device)
            t0 = time.perf_counter()
            try:
                eng.infer(cs, batch_audio_s=b)
            except Exception as e:  # an OOM at a big budget is a result, not a crash
                batched[f"{b:g}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            _sync(device)
            batched[f"{b:g}"] = {
                "audio_s_per_s": round(audio_s / (time.perf_counter() - t0), 2),
                "peak_mb": _peak_mb(device)}
        row["batched"] = batched
        if reference is None:
            reference = preds
        else:
            row["top_label_agrees"] = sum(
                (a.top or {}).get("label") == (b.top or {}).get("label")
                for a, b in zip(reference, preds, strict=True))
            row["max_abs_dp"] = float(max(
                max(abs(x - y) for x, y in zip(a.scores, b.scores, strict=True))
                for a, b in zip(reference, preds, strict=True)))
        out["dtypes"][dtype] = row
        eng.unload()
        del eng
    out["recommended_budget_s"] = _best_budget(out["dtypes"])
    return out


def _best_budget(dtypes: dict[str, Any]) -> dict[str, Any] | None:
    """The budget with the best batched throughput per dtype (ties: the smaller budget)."""
    best: dict[str, Any] = {}
    for dtype, row in dtypes.items():
        scored = [(v["audio_s_per_s"], -float(b), float(b))
                  for b, v in row.get("batched", {}).items() if "audio_s_per_s" in v]
        if scored:
            speed, _, budget = max(scored)
            best[dtype] = {"budget_s": budget, "audio_s_per_s": speed}
    return best or None


def compile_part(model: Path, device: str, dtype: str, buckets_s: list[float], batch: int,
                 left: Callable[[], float]) -> dict[str, Any]:
    """Eager vs torch.compile (default) vs torch.compile(mode='reduce-overhead', CUDA graphs) on
    fixed (bucketed) shapes: compile seconds and steady-state milliseconds per batch."""
    import torch

    from ondemand.model.engine import Clip, Engine

    out: dict[str, Any] = {"dtype": dtype, "batch": batch, "buckets_s": buckets_s, "modes": {}}
    rng = np.random.default_rng(0)
    shapes = {b: [Clip(f"b{i}", (0.1 * rng.standard_normal(int(b * 16000))).astype(np.float32))
                  for i in range(batch)] for b in buckets_s}

    def timed(eng: Any, clips: list[Any], reps: int) -> float:
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            eng.forward(clips, "utterance", False)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return round(1000 * statistics.median(times), 3)

    for mode in ("eager", "default", "reduce-overhead"):
        if left() < 45:
            out["modes"][mode] = {"skipped": "out of time"}
            continue
        eng = Engine.load(model, device=device, dtype=dtype)
        if mode != "eager":
            assert eng.net is not None
            eng.net = torch.compile(eng.net, mode=None if mode == "default" else mode,
                                    dynamic=False)
        row: dict[str, Any] = {}
        try:
            for b, clips in shapes.items():
                if left() < 30:
                    row[f"{b:g}s"] = {"skipped": "out of time"}
                    continue
                t0 = time.perf_counter()
                eng.forward(clips, "utterance", False)  # compiles (or warms) this shape
                eng.forward(clips, "utterance", False)
                _sync(device)
                first = time.perf_counter() - t0
                row[f"{b:g}s"] = {"first_two_s": round(first, 3),
                                  "ms_per_batch": timed(eng, clips, 10)}
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        out["modes"][mode] = row
        eng.unload()
        del eng
        torch._dynamo.reset()
    eager = out["modes"].get("eager", {})
    verdict = {}
    for mode in ("default", "reduce-overhead"):
        row = out["modes"].get(mode, {})
        gains = [eager[k]["ms_per_batch"] / row[k]["ms_per_batch"] for k in row
                 if k in eager and isinstance(row[k], dict) and "ms_per_batch" in row[k]
                 and isinstance(eager[k], dict)]
        verdict[mode] = round(min(gains), 3) if gains else None
    out["speedup_vs_eager_min"] = verdict
    return out

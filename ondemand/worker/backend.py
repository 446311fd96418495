"""The real worker backend: ondemand.model.engine (torch) behind the protocol loop.

torch is imported on the first `load`, so `import_s` in the load timings is the interpreter's
share of a cold start (peers.md lesson 8: cold start is imports more than weights)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ondemand import protocol as p
from ondemand.errors import OutOfMemory
from ondemand.worker.main import LoadInfo, PredictionLike


class TorchBackend:
    def __init__(self) -> None:
        self.engine: Any = None
        self._vad: Any = None  # model/vad.py SileroVad, loaded at the first segments=vad job

    @property
    def labels(self) -> list[str]:
        return list(self.engine.labels) if self.engine is not None else []

    @property
    def budget_s(self) -> float:
        """The device's default padded-audio budget (segmented jobs pool segments by it)."""
        from ondemand.batching import default_budget_s

        return default_budget_s(self.engine.device.type) if self.engine is not None else 6.0

    def speech_probs(self, source: Any, start: int, stop: int) -> np.ndarray:
        if self._vad is None:
            from ondemand.model.vad import SileroVad

            self._vad = SileroVad()
        return self._vad.probs(source, start, stop)

    def load(self, op: p.Load) -> LoadInfo:
        t0 = time.perf_counter()
        from ondemand.model.engine import Engine
        from ondemand.model.resolve import resolve_model

        t1 = time.perf_counter()
        model_dir: Path = resolve_model(
            op.model, revision=op.revision or "master", cache_dir=op.cache_dir or None
        )
        t2 = time.perf_counter()
        engine = Engine.load(model_dir, device=op.device or "auto", dtype=op.dtype or "float32")
        engine.warm_up()  # the first real request must not be the slow one (Triton warmup)
        self.engine = engine
        timings = {"import_s": t1 - t0, "resolve_s": t2 - t1, **engine.timings}
        return LoadInfo(device=str(engine.device), dtype=engine.dtype,
                        timings={k: round(v, 6) for k, v in timings.items()})

    def infer(
        self,
        clips: Sequence[tuple[str, np.ndarray]],
        *,
        granularity: p.Granularity,
        embeddings: bool,
        batch_audio_s: float | None,
    ) -> Sequence[PredictionLike]:
        import torch

        from ondemand.model.engine import Clip

        try:
            return self.engine.infer(
                [Clip(key, samples) for key, samples in clips],
                granularity=granularity,
                embeddings=embeddings,
                batch_audio_s=batch_audio_s,
            )
        except (torch.cuda.OutOfMemoryError, OutOfMemory) as e:
            if torch.cuda.is_initialized():
                # The allocator holds the failed batch's fragments; give them back before the
                # dispatcher retries smaller.
                torch.cuda.empty_cache()
            if isinstance(e, OutOfMemory):
                raise
            raise OutOfMemory(f"batch of {len(clips)} clips does not fit in GPU memory") from e

    def unload(self) -> None:
        self._vad = None
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.unload()  # drops the weights and calls torch.cuda.empty_cache()

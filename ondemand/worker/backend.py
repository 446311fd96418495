"""The real worker backend: ondemand.model.engine (torch) behind the protocol loop.

torch is imported on the first `prepare` or `load`, so `import_s` in their timings is the
interpreter's share of a cold start (peers.md lesson 8: cold start is imports more than weights).
A standby worker (`prepare`) holds a HostModel; the `load` that follows moves it to the device."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ondemand import protocol as p
from ondemand.errors import OutOfMemory
from ondemand.worker.main import LoadInfo, PredictionLike, PrepareInfo


class TorchBackend:
    def __init__(self) -> None:
        self.engine: Any = None
        self.host: Any = None  # model/engine.py HostModel of a standby worker (Prepare)
        self._host_key: tuple[str, str, str, str] | None = None
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

    def prepare(self, op: p.Prepare) -> PrepareInfo:
        """Standby: torch and the engine imported, the weights read into host memory.  No
        torch.cuda call and no pinned memory here (pinning initialises CUDA): the process must
        hold nothing on any GPU (docs/ladder.md; tests/test_standby.py trips on any)."""
        t0 = time.perf_counter()
        import torch

        from ondemand.model.engine import check_dtype, read_model
        from ondemand.model.resolve import resolve_model

        t1 = time.perf_counter()
        self._drop_model()
        if op.device == "cpu":
            check_dtype(op.dtype or "float32", torch.device("cpu"))  # fp16 on a CPU: fail now
        model_dir: Path = resolve_model(
            op.model, revision=op.revision or "master", cache_dir=op.cache_dir or None
        )
        t2 = time.perf_counter()
        host = read_model(model_dir, dtype=op.dtype or "float32")
        self.host, self._host_key = host, _key(op)
        timings = {"import_s": t1 - t0, "resolve_s": t2 - t1, **host.timings}
        return PrepareInfo(weights_mb=host.nbytes / 2**20,
                           cuda_initialized=bool(torch.cuda.is_initialized()),
                           timings={k: round(v, 6) for k, v in timings.items()})

    def load(self, op: p.Load) -> LoadInfo:
        t0 = time.perf_counter()
        from ondemand.model.engine import Engine
        from ondemand.model.resolve import resolve_model

        t1 = time.perf_counter()
        host, self.host = self.host, None
        if host is not None and self._host_key == _key(op):
            # Activation of a standby: only the device side is left (CUDA, copy, warm-up).
            read_before = set(host.timings)  # the prepare's own figures, sent with prepared
            engine = Engine.from_host(host, op.device or "auto")
            del host
            timings = {"standby": 1.0, **{k: v for k, v in engine.timings.items()
                                          if k not in read_before}}
        else:
            del host
            model_dir: Path = resolve_model(
                op.model, revision=op.revision or "master", cache_dir=op.cache_dir or None
            )
            t2 = time.perf_counter()
            engine = Engine.load(model_dir, device=op.device or "auto",
                                 dtype=op.dtype or "float32")
            timings = {"import_s": t1 - t0, "resolve_s": t2 - t1, **engine.timings}
        engine.warm_up()  # the first real request must not be the slow one (Triton warmup)
        self.engine = engine
        timings["warmup_s"] = engine.timings["warmup_s"]
        return LoadInfo(device=str(engine.device), dtype=engine.dtype,
                        timings={k: round(v, 6) for k, v in timings.items()},
                        weights_mb=round(engine.weights_bytes / 2**20, 3))

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
        self._drop_model()

    def _drop_model(self) -> None:
        self.host = None
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.unload()  # drops the weights and calls torch.cuda.empty_cache()


def _key(op: p.Load | p.Prepare) -> tuple[str, str, str, str]:
    """What must match for a Load to use the weights a Prepare read."""
    return (op.model, op.revision, op.cache_dir, op.dtype)

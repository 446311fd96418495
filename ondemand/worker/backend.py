"""The real worker backend: ondemand.model.engine (torch) behind the protocol loop.

torch is imported on the first `prepare` or `load`, so `import_s` in their timings is the
interpreter's share of a cold start (peers.md lesson 8: cold start is imports more than weights).
A standby worker (`prepare`) holds a HostModel (or, when the device is the CPU, an engine already
warmed up); the `load` that follows moves it to the device."""

from __future__ import annotations

import os
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
        # A standby worker's prepared model (Prepare): a model/engine.py HostModel (weights in
        # host memory, for a GPU), or an Engine already built and warmed up on the CPU.
        self.standby: Any = None
        self._standby_key: tuple[str, ...] | None = None
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
        hold nothing on any GPU (docs/ladder.md; tests/test_standby.py trips on any).  When the
        device is the CPU itself there is no device runtime to keep away from, so the engine is
        built and warmed up here too and a load only hands it over."""
        t0 = time.perf_counter()
        import torch

        from ondemand.model.engine import Engine, check_dtype, read_model
        from ondemand.model.resolve import resolve_model

        t1 = time.perf_counter()
        self._drop_model()
        on_cpu = _host_is_the_device(op.device, torch)
        if on_cpu:
            check_dtype(op.dtype or "float32", torch.device("cpu"))  # fp16 on a CPU: fail now
        model_dir: Path = resolve_model(
            op.model, revision=op.revision or "master", cache_dir=op.cache_dir or None
        )
        t2 = time.perf_counter()
        host = read_model(model_dir, dtype=op.dtype or "float32")
        nbytes = host.nbytes
        timings = {"import_s": t1 - t0, "resolve_s": t2 - t1, **host.timings}
        if on_cpu:
            engine = Engine.from_host(host, torch.device("cpu"))
            timings["build_s"] = engine.timings["build_s"]
            timings["warmup_s"] = engine.warm_up()
            self.standby = engine
        else:
            self.standby = host
        self._standby_key = _key(op)
        return PrepareInfo(weights_mb=nbytes / 2**20,
                           cuda_initialized=bool(torch.cuda.is_initialized()),
                           timings={k: round(v, 6) for k, v in timings.items()})

    def load(self, op: p.Load) -> LoadInfo:
        t0 = time.perf_counter()
        from ondemand.model.engine import Engine, HostModel
        from ondemand.model.resolve import resolve_model

        t1 = time.perf_counter()
        timings: dict[str, float]
        ready, self.standby = self.standby, None
        if ready is not None and self._standby_key == _key(op):
            if isinstance(ready, HostModel):
                # Activation on a GPU: only the device side is left (CUDA, copy, warm-up).
                engine = Engine.from_host(ready, op.device or "auto")
                del ready
                engine.warm_up()  # the first real request must not be the slow one
                timings = {"standby": 1.0, **{k: engine.timings[k] for k in (
                    "device_init_s", "to_device_s", "build_s", "warmup_s")
                    if k in engine.timings}}
            else:  # built and warmed up on the CPU by the prepare
                engine = ready
                timings = {"standby": 1.0}
        else:
            del ready
            model_dir: Path = resolve_model(
                op.model, revision=op.revision or "master", cache_dir=op.cache_dir or None
            )
            t2 = time.perf_counter()
            engine = Engine.load(model_dir, device=op.device or "auto",
                                 dtype=op.dtype or "float32")
            engine.warm_up()  # the first real request must not be the slow one (Triton warmup)
            timings = {"import_s": t1 - t0, "resolve_s": t2 - t1, **engine.timings}
        self.engine = engine
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
        self.standby = None
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.unload()  # drops the weights and calls torch.cuda.empty_cache()


def _key(op: p.Load | p.Prepare) -> tuple[str, ...]:
    """What must match for a Load to use what a Prepare read."""
    return (op.model, op.revision, op.cache_dir, op.dtype, op.device)


def _host_is_the_device(spec: str, torch: Any) -> bool:
    """Whether `spec` can only mean the CPU, told without touching CUDA: `cpu`, or `auto` with a
    torch built without CUDA or no GPU made visible (CUDA_VISIBLE_DEVICES empty or -1).
    `torch.backends.cuda.is_built()` is a compile-time flag, not a driver call."""
    if spec == "cpu":
        return True
    if spec != "auto":
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return not torch.backends.cuda.is_built() or (visible is not None
                                                   and visible.strip() in ("", "-1"))

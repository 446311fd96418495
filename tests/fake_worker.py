"""A fake GPU worker for lifecycle tests: the real protocol loop (ondemand.worker.main.serve)
with a backend that needs no torch and misbehaves on request.

Run as `python tests/fake_worker.py`.  Knobs (environment variables):

  FAKE_LOAD_S=0.05        seconds a load takes
  FAKE_INFER_S=0          seconds each batch takes
  FAKE_FAIL_LOAD=1        every load answers load_failed (code model)
  FAKE_EXIT_IN_LOAD=3     the process exits with this code during load
  FAKE_HANG_LOAD=1        load never returns (load timeout)
  FAKE_CRASH_ONCE=PATH    the first batch while PATH does not exist creates it and dies (SIGKILL)
  FAKE_CRASH_KEY=TEXT     any batch holding a clip whose key contains TEXT kills the process
  FAKE_HANG_BATCH=1       batches never return (heartbeats keep coming: a stuck, not a dead,
                          process)
  FAKE_GATE=PATH          each batch waits (heartbeating) until PATH exists, then runs
  FAKE_NAN=TEXT           clips whose key contains TEXT get NaN scores (a model gone non-finite)
  FAKE_IGNORE_SIGTERM=1   SIGTERM is ignored (stop must escalate to SIGKILL)
  FAKE_OOM_ABOVE=N        batches of more than N clips raise OutOfMemory
  FAKE_UNLOAD_S=0         seconds an unload takes (the worker stays `unloading` meanwhile)
  FAKE_EXIT_S=0           seconds the process takes to exit after an `exit` op (or EOF on stdin);
                          with FAKE_EXIT_S > worker.stop_timeout_s the stop escalates to SIGKILL
  FAKE_LOG=PATH           append one JSON line per op: {"pid", "op", "n", "keys"}
  FAKE_SEGMENTS=N         results carry N `segments` ({start_s, end_s, scores}), as segment-level
                          analysis of long recordings would (the console draws them)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ondemand import protocol
from ondemand.errors import ModelError, OutOfMemory
from ondemand.worker.main import LoadInfo, serve

LABELS = ["angry", "happy", "neutral", "sad"]


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _log(op: str, **extra: Any) -> None:
    path = _env("FAKE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "op": op, **extra}) + "\n")


@dataclass
class FakePrediction:
    key: str
    samples: int
    granularity: protocol.Granularity
    embedding: np.ndarray | None = field(default=None)
    nan: bool = False

    def to_json(self) -> dict[str, Any]:
        # Deterministic "scores" from the clip length so tests can check the mapping job->result.
        raw = np.array([1.0 + (self.samples % (7 + i)) for i in range(len(LABELS))])
        scores = (raw / raw.sum()).tolist()
        if self.nan:
            scores = [float("nan")] * len(LABELS)
        top = int(np.argmax(scores))
        out: dict[str, Any] = {
            "key": self.key, "labels": LABELS, "scores": scores,
            "top": {"label": LABELS[top], "score": scores[top]},
            "frames": max(1, (self.samples - 400) // 320 + 1),
            "duration_s": round(self.samples / 16000, 6)}
        n = int(_env("FAKE_SEGMENTS", "0"))
        if n:
            step = out["duration_s"] / n  # segment i peaks on label i (mod the label count)
            out["segments"] = [
                {"start_s": round(i * step, 6), "end_s": round((i + 1) * step, 6),
                 "scores": [0.7 if j == i % len(LABELS) else 0.3 / (len(LABELS) - 1)
                            for j in range(len(LABELS))]}
                for i in range(n)]
        return out


class FakeBackend:
    def __init__(self) -> None:
        self.loaded = False

    def load(self, op: protocol.Load) -> LoadInfo:
        _log("load")
        if _env("FAKE_EXIT_IN_LOAD"):
            os._exit(int(_env("FAKE_EXIT_IN_LOAD")))
        if _env("FAKE_HANG_LOAD"):
            while True:
                time.sleep(3600)
        time.sleep(float(_env("FAKE_LOAD_S", "0.05")))
        if _env("FAKE_FAIL_LOAD"):
            raise ModelError("fake model is broken (FAKE_FAIL_LOAD)")
        self.loaded = True
        return LoadInfo(device="cpu", dtype="float32",
                        timings={"import_s": 0.0, "weights_s": 0.01, "warmup_s": 0.01})

    def infer(
        self,
        clips: Sequence[tuple[str, np.ndarray]],
        *,
        granularity: protocol.Granularity,
        embeddings: bool,
        batch_audio_s: float | None,
    ) -> list[FakePrediction]:
        keys = [k for k, _ in clips]
        _log("infer", n=len(clips), keys=keys)
        once = _env("FAKE_CRASH_ONCE")
        if once and not Path(once).exists():
            Path(once).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        crash_key = _env("FAKE_CRASH_KEY")
        if crash_key and any(crash_key in k for k in keys):
            os._exit(11)
        if _env("FAKE_HANG_BATCH"):
            while True:
                time.sleep(3600)
        gate = _env("FAKE_GATE")
        while gate and not Path(gate).exists():
            time.sleep(0.01)
        limit = _env("FAKE_OOM_ABOVE")
        if limit and len(clips) > int(limit):
            raise OutOfMemory(f"fake OOM: {len(clips)} clips > {limit}")
        time.sleep(float(_env("FAKE_INFER_S", "0")))
        nan = _env("FAKE_NAN")
        out = []
        for key, samples in clips:
            emb = np.full(4, float(len(samples)), dtype=np.float32) if embeddings else None
            out.append(FakePrediction(key, len(samples), granularity, emb,
                                      nan=bool(nan) and nan in key))
        return out

    labels = LABELS
    budget_s = 6.0

    def speech_probs(self, source: Any, start: int, stop: int) -> np.ndarray:
        """A stand-in for Silero VAD: loud 512-sample windows are speech."""
        x = source.read(start, stop)
        n = -(-len(x) // 512)
        x = np.pad(x, (0, n * 512 - len(x)))
        rms = np.sqrt((x.reshape(n, 512).astype(np.float64) ** 2).mean(axis=1))
        return np.clip(rms * 10, 0.0, 1.0).astype(np.float32)

    def unload(self) -> None:
        _log("unload")
        time.sleep(float(_env("FAKE_UNLOAD_S", "0")))
        self.loaded = False


if __name__ == "__main__":
    if _env("FAKE_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = serve(FakeBackend())
    time.sleep(float(_env("FAKE_EXIT_S", "0")))  # a slow exit: releasing memory, flushing
    sys.exit(code)

"""The worker's protocol loop (docs/design.md, "Worker protocol"), independent of torch.

`serve(backend)` speaks the JSON-lines protocol on stdin/stdout; the backend does the work.  The
real backend (`TorchBackend`) imports ondemand.model.engine lazily on the first load; the tests'
fake worker runs this same loop with a misbehaving backend, so the protocol under test is the
real one.

Invariants:
- The protocol owns the original stdout; file descriptor 1 is pointed at stderr at start, so a
  stray print() from a library can never corrupt the protocol stream.
- The worker never outlives the daemon: EOF on stdin ends it, and on Linux the kernel SIGKILLs it
  when its parent dies (PR_SET_PDEATHSIG), so a `kill -9` of the front end cannot leave a GPU
  process behind computing for nobody.
- An `infer` always gets exactly one answer: `result` (with per-job errors) or `batch_failed`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from ondemand.errors import AudioError, OndemandError, OutOfMemory
from ondemand.spool import read_npy, write_npy

log = logging.getLogger("ondemand.worker")

PR_SET_PDEATHSIG = 1


class PredictionLike(Protocol):
    embedding: np.ndarray | None

    def to_json(self) -> dict[str, Any]: ...


class Backend(Protocol):
    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Load and warm up; return {"device", "dtype", "timings"}.  Raise OndemandError."""

    def infer(
        self,
        clips: Sequence[tuple[str, np.ndarray]],
        *,
        granularity: str,
        embeddings: bool,
        batch_audio_s: float | None,
    ) -> Sequence[PredictionLike]:
        """Predictions in clip order.  Raise OutOfMemory when the batch does not fit."""

    def unload(self) -> None: ...


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent (the daemon) dies; best effort elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _protocol_stream() -> IO[str]:
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


class Worker:
    def __init__(self, backend: Backend, out: IO[str]) -> None:
        self.backend = backend
        self.out = out
        self.loaded = False

    def send(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def handle(self, msg: dict[str, Any]) -> bool:
        """Handle one op; False when the worker should exit."""
        op = msg.get("op")
        if op == "load":
            self.load(msg)
        elif op == "infer":
            self.infer(msg)
        elif op == "unload":
            self.unload()
        elif op == "exit":
            return False
        else:
            log.warning("unknown op %r ignored", op)
        return True

    def load(self, msg: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        if self.loaded:
            self.backend.unload()
            self.loaded = False
        try:
            info = self.backend.load(msg)
        except OndemandError as e:
            self.send({"event": "load_failed", "code": e.code, "message": e.message})
            return
        except Exception as e:  # a bug or an unexpected library error: report, stay alive
            log.exception("load failed")
            self.send({"event": "load_failed", "code": "internal",
                       "message": f"{type(e).__name__}: {e}"})
            return
        self.loaded = True
        self.send({"event": "loaded", "seconds": round(time.perf_counter() - t0, 6), **info})

    def unload(self) -> None:
        if self.loaded:
            self.backend.unload()
            self.loaded = False
        gc.collect()
        self.send({"event": "unloaded"})

    def infer(self, msg: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        batch = msg.get("batch")
        if not self.loaded:
            self.send({"event": "batch_failed", "batch": batch, "code": "not_loaded",
                       "message": "the model is not loaded"})
            return
        items: list[dict[str, Any]] = list(msg.get("items", []))
        results: list[dict[str, Any]] = []
        clips: list[tuple[str, np.ndarray]] = []
        runnable: list[dict[str, Any]] = []
        for item in items:
            try:
                samples = read_npy(item["audio"])
            except (OSError, AudioError) as e:
                log.warning("job %s: spooled audio unreadable: %s", item.get("job"), e)
                results.append({"job": item["job"], "error": {
                    "code": "audio_missing",
                    "message": "the job's spooled audio is missing or unreadable; submit again"}})
                continue
            clips.append((str(item.get("key") or item["job"]), samples))
            runnable.append(item)
        if clips:
            try:
                preds = self.backend.infer(
                    clips,
                    granularity=str(msg.get("granularity", "utterance")),
                    embeddings=any(i.get("embedding") for i in runnable),
                    batch_audio_s=msg.get("batch_audio_s"),
                )
            except OutOfMemory as e:
                self.send({"event": "batch_failed", "batch": batch, "code": e.code,
                           "message": e.message})
                return
            except OndemandError as e:
                self.send({"event": "batch_failed", "batch": batch, "code": e.code,
                           "message": e.message})
                return
            except Exception as e:
                log.exception("batch %s failed", batch)
                self.send({"event": "batch_failed", "batch": batch, "code": "internal",
                           "message": f"{type(e).__name__}: {e}"})
                return
            for item, pred in zip(runnable, preds, strict=True):
                if item.get("embedding") and pred.embedding is not None:
                    write_npy(Path(item["embedding"]),
                              np.asarray(pred.embedding, dtype=np.float32), durable=False)
                results.append({"job": item["job"], "result": pred.to_json()})
        self.send({"event": "result", "batch": batch, "results": results,
                   "seconds": round(time.perf_counter() - t0, 6)})


def serve(backend: Backend) -> int:
    """Run the protocol on this process's stdin/stdout until `exit` or EOF."""
    die_with_parent()
    out = _protocol_stream()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    worker = Worker(backend, out)
    worker.send({"event": "hello", "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("ignoring a non-JSON line: %.200r", line)
            continue
        if not worker.handle(msg):
            break
    return 0


def main() -> int:
    from ondemand.worker.backend import TorchBackend

    return serve(TorchBackend())

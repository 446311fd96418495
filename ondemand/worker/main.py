"""The worker's protocol loop (docs/design.md, "Worker protocol"), independent of torch.

`serve(backend)` speaks the JSON-lines protocol (ondemand/protocol.py) on stdin/stdout; the
backend does the work.  The real backend (`TorchBackend`) imports ondemand.model.engine lazily on
the first load; the tests' fake worker runs this same loop with a misbehaving backend, so the
protocol under test is the real one.

Invariants:
- The protocol owns the original stdout; file descriptor 1 is pointed at stderr at start, so a
  stray print() from a library can never corrupt the protocol stream.
- The worker never outlives the daemon: EOF on stdin ends it, and on Linux the kernel SIGKILLs it
  when its parent dies (PR_SET_PDEATHSIG), so a `kill -9` of the front end cannot leave a GPU
  process behind computing for nobody.
- An `infer` always gets exactly one answer: `result` (with per-job errors) or `batch_failed`.
- Every line in and out goes through ondemand/protocol.py (`decode_op`, `encode`); a line that is
  not an op is logged and ignored in `serve`, nowhere else.  Lines are written whole under one
  lock: the heartbeat thread and the loop never interleave.
- While on a batch the worker sends `heartbeat` every `Infer.heartbeat_s` from a thread, so a long
  batch (the GIL is released in the model's kernels and in I/O) still beats; only a stopped or
  hung process goes silent, and the daemon kills it (issue 10: a SIGSTOPped worker stalled
  everything for minutes with nothing logged).  No heartbeat follows the batch's answer.
- A prediction or embedding holding NaN or Inf is never sent as a result: that job gets the
  error `non_finite_output`, its batch-mates are unaffected (issue 10: NaN scores stored `done`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from ondemand import protocol as p
from ondemand.errors import (
    AudioError,
    AudioMissing,
    NonFiniteOutput,
    NotLoaded,
    OndemandError,
    ProtocolError,
    StorageFull,
)
from ondemand.spool import read_npy, write_npy
from ondemand.worker import segmented

log = logging.getLogger("ondemand.worker")

PR_SET_PDEATHSIG = 1


class PredictionLike(Protocol):
    embedding: np.ndarray | None

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LoadInfo:
    """What a backend reports after a load; the loop adds its seconds and sends `Loaded`."""

    device: str
    dtype: str
    timings: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    def load(self, op: p.Load) -> LoadInfo:
        """Load and warm up.  Raise OndemandError."""

    def infer(
        self,
        clips: Sequence[tuple[str, np.ndarray]],
        *,
        granularity: p.Granularity,
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


def _reported(e: Exception, what: str) -> p.ErrorInfo:
    """`e` as the error the daemon gets: ours with its code, anything else (a bug or an
    unexpected library error) as internal, its traceback in our log."""
    if isinstance(e, OndemandError):
        return p.ErrorInfo(e.code, e.message)
    log.error("%s failed", what, exc_info=e)
    return p.ErrorInfo(OndemandError.code, f"{type(e).__name__}: {e}")


def _finite(value: Any) -> bool:
    """Whether every number in a prediction's JSON (nested lists and objects) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


class Worker:
    def __init__(self, backend: Backend, out: IO[str]) -> None:
        self.backend = backend
        self.out = out
        self.loaded = False
        self._out_lock = threading.Lock()  # the loop and the heartbeat thread both write

    def send(self, event: p.Event) -> None:
        line = p.encode(event)
        with self._out_lock:
            self.out.write(line)
            self.out.flush()

    @contextlib.contextmanager
    def _beating(self, op: p.Infer) -> Iterator[None]:
        """Send `heartbeat` every op.heartbeat_s from a thread until the block ends."""
        period = op.heartbeat_s
        if not period or period <= 0:
            yield
            return
        stop = threading.Event()
        t0 = time.perf_counter()

        def beat() -> None:
            while not stop.wait(period):
                try:
                    self.send(p.Heartbeat(batch=op.batch,
                                          seconds=round(time.perf_counter() - t0, 3)))
                except (OSError, ValueError):  # the daemon is gone: EOF on stdin ends us
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{op.batch}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def handle(self, op: p.Op) -> bool:
        """Handle one op; False when the worker should exit."""
        if isinstance(op, p.Load):
            self.load(op)
        elif isinstance(op, p.Infer):
            self.infer(op)
        elif isinstance(op, p.Unload):
            self.unload()
        return not isinstance(op, p.Exit)

    def load(self, op: p.Load) -> None:
        t0 = time.perf_counter()
        if self.loaded:
            self.backend.unload()
            self.loaded = False
        try:
            info = self.backend.load(op)
        except Exception as e:  # report it and stay alive: the daemon decides what is next
            err = _reported(e, "load")
            self.send(p.LoadFailed(code=err.code, message=err.message))
            return
        self.loaded = True
        self.send(p.Loaded(seconds=round(time.perf_counter() - t0, 6), device=info.device,
                           dtype=info.dtype, timings=info.timings))

    def unload(self) -> None:
        if self.loaded:
            self.backend.unload()
            self.loaded = False
        gc.collect()
        self.send(p.Unloaded())

    def infer(self, op: p.Infer) -> None:
        t0 = time.perf_counter()
        if not self.loaded:
            self.send(p.BatchFailed(batch=op.batch, code=NotLoaded.code,
                                    message="the model is not loaded"))
            return
        with self._beating(op):
            answer = self._run_batch(op, t0)
        self.send(answer)

    def _run_batch(self, op: p.Infer, t0: float) -> p.Result | p.BatchFailed:
        results: list[p.ItemResult] = []
        clips: list[tuple[str, np.ndarray]] = []
        runnable: list[p.InferItem] = []
        timelines = [i for i in op.items if i.segments is not None]  # issue 12: segmented jobs
        if timelines:
            done = segmented.run(self.backend, op, timelines, self.send, _reported)
            if isinstance(done, p.BatchFailed):
                return done
            results.extend(done)
        for item in op.items:
            if item.segments is not None:
                continue
            try:
                samples = read_npy(item.audio)
            except (OSError, AudioError) as e:
                log.warning("job %s: spooled audio unreadable: %s", item.job, e)
                results.append(p.ItemResult(item.job, error=p.ErrorInfo(
                    AudioMissing.code,
                    "the job's spooled audio is missing or unreadable; submit again")))
                continue
            clips.append((item.key or item.job, samples))
            runnable.append(item)
        if clips:
            try:
                preds = self.backend.infer(
                    clips,
                    granularity=op.granularity,
                    embeddings=any(i.embedding for i in runnable),
                    batch_audio_s=op.batch_audio_s,
                )
            except Exception as e:  # out_of_memory: the dispatcher retries the batch in halves
                err = _reported(e, f"batch {op.batch}")
                return p.BatchFailed(batch=op.batch, code=err.code, message=err.message)
            for item, pred in zip(runnable, preds, strict=True):
                results.append(self._item(item, pred))
        return p.Result(batch=op.batch, seconds=round(time.perf_counter() - t0, 6),
                        results=tuple(results))

    @staticmethod
    def _item(item: p.InferItem, pred: PredictionLike) -> p.ItemResult:
        result = pred.to_json()
        emb = None
        if item.embedding and pred.embedding is not None:
            emb = np.asarray(pred.embedding, dtype=np.float32)
        if not _finite(result) or (emb is not None and not np.isfinite(emb).all()):
            what = "scores" if not _finite(result) else "embedding"
            log.warning("job %s: the model's %s hold NaN or Inf; the job fails", item.job, what)
            return p.ItemResult(item.job, error=p.ErrorInfo(
                NonFiniteOutput.code,
                f"the model produced NaN or infinite {what} for this clip, so no result was "
                "stored; check the audio (silence, clipping, extreme values) and submit again"))
        if emb is not None and item.embedding:
            try:
                write_npy(Path(item.embedding), emb, durable=False)
            except OSError as e:  # a full disk: the daemon requeues the job and backs off
                log.warning("job %s: cannot write the embedding: %s", item.job, e)
                return p.ItemResult(item.job, error=p.ErrorInfo(
                    StorageFull.code, f"the embedding could not be written ({e})"))
        return p.ItemResult(item.job, result=result)


def serve(backend: Backend) -> int:
    """Run the protocol on this process's stdin/stdout until `exit` or EOF."""
    die_with_parent()
    out = _protocol_stream()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    worker = Worker(backend, out)
    worker.send(p.Hello(pid=os.getpid()))
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            op = p.decode_op(line)
        except ProtocolError as e:
            # The one place a malformed op is handled.  The daemon encodes with the same module,
            # so this is a bug: the line is ignored; what it asked for times out over there.
            log.warning("worker pid=%d ignored a line that is not the protocol: %s",
                        os.getpid(), e)
            continue
        if not worker.handle(op):
            break
    return 0


def main() -> int:
    from ondemand.worker.backend import TorchBackend

    return serve(TorchBackend())

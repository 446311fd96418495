"""The worker's side of segmented jobs (issue 12), without torch: the items of an `infer` op that
carry `segments` are run through `ondemand.timeline` on the backend's model and voice-activity
detector, reading each recording's spool file through a memory map (`spool.SpoolReader`), and
`progress` events go to the daemon between model batches.

Failures map as for whole clips: an unreadable spool file is that job's `audio_missing`; NaN
scores its `non_finite_output`; an embedding that cannot be written its `insufficient_storage`
(the dispatcher requeues it); anything the model raises (out of memory) fails the whole op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ondemand import protocol as p
from ondemand import timeline
from ondemand.errors import AudioError, AudioMissing, NonFiniteOutput, StorageFull
from ondemand.spool import SpoolReader

log = logging.getLogger("ondemand.worker")

DEFAULT_BUDGET_S = 6.0  # a backend that does not say its batch budget
POOL_BATCHES = 4  # segments pooled per model call: this many batches' worth of audio


def run(backend: Any, op: p.Infer, items: Sequence[p.InferItem],
        send: Callable[[p.Event], None],
        reported: Callable[[Exception, str], p.ErrorInfo]) -> list[p.ItemResult] | p.BatchFailed:
    results: list[p.ItemResult] = []
    readers: list[SpoolReader] = []
    runnable: list[tuple[p.InferItem, timeline.Recording]] = []
    try:
        for item in items:
            assert item.segments is not None
            try:
                reader = SpoolReader(item.audio)
            except (OSError, AudioError) as e:
                log.warning("job %s: spooled audio unreadable: %s", item.job, e)
                results.append(p.ItemResult(item.job, error=p.ErrorInfo(
                    AudioMissing.code,
                    "the job's spooled audio is missing or unreadable; submit again")))
                continue
            readers.append(reader)
            runnable.append((item, timeline.Recording(
                key=item.key or item.job, source=reader, spec=item.segments,
                embedding=Path(item.embedding) if item.embedding else None)))
        if not runnable:
            return results

        def infer(clips: Sequence[tuple[str, Any]], embeddings: bool) -> Any:
            try:
                return backend.infer(clips, granularity="utterance", embeddings=embeddings,
                                     batch_audio_s=op.batch_audio_s)
            finally:
                trim_heap()

        def progress(i: int, done_s: float, total_s: float) -> None:
            send(p.Progress(batch=op.batch, job=runnable[i][0].job, done_s=done_s,
                            total_s=total_s))

        default: float = getattr(backend, "budget_s", DEFAULT_BUDGET_S)
        budget = op.batch_audio_s or default
        try:
            outs = timeline.run([r for _, r in runnable], infer=infer,
                                speech_probs=getattr(backend, "speech_probs", None),
                                pool_s=POOL_BATCHES * budget, on_progress=progress,
                                labels=getattr(backend, "labels", ()))
        except Exception as e:  # out_of_memory: the dispatcher retries the batch in halves
            err = reported(e, f"batch {op.batch}")
            return p.BatchFailed(batch=op.batch, code=err.code, message=err.message)
        for (item, _), out in zip(runnable, outs, strict=True):
            results.append(_item(item, out))
        return results
    finally:
        for reader in readers:
            reader.close()


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give freed heap pages back after each pool of segments: over an hour of batches of
    varying shapes glibc's arenas otherwise keep growing the worker's resident set (fp32 peak
    +83 MB for 60 minutes against 10 before this, docs/benchmarks.md)."""
    if _TRIM is not None:
        _TRIM(0)


def _item(item: p.InferItem, out: dict[str, Any] | BaseException) -> p.ItemResult:
    if isinstance(out, dict):
        return p.ItemResult(item.job, result=out)
    if isinstance(out, timeline.NonFinite):
        log.warning("job %s: the model's %s hold NaN or Inf; the job fails", item.job, out)
        return p.ItemResult(item.job, error=p.ErrorInfo(
            NonFiniteOutput.code,
            f"the model produced NaN or infinite values ({out}), so no result was stored; "
            "check the audio (silence, clipping, extreme values) and submit again"))
    log.warning("job %s: cannot write the embedding: %s", item.job, out)
    return p.ItemResult(item.job, error=p.ErrorInfo(
        StorageFull.code, f"the embedding could not be written ({out})"))

"""Run segmented recordings through a model: the timeline runner (no torch; the model and the
voice-activity detector are passed in as functions).

Used by the worker for jobs submitted with `segments` (ondemand/worker/main.py) and by
`Engine.infer_recording` (`ondemand infer --segments`).  For each recording it reads the audio a
block at a time (a `Source`: the worker's is the spool file's memory map), finds its segments
(Silero VAD probabilities -> `segments.VadSegmenter`, or `segments.fixed_windows`), and pools
ready segments *across the recordings* of the call; a full pool is one `infer` call, which
plans its model batches with `batching.plan_batches` like any other clips.

Invariants:
- Memory follows the pool and the VAD block, not the recording: the recordings advance in turn
  one VAD block (`block_s`) at a time, and the pool is classified once it holds `pool_s` of
  audio; only the segments' spans and scores are kept (a few hundred bytes each: the result).
- A recording's segments are classified and their embedding rows written in time order (pools
  are filled in time order per recording and `infer` answers in clip order).
- Progress: `done_s` is the time before which every segment is classified; it never goes back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ondemand import segments as seg
from ondemand.protocol import Segmenting
from ondemand.spool import NpyWriter

log = logging.getLogger(__name__)

SAMPLE_RATE = seg.SAMPLE_RATE
BLOCK_S = 256.0  # VAD block: a multiple of VAD_WINDOW samples
MIN_POOL_S = 30.0
PROGRESS_EVERY_S = 1.0


class Source(Protocol):
    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArraySource:
    """A recording already in memory (the engine's callers)."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.samples[max(0, start):stop], dtype=np.float32)


class PredictionLike(Protocol):
    embedding: np.ndarray | None

    def to_json(self) -> dict[str, Any]: ...


# infer(clips [(key, samples)], embeddings) -> predictions in clip order
Infer = Callable[[Sequence[tuple[str, np.ndarray]], bool], Sequence[PredictionLike]]
# speech_probs(source, start, stop) -> one probability per VAD_WINDOW samples of [start, stop)
SpeechProbs = Callable[[Source, int, int], np.ndarray]
# on_progress(index of the recording, done_s, total_s)
OnProgress = Callable[[int, float, float], None]


@dataclass
class Recording:
    key: str
    source: Source
    spec: Segmenting
    embedding: Path | None = None  # where to write one row per segment


class NonFinite(Exception):
    """The model gave NaN or Inf for a segment; the recording fails (non_finite_output)."""


@dataclass
class _Run:
    rec: Recording
    total: int
    spans: list[tuple[int, int]] = field(default_factory=list)  # fixed: all; vad: found so far
    next_span: int = 0  # spans[:next_span] are in the pool or classified
    vad: seg.VadSegmenter | None = None
    cursor: int = 0  # samples given to the VAD
    scored: list[seg.Scored] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    writer: NpyWriter | None = None
    failed: BaseException | None = None
    reported: float = -1.0  # done_s last reported
    reported_at: float = 0.0

    @property
    def found_all(self) -> bool:
        return self.vad is None or self.cursor >= self.total

    @property
    def finished(self) -> bool:
        return self.found_all and self.next_span >= len(self.spans)

    def done_samples(self) -> int:
        """Samples before which every segment is classified (or known to be none)."""
        if self.failed is not None or self.finished:
            return self.total
        pending = self.spans[len(self.scored)][0] if len(self.scored) < len(self.spans) else None
        settled = self.total if self.vad is None else self.vad.done_samples
        return min(settled, pending) if pending is not None else settled


def run(recordings: Sequence[Recording], *, infer: Infer, speech_probs: SpeechProbs | None,
        pool_s: float, on_progress: OnProgress | None = None, labels: Sequence[str] = (),
        block_s: float = BLOCK_S) -> list[dict[str, Any] | BaseException]:
    """Each recording's timeline result (`segments.timeline`), or the exception that failed
    it (NonFinite, OSError writing its embedding); `infer`'s own exceptions (out of memory)
    propagate and fail the call.  `labels`: the model's, for a recording with no segment."""
    block = max(seg.VAD_WINDOW, int(block_s * SAMPLE_RATE) // seg.VAD_WINDOW * seg.VAD_WINDOW)
    pool_samples = int(max(pool_s, MIN_POOL_S) * SAMPLE_RATE)
    runs = [_start(r, labels) for r in recordings]
    pool: list[tuple[_Run, int, int]] = []
    pooled = 0
    try:
        while True:
            active = [r for r in runs if not r.finished and r.failed is None]
            if not active:
                break
            for r in active:
                _advance(r, block, speech_probs)
                while r.next_span < len(r.spans):
                    s, e = r.spans[r.next_span]
                    r.next_span += 1
                    pool.append((r, s, e))
                    pooled += e - s
                    if pooled >= pool_samples:
                        _classify(pool, infer)
                        pool, pooled = [], 0
                        _report(runs, on_progress)
            _report(runs, on_progress)
        _classify(pool, infer)
        _report(runs, on_progress, final=True)
        return [_result(r) for r in runs]
    finally:
        for r in runs:
            if r.writer is not None:
                r.writer.abort()  # a finished writer has been closed already (a no-op then)


def _start(rec: Recording, labels: Sequence[str]) -> _Run:
    total = len(rec.source)
    r = _Run(rec, total, labels=list(labels))
    if rec.spec.mode == "fixed":
        r.spans = seg.fixed_windows(total, rec.spec.window_s, rec.spec.hop_s)
    else:
        r.vad = seg.VadSegmenter(rec.spec, total)
    return r


def _advance(r: _Run, block: int, speech_probs: SpeechProbs | None) -> None:
    """One VAD block of the recording: its probabilities -> the segments they settle."""
    if r.vad is None or r.cursor >= r.total:
        return
    if speech_probs is None:
        raise RuntimeError("segments=vad needs a voice-activity detector")
    stop = min(r.total, r.cursor + block)
    probs = speech_probs(r.rec.source, r.cursor, stop)
    r.cursor = stop
    r.spans += r.vad.feed(probs)
    if r.cursor >= r.total:
        r.spans += r.vad.finish()


def _classify(pool: list[tuple[_Run, int, int]], infer: Infer) -> None:
    live = [(r, s, e) for r, s, e in pool if r.failed is None]
    if not live:
        return
    clips = [(f"{r.rec.key}@{s / SAMPLE_RATE:.2f}", r.rec.source.read(s, e)) for r, s, e in live]
    embeddings = any(r.rec.embedding is not None for r, _, _ in live)
    preds = infer(clips, embeddings)
    del clips
    for (r, s, e), pred in zip(live, preds, strict=True):
        if r.failed is not None:
            continue
        try:
            _record(r, s, e, pred)
        except (NonFinite, OSError) as exc:
            r.failed = exc
            if r.writer is not None:
                r.writer.abort()
                r.writer = None


def _record(r: _Run, s: int, e: int, pred: PredictionLike) -> None:
    doc = pred.to_json()
    scores = [float(x) for x in doc.get("scores") or []]
    if not all(math.isfinite(x) for x in scores):
        raise NonFinite(f"scores of the segment at {s / SAMPLE_RATE:.2f} s")
    r.labels = list(doc.get("labels") or [])
    r.scored.append(seg.Scored(s, e, scores, int(doc.get("frames") or 0)))
    if r.rec.embedding is not None and pred.embedding is not None:
        row = np.asarray(pred.embedding, dtype=np.float32).reshape(1, -1)
        if not np.isfinite(row).all():
            raise NonFinite(f"embedding of the segment at {s / SAMPLE_RATE:.2f} s")
        if r.writer is None:
            r.writer = NpyWriter(r.rec.embedding, row=row.shape[1:], durable=False)
        r.writer.write(row)


def _report(runs: Sequence[_Run], on_progress: OnProgress | None, *, final: bool = False) -> None:
    if on_progress is None:
        return
    now = time.monotonic()
    for i, r in enumerate(runs):
        done = r.done_samples() / SAMPLE_RATE
        if done > r.reported and (final or now - r.reported_at >= PROGRESS_EVERY_S):
            r.reported, r.reported_at = done, now
            on_progress(i, round(done, 3), round(r.total / SAMPLE_RATE, 3))


def _result(r: _Run) -> dict[str, Any] | BaseException:
    if r.failed is not None:
        return r.failed
    if r.rec.embedding is not None:
        if r.writer is None:  # no segment at all: an empty (0, 0) array says so
            r.writer = NpyWriter(r.rec.embedding, row=(0,), durable=False)
        r.writer.close()
        r.writer = None
    return seg.timeline(r.rec.key, r.total, r.labels, r.scored)

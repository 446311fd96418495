"""Segments of a long recording and the arithmetic of its timeline (pure: numpy, no torch, no I/O).

- `make_spec`: a job's `segments` option (none | vad | fixed, window_s, hop_s) checked and
  completed with the [segments] settings into the `protocol.Segmenting` that travels with it.
- `fixed_windows`: windows of `window_s` every `hop_s` over the whole recording.
- `VadSegmenter`: speech segments from Silero VAD's per-window speech probabilities, fed in time
  order block by block (the worker reads an hour-long recording a block at a time): hysteresis
  (speech starts at `vad_threshold`, ends below it - 0.15), runs merged across pauses shorter than
  `merge_pause_s`, bursts shorter than `min_speech_s` dropped, stretches longer than
  `max_segment_s` split at their quietest window, `pad_s` of context added at each side.
- `summarize`: the duration-weighted mean scores, the dominant label, each label's share of the
  time.  Overlapping windows (hop < window) would count the overlap twice, so each segment is
  weighted by the part of the timeline it *owns*: its span, cut where it overlaps a neighbour at
  the midpoint of their centres (each of a fixed run's windows owns one hop).  The owned spans
  never overlap, so the shares sum to 1.

Invariants: segments come out in time order, never overlap (fixed windows overlap by design and
are ordered by start), lie within [0, total], and are never shorter than `MIN_SAMPLES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ondemand.protocol import SEGMENT_MODES, Segmenting

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # ondemand.audio's: one model frame
VAD_WINDOW = 512  # Silero VAD at 16 kHz: one probability per 512 samples (32 ms)
MIN_WINDOW_S = 0.5  # fixed windows: shorter ones say little (emotion2vec #41: 1-2 s is poor)
MIN_HOP_S = 0.1
MAX_OVERLAP = 10  # window_s / hop_s: each second classified at most this many times
MODES = ("none", *SEGMENT_MODES)


class SpecError(ValueError):
    """A bad `segments`/`window_s`/`hop_s` option; the message says what is accepted."""


def make_spec(mode: str, *, window_s: float | None = None, hop_s: float | None = None,
              settings: Any = None) -> Segmenting | None:
    """The job's segmenting, or None for `none`.  `settings` is a config.SegmentsConfig (its
    fields fill what the request does not say); raises SpecError."""
    if mode not in MODES:
        raise SpecError(f"segments must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        if window_s is not None or hop_s is not None:
            raise SpecError("window_s and hop_s apply to segments=fixed only")
        return None
    base = Segmenting(mode="vad") if settings is None else Segmenting(
        mode="vad", window_s=settings.window_s, hop_s=settings.hop_s,
        vad_threshold=settings.vad_threshold, min_speech_s=settings.min_speech_s,
        merge_pause_s=settings.merge_pause_s, max_segment_s=settings.max_segment_s,
        pad_s=settings.pad_s)
    if mode == "vad":
        if window_s is not None or hop_s is not None:
            raise SpecError("window_s and hop_s apply to segments=fixed; segments=vad cuts at "
                            "the pauses (settings: [segments] in config.toml)")
        return base
    window = base.window_s if window_s is None else window_s
    hop = base.hop_s if hop_s is None else hop_s
    if not (math.isfinite(window) and MIN_WINDOW_S <= window <= base.max_segment_s):
        raise SpecError(f"window_s must be between {MIN_WINDOW_S:g} and {base.max_segment_s:g} "
                        f"seconds (segments.max_segment_s), got {window:g}")
    if not (math.isfinite(hop) and hop >= max(MIN_HOP_S, window / MAX_OVERLAP)):
        raise SpecError(f"hop_s must be at least {max(MIN_HOP_S, window / MAX_OVERLAP):g} "
                        f"seconds (window_s / {MAX_OVERLAP}), got {hop:g}")
    return Segmenting(mode="fixed", window_s=window, hop_s=hop,
                      vad_threshold=base.vad_threshold, min_speech_s=base.min_speech_s,
                      merge_pause_s=base.merge_pause_s, max_segment_s=base.max_segment_s,
                      pad_s=base.pad_s)


def longest_segment_s(spec: Segmenting) -> float:
    """The longest segment `spec` can produce: what the batch planner plans with."""
    return spec.window_s if spec.mode == "fixed" else spec.max_segment_s


def fixed_windows(total: int, window_s: float, hop_s: float) -> list[tuple[int, int]]:
    """[start, end) sample spans: every hop a window; the last one ends at `total` (a full
    window ending there, so the tail is classified on as much audio as the others)."""
    w = max(MIN_SAMPLES, round(window_s * SAMPLE_RATE))
    h = max(1, round(hop_s * SAMPLE_RATE))
    if total <= w:
        return [(0, total)] if total >= MIN_SAMPLES else []
    spans = [(s, s + w) for s in range(0, total - w + 1, h)]
    if spans[-1][1] < total:
        spans.append((total - w, total))
    return spans


class VadSegmenter:
    """Speech segments from per-window speech probabilities, fed in order.

        seg = VadSegmenter(spec, total_samples)
        for probs in blocks:            # VAD_WINDOW samples per probability
            done += seg.feed(probs)     # segments that can no longer change
        done += seg.finish()

    Memory: the probabilities of the open region only (at most `max_segment_s` of them)."""

    def __init__(self, spec: Segmenting, total: int) -> None:
        per_s = SAMPLE_RATE / VAD_WINDOW
        self.total = total
        self.on = spec.vad_threshold
        self.off = max(spec.vad_threshold - 0.15, 0.01)
        self.merge_w = round(spec.merge_pause_s * per_s)
        self.min_w = round(spec.min_speech_s * per_s)
        self.pad = round(spec.pad_s * SAMPLE_RATE)
        usable = spec.max_segment_s - 2 * spec.pad_s
        self.max_w = max(2, math.floor(max(usable, spec.max_segment_s / 2) * per_s))
        self.pos = 0  # windows consumed
        self.speaking = False
        self.start: int | None = None  # window where the open region starts
        self.last_end = 0  # window after the open region's last finished speech run
        self.cut = False  # the open region starts at a split: no padding before it
        self.probs: list[float] = []  # from `start` to `pos`
        self.prev_end = 0  # sample where the last emitted segment ends
        self.out: list[tuple[int, int]] = []

    @property
    def done_samples(self) -> int:
        """Samples before which nothing will change any more."""
        settled = self.pos if self.start is None else self.start
        return min(self.total, settled * VAD_WINDOW)

    def feed(self, probs: np.ndarray | Sequence[float]) -> list[tuple[int, int]]:
        for p in np.asarray(probs, dtype=np.float64).tolist():
            self._step(p)
        out, self.out = self.out, []
        return out

    def finish(self) -> list[tuple[int, int]]:
        if self.start is not None:
            if self.speaking:
                self.last_end = self.pos
            self._emit(self.start, self.last_end, pad_end=True)
            self.start = None
        out, self.out = self.out, []
        return out

    def _step(self, p: float) -> None:
        i = self.pos
        self.pos += 1
        if self.speaking:
            if p < self.off:
                self.speaking = False
                self.last_end = i
        elif p >= self.on:
            if self.start is not None and i - self.last_end >= self.merge_w:
                self._emit(self.start, self.last_end, pad_end=True)
                self.start = None
            self.speaking = True
            if self.start is None:
                self.start, self.probs, self.cut = i, [], False
        if self.start is None:
            return
        self.probs.append(p)
        if not self.speaking and self.pos - self.last_end >= self.merge_w:
            self._emit(self.start, self.last_end, pad_end=True)
            self.start = None
        elif self.pos - self.start > self.max_w:
            self._split()

    def _split(self) -> None:
        """The open region is longer than max_segment_s: cut it at its quietest window in the
        second half of the allowed length, emit the first part, keep the rest open."""
        assert self.start is not None
        lo = self.max_w // 2
        window = self.probs[lo : self.max_w + 1]
        cut = self.start + lo + int(np.argmin(window))
        cut = max(cut, self.start + 1)
        self._emit(self.start, cut, pad_end=False)
        self.probs = self.probs[cut - self.start:]
        if not self.speaking and self.last_end <= cut:
            self.start = None  # what is left of it is pause
        else:
            self.start, self.cut = cut, True

    def _emit(self, start_w: int, end_w: int, *, pad_end: bool) -> None:
        if end_w - start_w < max(self.min_w, 1):
            return
        start = start_w * VAD_WINDOW - (0 if self.cut else self.pad)
        end = min(end_w * VAD_WINDOW + (self.pad if pad_end else 0), self.total)
        start = max(start, self.prev_end, 0)
        if end - start >= MIN_SAMPLES:
            self.out.append((start, end))
            self.prev_end = end


@dataclass(frozen=True)
class Scored:
    """One classified segment: its span in samples and its scores (in `labels` order)."""

    start: int
    end: int
    scores: Sequence[float]
    frames: int = 0


def owned_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[float, float]]:
    """The part of the timeline each span owns (see the module docstring), in samples."""
    owned = [(float(s), float(e)) for s, e in spans]
    for i in range(len(spans) - 1):
        (s0, e0), (s1, e1) = spans[i], spans[i + 1]
        if e0 > s1:  # overlap: cut at the midpoint of the centres, inside the overlap
            cut = min(max((s0 + e0 + s1 + e1) / 4, s1), e0)
            owned[i] = (owned[i][0], cut)
            owned[i + 1] = (cut, owned[i + 1][1])
    return [(s, max(s, e)) for s, e in owned]


def summarize(segments: Sequence[Scored], labels: Sequence[str]) -> dict[str, Any]:
    """{scores, top, label_share, speech_s} over `segments` (in time order)."""
    owned = owned_spans([(s.start, s.end) for s in segments])
    weights = np.array([e - s for s, e in owned], dtype=np.float64)
    total = float(weights.sum())
    if not labels or not segments or total <= 0:
        return {"scores": [], "top": None, "label_share": {},
                "speech_s": round(total / SAMPLE_RATE, 6)}
    scores = np.array([list(s.scores) for s in segments], dtype=np.float64)
    mean = (weights[:, None] * scores).sum(axis=0) / total
    best = int(np.argmax(mean))
    share = dict.fromkeys(labels, 0.0)
    for w, row in zip(weights, scores, strict=True):
        share[labels[int(np.argmax(row))]] += float(w) / total
    return {"scores": [float(x) for x in mean],
            "top": {"label": labels[best], "score": float(mean[best])},
            "label_share": share,
            "speech_s": round(total / SAMPLE_RATE, 6)}


def segment_json(seg: Scored, labels: Sequence[str]) -> dict[str, Any]:
    scores = [float(x) for x in seg.scores]
    top = None
    if labels and scores:
        best = int(np.argmax(scores))
        top = {"label": labels[best], "score": scores[best]}
    return {"start_s": round(seg.start / SAMPLE_RATE, 4), "end_s": round(seg.end / SAMPLE_RATE, 4),
            "top": top, "scores": scores}


def timeline(key: str, total: int, labels: Sequence[str],
             segments: Sequence[Scored]) -> dict[str, Any]:
    """A segmented job's result: the whole-clip fields (scores and top are the summary's),
    `segments` in time order and `summary`."""
    summary = summarize(segments, labels)
    return {"key": key, "labels": list(labels), "scores": summary["scores"],
            "top": summary["top"], "frames": int(sum(s.frames for s in segments)),
            "duration_s": round(total / SAMPLE_RATE, 6),
            "segments": [segment_json(s, labels) for s in segments], "summary": summary}

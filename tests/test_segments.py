"""The pure arithmetic of timelines (ondemand/segments.py): fixed windows, the streaming VAD
segmenter on synthetic speech probabilities, the owned-span summary, the option checks."""

from __future__ import annotations

import numpy as np
import pytest

from ondemand import segments as seg
from ondemand.config import SegmentsConfig
from ondemand.protocol import Segmenting

SR = 16000
W = seg.VAD_WINDOW  # 512 samples = 32 ms
PER_S = SR / W


def probs(pattern: list[tuple[float, float]]) -> np.ndarray:
    """(seconds, probability) stretches as per-window speech probabilities."""
    return np.concatenate([np.full(round(s * PER_S), p) for s, p in pattern])


def run(p: np.ndarray, spec: Segmenting, *, block: int | None = None) -> list[tuple[float, float]]:
    s = seg.VadSegmenter(spec, len(p) * W)
    out: list[tuple[int, int]] = []
    step = block or len(p)
    for i in range(0, len(p), step):
        out += s.feed(p[i:i + step])
    out += s.finish()
    return [(a / SR, b / SR) for a, b in out]


NO_PAD = Segmenting(mode="vad", pad_s=0.0)


def test_fixed_windows_every_hop_and_a_last_full_window() -> None:
    assert seg.fixed_windows(10 * SR, 3.0, 1.0) == [(k * SR, (k + 3) * SR) for k in range(8)]
    spans = seg.fixed_windows(int(10.5 * SR), 3.0, 2.0)
    assert spans[:4] == [(0, 3 * SR), (2 * SR, 5 * SR), (4 * SR, 7 * SR), (6 * SR, 9 * SR)]
    assert spans[-1] == (int(7.5 * SR), int(10.5 * SR))  # the tail, on a whole window
    assert seg.fixed_windows(2 * SR, 3.0, 1.0) == [(0, 2 * SR)]  # shorter than a window
    assert seg.fixed_windows(100, 3.0, 1.0) == []  # shorter than one model frame


def test_pauses_shorter_than_merge_pause_join_longer_ones_split() -> None:
    p = probs([(1, 0.0), (2, 0.9), (0.3, 0.0), (1, 0.9), (1.0, 0.0), (2, 0.9), (1, 0.0)])
    got = run(p, NO_PAD)
    assert len(got) == 2
    assert got[0] == pytest.approx((1.0, 4.3), abs=0.1)  # window grid: 32 ms
    assert got[1] == pytest.approx((5.3, 7.3), abs=0.1)


def test_short_bursts_are_dropped_and_hysteresis_holds_speech() -> None:
    # 0.1 s click; then speech whose probability dips to 0.4 (above 0.5 - 0.15): still speech
    p = probs([(1, 0.0), (0.1, 0.9), (1, 0.0), (1, 0.9), (0.5, 0.4), (1, 0.9), (1, 0.0)])
    got = run(p, NO_PAD)
    assert got == [pytest.approx((2.1, 4.6), abs=0.1)]


def test_long_speech_is_split_at_its_quietest_point() -> None:
    # 22 s of speech with a dip (0.36: still speech) at 10 s; segments at most 15 s
    p = probs([(10, 0.9), (0.1, 0.36), (12, 0.9), (1, 0.0)])
    got = run(p, NO_PAD)
    assert len(got) == 2 and got[0][1] == pytest.approx(10.0, abs=0.1)
    assert got[1][0] == got[0][1]  # cut, not a pause: the pieces abut
    assert all(b - a <= 15.0 for a, b in got)
    flat = run(probs([(40, 0.9)]), NO_PAD)  # no dip at all: cut anyway, within the limit
    assert len(flat) >= 3 and all(b - a <= 15.0 + 1e-9 for a, b in flat)
    assert flat[0][0] == 0.0 and flat[-1][1] == pytest.approx(40.0, abs=0.1)


def test_padding_never_overlaps_and_stays_inside_the_recording() -> None:
    spec = Segmenting(mode="vad", pad_s=0.4, merge_pause_s=0.5)
    p = probs([(0.1, 0.0), (1, 0.9), (0.6, 0.0), (1, 0.9)])
    got = run(p, spec)
    assert len(got) == 2 and got[0][0] == 0.0 and got[1][1] <= len(p) * W / SR
    assert got[0][1] <= got[1][0]


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_feeding_in_blocks_changes_nothing(block: int) -> None:
    rng = np.random.default_rng(0)
    p = np.clip(np.repeat(rng.uniform(-0.5, 1.5, 400), 8), 0, 1)
    assert run(p, seg.make_spec("vad"), block=block) == run(p, seg.make_spec("vad"))  # type: ignore[arg-type]


def test_done_samples_never_passes_an_open_region() -> None:
    s = seg.VadSegmenter(NO_PAD, 100 * W)
    s.feed(probs([(0.5, 0.0), (0.5, 0.9)]))
    assert s.done_samples <= round(0.5 * PER_S) * W


def test_owned_spans_partition_overlapping_windows() -> None:
    spans = seg.fixed_windows(10 * SR, 3.0, 1.0)
    owned = seg.owned_spans(spans)
    assert owned[0] == (0.0, 2 * SR) and owned[-1] == (8 * SR, 10 * SR)
    assert all(e - s == SR for s, e in owned[1:-1])
    assert sum(e - s for s, e in owned) == 10 * SR


def test_summary_weights_by_owned_time_and_shares_sum_to_one() -> None:
    labels = ["angry", "happy", "sad"]
    segs = [seg.Scored(0, 2 * SR, [0.7, 0.2, 0.1]), seg.Scored(3 * SR, 4 * SR, [0.1, 0.3, 0.6]),
            seg.Scored(5 * SR, 6 * SR, [0.2, 0.5, 0.3])]
    s = seg.summarize(segs, labels)
    assert s["scores"] == pytest.approx([(1.4 + 0.1 + 0.2) / 4, (0.4 + 0.3 + 0.5) / 4,
                                         (0.2 + 0.6 + 0.3) / 4])
    assert s["top"] == {"label": "angry", "score": pytest.approx(1.7 / 4)}
    assert s["label_share"] == {"angry": 0.5, "happy": 0.25, "sad": 0.25}
    assert s["speech_s"] == 4.0
    windows = [seg.Scored(a, b, [1.0, 0.0, 0.0] if a < 4 * SR else [0.0, 1.0, 0.0])
               for a, b in seg.fixed_windows(10 * SR, 3.0, 1.0)]
    share = seg.summarize(windows, labels)["label_share"]
    assert sum(share.values()) == pytest.approx(1.0)
    assert share["angry"] == pytest.approx(0.5)  # windows 0-3 own [0, 5) s of 10


def test_timeline_keeps_time_order_and_the_whole_clip_fields() -> None:
    labels = ["a", "b"]
    doc = seg.timeline("k", 10 * SR, labels, [seg.Scored(0, SR, [0.4, 0.6], frames=49)])
    assert doc["segments"] == [{"start_s": 0.0, "end_s": 1.0, "top": {"label": "b", "score": 0.6},
                                "scores": [0.4, 0.6]}]
    assert doc["scores"] == doc["summary"]["scores"] and doc["frames"] == 49
    assert doc["duration_s"] == 10.0 and doc["labels"] == labels


@pytest.mark.parametrize(("mode", "window", "hop", "needle"), [
    ("window", None, None, "segments must be one of"),
    ("none", 3.0, None, "segments=fixed only"),
    ("vad", None, 1.0, "segments=fixed"),
    ("fixed", 0.2, None, "window_s must be between 0.5"),
    ("fixed", 3.0, 0.2, "hop_s must be at least 0.3"),
    ("fixed", float("nan"), None, "window_s"),
])
def test_bad_options_say_what_is_accepted(mode: str, window: float | None, hop: float | None,
                                          needle: str) -> None:
    with pytest.raises(seg.SpecError, match=needle):
        seg.make_spec(mode, window_s=window, hop_s=hop, settings=SegmentsConfig())


def test_specs_carry_the_settings() -> None:
    cfg = SegmentsConfig(vad_threshold=0.6, window_s=2.0, hop_s=0.5)
    assert seg.make_spec("none", settings=cfg) is None
    vad = seg.make_spec("vad", settings=cfg)
    assert vad is not None and vad.vad_threshold == 0.6 and seg.longest_segment_s(vad) == 15.0
    fixed = seg.make_spec("fixed", hop_s=1.0, settings=cfg)
    assert fixed is not None and (fixed.window_s, fixed.hop_s) == (2.0, 1.0)
    assert seg.longest_segment_s(fixed) == 2.0

"""Silero VAD in the worker: speech probabilities for a recording, a block at a time (torch).

The model is the TorchScript file shipped inside the `silero-vad` wheel (MIT licence), loaded
with torch alone: the package's Python module is never imported, because importing it calls
`torch.set_num_threads(1)` (it would halve the engine's speed on a 2-core CPU) and its audio
helpers want torchaudio.  It runs on the CPU whatever device the engine uses (it is ~2 MB).

One probability per 512 samples at 16 kHz, as `silero_vad.get_speech_timestamps` computes
them.  The model is recurrent, and one window at a time runs at ~8x real time here; so a block
is cut into up to `STREAMS` equal stretches run side by side as one batch, each preceded by
`WARMUP_S` of the audio before it (its outputs dropped) so that its state has settled where
its stretch begins (tests/test_segments_vad.py holds the agreement with the one-stream run).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ondemand.errors import ModelError

log = logging.getLogger(__name__)

WINDOW = 512  # samples per probability at 16 kHz
SAMPLE_RATE = 16000
STREAMS = 32
MIN_STREAM_S = 4.0  # a shorter block runs in fewer streams (the warm-up would dominate)
WARMUP_S = 2.048  # 64 windows


class Source(Protocol):
    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


def model_path() -> Path:
    """silero_vad/data/silero_vad.jit inside the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise ModelError("segments=vad needs the silero-vad package (pip install silero-vad "
                         "--no-deps; scripts/setup.sh installs it)")
    path = Path(spec.origin).parent / "data" / "silero_vad.jit"
    if not path.is_file():
        raise ModelError(f"the silero-vad package has no model file at {path.name}; reinstall it")
    return path


class SileroVad:
    """Speech probabilities, `probs(source, start, stop)`; `start` a multiple of WINDOW."""

    def __init__(self, path: Path | None = None, *, streams: int = STREAMS,
                 warmup_s: float = WARMUP_S) -> None:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript loading in favour of torch.export; the wheel
            # ships TorchScript (and ONNX, which would need onnxruntime): it still loads.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model: Any = torch.jit.load(str(path or model_path()), map_location="cpu")
        self.model.eval()
        self.streams = streams
        self.warmup = round(warmup_s * SAMPLE_RATE / WINDOW)

    @torch.inference_mode()
    def probs(self, source: Source, start: int, stop: int) -> np.ndarray:
        if start % WINDOW:
            raise ValueError(f"start {start} is not a multiple of {WINDOW}")
        n = math.ceil((stop - start) / WINDOW)
        if n <= 0:
            return np.zeros(0, np.float32)
        min_windows = round(MIN_STREAM_S * SAMPLE_RATE / WINDOW)
        k = max(1, math.ceil(n / max(1, min(self.streams, n // min_windows or 1))))
        lanes = math.ceil(n / k)
        warm = self.warmup
        lead = min(start, warm * WINDOW)
        audio = source.read(start - lead, stop)
        # (lanes, warm + k windows): lane j holds windows [j k, (j + 1) k) after `warm` of the
        # audio before them (zeros before the recording starts or past its end).
        span = (warm + k) * WINDOW
        x = np.zeros((lanes, span), np.float32)
        for j in range(lanes):
            a = lead + j * k * WINDOW - warm * WINDOW  # index in `audio` of the lane's start
            lo, hi = max(a, 0), min(a + span, len(audio))
            if hi > lo:
                x[j, lo - a : hi - a] = audio[lo:hi]
        del audio
        batch = torch.from_numpy(x)
        self.model.reset_states()
        out = np.empty((lanes, k), np.float32)
        for t in range(warm + k):
            p = self.model(batch[:, t * WINDOW : (t + 1) * WINDOW], SAMPLE_RATE)
            if t >= warm:
                out[:, t - warm] = p[:, 0].numpy()
        return out.reshape(-1)[:n]

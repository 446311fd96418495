#!/usr/bin/env python3
"""Write a deterministic set of mixed 1-10 s, 16 kHz mono wav clips for the benchmarks.

    python bench/make_clips.py bench/out/clips            # 24 clips, seed 0
    python bench/make_clips.py DIR --count 48 --seed 1

Needs only the standard library, numpy and soundfile (runs in either venv). The same
arguments give byte-identical files; ``manifest.json`` in the output dir lists every clip
(name, duration, kind, sha256) so two benchmark runs can prove they used the same audio.

Durations are spread evenly over [min, max] seconds and shuffled (so neither file order nor
length order is monotone). Content cycles through four kinds, all synthetic:
  voiced - harmonic "vowels" (gliding f0 100-260 Hz, formant-shaped harmonics, ~4 Hz syllable
           envelope, pauses, short fricative noise bursts)
  mixed  - voiced plus a steady coloured noise floor (SNR ~10-20 dB)
  tones  - sequences of sine/two-tone beeps with gaps
  noise  - amplitude-modulated coloured noise
The clips carry no emotion; they only have realistic lengths and non-trivial spectra.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000
KINDS = ("voiced", "mixed", "tones", "noise")
# (F1, F2, F3) in Hz for a few vowels
VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (660, 1720, 2410),
    (570, 840, 2410),
)


def _colored_noise(rng: np.random.Generator, n: int, tilt: float) -> np.ndarray:
    """Noise with a 1/f**tilt power spectrum, unit RMS."""
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.arange(n // 2 + 1, dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / f ** (tilt / 2), n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _smooth(rng: np.random.Generator, n: int, rate_hz: float) -> np.ndarray:
    """A smooth random curve in [0, 1] varying at about ``rate_hz``."""
    knots = max(2, int(n / SR * rate_hz) + 2)
    y = rng.random(knots)
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots), y)


def _voiced(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    base = rng.uniform(100, 220)
    f0 = base * (1 + 0.25 * (_smooth(rng, n, 2.0) - 0.5)) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    # formants change per syllable (~4 Hz): pick a vowel per syllable, interpolate
    n_syl = max(1, int(n / SR * 4))
    idx = rng.integers(0, len(VOWELS), n_syl + 1)
    pos = np.linspace(0, n_syl, n)
    formants = np.stack(
        [np.interp(pos, np.arange(n_syl + 1), [VOWELS[i][k] for i in idx]) for k in range(3)]
    )
    out = np.zeros(n)
    for h in range(1, 40):
        fh = h * f0
        amp = np.zeros(n)
        for k, bw in enumerate((90.0, 110.0, 170.0)):
            amp += (0.8**k) / (1 + ((fh - formants[k]) / bw) ** 2)
        amp *= (fh < SR / 2 - 200) / h**0.5
        out += amp * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    # syllable envelope with pauses
    syl = np.clip(np.sin(np.pi * (pos % 1.0)) ** 0.6, 0, 1)
    pause = (_smooth(rng, n, 0.7) > 0.25).astype(np.float64)
    pause = np.convolve(pause, np.ones(400) / 400, mode="same")
    out *= syl * pause
    # fricative bursts
    fric = _colored_noise(rng, n, -0.8) * 0.3
    gate = (_smooth(rng, n, 3.0) > 0.8).astype(np.float64)
    out += fric * np.convolve(gate, np.ones(160) / 160, mode="same")
    return out / (np.max(np.abs(out)) + 1e-12)


def _tones(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n)
    i = 0
    while i < n:
        dur = int(rng.uniform(0.08, 0.5) * SR)
        gap = int(rng.uniform(0.03, 0.3) * SR)
        m = min(dur, n - i)
        t = np.arange(m) / SR
        f1, f2 = rng.uniform(200, 1600), rng.uniform(600, 3400)
        seg = np.sin(2 * np.pi * f1 * t) + rng.uniform(0, 1) * np.sin(2 * np.pi * f2 * t)
        ramp = np.minimum(1, np.minimum(np.arange(m), np.arange(m)[::-1]) / 80)
        out[i : i + m] = seg * ramp
        i += dur + gap
    return out / (np.max(np.abs(out)) + 1e-12)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _colored_noise(rng, n, rng.uniform(0.3, 1.5)) * (0.2 + _smooth(rng, n, 4.0))
    return x / (np.max(np.abs(x)) + 1e-12)


def make_clip(rng: np.random.Generator, kind: str, seconds: float) -> np.ndarray:
    n = round(seconds * SR)
    if kind == "voiced":
        x = _voiced(rng, n)
    elif kind == "mixed":
        x = _voiced(rng, n)
        snr_db = rng.uniform(10, 20)
        x = x + _colored_noise(rng, n, 1.0) * np.sqrt(np.mean(x**2)) * 10 ** (-snr_db / 20)
    elif kind == "tones":
        x = _tones(rng, n)
    else:
        x = _noise(rng, n)
    peak = rng.uniform(0.3, 0.9)
    return (x / (np.max(np.abs(x)) + 1e-12) * peak).astype(np.float32)


def make_clips(
    out_dir: Path, count: int = 24, seed: int = 0, min_s: float = 1.0, max_s: float = 10.0
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    durations = np.round(np.linspace(min_s, max_s, count), 2)
    durations = durations[rng.permutation(count)]
    clips = []
    for i, seconds in enumerate(durations.tolist()):
        kind = KINDS[i % len(KINDS)]
        x = make_clip(rng, kind, seconds)
        name = f"clip{i:02d}_{kind}.wav"
        path = out_dir / name
        sf.write(path, x, SR, subtype="PCM_16")
        clips.append(
            {
                "name": name,
                "kind": kind,
                "seconds": len(x) / SR,
                "samples": len(x),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    manifest = {
        "seed": seed,
        "count": count,
        "sample_rate": SR,
        "min_s": min_s,
        "max_s": max_s,
        "total_seconds": round(sum(c["seconds"] for c in clips), 3),
        "clips": clips,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return clips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-s", type=float, default=1.0)
    ap.add_argument("--max-s", type=float, default=10.0)
    a = ap.parse_args(argv)
    clips = make_clips(a.out_dir, a.count, a.seed, a.min_s, a.max_s)
    total = sum(c["seconds"] for c in clips)
    print(f"wrote {len(clips)} clips, {total:.2f} s of audio, to {a.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compare our engine's per-clip output with FunASR's on the same model and clips.

    .venv/bin/python bench/compare_funasr.py bench/out/funasr_plus_large_scores.json \
        [--dtype float32] [--batch-audio-s 6]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ondemand.audio import decode
from ondemand.model.engine import Clip, Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("funasr_scores", type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-audio-s", type=float, default=None)
    args = ap.parse_args()
    ref = json.loads(args.funasr_scores.read_text())
    clip_dir = Path(ref["clip_dir"])
    names = sorted(ref["clips"])
    clips = [Clip(Path(n).stem, decode(clip_dir / n, max_seconds=600).samples) for n in names]
    engine = Engine.load(Path(ref["model_dir"]), device="cpu", dtype=args.dtype)
    preds = engine.infer(clips, batch_audio_s=args.batch_audio_s)
    ours = np.array([p.scores for p in preds])
    theirs = np.array([ref["clips"][n]["scores"] for n in names])
    frames_equal = all(
        p.frames == ref["clips"][n]["frames"] for p, n in zip(preds, names, strict=True)
    )
    report = {
        "clips": len(names),
        "dtype": args.dtype,
        "labels_equal": all(
            p.labels == ref["clips"][n]["labels"] for p, n in zip(preds, names, strict=True)
        ),
        "frames_equal": frames_equal,
        "top_label_agreement": f"{int((ours.argmax(1) == theirs.argmax(1)).sum())}/{len(names)}",
        "max_abs_dprob": float(np.abs(ours - theirs).max()),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

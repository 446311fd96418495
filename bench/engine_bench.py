"""Engine benchmark: fresh-process load-to-first-result (broken down) and throughput per dtype.

    .venv/bin/python bench/engine_bench.py --model bench/models/plus_large --clips bench/out/clips \
        [--dtypes float32,bfloat16,int8] [--runs 3] [--out bench/out/engine.json]

Throughput is audio-seconds per wall-second over the whole clip set, one clip at a time and in
padded batches (several budgets); agreement of each dtype with float32 is the top label on every
clip and the max |delta probability|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHILD = r"""
import json, sys, time
t0 = time.time()
import torch, numpy
from ondemand.audio import decode
from ondemand.model.engine import Clip, Engine
t1 = time.time()
eng = Engine.load(sys.argv[1], device=sys.argv[4], dtype=sys.argv[3])
t2 = time.time()
clip = Clip("first", decode(sys.argv[2], max_seconds=600).samples)
pred = eng.infer([clip])[0]
t3 = time.time()
print(json.dumps({"start": t0, "imports": t1 - t0, "load": t2 - t1, "timings": eng.timings,
                  "first_inference": t3 - t2, "end": t3}))
"""


def fresh_load(model: Path, clip: Path, dtype: str, runs: int, device: str) -> dict[str, Any]:
    rows = []
    for _ in range(runs):
        spawn = time.time()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(model), str(clip), dtype, device],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "interpreter_s": r["start"] - spawn,
                "imports_s": r["imports"],
                "weights_read_s": r["timings"]["parse_s"] + r["timings"]["weights_s"],
                "module_build_s": r["timings"]["build_s"],
                "first_inference_s": r["first_inference"],
                "total_s": r["end"] - spawn,
            }
        )
    return {k: round(statistics.median(row[k] for row in rows), 3) for k in rows[0]}


def throughput(model: Path, clips_dir: Path, dtypes: list[str], device: str) -> dict[str, Any]:
    import numpy as np

    from ondemand.audio import decode
    from ondemand.model.engine import Clip, Engine

    files = sorted(clips_dir.glob("*.wav"))
    clips = [Clip(f.stem, decode(f, max_seconds=600).samples) for f in files]
    audio_s = sum(len(c.samples) for c in clips) / 16000
    results: dict[str, Any] = {"clips": len(clips), "audio_s": round(audio_s, 2)}
    reference = None
    for dtype in dtypes:
        eng = Engine.load(model, device=device, dtype=dtype)
        eng.warm_up()
        row: dict[str, Any] = {}
        for label, budget in (
            ("one_at_a_time", 0.0),
            ("batched_6s", 6.0),
            ("batched_20s", 20.0),
            ("batched_60s", 60.0),
        ):
            t0 = time.perf_counter()
            preds = eng.infer(clips, batch_audio_s=budget)
            row[label] = round(audio_s / (time.perf_counter() - t0), 2)
        scores = np.array([p.scores for p in preds])
        if reference is None:
            reference = scores
        row["top_label_agreement"] = (
            f"{int((scores.argmax(1) == reference.argmax(1)).sum())}/{len(clips)}"
        )
        row["max_abs_dprob"] = float(np.abs(scores - reference).max())
        results[dtype] = row
        eng.unload()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clips", type=Path, required=True)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    first = sorted(args.clips.glob("*.wav"))[0]
    dtypes = args.dtypes.split(",")
    report = {
        "fresh_process_load_to_first_result": {
            d: fresh_load(args.model, first, d, args.runs, args.device) for d in dtypes
        },
        "throughput_audio_s_per_s": throughput(args.model, args.clips, dtypes, args.device),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

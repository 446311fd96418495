#!/usr/bin/env python3
"""Baseline benchmark: what users run today, FunASR ``AutoModel`` on emotion2vec(+), on CPU.

Runs inside the separate FunASR venv (see bench/README.md, bench/setup_funasr_venv.sh):

    .venv-funasr/bin/python bench/funasr_bench.py MODEL_DIR CLIP_DIR [--out FILE]
        [--scores-out FILE] [--runs 3] [--passes 2] [--threads 2] [--batch-sizes 4,24]
        [--first-clip NAME] [--expected GOLDEN.json] [--feats-dir DIR]

MODEL_DIR is a model directory in the official layout (model.pt, config.yaml,
configuration.json, tokens.txt); CLIP_DIR holds the audio (*.wav/*.flac/...; see make_clips.py).

Measures
  (a) fresh-process load-to-first-result, ``--runs`` times (+1 untimed warm-up run that also
      warms the page cache), median reported. Each run spawns a new interpreter running this
      file in ``--child-cold`` mode. Stamps are ``time.perf_counter()`` (CLOCK_MONOTONIC,
      system-wide on Linux, so parent and child stamps share one clock):
        interpreter  = child's first statement - parent's spawn
        import_torch = ``import torch``
        import_funasr= ``from funasr import AutoModel`` (torch already imported)
        model_build  = ``AutoModel(model=DIR, disable_update=True, device="cpu", ncpu=T)``,
                       of which ``weights_load`` = FunASR's load_pretrained_model (torch.load of
                       the whole model.pt + load_state_dict) and the rest is config parsing,
                       tokenizer and module construction (incl. random init)
        first_infer  = first ``generate(input=path, granularity="utterance",
                       extract_embedding=False)`` (includes reading/resampling the file)
        total        = spawn -> first result in hand
  (b) throughput in audio-seconds per wall-second over the clip set, in this process: one
      untimed warm-up generate, then ``--passes`` passes calling ``generate`` one clip at a
      time (file path in, so decode+resample are included, as users run it); median pass.
      Then ``generate(input=[paths...], batch_size=B)`` for each B in ``--batch-sizes``, with
      the model's ``inference`` wrapped to record how many clips each call got and how many
      forward passes (``extract_features`` calls) it made: FunASR's emotion2vec loops over the
      list one clip per forward, so batch_size only groups files per call (on CPU AutoModel
      even resets batch_size to 1 at build time; a generate(batch_size=...) overrides that).
  (c) per-clip results (key, labels, scores, top, duration_s, frames = floor((L-400)/320)+1 at
      16 kHz) to ``--scores-out`` (default: next to --out as *_scores.json, else not written),
      from the one-at-a-time pass; ``--expected`` compares them with a golden expected.json.

torch threads: ``torch.set_num_threads(T)`` and ``ncpu=T`` (FunASR's default ncpu is 4 and it
re-applies ncpu on every generate call, so both are needed), T = ``--threads`` (default 2).
The JSON summary goes to stdout (and ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # first statement: interpreter start-up ends here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif"}


def log(msg: str) -> None:
    print(f"[funasr_bench] {msg}", file=sys.stderr, flush=True)


def list_clips(clip_dir: Path) -> list[Path]:
    clips = sorted(p for p in clip_dir.iterdir() if p.suffix.lower() in AUDIO_EXT)
    if not clips:
        raise SystemExit(f"no audio files in {clip_dir}")
    return clips


def clip_info(path: Path) -> dict:
    import soundfile as sf

    info = sf.info(str(path))
    seconds = info.frames / info.samplerate
    samples16k = round(seconds * 16000) if info.samplerate != 16000 else info.frames
    return {
        "seconds": seconds,
        "sr": info.samplerate,
        "channels": info.channels,
        "samples16k": samples16k,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_automodel(model_dir: str, threads: int):
    """The way the benchmark builds FunASR's AutoModel (used by both modes)."""
    from funasr import AutoModel

    return AutoModel(
        model=model_dir, disable_update=True, device="cpu", ncpu=threads, disable_pbar=True
    )


# ---------------------------------------------------------------------------------------------
# (a) child: fresh process, load to first result
# ---------------------------------------------------------------------------------------------
def child_cold(model_dir: str, clip: str, threads: int) -> None:
    stamps = {"start": _T_START}
    import torch

    torch.set_num_threads(threads)
    stamps["torch_imported"] = time.perf_counter()
    import funasr.auto.auto_model as am
    from funasr import AutoModel  # noqa: F401

    stamps["funasr_imported"] = time.perf_counter()
    weights = {}
    orig = am.load_pretrained_model

    def timed_load(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            weights["s"] = time.perf_counter() - t0

    am.load_pretrained_model = timed_load
    model = build_automodel(model_dir, threads)
    stamps["model_built"] = time.perf_counter()
    res = model.generate(input=clip, granularity="utterance", extract_embedding=False)
    stamps["first_result"] = time.perf_counter()
    r = res[0]
    out = {
        "stamps": stamps,
        "weights_load_s": weights.get("s"),
        "cpu_s": time.process_time(),
        "torch_threads": torch.get_num_threads(),
        "key": r["key"],
        "top": r["labels"][max(range(len(r["scores"])), key=r["scores"].__getitem__)],
    }
    print("FUNASR_BENCH_CHILD " + json.dumps(out), flush=True)


def run_cold(model_dir: Path, clip: Path, threads: int, runs: int) -> dict:
    env = dict(os.environ)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-cold",
        str(model_dir),
        str(clip),
        "--threads",
        str(threads),
    ]
    results = []
    for i in range(runs + 1):
        load_before = loadavg()
        t_spawn = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        t_exit = time.perf_counter()
        line = next(
            (ln for ln in p.stdout.splitlines() if ln.startswith("FUNASR_BENCH_CHILD ")), None
        )
        if p.returncode != 0 or line is None:
            sys.stderr.write(p.stderr[-4000:])
            raise SystemExit(f"cold-start child failed (rc={p.returncode})")
        d = json.loads(line.split(" ", 1)[1])
        s = d["stamps"]
        build = s["model_built"] - s["funasr_imported"]
        w = d["weights_load_s"]
        row = {
            "interpreter_s": s["start"] - t_spawn,
            "import_torch_s": s["torch_imported"] - s["start"],
            "import_funasr_s": s["funasr_imported"] - s["torch_imported"],
            "model_build_s": build,
            "weights_load_s": w,
            "module_build_and_rest_s": build - w if w is not None else None,
            "first_infer_s": s["first_result"] - s["model_built"],
            "total_s": s["first_result"] - t_spawn,
            "process_exit_s": t_exit - s["first_result"],
            "child_cpu_s": d["cpu_s"],
            "loadavg_before": load_before,
            "torch_threads": d["torch_threads"],
            "top": d["top"],
        }
        row["interpreter_plus_imports_s"] = (
            row["interpreter_s"] + row["import_torch_s"] + row["import_funasr_s"]
        )
        tag = "warm-up (not counted)" if i == 0 else f"run {i}/{runs}"
        log(
            f"cold start {tag}: total {row['total_s']:.3f}s (interp+imports "
            f"{row['interpreter_plus_imports_s']:.3f}, build {build:.3f} [weights "
            f"{w if w is None else round(w, 3)}], first infer {row['first_infer_s']:.3f}) "
            f"load {load_before}"
        )
        results.append(row)
    counted = results[1:] if runs > 0 else results
    keys = [k for k, v in counted[0].items() if isinstance(v, float)]
    median = {k: round(statistics.median(r[k] for r in counted), 4) for k in keys}
    # the run with the smallest total: the least disturbed one on a shared machine
    best = min(counted, key=lambda r: r["total_s"])
    best = {k: round(best[k], 4) for k in keys}
    return {
        "first_clip": clip.name,
        "first_clip_seconds": round(clip_info(clip)["seconds"], 3),
        "runs": runs,
        "warmup_runs": 1 if runs > 0 else 0,
        "median": median,
        "best_run": best,
        "all_runs": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results
        ],
    }


# ---------------------------------------------------------------------------------------------
# (b) + (c): throughput and per-clip scores, in this process
# ---------------------------------------------------------------------------------------------
def result_record(r: dict, info: dict) -> dict:
    scores = [float(x) for x in r["scores"]]
    labels = list(r["labels"])
    top = max(range(len(scores)), key=scores.__getitem__) if scores else None
    n = info["samples16k"]
    return {
        "key": r["key"],
        "labels": labels,
        "scores": scores,
        "top": {"label": labels[top], "score": scores[top]} if top is not None else None,
        "duration_s": round(info["seconds"], 6),
        "frames": (n - 400) // 320 + 1 if n >= 400 else 0,
    }


def run_throughput(
    model, clips: list[Path], infos: dict, passes: int, batch_sizes: list[int]
) -> tuple[dict, dict]:
    import torch

    total_audio = sum(infos[c.name]["seconds"] for c in clips)
    kw = {"granularity": "utterance", "extract_embedding": False}
    # warm-up: the first generate pays one-off costs (allocator, oneDNN kernels)
    model.generate(input=str(clips[0]), **kw)

    passes_out = []
    records: dict[str, dict] = {}
    for p in range(passes):
        load_before = loadavg()
        per_clip = {}
        c0 = time.process_time()
        t0 = time.perf_counter()
        for c in clips:
            t1 = time.perf_counter()
            res = model.generate(input=str(c), **kw)
            per_clip[c.name] = round(time.perf_counter() - t1, 4)
            if p == 0:
                records[c.name] = result_record(res[0], infos[c.name])
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        passes_out.append(
            {
                "wall_s": round(wall, 4),
                "cpu_s": round(cpu, 4),
                "audio_s_per_s": round(total_audio / wall, 4),
                "loadavg_before": load_before,
                "per_clip_s": per_clip,
            }
        )
        log(
            f"one-at-a-time pass {p + 1}/{passes}: {total_audio:.1f} audio-s in {wall:.2f} s = "
            f"{total_audio / wall:.3f} audio-s/s (cpu {cpu:.2f} s), load {load_before}"
        )
    med_wall = statistics.median(x["wall_s"] for x in passes_out)
    one = {
        "passes": passes,
        "median_wall_s": round(med_wall, 4),
        "median_audio_s_per_s": round(total_audio / med_wall, 4),
        "best_audio_s_per_s": round(max(x["audio_s_per_s"] for x in passes_out), 4),
        # each clip's fastest time over the passes, summed: robust to bursts of load from
        # other processes on a shared machine (a lower bound on the undisturbed wall time)
        "min_per_clip_audio_s_per_s": round(
            total_audio / sum(min(x["per_clip_s"][c.name] for x in passes_out) for c in clips), 4
        ),
        "all_passes": passes_out,
    }

    # batched mode: what does batch_size do for emotion2vec?
    inner = model.model
    calls: list[int] = []
    forwards = [0]
    orig_inf, orig_feat = inner.inference, inner.extract_features

    def inf(*a, **k):
        calls.append(len(k.get("data_in", a[0] if a else [])))
        return orig_inf(*a, **k)

    def feat(*a, **k):
        forwards[0] += 1
        return orig_feat(*a, **k)

    inner.inference, inner.extract_features = inf, feat
    batched = []
    try:
        for bs in batch_sizes:
            calls.clear()
            forwards[0] = 0
            load_before = loadavg()
            t0 = time.perf_counter()
            res = model.generate(input=[str(c) for c in clips], batch_size=bs, **kw)
            wall = time.perf_counter() - t0
            maxdiff = 0.0
            for c, r in zip(clips, res, strict=True):
                ref = records[c.name]["scores"]
                maxdiff = max(
                    [maxdiff] + [abs(float(a) - b) for a, b in zip(r["scores"], ref, strict=True)]
                )
            batched.append(
                {
                    "batch_size": bs,
                    "wall_s": round(wall, 4),
                    "audio_s_per_s": round(total_audio / wall, 4),
                    "inference_calls": len(calls),
                    "clips_per_call": list(calls),
                    "forward_passes": forwards[0],
                    "max_abs_diff_vs_one_at_a_time": maxdiff,
                    "loadavg_before": load_before,
                }
            )
            log(
                f"generate(list, batch_size={bs}): {len(calls)} inference calls, "
                f"{forwards[0]} forward passes, {total_audio / wall:.3f} audio-s/s, "
                f"max |diff| vs single {maxdiff:.2e}"
            )
    finally:
        inner.inference, inner.extract_features = orig_inf, orig_feat
    return (
        {
            "total_audio_s": round(total_audio, 3),
            "clips": len(clips),
            "torch_threads": torch.get_num_threads(),
            "one_at_a_time": one,
            "batched": batched,
        },
        records,
    )


def compare_expected(records: dict, expected_path: Path) -> dict:
    exp = json.loads(expected_path.read_text())["clips"]
    rows, worst = {}, 0.0
    for name, e in exp.items():
        r = records.get(name)
        if r is None:
            rows[name] = "missing"
            continue
        d = max(abs(a - b) for a, b in zip(r["scores"], e["scores"], strict=True))
        same = (
            r["labels"] == e["labels"]
            and r["key"] == e["key"]
            and ("frames" not in e or r["frames"] == e["frames"])
        )
        rows[name] = {"max_abs_diff": d, "labels_key_frames_match": same}
        worst = max(worst, d)
    ok = all(
        isinstance(v, dict) and v["labels_key_frames_match"] and v["max_abs_diff"] <= 1e-5
        for v in rows.values()
    )
    return {
        "expected": str(expected_path),
        "max_abs_diff": worst,
        "tolerance": 1e-5,
        "match": ok,
        "per_clip": rows,
    }


def save_feats(model, clips: list[Path], feats_dir: Path) -> None:
    """Optional: FunASR's own utterance and frame embeddings as {key}_{granularity}.npy."""
    import numpy as np

    feats_dir.mkdir(parents=True, exist_ok=True)
    for c in clips:
        for g in ("utterance", "frame"):
            r = model.generate(input=str(c), granularity=g, extract_embedding=True)[0]
            np.save(feats_dir / f"{r['key']}_{g}.npy", np.asarray(r["feats"], dtype=np.float32))


def main(argv: list[str] | None = None) -> int:
    """FunASR prints notices to stdout (e.g. about ffmpeg at import): keep stdout for the JSON."""
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _main(argv, real_stdout)


def _main(argv: list[str] | None, real_stdout) -> int:
    import contextlib

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-cold":
        ap = argparse.ArgumentParser()
        ap.add_argument("model_dir")
        ap.add_argument("clip")
        ap.add_argument("--threads", type=int, default=2)
        a = ap.parse_args(argv[1:])
        with contextlib.redirect_stdout(real_stdout):
            child_cold(a.model_dir, a.clip, a.threads)
        return 0

    ap = argparse.ArgumentParser(description="FunASR AutoModel baseline benchmark (CPU)")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("clip_dir", type=Path)
    ap.add_argument("--out", type=Path, help="also write the JSON summary here")
    ap.add_argument(
        "--scores-out",
        type=Path,
        help="per-clip results JSON (default: <out stem>_scores.json when --out)",
    )
    ap.add_argument("--runs", type=int, default=3, help="fresh-process runs (plus 1 warm-up)")
    ap.add_argument("--passes", type=int, default=2, help="one-at-a-time passes over the clips")
    ap.add_argument("--threads", type=int, default=2, help="torch threads and FunASR ncpu")
    ap.add_argument(
        "--batch-sizes",
        default="4,all",
        help="comma list for generate(list, batch_size=B); 'all' = every clip; empty to skip",
    )
    ap.add_argument(
        "--first-clip", help="clip name for the cold-start run (default: first clip in name order)"
    )
    ap.add_argument("--expected", type=Path, help="golden expected.json to compare scores with")
    ap.add_argument("--feats-dir", type=Path, help="also save FunASR's embeddings here")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    a = ap.parse_args(argv)

    model_dir, clip_dir = a.model_dir.resolve(), a.clip_dir.resolve()
    for f in ("model.pt", "config.yaml", "configuration.json", "tokens.txt"):
        if not (model_dir / f).is_file():
            raise SystemExit(f"{model_dir} lacks {f}: not a model dir in the official layout")
    clips = list_clips(clip_dir)
    infos = {c.name: clip_info(c) for c in clips}
    first = clip_dir / a.first_clip if a.first_clip else clips[0]

    import torch

    torch.set_num_threads(a.threads)
    import funasr

    summary: dict = {
        "engine": "funasr.AutoModel",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "funasr": getattr(funasr, "__version__", "?"),
        },
        "cpu": _cpu_name(),
        "nproc": os.cpu_count(),
        "torch_threads": a.threads,
        "threads_note": f"torch.set_num_threads({a.threads}) and AutoModel(ncpu={a.threads})",
        "model_dir": str(model_dir),
        "model_pt_bytes": (model_dir / "model.pt").stat().st_size,
        "clip_dir": str(clip_dir),
        "clips": len(clips),
        "total_audio_s": round(sum(i["seconds"] for i in infos.values()), 3),
        "generate_kwargs": {"granularity": "utterance", "extract_embedding": False},
        "loadavg_at_start": loadavg(),
    }
    if not a.skip_cold:
        log(f"fresh-process load-to-first-result: {a.runs} runs + 1 warm-up on {first.name}")
        summary["cold_start"] = run_cold(model_dir, first, a.threads, a.runs)

    if not a.skip_throughput:
        import logging

        t0 = time.perf_counter()
        model = build_automodel(str(model_dir), a.threads)
        logging.getLogger().setLevel(logging.WARNING)
        summary["in_process_build_s"] = round(time.perf_counter() - t0, 4)
        n_params = sum(p.numel() for p in model.model.parameters())
        summary["model_parameters"] = n_params
        sizes = []
        for tok in a.batch_sizes.split(","):
            tok = tok.strip()
            if tok:
                sizes.append(len(clips) if tok == "all" else int(tok))
        thr, records = run_throughput(model, clips, infos, a.passes, sizes)
        summary["throughput"] = thr
        scores_out = a.scores_out or (
            a.out.with_name(a.out.stem + "_scores.json") if a.out else None
        )
        if scores_out:
            scores_out.parent.mkdir(parents=True, exist_ok=True)
            scores_out.write_text(
                json.dumps(
                    {
                        "engine": "funasr.AutoModel",
                        "funasr": summary["versions"]["funasr"],
                        "torch": torch.__version__,
                        "model_dir": str(model_dir),
                        "clip_dir": str(clip_dir),
                        "clips": records,
                    },
                    indent=1,
                    ensure_ascii=False,
                )
                + "\n"
            )
            summary["scores_file"] = str(scores_out)
        summary["per_clip"] = {
            k: {"top": v["top"], "scores": v["scores"]} for k, v in records.items()
        }
        if a.expected:
            summary["golden"] = compare_expected(records, a.expected)
            g = summary["golden"]
            log(f"golden comparison: match={g['match']} max |diff|={g['max_abs_diff']:.2e}")
        if a.feats_dir:
            save_feats(model, clips, a.feats_dir)
            summary["feats_dir"] = str(a.feats_dir)

    text = json.dumps(summary, indent=1, ensure_ascii=False)
    print(text, file=real_stdout)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    if a.expected and "golden" in summary and not summary["golden"]["match"]:
        return 1
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())

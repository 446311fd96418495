"""`ondemand infer` and `ondemand make-test-model`: the engine without the daemon."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ondemand import config as config_mod
from ondemand.errors import AudioError, OndemandError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="run emotion recognition on audio files (one JSON line per file)",
        description="Load the model in this process and print one JSON object per input file.",
    )
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="audio files (wav/flac/ogg/mp3, webm/m4a/mp4: a video's sound track)")
    p.add_argument("--model", help="model directory or ModelScope id (default: config model.*)")
    p.add_argument("--revision", help="ModelScope revision (default: config, 'master')")
    p.add_argument("--cache-dir", help="ModelScope cache directory (default: config/ModelScope's)")
    p.add_argument("--force", action="store_true", help="delete a cached model and re-download")
    p.add_argument("--granularity", choices=["utterance", "frame"], default="utterance")
    p.add_argument("--embeddings-dir", type=Path, help="write {key}.npy embeddings here")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: config worker.device)")
    p.add_argument(
        "--dtype",
        choices=list(config_mod.DTYPES),
        help="float32 (exact), bfloat16, float16 (GPU), int8 (CPU) (default: config worker.dtype)",
    )
    p.add_argument("--batch-audio-s", type=float, help="padded-audio budget per batch, seconds")
    p.add_argument("--segments", choices=["none", "vad", "fixed"], default="none",
                   help="none: one result per file (at most audio.max_seconds); vad: one per "
                        "stretch of speech; fixed: one per window (a timeline with `segments` "
                        "and `summary`, files up to audio.max_segmented_seconds)")
    p.add_argument("--window-s", type=float, help="--segments fixed: window length, seconds "
                                                  "(default: config segments.window_s)")
    p.add_argument("--hop-s", type=float, help="--segments fixed: seconds between window starts "
                                               "(default: config segments.hop_s)")
    p.add_argument(
        "--config", type=Path, help="config file (default: ONDEMAND_CONFIG or ./config.toml)"
    )
    p.add_argument("--timings", action="store_true", help="print load/infer timings to stderr")
    p.set_defaults(func=cmd_infer)

    m = sub.add_parser(
        "make-test-model",
        help="write a RANDOM-WEIGHT model directory in the official layout (for tests/benchmarks)",
    )
    m.add_argument("dir", type=Path)
    m.add_argument("--preset", choices=["tiny", "base", "plus_base", "plus_large"], default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_test_model)


def cmd_infer(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import numpy as np

    from ondemand.audio import decode
    from ondemand.model.engine import Clip, Engine
    from ondemand.model.resolve import resolve_model

    cfg = config_mod.load(args.config or config_mod.default_config_path())
    device = args.device or cfg.worker.device
    if config_mod.device(device):
        raise OndemandError(f"--device: {config_mod.device(device)}")
    if args.segments != "none":
        return _infer_segmented(args, cfg, device)
    t_imports = time.perf_counter()

    clips: list[tuple[int, Clip]] = []
    failures: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(args.files):
        key = Path(name).stem
        try:
            decoded = decode(Path(name), max_seconds=cfg.audio.max_seconds)
        except AudioError as e:
            message = e.message
            if e.code == "too_long":  # the whole-clip limit: a timeline has a higher one
                message += (" With --segments vad or --segments fixed it gets a timeline, up "
                            f"to {cfg.audio.max_segmented_seconds:g} s.")
            failures[i] = {
                "key": key,
                "file": name,
                "error": {"code": e.code, "message": message},
            }
            continue
        except OSError as e:
            failures[i] = {
                "key": key,
                "file": name,
                "error": {"code": "unreadable", "message": f"cannot read {name}: {e.strerror}"},
            }
            continue
        clips.append((i, Clip(key, decoded.samples)))
    t_audio = time.perf_counter()

    results: dict[int, dict[str, Any]] = {}
    t_load = t_audio
    if clips:
        model_dir = resolve_model(
            args.model or cfg.model.spec,
            revision=args.revision or cfg.model.revision,
            cache_dir=args.cache_dir or cfg.model.cache_dir or None,
            force=args.force,
        )
        engine = Engine.load(model_dir, device=device, dtype=args.dtype or cfg.worker.dtype)
        t_load = time.perf_counter()
        budget = (
            args.batch_audio_s
            if args.batch_audio_s is not None
            else (cfg.worker.batch_audio_s or None)
        )
        preds = engine.infer(
            [c for _, c in clips],
            granularity=args.granularity,
            embeddings=args.embeddings_dir is not None,
            batch_audio_s=budget,
        )
        if args.embeddings_dir is not None:
            args.embeddings_dir.mkdir(parents=True, exist_ok=True)
        for (i, _), pred in zip(clips, preds, strict=True):
            results[i] = pred.to_json()
            if args.embeddings_dir is not None and pred.embedding is not None:
                np.save(args.embeddings_dir / f"{pred.key}.npy", pred.embedding)
    t_done = time.perf_counter()

    out = sys.stdout
    for i in range(len(args.files)):
        out.write(json.dumps(results.get(i) or failures[i], ensure_ascii=False) + "\n")
    out.flush()
    for failure in failures.values():
        log.error(
            "infer failed file=%s code=%s: %s",
            failure["file"],
            failure["error"]["code"],
            failure["error"]["message"],
        )
    if args.timings:
        timing = {
            "imports_s": round(t_imports - t_start, 4),
            "audio_s": round(t_audio - t_imports, 4),
            "load_s": round(t_load - t_audio, 4),
            "infer_s": round(t_done - t_load, 4),
        }
        print(json.dumps({"timings": timing}), file=sys.stderr)
    return 1 if failures else 0


def _infer_segmented(args: argparse.Namespace, cfg: config_mod.Config, device: str) -> int:
    """`ondemand infer --segments vad|fixed`: each file decoded block by block into a temporary
    spool file and read back a slice at a time, as the daemon does (memory follows the batch)."""
    import tempfile

    from ondemand import segments
    from ondemand.audio import Limits, decode_to
    from ondemand.model.engine import Engine
    from ondemand.model.resolve import resolve_model
    from ondemand.spool import SpoolReader

    try:
        spec = segments.make_spec(args.segments, window_s=args.window_s, hop_s=args.hop_s,
                                  settings=cfg.segments)
    except segments.SpecError as e:
        raise OndemandError(f"--segments: {e}") from None
    if args.granularity != "utterance":
        raise OndemandError("--segments gives one result per segment: use --granularity "
                            "utterance (embeddings: one row per segment)")
    assert spec is not None
    model_dir = resolve_model(args.model or cfg.model.spec,
                              revision=args.revision or cfg.model.revision,
                              cache_dir=args.cache_dir or cfg.model.cache_dir or None,
                              force=args.force)
    engine = Engine.load(model_dir, device=device, dtype=args.dtype or cfg.worker.dtype)
    budget = args.batch_audio_s if args.batch_audio_s is not None else (
        cfg.worker.batch_audio_s or None)
    limits = Limits(cfg.audio.max_segmented_seconds, cfg.audio.decode_mb(True))
    if args.embeddings_dir is not None:
        args.embeddings_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="ondemand-infer-") as tmp:
        for name in args.files:
            key = Path(name).stem
            spool = Path(tmp) / f"{key}.npy"
            try:
                decode_to(Path(name), spool, limits, durable=False)
            except AudioError as e:
                failed += 1
                _emit({"key": key, "file": name, "error": {"code": e.code, "message": e.message}})
                continue
            except OSError as e:
                failed += 1
                _emit({"key": key, "file": name, "error": {
                    "code": "unreadable", "message": f"cannot read {name}: {e.strerror}"}})
                continue
            emb = args.embeddings_dir / f"{key}.npy" if args.embeddings_dir else None
            with SpoolReader(spool) as reader:
                _emit(engine.infer_recording(reader, spec, key=key, embedding_path=emb,
                                             batch_audio_s=budget))
            spool.unlink()
    return 1 if failed else 0


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from ondemand.model.testmodel import make_test_model

    path = make_test_model(args.dir, preset=args.preset, seed=args.seed)
    print(
        f"wrote {args.preset} test model to {path}\n"
        "WARNING: its weights are RANDOM: its predictions mean NOTHING. Use it for tests, "
        "trials and benchmarks only.",
        file=sys.stderr,
    )
    return 0

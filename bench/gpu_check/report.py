"""The GPU check's markdown: one table per section, from the JSON (pure)."""

from __future__ import annotations

from typing import Any


def _f(x: Any, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _problem(sec: Any) -> str | None:
    if not isinstance(sec, dict):
        return "missing"
    if "error" in sec:
        return f"failed: {sec['error']}"
    if "skipped" in sec:
        return f"skipped: {sec['skipped']}"
    return None


def markdown(res: dict[str, Any]) -> str:
    meta = res.get("meta", {})
    out = [f"# GPU check ({meta.get('device')}, {meta.get('started')}, "
           f"{meta.get('elapsed_s')} s, probe {meta.get('probe')})", ""]
    eng = res.get("engine")
    out.append("## Engine")
    if (why := _problem(eng)) is not None:
        out += [why, ""]
    else:
        out.append(f"{eng.get('gpu_name', eng['device'])}, torch {eng['torch']}, "
                   f"{eng['clips']} clips, {eng['audio_s']} s of audio; CUDA init "
                   f"{_f(eng.get('cuda_init_s'), ' s')}.")
        out.append("")
        budgets = [f"{b:g}" for b in eng["budgets_s"]]
        rows = []
        for dtype, r in eng["dtypes"].items():
            if "skipped" in r:
                rows.append([dtype, r["skipped"]] + [""] * (3 + len(budgets)))
                continue
            cells = []
            for b in budgets:
                v = r["batched"].get(b, {})
                cells.append("err" if "error" in v else
                             f"{_f(v.get('audio_s_per_s'))} ({_f(v.get('peak_mb'))} MiB)")
            rows.append([dtype, _f(r["load_s"], " s"), _f(r["warmup_s"], " s"),
                         _f(r["one_at_a_time_audio_s_per_s"]), *cells,
                         f"{r.get('top_label_agrees', '-')} / {_f(r.get('max_abs_dp'))}"])
        out += _table(["dtype", "load", "warm-up", "one at a time (audio-s/s)",
                       *(f"budget {b} s (audio-s/s, peak)" for b in budgets),
                       "top label = fp32 / max Δp"], rows)
        out += [f"Best budget per dtype: {eng.get('recommended_budget_s')}", ""]
    lad = res.get("ladder")
    out.append("## The ladder: time to first result and what each rung holds")
    if (why := _problem(lad)) is not None:
        out += [why, ""]
    else:
        med = lad["median_s"]
        loads = lad["loads"]

        def load_of(rung: str) -> str:
            recs = [x for x in loads.get(rung, []) if x]
            return _f(recs[0]["seconds"], " s") if recs else "-"

        rows = [[rung, _f(med.get(rung), " s"),
                 ", ".join(_f(x, "", 3) for x in lad["time_to_first_result_s"][rung]),
                 load_of(rung) if rung != "ready" else "-"]
                for rung in ("ready", "unloaded", "standby", "cold")]
        out.append(f"{lad['clip_s']:g} s clip through `POST /v1/recognize`; median of "
                   f"{lad['samples']} sample(s); standby / cold = **{lad['standby_over_cold']}**.")
        out.append("")
        out += _table(["from", "time to first result (median)", "samples", "load part"], rows)
        held = lad["held"]
        rows = [[rung, _f(h.get("rss_mb"), " MiB"), _f(h.get("worker_gpu_mb"), " MiB"),
                 _f(h.get("device_used_mb"), " MiB"), _f(h.get("power_w"), " W")]
                for rung, h in held.items()]
        out += _table(["rung", "worker RSS", "worker GPU memory", "device used", "power"], rows)
        sb = lad.get("standby") or {}
        out += [f"Standby guard: cuda_initialized = {sb.get('cuda_initialized')}, GPU memory "
                f"= {_f(sb.get('gpu_memory_mb'), ' MiB')}, weights {_f(sb.get('weights_mb'))} "
                f"MiB, prepared in {_f(sb.get('seconds'), ' s')}.", ""]
        for rung in ("standby", "unloaded", "cold"):
            recs = [x for x in loads.get(rung, []) if x]
            if recs:
                keys = {k: v for k, v in recs[0].items() if k.endswith("_s")}
                out.append(f"- load from {rung}: " + ", ".join(
                    f"{k} {_f(v)}" for k, v in keys.items()))
        out.append("")
    for name, title in (("yield_fake", "Stepping aside: decision latency (scripted GPU)"),
                        ("yield_gpu", "Stepping aside: a second process on the GPU")):
        sec = res.get(name)
        out.append(f"## {title}")
        if (why := _problem(sec)) is not None:
            out += [why, ""]
            continue
        out += [f"- {k}: {v}" for k, v in sec.items() if k != "section_s"] + [""]
        # (yield_fake holds one such block per poll period: printed as nested dicts)
    comp = res.get("compile")
    out.append("## torch.compile / CUDA graphs on bucketed lengths")
    if (why := _problem(comp)) is not None:
        out += [why, ""]
    else:
        rows = []
        for mode, r in comp["modes"].items():
            cells = [f"{_f(v.get('ms_per_batch'))} ms (first two {_f(v.get('first_two_s'))} s)"
                     if isinstance(v, dict) else str(v) for k, v in r.items()]
            rows.append([mode, *cells])
        out += [f"{comp['dtype']}, batch {comp['batch']}, buckets {comp['buckets_s']} s; "
                f"min speedup vs eager: {comp['speedup_vs_eager_min']}", ""]
        out += [f"- {r[0]}: " + "; ".join(r[1:]) for r in rows] + [""]
    return "\n".join(out)

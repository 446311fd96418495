"""bench/gpu_check (issue 14) runs on CPU too, so what the lead carries to a GPU machine has run
here first: the quick size with the golden tiny model, every CPU section, one JSON and one
markdown table; a failing section is recorded and the rest still run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import golden

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "gpu_check" / "run.py"


def test_the_gpu_check_runs_on_cpu_and_writes_one_json_and_one_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(RUN), "--device", "cpu", "--quick", "--model", str(golden.MODEL),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    eng = res["engine"]["dtypes"]
    assert eng["float32"]["one_at_a_time_audio_s_per_s"] > 0
    assert eng["bfloat16"]["top_label_agrees"] == 4
    lad = res["ladder"]
    med = lad["median_s"]
    assert all(med[r] > 0 for r in ("ready", "unloaded", "standby", "cold"))
    assert med["standby"] < med["cold"] and lad["standby_over_cold"] < 1
    assert lad["standby"]["cuda_initialized"] is False
    assert lad["loads"]["standby"][0]["kind"] == "activate"
    assert lad["loads"]["cold"][0]["kind"] == "spawn"
    assert res["yield_fake"]["poll_0.5s"]["decision"]["max_ms"] < 2000  # poll 0.5 s + handling
    assert res["yield_gpu"] == {"skipped": "needs a GPU"}
    assert res["compile"] == {"skipped": "needs a GPU"}
    md = (tmp_path / "gpu_check.md").read_text()
    for title in ("## Engine", "## The ladder", "decision latency", "torch.compile"):
        assert title in md


def test_the_table_reports_a_failed_section_and_keeps_the_rest() -> None:
    sys.path.insert(0, str(RUN.parent))
    import report  # bench/gpu_check/report.py

    md = report.markdown({"meta": {"device": "cuda"}, "engine": {"error": "OOM"},
                          "ladder": {"skipped": "out of time"}})
    assert "failed: OOM" in md and "skipped: out of time" in md and "torch.compile" in md

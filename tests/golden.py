"""The golden fixture: a tiny emotion2vec+ model, five clips and the reference (FunASR) outputs
for them, kept in the project at tests/fixtures/emotion2vec-tiny (see tests/fixtures/README.md).
The one place that knows the path; tests read the files in place and never write them."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent / "fixtures" / "emotion2vec-tiny"
SUMS = ROOT.with_name(ROOT.name + ".sha256")  # sha256sum format, one line per file
MODEL = ROOT / "model"
AUDIO = ROOT / "audio"


@cache
def expected() -> dict[str, Any]:
    return json.loads((ROOT / "expected.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def clip_names() -> list[str]:
    return sorted(expected()["clips"])


def expected_feats(key: str, granularity: str) -> np.ndarray:
    return np.load(ROOT / f"expected_{key}_{granularity}.npy")

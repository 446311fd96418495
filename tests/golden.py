"""Access to the read-only golden fixture in ../shared (tests read it in place)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "emotion2vec-tiny"
MODEL = ROOT / "model"
AUDIO = ROOT / "audio"


@cache
def expected() -> dict[str, Any]:
    return json.loads((ROOT / "expected.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def clip_names() -> list[str]:
    return sorted(expected()["clips"])


def expected_feats(key: str, granularity: str) -> np.ndarray:
    return np.load(ROOT / f"expected_{key}_{granularity}.npy")

"""Engine backends for the Ray replicas in tests/test_cluster_ray.py, injected by import path
(`replica_backend`): the real TorchBackend on the golden model, held at a gate on request, so a
test decides when a replica is inside a batch instead of betting on how long one takes.

    ONDEMAND_TEST_GATE=PATH   a batch holding a clip whose key starts with "gate" waits until
                              PATH exists (the replica stays busy meanwhile)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ondemand import protocol
from ondemand.worker.backend import TorchBackend


class GatedTorchBackend(TorchBackend):
    def infer(
        self,
        clips: Sequence[tuple[str, np.ndarray]],
        *,
        granularity: protocol.Granularity,
        embeddings: bool,
        batch_audio_s: float | None,
    ) -> Sequence[Any]:
        gate = os.environ.get("ONDEMAND_TEST_GATE", "")
        if gate and any(key.startswith("gate") for key, _ in clips):
            while not Path(gate).exists():
                time.sleep(0.02)
        return super().infer(clips, granularity=granularity, embeddings=embeddings,
                             batch_audio_s=batch_audio_s)

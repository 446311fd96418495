"""Batch planning shared by the engine and the daemon's dispatcher (pure, no torch).

Clips are sorted longest first and packed greedily while the *padded* audio of a batch
(clips x longest clip) stays within a budget; a clip longer than the budget runs alone, so a lone
job is never delayed or refused by batching."""

from __future__ import annotations

from collections.abc import Sequence

# Padded-audio budget per batch, in seconds, chosen from measurements (docs/benchmarks.md):
# on CPU padded batches do not pay (compute-bound, padding is waste), so only very short clips
# are grouped; on a GPU batching is where throughput comes from.
DEFAULT_BUDGET_S = {"cpu": 6.0, "cuda": 320.0}


def default_budget_s(device_type: str) -> float:
    return DEFAULT_BUDGET_S.get(device_type, 0.0)


def plan_batches(lengths: Sequence[int], budget_samples: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first.

    Each batch satisfies len(batch) * max(length in batch) <= budget_samples, except a single
    clip longer than the budget, which forms a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted descending, so the batch's longest clip is its first one.
        if current and (len(current) + 1) * lengths[current[0]] > budget_samples:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches

"""Labels from `tokens.txt`, in classifier-row order.

Old 5-class revisions of the models mark hidden classes with a label starting with `unuse`: they
get logit -inf and are dropped from the output (emotion2vec #45, FunASR #2728)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ondemand.errors import CheckpointError

UNUSED_PREFIX = "unuse"


@dataclass(frozen=True)
class Labels:
    all: tuple[str, ...]  # one per classifier row

    @property
    def keep(self) -> tuple[bool, ...]:
        return tuple(not label.startswith(UNUSED_PREFIX) for label in self.all)

    @property
    def shown(self) -> list[str]:
        return [label for label, k in zip(self.all, self.keep, strict=True) if k]


def read_labels(model_dir: Path, classes: int) -> Labels:
    """Read `tokens.txt`; it must have exactly one line per classifier row."""
    path = model_dir / "tokens.txt"
    if not path.is_file():
        raise CheckpointError(
            f"tokens.txt is missing from the model directory {model_dir.name}: the labels cannot "
            "be named. Re-download the model (revision 'master')."
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = tuple(line for line in lines if line)
    if len(labels) != classes:
        raise CheckpointError(
            f"tokens.txt has {len(labels)} labels but the classifier has {classes} rows; "
            "the model directory is inconsistent. Re-download the model (revision 'master')."
        )
    return Labels(labels)

"""The one pair of spool functions: decoded audio and embeddings as `.npy` files on disk.

`write_npy` is atomic (tmp file + rename) and, with `durable=True`, fsynced before the rename:
the front end promises a job's audio is on disk before it answers 202.  A failed write (disk
full mid-write) leaves no half file behind.  `read_npy` refuses anything but the expected
float32 array (never a pickle).  No torch."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ondemand.errors import AudioUndecodable


def write_npy(path: Path, array: np.ndarray, *, durable: bool) -> None:
    """Write `array` at exactly `path` (no `.npy` appended), atomically; fsync when durable."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full mid-write: leave no half file behind (issue 6)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Read spooled samples; anything but a 1-D float32 array is refused (no pickles)."""
    try:
        with open(path, "rb") as fh:
            arr = np.load(fh, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise AudioUndecodable("the spooled audio file is corrupt (not a .npy array)") from e
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 1:
        got = f"{arr.ndim}-D {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise AudioUndecodable(f"the spooled audio must be a 1-D float32 array, got {got}")
    return arr

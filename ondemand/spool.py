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


# -- streaming: recordings too long to hold in memory ------------------------------------------
HEADER_BYTES = 128  # a v1.0 .npy header for float32 (N,) or (N, D) is < 128 bytes for any N


def _header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    data = buf.getvalue()
    if len(data) != HEADER_BYTES:  # fixed so that the final header overwrites the first one
        raise ValueError(f"npy header of {len(data)} bytes for shape {shape}")
    return data


class NpyWriter:
    """A float32 `.npy` written block by block: rows of shape `row` appended as they come, the
    header (which holds the length) rewritten at `close`.  Same guarantees as `write_npy`: the
    file appears at `path` only whole (tmp + rename), fsynced first when `durable`, and a
    failure (a full disk) leaves nothing behind.

        with NpyWriter(path, durable=True) as w:
            for block in blocks:
                w.write(block)
    """

    def __init__(self, path: Path, *, row: tuple[int, ...] = (), durable: bool) -> None:
        self.path = path
        self.row = row
        self.durable = durable
        self.rows = 0
        self._tmp = path.with_name(path.name + ".tmp")
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 -- closed in close()/abort()
        try:
            self._fh.write(_header((0, *row)))
        except BaseException:
            self.abort()
            raise

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype="<f4")
        if block.shape[1:] != self.row:
            raise ValueError(f"rows of shape {block.shape[1:]}, expected {self.row}")
        self._fh.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        """Finish: the real header, fsync when durable, rename into place."""
        try:
            self._fh.seek(0)
            self._fh.write(_header((self.rows, *self.row)))
            self._fh.flush()
            if self.durable:
                os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SpoolReader:
    """Spooled samples read through a memory map, a slice at a time.

    `read(start, stop)` copies the slice out and drops the pages it touched from this process
    (MADV_DONTNEED on a read-only file mapping: the page cache keeps them, our RSS does not), so
    reading an hour-long recording from start to end costs the memory of a slice, not of the
    recording.  Refuses anything but a 1-D float32 little-endian array, as `read_npy` does."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import mmap

        with open(path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"npy version {version}")
            except (ValueError, EOFError) as e:
                raise AudioUndecodable("the spooled audio file is corrupt (not a .npy "
                                       "array)") from e
            if dtype != np.dtype("<f4") or len(shape) != 1 or fortran:
                raise AudioUndecodable(f"the spooled audio must be a 1-D float32 array, got "
                                       f"{len(shape)}-D {dtype}")
            self.offset = fh.tell()
            self.size = int(shape[0])
            if os.fstat(fh.fileno()).st_size < self.offset + 4 * self.size:
                raise AudioUndecodable("the spooled audio file is truncated")
            self._mm = (mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                        if self.size else None)

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(self.size, stop)
        if self._mm is None or stop <= start:
            return np.zeros(0, np.float32)
        a, b = self.offset + 4 * start, self.offset + 4 * stop
        out = np.frombuffer(self._mm, dtype="<f4", count=stop - start, offset=a).copy()
        self._release(a, b)
        return out

    def _release(self, a: int, b: int) -> None:
        import mmap

        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = a - a % page
        with contextlib.suppress(OSError, ValueError):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, b - lo)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> SpoolReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

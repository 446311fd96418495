"""One daemon per storage directory: an exclusive `flock` on `storage.dir/ondemand.lock`.

Invariants:
- `serve()` takes the lock before anything under storage.dir is opened, recovered or swept, and
  holds it through an open file descriptor for the daemon's whole life.  Without it a second
  daemon on the same directory "recovered" the first one's running job (ran it again,
  `attempts=2`, and the first worker found its spool file gone) and closed the first one's open
  cost intervals (issue 10).
- The kernel drops a flock when its process ends, however it ends: a restart after `kill -9`
  never finds a stale lock, so there is nothing to clean up by hand.  The PID in the file is
  only for the message; the flock alone decides.  The file is never unlinked (unlinking races
  a second opener onto a different inode, and two daemons would both "hold" a lock).
- The descriptor is not inherited (PEP 446 default): the worker process never holds the lock,
  so a worker that outlived its daemon could not block a restart.
- Readers do not take it: `ondemand cost` reads the ledger read-only beside a running daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

from ondemand.errors import StorageError, StorageLocked

log = logging.getLogger(__name__)

LOCK_FILE = "ondemand.lock"


class StorageLock:
    """The held lock; `release()` (or process exit) gives it back."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def prepare_dir(directory: Path) -> None:
    """Create storage.dir if missing; refuse a path that is a file or that we cannot write."""
    if directory.exists() and not directory.is_dir():
        raise StorageError(
            f"storage.dir {directory}: is a file, not a directory; set storage.dir to a "
            "directory (it is created if missing), or move the file away"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(
            f"storage.dir {directory}: cannot create it ({e.strerror}); create it for user "
            f"uid={os.getuid()}, or choose another storage.dir"
        ) from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(
            f"storage.dir {directory}: not writable by uid={os.getuid()}; fix its owner or mode "
            f"(chown/chmod), or choose another storage.dir"
        )


def acquire(directory: Path) -> StorageLock:
    """Take the directory's lock without waiting.  Raises StorageLocked naming the holder's PID
    when another process holds it, StorageError when the directory is unusable."""
    prepare_dir(directory)
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StorageError(
            f"storage.dir {directory}: cannot open the lock file {LOCK_FILE} ({e.strerror}); "
            "fix the directory's owner or mode, or choose another storage.dir"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_pid(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StorageError(
                f"storage.dir {directory}: cannot lock {LOCK_FILE} ({e.strerror}); use a local "
                "file system that supports flock for storage.dir"
            ) from e
        who = f"pid {holder}" if holder else "pid unknown"
        raise StorageLocked(
            f"storage.dir {directory} is in use by another ondemand daemon ({who}); stop that "
            "daemon first, or give this one its own storage.dir"
        ) from None
    with contextlib.suppress(OSError):  # only for the message; the flock is what counts
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    log.debug("storage lock taken: %s pid=%d", path, os.getpid())
    return StorageLock(directory, fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
    except (OSError, ValueError):
        return None

"""The task guard: a long-lived task of the daemon never dies quietly.

Every component's owner task (supervisor, dispatcher, purge, prewarm scheduler, sd-notify) is
watched: `guard.watch(task)` is an `add_done_callback`.  A task that ends while the daemon runs is
a failure: with an exception (a bug: I/O errors are retried inside the tasks), or returned or
cancelled without its owner asking.  Then, once:

- one ERROR line names the task and why (the traceback in the same record);
- `failed` holds the reason: /readyz answers 503 with it, the systemd watchdog gets no ping;
- the `on_failure` callbacks run: `serve()` stops the daemon in order and exits 1, so the service
  manager restarts it and the queued jobs run after the restart.

Issue 10: a dispatcher that died of a full disk left a daemon that answered 202 to every
submission and ran none, said ready, logged nothing, and exited 1 with a traceback at SIGTERM.

Owners end their own tasks: `watching(task)` retires the task when the component's context
unwinds (before the owner ends it), and `close()` at the start of a shutdown makes every later
return or cancellation expected.  An exception is a failure even during a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class TaskGuard:
    def __init__(self) -> None:
        self.failed: str | None = None  # the first failure, e.g. "task dispatcher died: ..."
        self._closing = False
        self._callbacks: list[Callable[[str], None]] = []

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` when a watched task fails (at most once)."""
        self._callbacks.append(callback)

    def watch(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            task.add_done_callback(self._ended)

    def retire(self, task: asyncio.Task[Any] | None) -> None:
        """Its owner is about to end it: no longer watched."""
        if task is not None:
            task.remove_done_callback(self._ended)

    @contextlib.contextmanager
    def watching(self, task: asyncio.Task[Any] | None) -> Iterator[None]:
        """Watch `task` for the block (a component's `yield` in its cleanup context)."""
        self.watch(task)
        try:
            yield
        finally:
            self.retire(task)

    def close(self) -> None:
        """A shutdown began: tasks that now return or are cancelled do so on purpose."""
        self._closing = True

    def _ended(self, task: asyncio.Task[Any]) -> None:
        exc: BaseException | None = None
        if task.cancelled():
            reason = "was cancelled"
        else:
            exc = task.exception()  # retrieved: asyncio does not log it a second time
            reason = "returned" if exc is None else f"died: {type(exc).__name__}: {exc}"
        if exc is None and self._closing:
            return
        self.fail(f"task {task.get_name()} {reason}", exc)

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """Record a failure (the first one wins) and run the callbacks."""
        if self.failed is not None:
            log.error("%s (after: %s)", reason, self.failed, exc_info=exc)
            return
        self.failed = reason
        log.error("%s; the daemon stops with exit status 1 so that its service manager restarts "
                  "it (queued jobs are kept)", reason, exc_info=exc)
        for callback in self._callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("task guard callback failed")

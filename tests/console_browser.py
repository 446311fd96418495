"""Browser test helpers: the distribution's Chromium driven by Playwright (no browser download),
and the real daemon (tests/conftest.py `Daemon`) on its own event-loop thread, so the synchronous
Playwright API can drive the page while the daemon serves it.

Chromium is found at $PLAYWRIGHT_CHROMIUM, else `chromium` / `chromium-browser` on PATH; tests
skip with the reason when it (or the playwright package) is missing.  `.ci/run` installs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ondemand import config as config_mod
from tests.conftest import TESTS, Daemon

T = TypeVar("T")
ARTIFACTS = TESTS / "artifacts"  # screenshots (ignored by git)
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",  # else Chromium keeps calling home
    "--disable-component-update",
    "--use-fake-ui-for-media-stream",  # the microphone prompt says yes
    "--use-fake-device-for-media-stream",
]


def find_chromium() -> str | None:
    explicit = os.environ.get("PLAYWRIGHT_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class ServedDaemon:
    """`Daemon` running on a background thread's loop; `call()` runs a coroutine there."""

    def __init__(self, cfg: config_mod.Config, **kwargs: Any) -> None:
        self.cfg = cfg
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="daemon", daemon=True)
        self.daemon: Daemon | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Daemon:
        d = Daemon(self.cfg, **self.kwargs)
        await d.__aenter__()
        return d

    def __enter__(self) -> ServedDaemon:
        self.thread.start()
        self.daemon = self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.daemon is not None:
                self.call(self.daemon.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def d(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    @property
    def url(self) -> str:
        return self.d.url

    def state(self) -> str:
        return self.d.sup.state.value

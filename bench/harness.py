"""What the benchmarks share: `ondemand serve` in a subprocess, returned once it listens.

Benchmarks run as scripts (`.venv/bin/python bench/x.py`), so their folder is on sys.path and
they `from harness import start_serve`.  tests/conftest.py has the tests' own copy with a
deadline (tests must fail rather than hang); a benchmark is watched by whoever runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

SERVING = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")


def start_serve(config: Path, env: dict[str, str] | None = None, cwd: Path | None = None
                ) -> tuple[subprocess.Popen[str], str]:
    """`ondemand serve --config config`; returns the process and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "ondemand", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            cwd=cwd)
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("ondemand serve did not start")
        m = SERVING.search(line)
        if m:
            # keep draining stderr so the daemon never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)

"""A tiny sd_notify(3): tell systemd we are ready, what we are doing, and that we are alive.

Why not the `sdnotify` package: the protocol is one datagram per message on the AF_UNIX socket
named by $NOTIFY_SOCKET (an abstract socket when it starts with `@`); the package adds a
dependency for those few lines and knows nothing about $WATCHDOG_USEC / $WATCHDOG_PID, which we
need to pick the ping interval.  Everything here is a no-op outside systemd ($NOTIFY_SOCKET unset),
and a send error is logged once and swallowed: notifying must never take the daemon down.

Messages used by the daemon (docs/operations.md): READY=1 once the socket listens, STATUS=<text>
on every worker state change, WATCHDOG=1 pings, STOPPING=1 when SIGTERM starts the drain.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """One notify socket, opened lazily.  `enabled` is False outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        self._addr = addr if addr.startswith(("/", "\0")) else ""
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_s = _watchdog_s(env)

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, **fields: str) -> bool:
        """Send `KEY=value` lines (e.g. `notify(READY="1", STATUS="...")`).  True if sent."""
        if not self._addr:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._addr)
        except OSError as e:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s (further failures not logged)",
                            self._addr.replace("\0", "@"), e)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        # STATUS is one line: systemctl shows it as-is.
        return self.notify(STATUS=" ".join(text.split()))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING="1", **({"STATUS": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_s(env: Mapping[str, str]) -> float | None:
    """WatchdogSec= in seconds when the watchdog is meant for this process, else None."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # inherited by a child: the watchdog belongs to our parent
    return int(usec) / 1e6

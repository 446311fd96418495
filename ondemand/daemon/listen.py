"""The daemon's listening sockets, bound before anything under storage.dir is opened.

`serve()` binds first so that a port in use (or a host it may not bind) is one line and exit 2
before the store recovers jobs or the dispatcher could start a batch; before this it was a
traceback from a daemon that had already started and then had to stop (issue 10).  The sockets
listen at once: a client that connects during start-up waits in the backlog instead of being
refused.  Same choices as asyncio's `create_server`: every address the host resolves to,
SO_REUSEADDR (a restart never waits for TIME_WAIT), IPv6 sockets IPv6-only, an IPv6 address the
kernel lacks skipped.
"""

from __future__ import annotations

import errno
import socket

from ondemand.errors import ListenFailed

BACKLOG = 128  # aiohttp's default


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening, non-blocking sockets for `host:port`; raises ListenFailed with what to do."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenFailed(f"server.host {host!r}: cannot resolve it ({e.strerror}); set "
                           "server.host to an address of this machine") from e
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except OSError as e:
                sock.close()
                if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                    continue  # IPv6 disabled here: asyncio skips it too (bpo-30945)
                raise ListenFailed(_why(host, port, e)) from e
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise ListenFailed(f"cannot listen on {host}:{port}: no usable address; set server.host "
                           "to an address of this machine")
    return socks


def _why(host: str, port: int, e: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return (f"{where}: address already in use (`ss -ltnp 'sport = :{port}'` shows the "
                "process); stop it, or set server.port to a free port")
    if e.errno == errno.EACCES:
        return (f"{where}: permission denied (ports below 1024 need privileges); set "
                "server.port to 1024 or above")
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where}: not an address of this machine; set server.host to one"
    return f"{where}: {e.strerror}"

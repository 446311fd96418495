"""Where a job callback may go: `webhooks.allowed_hosts` applied to a URL (daemon/webhooks.py).

Rules: http(s) only, no user info, and the host either listed by name (`hooks.example.com`;
`*.example.com` for its subdomains: trusted whatever it resolves to) or resolving only to
addresses inside the listed CIDR blocks (every address: one outside refuses the host, so a name
with an internal address among its records cannot slip through).  `check` runs at submit (400
callback_refused, before the body is decoded); `CheckedResolver` applies the same rule when the
delivery connects, so a name that later re-resolves elsewhere (DNS rebinding) is refused then
too; `check_literal` covers address literals, which aiohttp never hands to a resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from ondemand.config import WebhooksConfig
from ondemand.errors import CallbackRefused

MAX_URL_CHARS = 2048
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]


def _address(text: str) -> Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return ip


class Destinations:
    """`webhooks.allowed_hosts`: host names (`*.example.com`: its subdomains) and CIDR blocks."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if name.startswith("*."):
                self.suffixes.append(name[1:])
            else:
                self.names.add(name)

    def allows_name(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    def allows_address(self, address: str) -> bool:
        try:
            ip = _address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def parse(self, url: str) -> tuple[str, int]:
        """(host, port) of an acceptable callback URL; CallbackRefused says what is wrong."""
        if len(url) > MAX_URL_CHARS or any(c.isspace() or not c.isprintable() for c in url):
            raise CallbackRefused(f"callback_url must be a URL of at most {MAX_URL_CHARS} "
                                  "printable characters without spaces")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise CallbackRefused(f"callback_url is not a valid URL ({e})") from None
        if parts.scheme not in ("http", "https"):
            raise CallbackRefused(f"callback_url must be http:// or https://, got "
                                  f"{parts.scheme or 'no scheme'!r}")
        if parts.username is not None or parts.password is not None:
            raise CallbackRefused("callback_url must not hold user info (user:password@); "
                                  "authenticate the callback with its signature")
        host = parts.hostname or ""
        if not host:
            raise CallbackRefused("callback_url has no host")
        return host, port or (443 if parts.scheme == "https" else 80)

    def check_literal(self, url: str) -> None:
        """At delivery: `url` parses, and an address-literal host is allowed."""
        host, _ = self.parse(url)
        if self.allows_name(host):
            return
        try:
            literal = str(_address(host))
        except ValueError:
            return  # a name: CheckedResolver decides when it connects
        if not self.allows_address(literal):
            raise CallbackRefused(f"{host} is outside webhooks.allowed_hosts")

    async def check(self, url: str, resolve: Resolve) -> None:
        """Refuse `url` unless its host is listed by name, or every address it resolves to
        lies in a listed CIDR block."""
        host, port = self.parse(url)
        if self.allows_name(host):
            return
        try:
            addresses = [str(_address(host))]
        except ValueError:
            try:
                addresses = await resolve(host, port)
            except (OSError, TimeoutError) as e:
                raise CallbackRefused(f"callback_url's host {host!r} does not resolve ({e}); "
                                      "use a host in webhooks.allowed_hosts") from None
        outside = [a for a in addresses if not self.allows_address(a)]
        if not addresses or outside:
            raise CallbackRefused(
                f"callback_url's host {host!r} is not in webhooks.allowed_hosts"
                + (f" (it resolves to {', '.join(outside[:3])})" if outside and
                   outside != [host] else "")
                + "; ask the operator to allow it")


async def resolve_host(host: str, port: int, *, timeout_s: float) -> list[str]:
    """Every address `host` resolves to (getaddrinfo in a thread, bounded by `timeout_s`)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names outside `webhooks.allowed_hosts` at connect time:
    the connection can only go to addresses that were checked (no rebinding in between)."""

    def __init__(self, destinations: Destinations) -> None:
        self._dest = destinations
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if self._dest.allows_name(host):
            return found
        outside = [r["host"] for r in found if not self._dest.allows_address(r["host"])]
        if outside or not found:
            raise OSError(f"{host} resolves to {', '.join(outside[:3]) or 'nothing'}, outside "
                          "webhooks.allowed_hosts")
        return found

    async def close(self) -> None:
        await self._inner.close()


async def check_callback(cfg: WebhooksConfig, url: str,
                         destinations: Destinations | None = None) -> None:
    """At submit: refuse a callback the daemon would not call (400 callback_refused)."""
    if not cfg.enabled:
        raise CallbackRefused("webhooks are off on this daemon (no webhooks.secret or "
                              "webhooks.allowed_hosts); submit without callback_url and poll")
    dest = destinations or Destinations(cfg.allowed_hosts)

    async def resolve(host: str, port: int) -> list[str]:
        return await resolve_host(host, port, timeout_s=cfg.timeout_s)

    await dest.check(url, resolve)

"""Who is asking, and what may they do: bearer tokens, scopes, per-token limits.

Tokens (config.py): `server.token` (or ONDEMAND_TOKEN) is an admin token named "server"; each
`[[tokens]]` table is a named token kept as the SHA-256 of the token, never the token itself
(`ondemand token create` makes one).  With neither, the daemon is open and every request acts
as an admin without a name.

Scopes: `jobs` (submit, read and cancel the jobs this token created), `read` (status, readyz,
prewarm, cost, metrics), `admin` (everything: worker control, every job).  `ROUTE_SCOPES` is the
one table of what each route needs; a route missing from it needs `admin` (and
tests/test_auth.py fails until it is listed).  A missing or unknown token is 401
`unauthorized`, a known one without the scope 403 `forbidden`, both before any body is read.

Limits, per token: `submits_per_minute` (a rolling minute, in memory: `SubmitLimiter`) and
`max_pending` (jobs queued or running, counted in the insert's own transaction:
`Store.add(owner_max_pending=)`), both 429 with Retry-After.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from ondemand.config import SCOPES, SERVER_TOKEN_NAME, Config
from ondemand.daemon.http import Handler
from ondemand.errors import ConfigError, Forbidden, TooManyRequests, Unauthorized

OPEN, ANY = "open", "any"  # no token at all; any valid token
STATIC_PREFIX = "/console/"  # the web console's files (ondemand/console/routes.py)
JOBS, READ, ADMIN = SCOPES

# What each route needs: (method, route as registered) -> scope.  HEAD counts as GET.
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/"): OPEN,  # the console page and its static files hold no data
    ("GET", "/console/{version}/{path}"): OPEN,
    ("GET", "/v1/events"): READ,
    ("GET", "/v1/jobs"): JOBS,  # a jobs token lists its own jobs (daemon/jobs_api.py)
    ("GET", "/v1/openapi.json"): ANY,
    ("POST", "/v1/jobs"): JOBS,
    ("GET", "/v1/jobs/{id}"): JOBS,
    ("GET", "/v1/jobs/{id}/embedding.npy"): JOBS,
    ("DELETE", "/v1/jobs/{id}"): JOBS,
    ("POST", "/v1/recognize"): JOBS,
    ("GET", "/v1/status"): READ,
    ("GET", "/readyz"): READ,
    ("GET", "/v1/prewarm"): READ,
    ("GET", "/v1/cost"): READ,
    ("GET", "/metrics"): READ,
    ("POST", "/v1/worker/load"): ADMIN,
    ("POST", "/v1/worker/unload"): ADMIN,
}

MIN_TOKEN_CHARS = 16
TOKEN_HELP = ("Generate a token with: ondemand token create NAME --scopes admin (or python -c "
              "'import secrets; print(secrets.token_urlsafe(32))')")
BEARER = "Bearer "


@dataclass(frozen=True)
class Principal:
    """The token behind a request.  `name` is the owner recorded on its jobs."""

    name: str
    scopes: frozenset[str]
    max_pending: int = 0  # 0 = no limit
    submits_per_minute: int = 0  # 0 = no limit

    def allows(self, scope: str) -> bool:
        return scope in (OPEN, ANY) or ADMIN in self.scopes or scope in self.scopes

    @property
    def owner_filter(self) -> str | None:
        """The owner whose jobs this token may see, or None for every job (admin)."""
        return None if ADMIN in self.scopes else self.name


ANONYMOUS = Principal("", frozenset({ADMIN}))  # auth off: the daemon is open
NOBODY = Principal("", frozenset())  # no token, on an open route while auth is on
PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    return request.get(PRINCIPAL, NOBODY)


def route_scope(request: web.Request) -> str:
    """The scope `request`'s route needs; an unknown route (404/405 follow) any valid token; a
    served route missing from ROUTE_SCOPES admin."""
    resource = request.match_info.route.resource
    if resource is None:
        # Under the console's static prefix nothing holds data: a missing file is a plain 404.
        return OPEN if request.path.startswith(STATIC_PREFIX) else ANY
    method = "GET" if request.method == "HEAD" else request.method
    return ROUTE_SCOPES.get((method, resource.canonical), ADMIN)


class Keyring:
    """The configured tokens.  Every comparison is constant-time and none stops early."""

    def __init__(self, cfg: Config) -> None:
        token = cfg.auth_token()
        self._server = f"{BEARER}{token}".encode() if token else None
        self._named = [(t.sha256.encode(), Principal(t.name, frozenset(t.scopes), t.max_pending,
                                                     t.submits_per_minute)) for t in cfg.tokens]
        self.required = cfg.auth_required()

    def identify(self, header: str) -> Principal | None:
        if header[:len(BEARER)].lower() == BEARER.lower():  # the scheme is case-insensitive
            header = BEARER + header[len(BEARER):]
        # aiohttp decodes headers as UTF-8 with surrogateescape: this encodes any bytes a
        # client sent (no 500).
        given = header.encode("utf-8", "surrogateescape")
        found: Principal | None = None
        if self._server is not None and hmac.compare_digest(given, self._server):
            found = Principal(SERVER_TOKEN_NAME, frozenset({ADMIN}))
        digest = hashlib.sha256(given[len(BEARER):]).hexdigest().encode()
        bearer = given.startswith(BEARER.encode())
        for expected, who in self._named:
            if hmac.compare_digest(digest, expected) and bearer:
                found = who
        return found


def middleware(cfg: Config) -> Middleware:
    keys = Keyring(cfg)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not keys.required:
            request[PRINCIPAL] = ANONYMOUS
            return await handler(request)
        scope = route_scope(request)
        if scope == OPEN:
            return await handler(request)
        who = keys.identify(request.headers.get("Authorization", ""))
        if who is None:
            raise Unauthorized("missing or wrong bearer token; send `Authorization: Bearer "
                               "<token>` (server.token / ONDEMAND_TOKEN, or a [[tokens]] one)")
        if not who.allows(scope):
            raise Forbidden(f"token {who.name!r} has the scopes {', '.join(sorted(who.scopes))}; "
                            f"{request.method} {request.path} needs {scope!r} (or admin)")
        request[PRINCIPAL] = who
        return await handler(request)

    return auth


class SubmitLimiter:
    """`submits_per_minute` per token over a rolling minute (in memory: a restart forgets)."""

    WINDOW_S = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sent: dict[str, collections.deque[float]] = {}

    def admit(self, who: Principal) -> None:
        limit = who.submits_per_minute
        if not limit:
            return
        now = self._clock()
        sent = self._sent.setdefault(who.name, collections.deque())
        while sent and sent[0] <= now - self.WINDOW_S:
            sent.popleft()
        if len(sent) >= limit:
            wait = sent[0] + self.WINDOW_S - now
            raise TooManyRequests(
                f"token {who.name!r} sent its {limit} submissions of the last minute "
                f"(submits_per_minute); retry in {wait:.0f} s", retry_after_s=wait)
        sent.append(now)


LIMITER = web.AppKey("submit_limiter", SubmitLimiter)


# -- binding beyond loopback -----------------------------------------------------------------
def check_bind(cfg: Config) -> None:
    """Refuse to listen beyond loopback without a token unless explicitly allowed, or with a
    token a network attacker could guess (issue 10: one character, or a single space, passed).
    `[[tokens]]` count as tokens (`ondemand token create` makes strong ones)."""
    host = cfg.server.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    token = cfg.auth_token()
    if not token:
        if cfg.server.allow_insecure_bind or cfg.tokens:
            return
        raise ConfigError(
            f"server.host: {host!r} is reachable from other machines but no server.token (or "
            "ONDEMAND_TOKEN) or [[tokens]] is set; set a token, bind 127.0.0.1, or set "
            f"server.allow_insecure_bind = true. {TOKEN_HELP}"
        )
    problem = token_problem(token)
    if problem:
        source = "server.token" if cfg.server.token else "ONDEMAND_TOKEN"
        raise ConfigError(
            f"{source}: {problem}, too weak for server.host {host!r} (reachable from other "
            f"machines). {TOKEN_HELP}"
        )


def token_problem(token: str) -> str | None:
    """Why `token` cannot guard a network-facing daemon, or None."""
    if token != token.strip():
        return "starts or ends with whitespace, which HTTP strips from headers"
    if not (token.isascii() and token.isprintable()):
        return "holds control or non-ASCII characters"
    if len(token) < MIN_TOKEN_CHARS:
        return f"is {len(token)} characters long; at least {MIN_TOKEN_CHARS} are needed"
    return None

"""The web console: `GET /` and its static files under `/console/<version>/` (docs/console.md).

Plain HTML, CSS and ES modules shipped in the package (`static/`; third-party files under
`static/vendor/` with their version in the name and their licence beside them): no build step and
no request to any other host.  Everything the page shows comes from the documented API.

Invariants:
- The page and its files hold no data, so they load without the bearer token (`is_public`);
  the API calls they make carry it.
- Files are read and gzipped once, on the first request (in a thread), so a daemon nobody opens
  the page on keeps its idle memory.  `<version>` is a hash of every file: content under a
  versioned URL never changes, so it is cached for a year (`immutable`); `/` is `no-cache`
  (revalidated by ETag), so a new release shows at the next visit.
- Every console response carries a Content-Security-Policy without inline scripts or styles,
  `nosniff`, and refuses framing.  Requested paths are looked up in the loaded set, never joined
  to a filesystem path.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ondemand.config import Config
from ondemand.daemon import auth

STATIC = Path(__file__).with_name("static")
ASSET_PREFIX = auth.STATIC_PREFIX  # "/console/"
INDEX = "index.html"
ASSETS_MARK = "%ASSETS%"  # in index.html: replaced by /console/<version>
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


def is_public(path: str) -> bool:
    """The page and its static files: served without the token (they hold no data)."""
    return path == "/" or path.startswith(ASSET_PREFIX)


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    content_type: str

    @classmethod
    def of(cls, body: bytes, content_type: str) -> Asset:
        digest = hashlib.sha256(body).hexdigest()[:20]
        return cls(body, gzip.compress(body, 9, mtime=0), f'"{digest}"', content_type)


@dataclass(frozen=True)
class Bundle:
    version: str
    index: Asset
    files: dict[str, Asset]  # by path relative to static/, e.g. "app.js", "vendor/x.js"


def load_bundle(root: Path = STATIC) -> Bundle:
    """Read every file under `root` (licences as text/plain, unknown types refused)."""
    raw: dict[str, bytes] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        raw[path.relative_to(root).as_posix()] = path.read_bytes()
    version = hashlib.sha256(
        b"".join(name.encode() + b"\0" + body for name, body in raw.items())).hexdigest()[:12]
    files = {}
    for name, body in raw.items():
        if name == INDEX:
            continue
        ctype = TYPES.get(Path(name).suffix) or ("text/plain; charset=utf-8"
                                                  if "LICENSE" in name else None)
        if ctype is None:
            raise ValueError(f"console file {name}: unknown type (add it to TYPES)")
        files[name] = Asset.of(body, ctype)
    page = raw[INDEX].replace(ASSETS_MARK.encode(), f"{ASSET_PREFIX}{version}".encode())
    return Bundle(version, Asset.of(page, TYPES[".html"]), files)


class Console:
    """Serves the bundle; loads it on first use."""

    def __init__(self, root: Path = STATIC) -> None:
        self.root = root
        self._bundle: Bundle | None = None
        self._lock = asyncio.Lock()

    async def bundle(self) -> Bundle:
        if self._bundle is None:
            async with self._lock:
                if self._bundle is None:
                    self._bundle = await asyncio.to_thread(load_bundle, self.root)
        return self._bundle

    async def index(self, request: web.Request) -> web.Response:
        return respond(request, (await self.bundle()).index, REVALIDATE)

    async def asset(self, request: web.Request) -> web.Response:
        bundle = await self.bundle()
        found = bundle.files.get(request.match_info["path"])
        if found is None:
            raise web.HTTPNotFound()
        # A page from an older release may ask for its version: serve today's file uncached.
        current = request.match_info["version"] == bundle.version
        return respond(request, found, IMMUTABLE if current else REVALIDATE)


def respond(request: web.Request, asset: Asset, cache: str) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": asset.etag,
               "Vary": "Accept-Encoding"}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    body = asset.body
    if "gzip" in request.headers.get("Accept-Encoding", "") and len(asset.gzipped) < len(body):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def setup(app: web.Application, cfg: Config) -> None:
    if not cfg.console.enabled:
        return
    console = Console()
    app.router.add_get("/", console.index)
    app.router.add_get(ASSET_PREFIX + "{version}/{path:.+}", console.asset)

"""The chat page (static SPA at /) and the dev-only token endpoint.

The page is plain ES modules and CSS under ``service/static`` (no build step, nothing from a CDN).
Only files that exist in that folder when the app is built are served: the request path is looked
up in a fixed table, never joined onto the file system, so ``..`` tricks cannot reach other files.

``GET /api/dev/token?user=<name>`` mints a bearer token for local development. It is registered
only when ``DEV_TOKEN_ENDPOINT`` is true; otherwise the path is an ordinary 404.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from aiohttp import web

from service.auth import mint_token
from service.errors import BadRequest, Forbidden, ServiceUnavailable
from service.http import json_response
from service.keys import SETTINGS

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DEV_TOKEN_TTL_S = 8 * 3600
_DEV_USER_OK = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}

# Same-origin everything: scripts, styles, fetch and the WebSocket. No inline script or style.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# No content hashes in the file names (no build step): the browser revalidates every time and
# gets a 304 when nothing changed (ETag / Last-Modified from FileResponse).
STATIC_CACHE = "no-cache"

STATIC_FILES = web.AppKey("static_files", dict[str, Path])


def _static_table(root: Path) -> dict[str, Path]:
    table: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            table[path.relative_to(root).as_posix()] = path
    return table


def _file_response(path: Path) -> web.FileResponse:
    """A static file with the page's headers: every file, so that the page reached by another
    path (``/static/index.html``) cannot be framed or run another origin's script either."""
    resp = web.FileResponse(path)
    resp.headers["Content-Type"] = CONTENT_TYPES[path.suffix]
    resp.headers["Cache-Control"] = STATIC_CACHE
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


async def index(request: web.Request) -> web.StreamResponse:
    return _file_response(STATIC_DIR / "index.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    path = request.app[STATIC_FILES].get(request.match_info["path"])
    if path is None:
        raise web.HTTPNotFound()
    return _file_response(path)


def _loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, or a Host header's name) is this machine's loopback."""
    if not host:
        return False
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket's IPv4 peer
    return (mapped or address).is_loopback


async def dev_token(request: web.Request) -> web.Response:
    """A token for any user, to whoever asks: only from this machine (the peer a loopback
    address, so ``HOST=0.0.0.0`` does not hand tokens to the network) and to a loopback name
    (the Host header, so a web page whose name was rebound to 127.0.0.1 cannot read one)."""
    try:
        name = request.url.host
    except ValueError:  # a Host header that is no host (an IPv6 address without brackets)
        name = None
    if not (_loopback(request.remote) and _loopback(name)):
        raise Forbidden(
            "the dev token endpoint answers only requests from this machine to a loopback "
            "address (http://127.0.0.1 or http://localhost)",
            code="dev_token_local_only",
        )
    settings = request.app[SETTINGS]
    user = request.query.get("user", "dev").strip() or "dev"
    if not _DEV_USER_OK.match(user):
        raise BadRequest(
            "user must be 1 to 64 letters, digits or . _ @ -",
            code="invalid_user",
            details={"field": "user"},
        )
    try:
        token = mint_token(settings, user, ttl_s=DEV_TOKEN_TTL_S)
    except ValueError as exc:  # an asymmetric key without its private half: nothing to sign with
        raise ServiceUnavailable(
            f"the dev token endpoint cannot sign tokens: {exc}", code="dev_token_unavailable"
        ) from exc
    return json_response(
        {"token": token, "token_type": "Bearer", "user": user, "expires_in": DEV_TOKEN_TTL_S},
        headers={"Cache-Control": "no-store"},
    )


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app[STATIC_FILES] = _static_table(STATIC_DIR)
    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.+}", static_file)
    if app[SETTINGS].dev_token_endpoint:
        app.router.add_get("/api/dev/token", dev_token)

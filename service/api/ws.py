"""WebSocket transport endpoint: GET /api/ws (and POST /api/ws/ticket).

``/api/ws`` authenticates itself, before the upgrade, because browsers cannot set headers on a
WebSocket: programs send ``Authorization: Bearer <JWT>``, browsers pass ``?ticket=`` from
``POST /api/ws/ticket`` (one use, short-lived, kept in MongoDB so any replica accepts it). The
Origin is checked first (cross-site WebSocket hijacking). The protocol is in docs/websocket.md.
"""

from __future__ import annotations

import secrets
import time
from datetime import timedelta
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from service.auth import Principal
from service.errors import BadRequest, ServiceError, Unauthorized
from service.http import json_response
from service.keys import (
    ADMISSIONS,
    API_KEYS,
    AUTH,
    PRINCIPAL,
    REGISTRY,
    RESUMES,
    SETTINGS,
    STORE,
    UPGRADED,
    WS_CONNECTIONS,
)
from service.logs import bind_request
from service.store import utcnow
from service.transports import ws as transport

log = structlog.get_logger("service.ws")


class OriginNotAllowed(ServiceError):
    status = 403
    code = "origin_not_allowed"


def origin_allowed(request: web.Request, allowed: str) -> bool:
    """No Origin (a program) is fine; a browser's must be listed or be this server's own."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    normalized = origin.strip().rstrip("/").lower()
    listed = {o.strip().rstrip("/").lower() for o in allowed.split(",") if o.strip()}
    if "*" in listed or normalized in listed:
        return True
    parts = urlsplit(normalized)
    return parts.scheme in ("http", "https") and parts.netloc == request.host.lower()


def _loggable(value: str, limit: int = 200) -> str:
    """A header value the JSON log can hold: aiohttp keeps bytes that are not UTF-8 as
    surrogate escapes, which the renderer refuses (the log call would raise, a 500)."""
    return value[:limit].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


async def _authenticate(request: web.Request, ws: web.WebSocketResponse) -> Principal:
    """Checks in the documented order: a credential (401), then the upgrade (400). A bearer
    header is verified before the upgrade check; a ticket only on a real upgrade request,
    because checking it uses it up."""
    header = request.headers.get("Authorization")
    ticket = request.query.get("ticket")
    if header is None and not ticket:
        raise Unauthorized("missing credentials: send a bearer token or a ?ticket=", missing=True)
    principal = await request.app[AUTH].verify_header(header) if header is not None else None
    if not ws.can_prepare(request).ok:
        raise BadRequest("expected a WebSocket upgrade request", code="websocket_required")
    return principal or await _redeem(request, ticket or "")


async def _redeem(request: web.Request, ticket: str) -> Principal:
    doc = await request.app[STORE].consume_ws_ticket(ticket, now=utcnow())
    if doc is None:
        raise Unauthorized("invalid ticket: unknown, already used or expired")
    if doc.get("key_id") is not None:  # asked for with an API key: that key, as it is now
        return await request.app[API_KEYS].resolve_id(str(doc["key_id"]))
    principal = Principal(
        user_id=str(doc["user_id"]),
        expires_at=float(doc["token_expires_at"]),
        admin=bool(doc.get("admin")),
    )
    if principal.accepted_until(request.app[SETTINGS].jwt_leeway_s) <= time.time():
        raise Unauthorized("invalid ticket: its token has expired")
    return principal


async def websocket(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not origin_allowed(request, settings.ws_allowed_origins):
        log.info("ws.origin_rejected", origin=_loggable(request.headers.get("Origin", "")))
        raise OriginNotAllowed("this Origin may not open a WebSocket here")
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s, max_msg_size=settings.ws_max_msg_bytes
    )
    principal = await _authenticate(request, ws)
    request[PRINCIPAL] = principal
    key = {"key_id": principal.key.key_id} if principal.key is not None else {}
    bind_request(user_id=principal.user_id, **key)
    await ws.prepare(request)
    request[UPGRADED] = True
    services = transport.Services(
        admissions=request.app[ADMISSIONS],
        registry=request.app[REGISTRY],
        resumes=request.app[RESUMES],
        store=request.app[STORE],
        settings=settings,
        api_keys=request.app[API_KEYS],
    )
    await transport.serve(
        request, ws, principal=principal, services=services, connections=request.app[WS_CONNECTIONS]
    )
    return ws


async def create_ticket(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    principal = request[PRINCIPAL]
    ends = principal.accepted_until(settings.jwt_leeway_s)  # as long as HTTP takes the token
    ttl = int(min(settings.ws_ticket_ttl_s, max(0.0, ends - time.time())))
    if ttl < 1:
        raise Unauthorized("invalid token: about to expire")
    ticket = secrets.token_urlsafe(32)
    await request.app[STORE].create_ws_ticket(
        ticket,
        user_id=principal.user_id,
        token_expires_at=principal.expires_at,
        expires_at=utcnow() + timedelta(seconds=ttl),
        key_id=principal.key.key_id if principal.key is not None else None,
        admin=principal.admin,
    )
    return json_response(
        {"ticket": ticket, "expires_in": ttl}, headers={"Cache-Control": "no-store"}
    )


CLOSE_AT_SHUTDOWN_S = 5.0  # a reader that stopped reading must not outlast the grace period


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown (after the drain hook): close every socket with 1001 GOING_AWAY. Every turn
    is final by now; a client that does not take its last frames in time loses only those."""
    timeout_s = min(CLOSE_AT_SHUTDOWN_S, app[SETTINGS].stream_send_timeout_s)
    await transport.close_all(app[WS_CONNECTIONS], timeout_s=timeout_s)


def setup(app: web.Application) -> None:
    app[WS_CONNECTIONS] = set()
    app.router.add_get("/api/ws", websocket)
    app.router.add_post("/api/ws/ticket", create_ticket)
    app.on_shutdown.append(_close_sockets)

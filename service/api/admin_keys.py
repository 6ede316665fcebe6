"""Operators' routes over API keys, ``/api/admin/...``: a user's keys listed and revoked (one, or
all at once), and every user's keys (``?admin=true``: the admin keys alone, to audit who holds
admin rights by key).

A key outlives its user's account and role at the identity provider, which this service never
asks: offboarding someone, or taking an admin role away, ends with revoking their keys here.
That takes the path a user's own ``DELETE /api/keys/{key_id}`` takes (``ApiKeys.revoke``):
refused at once on this replica and within ``API_KEY_CACHE_S`` on the others, the key's open
WebSockets closed (4001) when they next check it. Each revocation is logged
(``admin.key_revoked``, ``admin.keys_revoked``) with who did it, the user and the key ids.
Administrators only, as every ``/api/admin`` route (``admin_only``); revoking, which cannot be
undone, with a token only (``_token_only``: a leaked admin key cannot revoke every user's keys).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service.api.admin import actor, admin_only, decode_cursor, encode_cursor, target_user
from service.errors import BadRequest, Forbidden, NotFound
from service.http import json_response, no_query, validate
from service.keys import API_KEYS, PRINCIPAL, SETTINGS, STORE
from service.store import EPOCH, Doc, utcnow
from service.stream.producer import period_of

log = structlog.get_logger("service.admin")
MILLISECOND = timedelta(milliseconds=1)


@admin_only
async def list_user_keys(request: web.Request) -> web.Response:
    """The user's keys as ``GET /api/keys`` shows them to the user."""
    no_query(request)
    user_id = target_user(request)
    api_keys = request.app[API_KEYS]
    docs = await api_keys.list(user_id)
    views = await api_keys.views(docs, request.app[SETTINGS].budget, period_of(utcnow()))
    return json_response({"items": views})


def _token_only(request: web.Request) -> None:
    """Revoking is irreversible (a secret is shown once): a token's, never a key's, as on the
    user's own key routes (a leaked admin key must not wipe every user's keys)."""
    if request[PRINCIPAL].key is not None:
        raise Forbidden("API keys cannot revoke API keys: use a token")


@admin_only
async def revoke_user_key(request: web.Request) -> web.Response:
    no_query(request)
    _token_only(request)
    user_id = target_user(request)
    key_id = request.match_info["key_id"]
    try:
        found = await request.app[API_KEYS].revoke(user_id, key_id)
    except BaseException as exc:  # the write may have landed: say who tried
        log.warning(
            "admin.key_revoke_unconfirmed",
            **actor(request),
            target_user_id=user_id,
            target_key_id=key_id,
            error=type(exc).__name__,
        )
        raise
    if not found:
        raise NotFound("API key not found", code="key_not_found")
    log.info("admin.key_revoked", **actor(request), target_user_id=user_id, target_key_id=key_id)
    return web.Response(status=204)


@admin_only
async def revoke_user_keys(request: web.Request) -> web.Response:
    """Every key of the user not revoked yet: how many this call revoked, and which."""
    no_query(request)
    _token_only(request)
    user_id = target_user(request)
    revoked: list[str] = []
    complete = False
    try:
        await request.app[API_KEYS].revoke_all(user_id, into=revoked)
        complete = True
    finally:  # those revoked before a failure or a cancellation are logged too
        log.info(
            "admin.keys_revoked",
            **actor(request),
            target_user_id=user_id,
            target_key_ids=revoked,
            revoked=len(revoked),
            complete=complete,
        )
    return json_response({"user_id": user_id, "revoked": len(revoked), "key_ids": revoked})


class KeysQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    admin: bool | None = None  # only admin keys (true), only the others (false); both unset
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=400)


def _cursor_of(doc: Doc) -> str:
    """After this key: its ``created_at`` in whole milliseconds (MongoDB's precision), its id."""
    return encode_cursor((doc["created_at"] - EPOCH) // MILLISECOND, str(doc["_id"]))


def _after(cursor: str) -> tuple[datetime, str]:
    millis, key_id = decode_cursor(cursor)
    try:
        return EPOCH + millis * MILLISECOND, key_id
    except OverflowError:  # a number no date has
        raise BadRequest("invalid cursor", code="invalid_cursor") from None


@admin_only
async def list_keys(request: web.Request) -> web.Response:
    """Every user's keys not revoked, newest first, each with its ``user_id``."""
    query = validate(KeysQuery, dict(request.query))
    after = _after(query.cursor) if query.cursor else None
    docs = await request.app[STORE].all_api_keys(admin=query.admin, limit=query.limit, after=after)
    more = len(docs) > query.limit
    docs = docs[: query.limit]
    views = await request.app[API_KEYS].views(
        docs, request.app[SETTINGS].budget, period_of(utcnow())
    )
    items = [{"user_id": d["user_id"], **v} for d, v in zip(docs, views, strict=True)]
    return json_response(
        {"items": items, "next_cursor": _cursor_of(docs[-1]) if more and docs else None}
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/admin/keys", list_keys)
    app.router.add_get("/api/admin/users/{user_id}/keys", list_user_keys)
    app.router.add_delete("/api/admin/users/{user_id}/keys", revoke_user_keys)
    app.router.add_delete("/api/admin/users/{user_id}/keys/{key_id}", revoke_user_key)

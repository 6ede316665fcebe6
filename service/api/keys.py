"""API keys: ``POST /api/keys`` (the secret is in this answer only), ``GET /api/keys``,
``DELETE /api/keys/{key_id}``. Only a token manages keys: a request made with a key may not
create, list or revoke any (a leaked key must not mint more). The logic is ``service/apikeys.py``.
"""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.api.admin import parse_limit
from service.apikeys import key_view, parse_expiry
from service.auth import Principal
from service.errors import BadRequest, Forbidden, NotFound
from service.http import json_response, no_query, one_line, read_json
from service.keys import API_KEYS, CATALOGUE, PRINCIPAL, SETTINGS
from service.store import utcnow
from service.stream.producer import period_of


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)
    name: Annotated[str, AfterValidator(one_line)] = Field(min_length=1, max_length=100)
    expires_at: str | None = Field(None, max_length=64)
    models: list[str] | None = Field(None, min_length=1, max_length=100)
    limit: int | str | None = None  # in the budget's unit (``parse_limit``)
    admin: bool = False


def _token_principal(request: web.Request) -> Principal:
    principal = request[PRINCIPAL]
    if principal.key is not None:
        raise Forbidden("API keys cannot manage API keys: use a token")
    return principal


def _check_models(request: web.Request, models: list[str] | None) -> None:
    if models is None:
        return
    known = {m.name for m in request.app[CATALOGUE].all()}
    unknown = sorted({m for m in models if m not in known})
    if unknown:
        raise BadRequest(
            f"unknown model: {', '.join(unknown)}",
            code="unknown_model",
            details={"unknown": unknown, "known": sorted(known)},
        )


async def create_key(request: web.Request) -> web.Response:
    principal = _token_principal(request)
    body = await read_json(request, CreateKey)
    expires_at = parse_expiry(body.expires_at, utcnow()) if body.expires_at is not None else None
    _check_models(request, body.models)
    if body.admin and not principal.admin:
        raise Forbidden("only an admin may create an admin key")
    budget = request.app[SETTINGS].budget
    limit = parse_limit(body.limit, budget) if body.limit is not None else None
    doc, secret = await request.app[API_KEYS].create(
        principal.user_id,
        name=body.name,
        expires_at=expires_at,
        models=body.models,
        limit=limit,
        admin=body.admin,
    )
    return json_response(
        {**key_view(doc, budget), "key": secret},
        status=201,
        headers={"Cache-Control": "no-store"},
    )


async def list_keys(request: web.Request) -> web.Response:
    no_query(request)
    principal = _token_principal(request)
    api_keys = request.app[API_KEYS]
    docs = await api_keys.list(principal.user_id)
    views = await api_keys.views(docs, request.app[SETTINGS].budget, period_of(utcnow()))
    return json_response({"items": views})


async def revoke_key(request: web.Request) -> web.Response:
    principal = _token_principal(request)
    key_id = request.match_info["key_id"]
    if not await request.app[API_KEYS].revoke(principal.user_id, key_id):
        raise NotFound("API key not found", code="key_not_found")
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app.router.add_post("/api/keys", create_key)
    app.router.add_get("/api/keys", list_keys)
    app.router.add_delete("/api/keys/{key_id}", revoke_key)

"""``GET /v1/models`` and ``GET /v1/models/{model}``, in the caller's vendor's shape.

Both SDKs ask the same paths. A request that carries ``anthropic-version`` (every Anthropic SDK
and Claude Code send it) is answered as Anthropic's Models API answers: ``ModelInfo`` objects,
its list's ``limit`` / ``after_id`` / ``before_id`` pages, its error shape, and the key in
``x-api-key`` (``service.middleware.is_anthropic``); any other as OpenAI's. Either way a caller
is offered only the models it may use: the catalogue's that their upstream lists now and, with an
API key that has a model list, those on it (``ModelLists.live``); another is 404
``model_not_found``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from service.errors import BadRequest
from service.http import json_response
from service.keys import CATALOGUE, MODEL_LISTS, PRINCIPAL
from service.middleware import is_anthropic
from service.models import ModelSpec

# The catalogue has no dates: the models are as new as this process's reading of it.
MODELS_CREATED = int(time.time())
CREATED_AT = datetime.fromtimestamp(MODELS_CREATED, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
PAGE_DEFAULT, PAGE_MAX = 20, 1000  # Anthropic's list: ``limit``'s default and its most


def _openai_view(spec: ModelSpec) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": MODELS_CREATED,
        "owned_by": spec.provider,
    }


def _anthropic_view(spec: ModelSpec) -> dict[str, Any]:
    return {
        "type": "model",
        "id": spec.name,
        "display_name": spec.name,
        "created_at": CREATED_AT,
        "max_input_tokens": spec.context_window,
        "max_tokens": spec.max_output_tokens,
    }


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[MODEL_LISTS].live(
        request.app[CATALOGUE].all(), request[PRINCIPAL].key
    )
    if not is_anthropic(request):
        return json_response({"object": "list", "data": [_openai_view(m) for m in models]})
    page, more = _page([m.name for m in models], request.query)
    return json_response(
        {
            "data": [_anthropic_view(m) for m in models if m.name in page],
            "has_more": more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
    )


def _page(ids: list[str], query: Any) -> tuple[list[str], bool]:
    """The ids of Anthropic's page (``limit``, after ``after_id`` or before ``before_id``) and
    whether more lie beyond it in that direction."""
    raw = query.get("limit", str(PAGE_DEFAULT))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= PAGE_MAX:
        raise BadRequest(f"limit: must be an integer from 1 to {PAGE_MAX}", code="validation_error")
    limit = int(raw)
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise BadRequest("only one of after_id and before_id may be given", code="invalid_cursor")
    for cursor in (after, before):
        if cursor is not None and cursor not in ids:
            raise BadRequest(f"no model '{cursor}' to page from", code="invalid_cursor")
    if before is not None:
        end = ids.index(before)
        return ids[max(0, end - limit) : end], end - limit > 0
    start = ids.index(after) + 1 if after is not None else 0
    return ids[start : start + limit], start + limit < len(ids)


async def get_model(request: web.Request) -> web.Response:
    """One model, or 404 ``model_not_found`` (also one the caller's API key may not use)."""
    spec = request.app[CATALOGUE].resolve(request.match_info["model"])
    await request.app[MODEL_LISTS].require(spec, request[PRINCIPAL].key)
    return json_response(_anthropic_view(spec) if is_anthropic(request) else _openai_view(spec))


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)

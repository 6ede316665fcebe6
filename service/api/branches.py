"""Regenerate the chat's latest answer, edit its latest question, and list a message's versions.

``POST /api/chat/{chat_id}/messages/{message_id}/regenerate`` (body optional: ``{"model"}``)
and ``POST .../edit`` (``{"message", "model"?}``) answer exactly like a send (an SSE stream, the
same producer, budget, rate limit and ``Idempotency-Key``); ``GET .../versions`` lists every
version of a message. The rules are in ``service/stream/branches.py``.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import Field

from service.api.chats import StrictModel, message_view
from service.http import json_response, no_query, not_found, parse_uuid, read_json
from service.keys import ADMISSIONS, PRINCIPAL, REGISTRY, SETTINGS, STORE
from service.stream.branches import Branch, Kind, root_of
from service.stream.idempotency import HEADER as KEY_HEADER
from service.stream.idempotency import REPLAYED_HEADER, branch_payload, parse_key
from service.stream.producer import TurnInput
from service.transports import sse


class Regenerate(StrictModel):
    model: str | None = Field(None, min_length=1, max_length=100)


class Edit(StrictModel):
    # 1..MAX_MESSAGE_CHARS after trimming is checked by the producer; this bounds the raw text.
    message: str = Field(max_length=200_000)
    model: str | None = Field(None, min_length=1, max_length=100)


def _ids(request: web.Request) -> tuple[str, str]:
    return (
        parse_uuid(request.match_info["chat_id"], "chat_id"),
        parse_uuid(request.match_info["message_id"], "message_id"),
    )


async def regenerate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, Regenerate, empty_ok=True)
    return await _branch(request, "regenerate", None, body.model)


async def edit(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, Edit)
    return await _branch(request, "edit", body.message, body.model)


async def _branch(
    request: web.Request, kind: Kind, text: str | None, model: str | None
) -> web.StreamResponse:
    chat_id, message_id = _ids(request)
    key = parse_key(request.headers.get(KEY_HEADER))
    inp = TurnInput(
        user_id=request[PRINCIPAL].user_id,
        api_key=request[PRINCIPAL].key,
        transport="sse",
        chat_id=chat_id,
        text=text,
        model=model,
        key=key,
        branch=Branch(kind, message_id),
    )
    payload = branch_payload(kind, chat_id, message_id, text, model) if key is not None else None
    admission = await request.app[ADMISSIONS].admit(inp, payload)
    registry = request.app[REGISTRY]
    follower = registry.follow(admission.live, 0, "sse", keepalive=True)
    headers = {REPLAYED_HEADER: "true"} if admission.replayed else None
    return sse.respond(registry, follower, request.app[SETTINGS], headers=headers)


async def list_versions(request: web.Request) -> web.Response:
    """Every version of a message, oldest first, and which one the chat's history shows
    (``chosen``: none when all were superseded, e.g. an answer to a question edited since)."""
    no_query(request)
    chat_id, message_id = _ids(request)
    user_id = request[PRINCIPAL].user_id
    store = request.app[STORE]
    doc = await store.chat_message(user_id, chat_id, message_id)
    if doc is None or await store.get_chat(user_id, chat_id) is None:
        raise not_found("message")
    versions = await store.versions(chat_id, user_id, root_of(doc))
    chosen = next((v["_id"] for v in versions if "superseded_by" not in v), None)
    return json_response(
        {
            "message_id": message_id,
            "chosen": chosen,
            "versions": [message_view(v) for v in versions],
        }
    )


def setup(app: web.Application) -> None:
    base = "/api/chat/{chat_id}/messages/{message_id}"
    app.router.add_post(f"{base}/regenerate", regenerate)
    app.router.add_post(f"{base}/edit", edit)
    app.router.add_get(f"{base}/versions", list_versions)

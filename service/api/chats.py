"""Chat API: list, create, read (with paginated messages), rename, soft delete."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from service.costs import format_cost
from service.http import json_response, not_found, one_line, parse_uuid, read_json, validate
from service.keys import CATALOGUE, MODEL_LISTS, PRINCIPAL, REGISTRY, SETTINGS, STORE
from service.records import Status
from service.store import Doc, utcnow
from service.stream.watcher import settle_interrupted

# The largest integer MongoDB stores (a signed 64-bit int); a larger one cannot even be encoded.
MAX_INT64 = 2**63 - 1


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# A chat's title, as created or renamed: trimmed, then 1..200 characters (all blank is refused),
# on one line.
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(one_line),
]


class CreateChat(StrictModel):
    title: Title | None = None
    model: str | None = Field(None, min_length=1, max_length=100)


class RenameChat(StrictModel):
    title: Title


class ListChatsQuery(StrictModel):
    model_config = ConfigDict(strict=False)  # query strings are text: lax ints
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class ChatQuery(StrictModel):
    model_config = ConfigDict(strict=False)
    limit: int = Field(100, ge=1, le=500)
    after: int = Field(-1, ge=-1, le=MAX_INT64)


def chat_view(doc: Doc) -> dict[str, Any]:
    return {
        "chat_id": doc["_id"],
        "title": doc.get("title"),
        "model": doc.get("model"),
        "created_at": doc["created_at"],
        "updated_at": doc["updated_at"],
    }


def _cost(doc: Doc) -> dict[str, Any]:
    """An answer's cost (a priced model's) and the currency, beside its tokens."""
    if doc.get("cost") is None:
        return {}
    return {"cost": format_cost(int(doc["cost"])), "currency": doc.get("currency")}


def message_view(doc: Doc) -> dict[str, Any]:
    return {
        "message_id": doc["_id"],
        "seq": doc["seq"],
        "role": doc["role"],
        "content": doc.get("content", ""),
        "status": doc.get("status", Status.COMPLETE),
        "created_at": doc["created_at"],
        "model": doc.get("model"),
        "finish_reason": doc.get("finish_reason"),
        "reason": doc.get("reason"),
        "error": doc.get("error"),
        "tokens": doc.get("tokens"),
        **_cost(doc),
        **{k: doc[k] for k in MESSAGE_EXTRAS if doc.get(k)},
    }


# What an answer may carry besides its text (the /v1 route's), a tool turn's results, the
# user's rating of an answer (``service/api/feedback.py``), and its place among its versions
# (``service/stream/branches.py``).
MESSAGE_EXTRAS = (
    "reasoning",
    "tool_calls",
    "refusal",
    "results",
    "feedback",
    "replaces",
    "edits",
    "version_of",
    "version",
    "superseded_by",
)


async def list_chats(request: web.Request) -> web.Response:
    query = validate(ListChatsQuery, dict(request.query))
    page = await request.app[STORE].list_chats(
        request[PRINCIPAL].user_id, limit=query.limit, cursor=query.cursor
    )
    return json_response(
        {"chats": [chat_view(c) for c in page.items], "next_cursor": page.next_cursor}
    )


async def create_chat(request: web.Request) -> web.Response:
    body = await read_json(request, CreateChat, empty_ok=True)
    principal = request[PRINCIPAL]
    if body.model is not None:  # refused now as a send in the chat would be, not at each send
        spec = request.app[CATALOGUE].resolve(body.model)
        if principal.key is not None and not principal.key.may_use(spec.name):
            raise principal.key.not_allowed(spec.name)
        await request.app[MODEL_LISTS].require(spec)
    chat = await request.app[STORE].create_chat(
        principal.user_id,
        title=body.title,
        model=body.model,
        cap=request.app[SETTINGS].max_chats_per_user,
    )
    return json_response(chat_view(chat), status=201)


async def get_chat(request: web.Request) -> web.Response:
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    query = validate(ChatQuery, dict(request.query))
    store = request.app[STORE]
    chat = await store.get_chat(request[PRINCIPAL].user_id, chat_id)
    if chat is None:
        raise not_found("chat")
    messages = await store.list_messages(chat_id, after_seq=query.after, limit=query.limit + 1)
    if await _settle_dead_streams(request, messages):
        messages = await store.list_messages(chat_id, after_seq=query.after, limit=query.limit + 1)
    more = len(messages) > query.limit
    messages = messages[: query.limit]
    return json_response(
        {
            **chat_view(chat),
            "messages": [message_view(m) for m in messages],
            "next_after": messages[-1]["seq"] if more else None,
        }
    )


async def _settle_dead_streams(request: web.Request, messages: list[Doc]) -> bool:
    """A message left 'streaming' by a dead process is reported as interrupted when read (not
    while this replica is just back from a MongoDB outage: live replicas' heartbeats are old)."""
    store = request.app[STORE]
    stale_s = request.app[SETTINGS].stale_stream_s
    if not request.app[REGISTRY].may_reap(asyncio.get_running_loop().time(), stale_s):
        return False
    cutoff = utcnow() - timedelta(seconds=stale_s)
    dead = await store.dead_among(messages, older_than=cutoff)
    for doc in dead:
        await settle_interrupted(store, doc, request.app[SETTINGS].budget)
    return bool(dead)


async def rename_chat(request: web.Request) -> web.Response:
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    body = await read_json(request, RenameChat)
    chat = await request.app[STORE].rename_chat(request[PRINCIPAL].user_id, chat_id, body.title)
    if chat is None:
        raise not_found("chat")
    return json_response(chat_view(chat))


async def delete_chat(request: web.Request) -> web.Response:
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    deleted_at = await request.app[STORE].delete_chat(request[PRINCIPAL].user_id, chat_id)
    if deleted_at is None:
        raise not_found("chat")
    request.app[REGISTRY].cancel_chat(chat_id, "user_cancel")  # at once when they run here
    return json_response({"chat_id": chat_id, "deleted_at": deleted_at})


def setup(app: web.Application) -> None:
    app.router.add_get("/api/chat", list_chats)
    app.router.add_post("/api/chat", create_chat)
    app.router.add_get("/api/chat/{chat_id}", get_chat)
    app.router.add_patch("/api/chat/{chat_id}", rename_chat)
    app.router.add_delete("/api/chat/{chat_id}", delete_chat)

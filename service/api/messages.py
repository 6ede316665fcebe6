"""Sending a message (streamed over SSE), following an answer again (resume), cancelling one,
and the usage summary."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web
from pydantic import Field

from service.api.admin import month_limit
from service.api.chats import StrictModel
from service.costs import format_cost
from service.errors import BadRequest, Conflict
from service.http import json_response, no_query, not_found, parse_uuid, read_json
from service.keys import (
    ADMISSIONS,
    CATALOGUE,
    MODEL_LISTS,
    PRINCIPAL,
    REGISTRY,
    RESUMES,
    SETTINGS,
    STORE,
)
from service.metrics import RESUMES as RESUMES_TOTAL
from service.records import Status
from service.store import utcnow
from service.stream.idempotency import HEADER as KEY_HEADER
from service.stream.idempotency import REPLAYED_HEADER, Admission, chat_send_payload, parse_key
from service.stream.live import LiveStream
from service.stream.producer import TurnInput, period_of
from service.transports import sse

MAX_OFFSET = 10**9  # no answer is longer; a bigger offset is not one this service gave


class SendMessage(StrictModel):
    # 1..MAX_MESSAGE_CHARS after trimming is checked by the producer; this bounds the raw text.
    message: str = Field(max_length=200_000)
    model: str | None = Field(None, min_length=1, max_length=100)


async def send_message(request: web.Request) -> web.StreamResponse:
    admission = await _start(request)
    return await _follow(request, admission.live, 0, replayed=admission.replayed)


async def _start(request: web.Request) -> Admission:
    """Start the turn, or follow the one its Idempotency-Key claimed (the request's body is
    not kept for the length of the stream)."""
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    key = parse_key(request.headers.get(KEY_HEADER))
    body = await read_json(request, SendMessage)
    inp = TurnInput(
        user_id=request[PRINCIPAL].user_id,
        api_key=request[PRINCIPAL].key,
        transport="sse",
        chat_id=chat_id,
        text=body.message,
        model=body.model,
        key=key,
    )
    payload = chat_send_payload(chat_id, body.message, body.model) if key is not None else None
    return await request.app[ADMISSIONS].admit(inp, payload)


async def _follow(
    request: web.Request, live: LiveStream, offset: int, *, replayed: bool = False
) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    follower = registry.follow(live, offset, "sse", keepalive=True)
    headers = {REPLAYED_HEADER: "true"} if replayed else None
    return sse.respond(registry, follower, request.app[SETTINGS], headers=headers)


async def resume_message(request: web.Request) -> web.StreamResponse:
    """``GET /api/chat/{chat_id}/messages/{message_id}/stream``: the answer from an offset
    (``Last-Event-ID`` or ``?after=``): the text after it as one delta, then live deltas, then
    the terminal event; from any replica. An ended answer gives the rest and its end at once."""
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    message_id = parse_uuid(request.match_info["message_id"], "message_id")
    after = _offset(request)
    found = await request.app[RESUMES].find(request[PRINCIPAL].user_id, chat_id, message_id)
    if found is None:
        raise not_found("message")
    return await _resume(request, *found, after)


async def resume_chat(request: web.Request) -> web.StreamResponse:
    """``GET /api/chat/{chat_id}/stream``: follow the chat's running answer (from ``after``),
    or 204 when none runs (the AI SDK's ``resume`` convention)."""
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    after = _offset(request)
    user_id = request[PRINCIPAL].user_id
    if await request.app[STORE].get_chat(user_id, chat_id) is None:
        raise not_found("chat")
    found = await request.app[RESUMES].running(user_id, chat_id)
    if found is None:
        return web.Response(status=204)
    return await _resume(request, *found, after)


async def _resume(
    request: web.Request, live: LiveStream, source: str, after: int
) -> web.StreamResponse:
    # Past the end of an ended answer, or of one running here, is an offset this service never
    # gave; a copy followed from another replica may lag behind the offset a client has.
    if after > live.length and (live.final is not None or source == "memory"):
        raise BadRequest(
            f"offset {after} is past the end of the answer ({live.length} characters)",
            code="invalid_offset",
            details={"length": live.length},
        )
    RESUMES_TOTAL.labels(source).inc()
    return await _follow(request, live, after)


def _offset(request: web.Request) -> int:
    """``?after=`` (wins) or ``Last-Event-ID``: a count of characters; 0 when neither."""
    raw = request.query.get("after", request.headers.get("Last-Event-ID", "0")).strip()
    if not raw.isascii() or not raw.isdigit():
        raise BadRequest(
            "the offset (after / Last-Event-ID) must be a whole number of characters",
            code="invalid_offset",
        )
    # The length first: int() refuses thousands of digits (a 500).
    if len(raw.lstrip("0")) > len(str(MAX_OFFSET)) or int(raw) > MAX_OFFSET:
        raise BadRequest(
            f"the offset (after / Last-Event-ID) is past any answer's end (at most {MAX_OFFSET})",
            code="invalid_offset",
        )
    return int(raw)


async def cancel_message(request: web.Request) -> web.Response:
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    message_id = parse_uuid(request.match_info["message_id"], "message_id")
    doc = await request.app[STORE].request_cancel(request[PRINCIPAL].user_id, chat_id, message_id)
    if doc is None:
        raise not_found("message")
    if doc["status"] != Status.STREAMING:
        raise Conflict(
            "this answer is not streaming any more",
            code="not_streaming",
            details={"status": doc["status"]},
        )
    request.app[REGISTRY].cancel(message_id, "user_cancel")  # at once when it runs here
    return json_response({"message_id": message_id, "status": "cancelling"}, status=202)


def _period_bounds(now: datetime) -> tuple[datetime, datetime]:
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def get_usage(request: web.Request) -> web.Response:
    no_query(request)
    now = utcnow()
    period = period_of(now)
    store, user_id = request.app[STORE], request[PRINCIPAL].user_id
    doc = await store.get_usage(user_id, period) or {}
    budget = request.app[SETTINGS].budget
    # Before the month's first turn, the standing limit an admin set (one more read, then).
    standing = None if doc else await store.standing_limit(user_id)
    limit = month_limit(doc, budget, standing)
    used, reserved = int(doc.get("used", 0)), int(doc.get("reserved", 0))
    start, end = _period_bounds(now)
    return json_response(
        {
            "period": period,
            "period_start": start,
            "period_end": end,
            "unit": budget.label,  # what used/reserved/limit/remaining count
            "used": budget.show(used),
            "reserved": budget.show(reserved),
            "limit": budget.show(limit),
            "remaining": budget.show(max(0, limit - used - reserved)),
            "percent": round(100 * used / limit, 2) if limit else 100.0,
            "cost": format_cost(int(doc.get("cost", 0))),  # the month's spend, in any unit
            "currency": budget.currency,
        }
    )


def setup(app: web.Application) -> None:
    app.router.add_post("/api/chat/{chat_id}/message", send_message)
    app.router.add_get("/api/chat/{chat_id}/stream", resume_chat)
    app.router.add_get("/api/chat/{chat_id}/messages/{message_id}/stream", resume_message)
    app.router.add_post("/api/chat/{chat_id}/messages/{message_id}/cancel", cancel_message)
    app.router.add_get("/api/usage", get_usage)
    app.router.add_get("/api/models", list_models)


async def list_models(request: web.Request) -> web.Response:
    no_query(request)
    catalogue = request.app[CATALOGUE]
    key = request[PRINCIPAL].key
    models = await request.app[MODEL_LISTS].live(catalogue.all(), key)
    return json_response(
        {
            "default": catalogue.default_for(key),
            "models": [
                {
                    "name": m.name,
                    "provider": m.provider,
                    "context_window": m.context_window,
                    "max_output_tokens": m.max_output_tokens,
                }
                for m in models
            ],
        }
    )

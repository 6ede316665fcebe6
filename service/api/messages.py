"""Sending a message (streamed over SSE), cancelling a running answer, and the usage summary."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web
from pydantic import Field

from service.api.chats import StrictModel
from service.errors import Conflict
from service.http import json_response, not_found, parse_uuid, read_json
from service.keys import CATALOGUE, MODEL_LISTS, PRINCIPAL, PRODUCER, REGISTRY, SETTINGS, STORE
from service.store import utcnow
from service.stream.producer import Turn, TurnInput, period_of
from service.transports import sse


class SendMessage(StrictModel):
    # 1..MAX_MESSAGE_CHARS after trimming is checked by the producer; this bounds the raw text.
    message: str = Field(max_length=200_000)
    model: str | None = Field(None, min_length=1, max_length=100)


async def send_message(request: web.Request) -> web.StreamResponse:
    turn = await _start(request)
    return await sse.stream_turn(request, turn, request.app[SETTINGS])


async def _start(request: web.Request) -> Turn:
    """Start the turn (the request's body is not kept for the length of the stream)."""
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    body = await read_json(request, SendMessage)
    return await request.app[PRODUCER].start(
        TurnInput(
            user_id=request[PRINCIPAL].user_id,
            transport="sse",
            chat_id=chat_id,
            text=body.message,
            model=body.model,
        )
    )


async def cancel_message(request: web.Request) -> web.Response:
    chat_id = parse_uuid(request.match_info["chat_id"], "chat_id")
    message_id = parse_uuid(request.match_info["message_id"], "message_id")
    doc = await request.app[STORE].request_cancel(request[PRINCIPAL].user_id, chat_id, message_id)
    if doc is None:
        raise not_found("message")
    if doc["status"] != "streaming":
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
    now = utcnow()
    period = period_of(now)
    doc = await request.app[STORE].get_usage(request[PRINCIPAL].user_id, period) or {}
    limit = int(doc.get("limit", request.app[SETTINGS].default_token_limit))
    used, reserved = int(doc.get("used", 0)), int(doc.get("reserved", 0))
    start, end = _period_bounds(now)
    return json_response(
        {
            "period": period,
            "period_start": start,
            "period_end": end,
            "used": used,
            "reserved": reserved,
            "limit": limit,
            "remaining": max(0, limit - used - reserved),
            "percent": round(100 * used / limit, 2) if limit else 100.0,
        }
    )


def setup(app: web.Application) -> None:
    app.router.add_post("/api/chat/{chat_id}/message", send_message)
    app.router.add_post("/api/chat/{chat_id}/messages/{message_id}/cancel", cancel_message)
    app.router.add_get("/api/usage", get_usage)
    app.router.add_get("/api/models", list_models)


async def list_models(request: web.Request) -> web.Response:
    catalogue = request.app[CATALOGUE]
    models = await request.app[MODEL_LISTS].live(catalogue.all())
    return json_response(
        {
            "default": catalogue.default,
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

"""A user's rating of an answer: ``PUT`` / ``DELETE
/api/chat/{chat_id}/messages/{message_id}/feedback``.

Stored on the message itself (``feedback: {rating, comment, at}``), so it goes wherever the
message goes (``GET /api/chat/{chat_id}`` shows it) and is removed with it. Only an answer that
has ended can be rated (409 ``answer_streaming`` before).
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service.http import json_response, not_found, parse_uuid, read_json
from service.keys import PRINCIPAL, STORE
from service.store import utcnow


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=2000)


def _ids(request: web.Request) -> tuple[str, str]:
    return (
        parse_uuid(request.match_info["chat_id"], "chat_id"),
        parse_uuid(request.match_info["message_id"], "message_id"),
    )


async def put_feedback(request: web.Request) -> web.Response:
    chat_id, message_id = _ids(request)
    body = await read_json(request, Feedback)
    feedback = {"rating": body.rating, "comment": body.comment or None, "at": utcnow()}
    doc = await request.app[STORE].set_feedback(
        request[PRINCIPAL].user_id, chat_id, message_id, feedback
    )
    if doc is None:
        raise not_found("message")
    return json_response({"message_id": message_id, "feedback": doc["feedback"]})


async def delete_feedback(request: web.Request) -> web.Response:
    chat_id, message_id = _ids(request)
    doc = await request.app[STORE].set_feedback(
        request[PRINCIPAL].user_id, chat_id, message_id, None
    )
    if doc is None:
        raise not_found("message")
    return json_response({"message_id": message_id, "feedback": None})


def setup(app: web.Application) -> None:
    path = "/api/chat/{chat_id}/messages/{message_id}/feedback"
    app.router.add_put(path, put_feedback)
    app.router.add_delete(path, delete_feedback)

"""Search of the user's own chats: ``GET /api/search?q=&limit=&cursor=``.

Titles of the user's active chats and the messages in them (never a deleted chat's, never
another user's), ranked by ``service.search``, paged by an opaque cursor (an offset into the
ranking: a page further on may shift when new messages arrive meanwhile).
"""

from __future__ import annotations

import base64

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service.errors import BadRequest
from service.http import json_response, validate
from service.keys import PRINCIPAL, STORE
from service.search import Query, rank

# How many matching messages one search ranks at most: the best by the text index, or the newest
# where the server has none. Pages end there.
CANDIDATES = 500


class SearchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    q: str = Field(min_length=1, max_length=200)
    limit: int = Field(20, ge=1, le=50)
    cursor: str | None = Field(None, max_length=100)


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"o": offset})).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        offset = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["o"]
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc
    if type(offset) is not int or not 0 <= offset <= CANDIDATES * 2:  # a bool is an int too
        raise BadRequest("invalid cursor", code="invalid_cursor")
    return offset


async def search(request: web.Request) -> web.Response:
    params = validate(SearchQuery, dict(request.query))
    query = Query.parse(params.q)
    offset = decode_cursor(params.cursor)
    user_id = request[PRINCIPAL].user_id
    store = request.app[STORE]
    chats = await store.active_chats(user_id)
    messages = (
        await store.find_messages(
            user_id, [c["_id"] for c in chats], list(query.terms), limit=CANDIDATES
        )
        if chats
        else []
    )
    hits = rank(query, chats, messages)
    page = hits[offset : offset + params.limit]
    more = len(hits) > offset + params.limit
    return json_response(
        {
            "query": query.text,
            "results": [hit.view() for hit in page],
            "next_cursor": encode_cursor(offset + params.limit) if more else None,
        }
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/search", search)

"""OpenAI-compatible front door: POST /v1/chat/completions and GET /v1/models.

Anything written for an OpenAI-style backend works by changing the base URL and the key (a
token of this service)::

    client = AsyncOpenAI(base_url="http://127.0.0.1:8080/v1", api_key=token)

It is a thin transport over the same turn producer as the SSE route: budgets, usage accounting
and lifecycle logs (``transport="openai"``) apply exactly as there; its rate limits are the
programs' (requests per minute, turns at once), announced in OpenAI's ``x-ratelimit-*`` headers.
Errors take OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (see
``service.middleware``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import BadRequest, BudgetExceeded, RateLimited
from service.http import json_response, parse_uuid, read_body
from service.keys import ADMISSIONS, CATALOGUE, MODEL_LISTS, PRINCIPAL, REGISTRY, SETTINGS, STORE
from service.limits import Allowance, rate_limit_headers
from service.models import ModelSpec
from service.store import allowance_of, utcnow
from service.stream.idempotency import HEADER as KEY_HEADER
from service.stream.idempotency import REPLAYED_HEADER, Admission, fingerprint, parse_key
from service.stream.producer import TurnInput, period_of
from service.transports import openai_chunks, sse

CHAT_ID_HEADER = "X-Chat-Id"
MODELS_CREATED = int(time.time())  # the catalogue has no dates: when this process loaded it


class _Body(BaseModel):
    # Unknown optional fields are ignored as OpenAI does; wrong types are rejected (strict).
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class ChatCompletionRequest(_Body):
    model: str = Field(min_length=1, max_length=100)
    messages: list[ChatMessage] = Field(min_length=1, max_length=2000)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = None


# --------------------------------------------------------------------------- request edge
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as OpenAI names a parameter: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part:  # a union member's tag, not a field
            continue
        else:
            out += f".{part}" if out else part
    return out


def _invalid(message: str, param: str | None, code: str | None = None) -> BadRequest:
    return BadRequest(message, code=code or "invalid_value", details={"param": param})


def _validation_error(exc: ValidationError) -> BadRequest:
    err = exc.errors(include_url=False, include_input=False)[0]
    param = _param(err["loc"])
    if err["type"] == "missing":
        return _invalid(
            f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
        )
    if err["type"].endswith("_type") or err["type"] in ("union_tag_invalid", "model_type"):
        return _invalid(f"Invalid type for '{param}': {err['msg']}.", param, "invalid_type")
    return _invalid(f"Invalid value for '{param}': {err['msg']}.", param)


async def _read_body(request: web.Request) -> ChatCompletionRequest:
    raw = await read_body(request)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid(
            "We could not parse the JSON body of your request.", None, "invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise _invalid("The request body must be a JSON object.", None, "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _invalid(
                f"Content parts of type '{part.type}' are not supported; send text.",
                f"messages[{index}].content[{j}].type",
            )
        texts.append(part.text)
    return "".join(texts)


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        if m.role in ("tool", "function"):
            raise _invalid(
                f"Messages with role '{m.role}' are not supported by this service.",
                f"messages[{i}].role",
            )
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": _text(m, i)})
    if out[-1]["role"] != "user":
        raise _invalid(
            "The last message must be the user's (role 'user').",
            f"messages[{len(out) - 1}].role",
        )
    return out


def _turn_input(request: web.Request, body: ChatCompletionRequest) -> TurnInput:
    messages = _messages(body)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and len(stop) > 4:
        raise _invalid("'stop' takes at most 4 sequences.", "stop")
    common: dict[str, Any] = {
        "user_id": request[PRINCIPAL].user_id,
        "transport": "openai",
        "model": body.model,
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": stop,
    }
    header = request.headers.get(CHAT_ID_HEADER)
    if header is None:
        return TurnInput(messages=messages, **common)
    chat_id = parse_uuid(header, CHAT_ID_HEADER)
    return TurnInput(chat_id=chat_id, text=messages[-1]["content"], **common)


# --------------------------------------------------------------------------- handlers
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``, OpenAI's request and response formats.

    Stateless by default: the request's ``messages`` are the whole context (an optional first
    ``system``/``developer`` message, then the conversation, ending with the user's message).

    Header ``X-Chat-Id: <chat uuid>`` attaches the turn to one of the caller's stored chats
    instead: the last (user) message is the turn's text, the chat's stored history is the
    context (earlier request messages are ignored), and both the user message and the answer are
    persisted exactly like ``POST /api/chat/{chat_id}/message`` (the request's ``model`` is
    used for the turn). An unknown chat is a 404 ``chat_not_found``, a malformed id a 400.

    ``stream: true`` answers with ``chat.completion.chunk`` frames (plus a usage chunk when
    ``stream_options.include_usage`` is set) and ``data: [DONE]``; otherwise one
    ``chat.completion`` with ``usage``.

    Every answer, and a refusal by a rate limit or the budget, carries OpenAI's
    ``x-ratelimit-*`` headers (``_limit_headers``).
    """
    try:
        admission, stream, include_usage = await _start(request)
    except (RateLimited, BudgetExceeded) as exc:
        if exc.allowance is not None:
            exc.headers.update(_limit_headers(request, exc.allowance))
        raise
    headers = _limit_headers(request, await _allowance(request, admission))
    if admission.replayed:
        headers[REPLAYED_HEADER] = "true"
    live = admission.live
    registry = request.app[REGISTRY]
    follower = registry.follow(live, 0, "openai", keepalive=stream)
    if stream:
        enc = openai_chunks.ChunkEncoder(
            openai_chunks.completion_id(live.message_id),
            live.model,
            admission.created,
            include_usage=include_usage,
        )
        return await sse.respond(
            request, registry, follower, request.app[SETTINGS], enc.encode, headers=headers
        )
    try:
        completion = await openai_chunks.complete(follower, created=admission.created)
    finally:
        registry.leave(follower, "client_disconnect")  # a no-op once the turn has ended
    return json_response(completion, headers=headers)


async def _start(request: web.Request) -> tuple[Admission, bool, bool]:
    """Start the turn, or follow the one its Idempotency-Key claimed; what the response needs
    of the body besides (the body itself is not kept for the length of the stream)."""
    key = parse_key(request.headers.get(KEY_HEADER))
    body = await _read_body(request)
    inp = dataclasses.replace(_turn_input(request, body), key=key)
    payload = None
    if key is not None:
        payload = fingerprint(
            {
                "route": "v1",
                "chat_id": inp.chat_id,
                "body": body.model_dump(mode="json", exclude_unset=True),
            }
        )
    admission = await request.app[ADMISSIONS].admit(inp, payload)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return admission, bool(body.stream), include_usage


def _limit_headers(request: web.Request, allowance: Allowance) -> dict[str, str]:
    return rate_limit_headers(allowance, rpm=request.app[SETTINGS].v1_requests_per_minute)


async def _allowance(request: web.Request, admission: Admission) -> Allowance:
    """The usage right after this request's reservation; a replayed or attached send reserved
    nothing (and is not counted), so it gets the usage as it is now (one read)."""
    if admission.reservation is not None:
        return admission.reservation.allowance
    now = utcnow()
    user_id = request[PRINCIPAL].user_id
    doc = await request.app[STORE].get_usage(user_id, period_of(now))
    return allowance_of(doc or {}, request.app[SETTINGS].default_token_limit, now)


def _model_view(spec: ModelSpec) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": MODELS_CREATED,
        "owned_by": spec.provider,
    }


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the catalogue's models their upstreams list now (every caller may use
    all of them)."""
    models = await request.app[MODEL_LISTS].live(request.app[CATALOGUE].all())
    return json_response({"object": "list", "data": [_model_view(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one model, or 404 ``model_not_found``."""
    spec = request.app[CATALOGUE].resolve(request.match_info["model"])
    await request.app[MODEL_LISTS].require(spec)
    return json_response(_model_view(spec))


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)

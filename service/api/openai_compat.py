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
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.errors import BadRequest, BudgetExceeded, RateLimited
from service.http import json_response, parse_uuid, problem, read_body
from service.keys import ADMISSIONS, PRINCIPAL, REGISTRY, SETTINGS, STORE
from service.limits import Allowance, rate_limit_headers
from service.store import allowance_of, utcnow
from service.stream.idempotency import HEADER as KEY_HEADER
from service.stream.idempotency import REPLAYED_HEADER, Admission, fingerprint, parse_key
from service.stream.producer import TurnInput, period_of
from service.transports import openai_chunks, sse

CHAT_ID_HEADER = "X-Chat-Id"
MAX_CHOICES = 8  # n: each choice is a whole answer, reserved from the budget up front
MAX_TOOLS = 128  # OpenAI's own limit on tools (and on one message's tool calls)
MAX_ARGUMENTS = 1_000_000  # characters of one tool call's arguments in a message
MAX_IMAGE_URL = 20_000_000  # characters of an image URL (a data: URL carries the image)


class _Body(BaseModel):
    # Validation only (types, ranges, sizes, strict): what goes upstream is the client's JSON as
    # sent, never a re-serialised model. Fields this service does not know are kept too, for
    # the provider to send on (OpenAI answers for itself) or refuse (``unsupported_parameter``).
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class ImageURL(_Body):
    url: str = Field(min_length=1, max_length=MAX_IMAGE_URL)
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Body):
    type: str = Field(min_length=1, max_length=64)
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _complete(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        return self


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=MAX_ARGUMENTS)


class CustomCall(_Body):
    name: str = Field(min_length=1, max_length=64)
    input: str = Field(max_length=MAX_ARGUMENTS)


def _one_of_its_type(item: Any) -> None:
    """A function or custom tool (call, choice) carries the object its ``type`` names."""
    if getattr(item, item.type) is None:
        raise ValueError(f"type '{item.type}' needs '{item.type}'")


class ToolCall(_Body):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function", "custom"]
    function: FunctionCall | None = None
    custom: CustomCall | None = None

    @model_validator(mode="after")
    def _complete(self) -> ToolCall:
        _one_of_its_type(self)
        return self


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs 'tool_call_id'")
        if self.role != "assistant" and self.content is None:  # as OpenAI: only an answer may
            raise ValueError(f"a {self.role} message needs 'content'")  # have none (tool calls)
        if self.role != "assistant" and self.tool_calls is not None:
            raise ValueError("only an assistant message carries 'tool_calls'")
        return self


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    format: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function", "custom"]  # custom: free-form input (OpenAI's custom tools)
    function: FunctionDefinition | None = None
    custom: CustomDefinition | None = None

    @model_validator(mode="after")
    def _complete(self) -> Tool:
        _one_of_its_type(self)
        return self


class NamedFunction(_Body):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function", "custom"]
    function: NamedFunction | None = None
    custom: NamedFunction | None = None

    @model_validator(mode="after")
    def _complete(self) -> NamedToolChoice:
        _one_of_its_type(self)
        return self


class AllowedTools(_Body):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_TOOLS)


class AllowedToolsChoice(_Body):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class JSONSchema(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs 'json_schema'")
        return self


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
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    user: str | None = Field(None, max_length=256)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: (
        Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None
    ) = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = Field(None, max_length=1024)
    reasoning_effort: str | None = Field(None, min_length=1, max_length=32)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    service_tier: str | None = Field(None, min_length=1, max_length=32)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value and any(not -100 <= v <= 100 for v in value.values()):
            raise ValueError("values must be between -100 and 100")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return value


# What the gateway itself reads of a request; every other field is the provider's (``options``).
GATEWAY_FIELDS = frozenset(
    {"model", "messages", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop"}
)


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
    return _invalid(f"Invalid value for '{param}': {problem(err)}.", param)


async def _read_body(request: web.Request) -> tuple[ChatCompletionRequest, dict[str, Any]]:
    """The request validated, and its JSON as sent (what goes upstream)."""
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
        return ChatCompletionRequest.model_validate(data), data
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _text(message: ChatMessage, index: int) -> str:
    """A stored chat's new message: its text (a stored chat keeps text)."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise BadRequest(
                f"A stored chat (X-Chat-Id) takes text; content parts of type '{part.type}' "
                "are for stateless requests.",
                code="unsupported_parameter",
                details={"param": f"messages[{index}].content[{j}]"},
            )
        texts.append(part.text)
    return "".join(texts)


def _check_last(body: ChatCompletionRequest) -> None:
    last = len(body.messages) - 1
    if body.messages[last].role not in ("user", "tool"):
        raise _invalid(
            "The last message must be the user's or a tool's result (role 'user' or 'tool').",
            f"messages[{last}].role",
        )


def _turn_input(
    request: web.Request, body: ChatCompletionRequest, data: dict[str, Any]
) -> TurnInput:
    _check_last(body)
    if body.stream_options is not None and not body.stream:  # OpenAI's 400, word for word
        raise _invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and len(stop) > 4:
        raise _invalid("'stop' takes at most 4 sequences.", "stop")
    common: dict[str, Any] = {
        "user_id": request[PRINCIPAL].user_id,
        "api_key": request[PRINCIPAL].key,
        "transport": "openai",
        "model": body.model,
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": stop,
        "options": {k: v for k, v in data.items() if k not in GATEWAY_FIELDS} or None,
    }
    header = request.headers.get(CHAT_ID_HEADER)
    if header is None:
        return TurnInput(messages=data["messages"], **common)
    chat_id = parse_uuid(header, CHAT_ID_HEADER)
    last = len(body.messages) - 1
    if body.messages[last].role == "tool":
        return TurnInput(chat_id=chat_id, results=_results(body), **common)
    return TurnInput(chat_id=chat_id, text=_text(body.messages[last], last), **common)


def _results(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """A stored chat's tool loop: the tool results after the last assistant message are the
    turn's new message (the chat's history has the answer that called them)."""
    results = []
    for i in range(len(body.messages) - 1, -1, -1):
        message = body.messages[i]
        if message.role != "tool":
            break
        results.append({"tool_call_id": message.tool_call_id, "content": _text(message, i)})
    results.reverse()
    return results


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
    live, created = admission.live, admission.created
    del admission  # not kept for the length of the stream (thousands are live at once)
    registry = request.app[REGISTRY]
    follower = registry.follow(live, 0, "openai", keepalive=stream)
    if stream:
        enc = openai_chunks.ChunkEncoder(
            live,
            created,
            include_usage=include_usage,
        )
        return sse.respond(registry, follower, request.app[SETTINGS], enc.encode, headers=headers)
    try:
        completion = await openai_chunks.complete(follower, created=created)
    finally:
        registry.leave(follower, "client_disconnect")  # a no-op once the turn has ended
    return json_response(completion, headers=headers)


async def _start(request: web.Request) -> tuple[Admission, bool, bool]:
    """Start the turn, or follow the one its Idempotency-Key claimed; what the response needs
    of the body besides (the body itself is not kept for the length of the stream)."""
    key = parse_key(request.headers.get(KEY_HEADER))
    body, data = await _read_body(request)
    inp = dataclasses.replace(_turn_input(request, body, data), key=key)
    payload = None
    if key is not None:
        payload = fingerprint({"route": "v1", "chat_id": inp.chat_id, "body": data})
    admission = await request.app[ADMISSIONS].admit(inp, payload)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return admission, bool(body.stream), include_usage


def _limit_headers(request: web.Request, allowance: Allowance) -> dict[str, str]:
    settings = request.app[SETTINGS]
    return rate_limit_headers(
        allowance,
        rpm=settings.v1_requests_per_minute,
        tokens=settings.budget_unit == "tokens",
    )


async def _allowance(request: web.Request, admission: Admission) -> Allowance:
    """The usage right after this request's reservation; a replayed or attached send reserved
    nothing (and is not counted), so it gets the usage as it is now (one read)."""
    if admission.reservation is not None:
        return admission.reservation.allowance
    now = utcnow()
    user_id = request[PRINCIPAL].user_id
    doc = await request.app[STORE].get_usage(user_id, period_of(now))
    return allowance_of(doc or {}, request.app[SETTINGS].budget.default_limit, now)


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app.router.add_post("/v1/chat/completions", chat_completions)

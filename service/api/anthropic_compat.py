"""Anthropic-compatible front door: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

What Claude Code and anything built on Anthropic's SDKs need from a gateway: the SDK's base URL
is this service's root (the SDK adds ``/v1/messages``) and its key a token of this service,
sent as ``x-api-key`` or ``Authorization: Bearer``::

    client = AsyncAnthropic(base_url="http://127.0.0.1:8080", api_key=token)

The request is translated into the turn's one internal representation (OpenAI-shaped messages
and options, ``service.api.anthropic_request``) for the same turn producer as every other
route: budgets, the programs' rate limits, usage accounting and lifecycle logs
(``transport="anthropic"``) apply exactly as there. The answer is encoded back by
``service.transports.anthropic_events``. Errors take Anthropic's shape ``{"type": "error",
"error": {"type", "message"}}`` (``service.middleware``); answers and rate-limit refusals carry
Anthropic's ``anthropic-ratelimit-*`` headers. Turns are stateless (the request's messages are
the whole context); an ``Idempotency-Key`` makes one resumable and sent once, as on
``/v1/chat/completions``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from service.api.anthropic_request import (
    NATIVE_PROVIDERS,
    CountTokensRequest,
    MessagesRequest,
    Translation,
    parse,
)
from service.errors import BadRequest, BudgetExceeded, RateLimited
from service.http import json_response, read_body
from service.keys import (
    ADMISSIONS,
    CATALOGUE,
    PRINCIPAL,
    PRODUCER,
    REGISTRY,
    REQUEST_ID,
    SETTINGS,
    STORE,
)
from service.limits import Allowance, anthropic_rate_limit_headers
from service.store import allowance_of, utcnow
from service.stream.idempotency import HEADER as KEY_HEADER
from service.stream.idempotency import REPLAYED_HEADER, Admission, fingerprint, parse_key
from service.stream.producer import TurnInput, period_of
from service.transports import anthropic_events, sse

TRANSPORT = "anthropic"
CHAT_ID_HEADER = "X-Chat-Id"


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return data


def _translate(request: web.Request, body: CountTokensRequest, data: dict[str, Any]) -> Translation:
    spec = request.app[CATALOGUE].resolve(body.model)
    return Translation(body, data, native=spec.provider in NATIVE_PROVIDERS)


def _named(exc: BadRequest, translation: Translation) -> BadRequest:
    """A provider's refusal of a parameter, named as the client named it (the field, and the
    model: a refusal when the turn opens names the upstream's id), with its reason if any."""
    details = exc.details
    if exc.code != "unsupported_parameter" or not isinstance(details, dict):
        return exc
    param = translation.anthropic_param(str(details.get("param")))
    model = translation.body.model
    provider = details.get("provider")
    by = f" (provider {provider})" if provider else ""
    why = f": {details['why']}" if details.get("why") else ""
    return BadRequest(
        f"'{param}' is not supported with model '{model}'{by}{why}",
        code="unsupported_parameter",
        details={**details, "param": param, "model": model},
    )


# --------------------------------------------------------------------------- handlers
async def create_message(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``, Anthropic's request and response formats, streamed
    (``stream: true``: Anthropic's SSE events) or not (one ``message``)."""
    try:
        admission, stream = await _start(request)
    except (RateLimited, BudgetExceeded) as exc:
        if exc.allowance is not None:
            exc.headers.update(_limit_headers(request, exc.allowance))
        raise
    headers = _limit_headers(request, await _allowance(request, admission))
    headers["request-id"] = request[REQUEST_ID]
    if admission.replayed:
        headers[REPLAYED_HEADER] = "true"
    live = admission.live
    registry = request.app[REGISTRY]
    follower = registry.follow(live, 0, TRANSPORT, keepalive=stream)
    mid = anthropic_events.message_id(live.message_id)
    if stream:
        enc = anthropic_events.EventEncoder(mid, live.model, live.prompt_tokens)
        return sse.respond(registry, follower, request.app[SETTINGS], enc.encode, headers=headers)
    try:
        message = await anthropic_events.complete(follower, mid, live.model)
    finally:
        registry.leave(follower, "client_disconnect")  # a no-op once the turn has ended
    return json_response(message, headers=headers)


async def _start(request: web.Request) -> tuple[Admission, bool]:
    """Start the turn, or follow the one its Idempotency-Key claimed."""
    if CHAT_ID_HEADER in request.headers:
        raise BadRequest(
            f"{CHAT_ID_HEADER} (a stored chat's turn) is for /v1/chat/completions; "
            "/v1/messages turns are stateless",
            code="unsupported_parameter",
            details={"header": CHAT_ID_HEADER},
        )
    key = parse_key(request.headers.get(KEY_HEADER))
    data = await _read_json(request)
    body: MessagesRequest = parse(MessagesRequest, data)
    translation = _translate(request, body, data)
    translation.check_prefill()
    inp = TurnInput(
        user_id=request[PRINCIPAL].user_id,
        api_key=request[PRINCIPAL].key,
        transport=TRANSPORT,
        messages=translation.messages,
        model=body.model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=translation.stop(),
        options=translation.options or None,
        key=key,
    )
    payload = fingerprint({"route": TRANSPORT, "body": data}) if key is not None else None
    try:
        admission = await request.app[ADMISSIONS].admit(inp, payload)
    except BadRequest as exc:
        raise _named(exc, translation) from exc
    return admission, bool(body.stream)


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``, the prompt counted as a
    turn's is (the model's local tokenizer, or its provider's count call). Not a turn: it
    takes nothing from the budget, and a request from the per-minute bucket only when the
    vendor counts it (a call on the operator's key)."""
    data = await _read_json(request)
    body: CountTokensRequest = parse(CountTokensRequest, data)
    translation = _translate(request, body, data)
    inp = TurnInput(
        user_id=request[PRINCIPAL].user_id,
        api_key=request[PRINCIPAL].key,
        transport=TRANSPORT,
        messages=translation.messages,
        model=body.model,
        options=translation.options or None,
    )
    try:
        tokens = await request.app[PRODUCER].count_tokens(inp)
    except BadRequest as exc:
        raise _named(exc, translation) from exc
    return json_response({"input_tokens": tokens}, headers={"request-id": request[REQUEST_ID]})


def _limit_headers(request: web.Request, allowance: Allowance) -> dict[str, str]:
    settings = request.app[SETTINGS]
    return anthropic_rate_limit_headers(
        allowance,
        rpm=settings.v1_requests_per_minute,
        tokens=settings.budget_unit == "tokens",
    )


async def _allowance(request: web.Request, admission: Admission) -> Allowance:
    """The usage right after this request's reservation; a replayed send reserved nothing, so
    it gets the usage as it is now (one read)."""
    if admission.reservation is not None:
        return admission.reservation.allowance
    now = utcnow()
    doc = await request.app[STORE].get_usage(request[PRINCIPAL].user_id, period_of(now))
    return allowance_of(doc or {}, request.app[SETTINGS].budget.default_limit, now)


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app.router.add_post("/v1/messages", create_message)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)

"""Anthropic's Messages API spoken natively, over the shared aiohttp session (no SDK).

``POST {ANTHROPIC_BASE_URL}/v1/messages`` with ``stream: true``; the key only in the
``x-api-key`` header (never in a URL, never logged), ``anthropic-version: 2023-06-01`` on every
call. The request is translated by ``anthropic_request`` (system prompt as its own field,
``max_tokens`` always sent: the turn's, clamped to the budget grant), the stream read by
``anthropic_stream`` (text, thinking, tool use, exact usage with cache tokens).

HTTP errors before the first token go through the shared retry policy: 429 ``rate_limit_error``
and 529 ``overloaded_error`` (and other 5xx) are retried, honouring ``retry-after``; 401/403
are ``upstream_auth``, a 402 or a 400 saying the credit balance is too low
``upstream_billing`` (the operator's; 502), other 4xx ``upstream_bad_request`` (400 with the
body's message for 400/422, else 502).
Anthropic's error body goes to the log, redacted.

``count_prompt`` asks ``POST /v1/messages/count_tokens`` for the messages, tools and thinking
(as the turn would send them), plus the system prompt counted once per (model, system text) and
cached: the system prompt is the same for every chat turn. ``list_models`` walks
``GET /v1/models`` (``has_more`` / ``after_id``); an id with a date
(``claude-sonnet-4-5-20250929``) also lists the aliases that name it (``claude-sonnet-4-5``,
``claude-sonnet-4-5-latest``), which the Messages API takes but the list does not show.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from service.errors import UpstreamError
from service.providers import anthropic_request as translate
from service.providers.anthropic_stream import chunks
from service.providers.base import (
    Chunk,
    CompletionRequest,
    RetryPolicy,
    call_json,
    error_for_exception,
    raise_for_status,
    token_count,
    with_retries,
)

API_VERSION = "2023-06-01"
LIST_TIMEOUT_S = 10.0  # the whole model list walk, every page included
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10)  # one model list page or one count_tokens
SYSTEM_CACHE_SIZE = 64
# What the system prompt is counted beside: count_tokens takes no request without a message.
PLACEHOLDER = [{"role": "user", "content": "."}]
_DATED = re.compile(r"^(.+)-\d{8}$")


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str | None,
        retry: RetryPolicy,
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._session = session
        base = base_url.rstrip("/").removesuffix("/v1") + "/v1"  # with or without /v1
        self._messages_url = base + "/messages"
        self._count_url = base + "/messages/count_tokens"
        self._models_url = base + "/models"
        self._headers = {"Content-Type": "application/json", "anthropic-version": API_VERSION}
        if api_key:
            self._headers["x-api-key"] = api_key
        self._secrets = (api_key or "",)
        self._check = functools.partial(raise_for_status, provider=self.name, secrets=self._secrets)
        self._retry = retry
        self._timeout = timeout
        self._system_counts: dict[tuple[str, tuple[str, ...]], int] = {}
        self._placeholder_counts: dict[str, int] = {}

    def unsupported(self, request: CompletionRequest) -> str | None:
        """What Anthropic cannot honour; sampling it cannot take (a temperature above 1, or
        sampling changed while the model thinks) raises the 400 itself, before admission."""
        param = translate.unsupported(request)
        if param is None:
            _check_sampling(request, translate.build_body(request))
        return param

    async def open(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        body = translate.build_body(request)
        _check_sampling(request, body)
        data = orjson.dumps(body)
        headers = {**self._headers, "Accept": "text/event-stream"}

        async def attempt() -> aiohttp.ClientResponse:
            resp = await self._session.post(
                self._messages_url, data=data, headers=headers, timeout=self._timeout
            )
            await self._check(resp)
            return resp

        resp = await with_retries(attempt, self._retry, provider=self.name)
        return chunks(resp, self._secrets)

    # ------------------------------------------------------------------ model list
    async def list_models(self) -> set[str] | None:
        """``GET /v1/models``, every page: the ids this key may use, and their aliases."""
        ids: set[str] = set()
        params = {"limit": "1000"}
        try:
            async with asyncio.timeout(LIST_TIMEOUT_S):
                while True:
                    page = await self._call("GET", self._models_url, params=params)
                    data = page.get("data")
                    if not isinstance(data, list):
                        raise UpstreamError("upstream_bad_response", "malformed model list")
                    ids |= {str(m["id"]) for m in data if isinstance(m, dict) and "id" in m}
                    last = page.get("last_id")
                    if page.get("has_more") is not True or not last:
                        return ids | _aliases(ids)
                    params = {"limit": "1000", "after_id": str(last)}
        except TimeoutError as exc:
            raise error_for_exception(exc) from exc

    # ------------------------------------------------------------------ counting
    async def count_prompt(self, request: CompletionRequest) -> int:
        system, messages = translate.to_messages(request.messages)
        total = 0
        if messages:
            body: dict[str, Any] = {"model": request.model, "messages": messages}
            body.update(translate.tool_fields(request.options))
            thinking = translate.thinking_for(request)
            if thinking is not None:
                body["thinking"] = thinking
            total = await self._count(body)
        if system:
            total += await self._system_tokens(request.model, system)
        return total

    async def _system_tokens(self, model: str, system: list[dict[str, Any]]) -> int:
        """The system prompt's share of a count: counted beside a one-character message, less
        that message's own count (both cached)."""
        key = (model, tuple(block["text"] for block in system))
        count = self._system_counts.get(key)
        if count is None:
            with_system = await self._count(
                {"model": model, "system": system, "messages": PLACEHOLDER}
            )
            count = max(0, with_system - await self._placeholder(model))
            if len(self._system_counts) >= SYSTEM_CACHE_SIZE:
                del self._system_counts[next(iter(self._system_counts))]
            self._system_counts[key] = count
        return count

    async def _placeholder(self, model: str) -> int:
        count = self._placeholder_counts.get(model)
        if count is None:
            count = await self._count({"model": model, "messages": PLACEHOLDER})
            if len(self._placeholder_counts) >= SYSTEM_CACHE_SIZE:
                self._placeholder_counts.clear()
            self._placeholder_counts[model] = count
        return count

    async def _count(self, body: dict[str, Any]) -> int:
        answer = await self._call("POST", self._count_url, body=orjson.dumps(body))
        return token_count(answer, "input_tokens", "count_tokens")

    async def _call(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        """One JSON request/answer (no retries: callers have a fallback or a retry loop)."""
        return await call_json(
            self._session,
            method,
            url,
            headers=self._headers,
            limits=CALL_TIMEOUT,
            check=self._check,
            params=params,
            body=body,
        )


def _aliases(ids: set[str]) -> set[str]:
    """``claude-x-20250101`` is also ``claude-x`` and ``claude-x-latest``."""
    out: set[str] = set()
    for model in ids:
        dated = _DATED.match(model)
        if dated is not None:
            out |= {dated.group(1), dated.group(1) + "-latest"}
    return out


def _check_sampling(request: CompletionRequest, body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    thinks = thinking is not None and thinking["type"] != "disabled"
    conflict = translate.sampling_conflict(request, thinks)
    if conflict is not None:
        raise conflict

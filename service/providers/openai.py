"""Any OpenAI-compatible ``/v1/chat/completions`` upstream (OpenAI, vLLM, Ollama, gateways).

The key stays server-side. The client's request fields are sent as given (``options``: tools,
response_format, seed, logprobs, n, ...): this provider honours everything OpenAI does, and an
upstream that does not answers with its own 400. Streams with ``stream_options.include_usage``
so exact counts come back; handles ``[DONE]``, keep-alive comments, multi-line data, a stream
that ends without ``[DONE]`` (an error: the answer may be cut), malformed or oversized frames,
and error frames.

A frame that is choice 0's plain text is read into ``Chunk.text`` alone (the hot path builds
nothing else); any other frame (tool call deltas, reasoning, a refusal, logprobs, other
choices) is kept whole in ``Chunk.frame``, minus the ids the gateway replaces. A plain text
frame shaped as the stream's last one is not parsed again: only its text is
(``service.providers.templates``), and one network read's plain text is one chunk.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import structlog

from service.errors import UpstreamError
from service.providers.base import (
    Chunk,
    CompletionRequest,
    RetryPolicy,
    Usage,
    call_json,
    raise_for_status,
    with_retries,
)
from service.providers.sse import SSEDecoder, SSEEvent, load_frame
from service.providers.templates import STRING, TextEvents, read_stream

LIST_TIMEOUT = aiohttp.ClientTimeout(total=10)
log = structlog.get_logger("service.providers")


class OpenAIProvider:
    name = "openai"

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
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._models_url = base_url.rstrip("/") + "/models"
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._check = functools.partial(
            raise_for_status, provider=self.name, secrets=(api_key or "",)
        )
        self._retry = retry
        self._timeout = timeout

    def _body(self, req: CompletionRequest) -> bytes:
        body: dict[str, Any] = {
            "model": req.model,
            "messages": req.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for key in ("temperature", "top_p", "stop"):
            value = getattr(req, key)
            if value is not None:
                body[key] = value
        body.update(req.options)
        # The granted limit, under the name the client used (reasoning models take only
        # ``max_completion_tokens``; older compatible servers only ``max_tokens``).
        limit = "max_completion_tokens" if "max_completion_tokens" in req.options else "max_tokens"
        body[limit] = req.max_tokens
        return orjson.dumps(body)

    def unsupported(self, request: CompletionRequest) -> str | None:
        return None  # everything is sent as given

    async def open(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        body = self._body(request)

        async def attempt() -> aiohttp.ClientResponse:
            resp = await self._session.post(
                self._url, data=body, headers=self._headers, timeout=self._timeout
            )
            await self._check(resp)
            return resp

        resp = await with_retries(attempt, self._retry, provider=self.name)
        return _chunks(resp)

    async def list_models(self) -> set[str] | None:
        """``GET /models``: the ids this key may use (OpenAI, vLLM, Ollama and most gateways)."""
        headers = {k: v for k, v in self._headers.items() if k != "Accept"}
        body = await call_json(
            self._session,
            "GET",
            self._models_url,
            headers=headers,
            limits=LIST_TIMEOUT,
            check=self._check,
        )
        data = body.get("data")
        if not isinstance(data, list):
            raise UpstreamError("upstream_bad_response", "malformed model list")
        return {str(m["id"]) for m in data if isinstance(m, dict) and "id" in m}

    async def count_prompt(self, request: CompletionRequest) -> int | None:
        return None  # counted locally with the model's tokenizer


def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    return read_stream(resp, _Frames(SSEDecoder()), "upstream stream ended without [DONE]")


_Meta = dict[str, Any]
PLAIN_DELTA = frozenset({"content", "role"})  # what a plain text frame's delta may carry
META = ("system_fingerprint", "service_tier")  # per stream, not per frame: ``Chunk.meta``


class _Frames(TextEvents):
    """An OpenAI-compatible stream's events: ``[DONE]`` ends it, a finish reason completes it;
    a plain text frame's template spans its text and OpenAI's ``obfuscation`` padding."""

    __slots__ = ("finished", "meta")
    key = re.compile(rb'"content"\s*:\s*')
    pad = re.compile(rb'"obfuscation"\s*:\s*' + STRING)

    def __init__(self, decoder: SSEDecoder) -> None:
        super().__init__(decoder)
        self.finished = False  # a finish_reason came
        self.meta: _Meta | None = None  # as last sent; shared with the chunk that carried it

    def complete(self) -> bool:
        return self.ended or self.finished  # a clean close after a finish reason is complete

    def whole(self, event: SSEEvent) -> Chunk | None:
        if event.data == "[DONE]":
            self.ended = True
            return None
        chunk = _parse(event.data, self.meta)
        if chunk.meta is not None:
            self.meta = chunk.meta
            self.template = None  # its frames carry the meta before
        self.finished = self.finished or chunk.finish_reason is not None
        return chunk

    def probe(self, event: SSEEvent) -> Chunk | None:
        return _parse(event.data, self.meta)


def _parse(data: str, meta: _Meta | None) -> Chunk:
    """One ``chat.completion.chunk``. A frame of the wrong shape where text or a finish reason
    would be is ``upstream_bad_response`` (the turn ends cleanly, its text so far kept); a usage
    object of the wrong shape is ignored (the answer is billed by the local tokenizer then)."""
    frame = load_frame(data, "openai")
    text, finish, rich = "", None, False
    choices = frame.get("choices")
    if choices:
        if not isinstance(choices, list):
            raise _malformed("choices")
        rich = len(choices) > 1
        for choice in choices:
            if not isinstance(choice, dict):
                raise _malformed("choices")
            index = choice.get("index", 0)
            if index != 0:
                rich = True
                continue
            delta = choice.get("delta")
            if delta:
                if not isinstance(delta, dict):
                    raise _malformed("delta")
                content = delta.get("content")
                if content is not None and not isinstance(content, str):
                    raise _malformed("delta.content")
                text = content or ""
                if len(delta) > 1 or content is None:  # a text delta alone needs no scan
                    rich = rich or any(
                        v is not None and k not in PLAIN_DELTA for k, v in delta.items()
                    )
            rich = rich or choice.get("logprobs") is not None
            finish = choice.get("finish_reason")
            if finish is not None and not isinstance(finish, str):
                raise _malformed("finish_reason")
    usage = frame.get("usage")
    chunk = Chunk(text, _usage(usage) if usage else None, finish)
    if rich and isinstance(
        choices, list
    ):  # choice 0's finish goes out in the gateway's own closing frame, once
        chunk.frame = {
            "choices": [
                {**c, "finish_reason": None} if finish and c.get("index", 0) == 0 else c
                for c in choices
            ]
        }
    for key in META:
        value = frame.get(key)
        if value is not None and (meta is None or meta.get(key) != value):
            meta = chunk.meta = {**(meta or {}), key: value}  # a new one: never changed after
    return chunk


def _usage(usage: object) -> Usage | None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        if _count(prompt) and _count(completion):
            details = {
                k: v
                for k, v in usage.items()
                if k not in ("prompt_tokens", "completion_tokens", "total_tokens") and v is not None
            }
            return Usage(
                prompt,
                completion,
                cached_tokens=_detail(usage, "prompt_tokens_details", "cached_tokens"),
                reasoning_tokens=_detail(usage, "completion_tokens_details", "reasoning_tokens"),
                details=details or None,
            )
    log.warning("upstream.malformed_usage", provider="openai")
    return None


def _detail(usage: dict[str, Any], group: str, key: str) -> int:
    details = usage.get(group)
    value = details.get(key, 0) if isinstance(details, dict) else 0
    return value if _count(value) else 0


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(where: str) -> UpstreamError:
    return UpstreamError("upstream_bad_response", f"malformed upstream frame ({where})")

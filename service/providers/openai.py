"""Any OpenAI-compatible ``/v1/chat/completions`` upstream (OpenAI, vLLM, Ollama, gateways).

The key stays server-side. Streams with ``stream_options.include_usage`` so exact counts come
back; handles ``[DONE]``, keep-alive comments, multi-line data, a stream that ends without
``[DONE]`` (an error: the answer may be cut), malformed or oversized frames, and error frames.
"""

from __future__ import annotations

import functools
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
    error_for_exception,
    raise_for_status,
    with_retries,
)
from service.providers.sse import SSEDecoder, SSEEvent, load_frame

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
            "max_tokens": req.max_tokens,
        }
        for key in ("temperature", "top_p", "stop"):
            value = getattr(req, key)
            if value is not None:
                body[key] = value
        body.update(req.extra)
        return orjson.dumps(body)

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


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    decoder = SSEDecoder()
    finished = False
    event: SSEEvent | None = None
    events: list[SSEEvent] = []
    chunk: Chunk | None = None
    try:
        async for data in resp.content.iter_any():
            events = decoder.feed(data)
            last = len(events) - 1
            for i, event in enumerate(events):
                if event.data == "[DONE]":
                    return
                chunk = _parse(event.data)
                chunk.more = i < last
                finished = finished or chunk.finish_reason is not None
                yield chunk
            data, events, event, chunk = b"", [], None, None  # not held while the next read waits
        for event in decoder.finish():
            if event.data == "[DONE]":
                return
            yield _parse(event.data)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise error_for_exception(exc) from exc
    finally:
        resp.close()
    if not finished:  # a clean close after a finish_reason is complete; otherwise it was cut
        raise UpstreamError("upstream_bad_response", "upstream stream ended without [DONE]")


def _parse(data: str) -> Chunk:
    """One ``chat.completion.chunk``. A frame of the wrong shape where text or a finish reason
    would be is ``upstream_bad_response`` (the turn ends cleanly, its text so far kept); a usage
    object of the wrong shape is ignored (the answer is billed by the local tokenizer then)."""
    frame = load_frame(data, "openai")
    text, finish = "", None
    choices = frame.get("choices")
    if choices:
        choice = choices[0] if isinstance(choices, list) else None
        if not isinstance(choice, dict):
            raise _malformed("choices")
        delta = choice.get("delta")
        if delta:
            if not isinstance(delta, dict):
                raise _malformed("delta")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise _malformed("delta.content")
            text = content or ""
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise _malformed("finish_reason")
    usage = frame.get("usage")
    return Chunk(text, _usage(usage) if usage else None, finish)


def _usage(usage: object) -> Usage | None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        if _count(prompt) and _count(completion):
            return Usage(prompt, completion)
    log.warning("upstream.malformed_usage", provider="openai")
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(where: str) -> UpstreamError:
    return UpstreamError("upstream_bad_response", f"malformed upstream frame ({where})")

"""The provider interface, the shared retry policy and the vendor-error mapping."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

from service.errors import UpstreamError
from service.metrics import UPSTREAM_ERRORS

log = structlog.get_logger("service.providers")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Chunk:
    """One step of an upstream stream: some text, and/or usage, and/or a finish reason."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str  # the upstream's model id
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    name: str

    async def open(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        """Connect (retrying before the first token), then return the chunk stream.

        Raises ``UpstreamError`` when the upstream refuses or cannot be reached. Closing the
        returned iterator (``aclose``) closes the upstream connection.
        """
        ...

    async def list_models(self) -> set[str] | None:
        """The upstream model ids the key may use now, or None when the provider has no list
        (its models are always live). Raises ``UpstreamError`` when the list cannot be read."""
        ...

    async def count_prompt(self, request: CompletionRequest) -> int | None:
        """Exact prompt tokens from the upstream (e.g. Gemini's countTokens), or None when the
        provider has no such call and a local tokenizer or estimate is used instead."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    base_s: float = 0.5
    max_s: float = 8.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_s)
        backoff: float = min(self.base_s * 2 ** (attempt - 1), self.max_s)
        return backoff * (0.5 + random.random() / 2)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import time

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_for_status(status: int, detail: str, retry_after: str | None = None) -> UpstreamError:
    """Map a vendor's HTTP status to our upstream error codes."""
    message = f"upstream answered HTTP {status}: {detail[:200]}" if detail else f"HTTP {status}"
    if status in (401, 403):
        return UpstreamError("upstream_auth", message, upstream_status=status)
    if status == 429:
        return UpstreamError(
            "upstream_rate_limited",
            message,
            retryable=True,
            retry_after_s=retry_after_seconds(retry_after),
            upstream_status=status,
        )
    if status in (408, 504):
        return UpstreamError("upstream_timeout", message, retryable=True, upstream_status=status)
    if status >= 500:
        return UpstreamError(
            "upstream_unavailable",
            message,
            retryable=True,
            retry_after_s=retry_after_seconds(retry_after),
            upstream_status=status,
        )
    return UpstreamError("upstream_bad_request", message, upstream_status=status)


def error_for_exception(exc: BaseException) -> UpstreamError:
    """Map an aiohttp client failure to our upstream error codes."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamError("upstream_timeout", "the upstream stopped sending", retryable=True)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
        return UpstreamError(
            "upstream_unavailable",
            f"cannot reach the upstream: {type(exc).__name__}",
            retryable=True,
        )
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return UpstreamError("upstream_unavailable", "the upstream connection broke")
    return UpstreamError("upstream_bad_response", f"upstream failure: {type(exc).__name__}")


async def with_retries(
    attempt_once: Callable[[], Awaitable[aiohttp.ClientResponse]],
    policy: RetryPolicy,
    *,
    provider: str,
) -> aiohttp.ClientResponse:
    """Run ``attempt_once`` until it returns a 2xx response; retry only retryable failures."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await attempt_once()
        except (aiohttp.ClientError, TimeoutError, UpstreamError) as exc:
            err = error_for_exception(exc)
            if not err.retryable or attempt >= policy.max_attempts:
                raise err from exc
            UPSTREAM_ERRORS.labels(provider, err.code, "retried").inc()
            delay = policy.delay(attempt, err.retry_after_s)
            log.warning(
                "upstream.retry", provider=provider, code=err.code, attempt=attempt, delay_s=delay
            )
            await asyncio.sleep(delay)


async def raise_for_status(resp: aiohttp.ClientResponse) -> None:
    """Turn a non-2xx answer into ``UpstreamError`` (releasing the connection)."""
    if resp.status < 300:
        return
    try:
        detail = (await resp.text(errors="replace"))[:500]
    except (aiohttp.ClientError, TimeoutError):
        detail = ""
    finally:
        resp.release()
    raise error_for_status(resp.status, detail, resp.headers.get("Retry-After"))


async def call_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    limits: aiohttp.ClientTimeout,
    check: Callable[[aiohttp.ClientResponse], Awaitable[None]] = raise_for_status,
    params: dict[str, str] | None = None,
    body: bytes | None = None,
) -> dict[str, Any]:
    """One JSON request and its JSON object answer (model lists, token counts; no retries:
    callers have a fallback). ``check`` turns a vendor's error answer into ``UpstreamError``."""
    try:
        async with session.request(
            method, url, params=params, data=body, headers=headers, timeout=limits
        ) as resp:
            await check(resp)
            answer = await resp.json(loads=orjson.loads, content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise error_for_exception(exc) from exc
    except ValueError as exc:
        raise UpstreamError("upstream_bad_response", f"malformed answer from {url}") from exc
    if not isinstance(answer, dict):
        raise UpstreamError("upstream_bad_response", f"malformed answer from {url}")
    return answer

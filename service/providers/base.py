"""The provider interface, the shared retry policy and the vendor-error mapping."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeGuard

import aiohttp
import orjson
import structlog

from service.errors import UpstreamError
from service.metrics import UPSTREAM_ERRORS

log = structlog.get_logger("service.providers")


@dataclass(frozen=True, slots=True)
class Usage:
    """What the upstream billed. ``prompt_tokens`` includes the cached ones and
    ``completion_tokens`` the reasoning ones (OpenAI's rule; Gemini's thoughts are added to its
    candidates). ``details``: the upstream's own usage fields beyond the three counts, in
    OpenAI's shape (``prompt_tokens_details``, ``completion_tokens_details``), passed to
    clients as sent."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    details: dict[str, Any] | None = None
    # The prompt's counts alone, said before the answer (Anthropic's ``message_start``): a turn
    # cut before the whole bill keeps them, and its answer is counted locally.
    partial: bool = False


def cache_writes(details: dict[str, Any] | None) -> tuple[int, int]:
    """The prompt tokens written to a cache, and how many of them to a 1-hour one, from a
    usage's details: Anthropic's own counts (its provider keeps them under ``anthropic``), or
    ones an upstream put beside OpenAI's details. (0, 0) when there are none."""
    details = details or {}
    native = details.get("anthropic")
    for source in (native if isinstance(native, dict) else {}, details):
        written = source.get("cache_creation_input_tokens")
        if is_count(written) and written > 0:
            split = source.get("cache_creation")
            hour = split.get("ephemeral_1h_input_tokens") if isinstance(split, dict) else 0
            return written, min(hour, written) if is_count(hour) else 0
    return 0, 0


def is_count(value: object) -> TypeGuard[int]:
    """A token count as a vendor's usage gives it: an integer, 0 or more (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(slots=True)
class Chunk:
    """One step of an upstream stream: some text, and/or usage, and/or a finish reason."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    more: bool = False  # more chunks of the same network read follow at once
    # A step that carries more than choice 0's plain text (tool call deltas, reasoning, a
    # refusal, logprobs, another choice of ``n``): OpenAI's chunk without its ids, i.e.
    # ``{"choices": [{"index", "delta", "logprobs", "finish_reason"}, ...]}``. ``text`` is
    # still choice 0's content in it, and ``finish_reason`` choice 0's.
    frame: dict[str, Any] | None = None
    # The stream's ``system_fingerprint`` / ``service_tier`` when they first appear or change.
    meta: dict[str, Any] | None = None
    frames: int = 1  # the upstream's text frames in it (one read's, together)


Message = dict[str, Any]  # OpenAI's chat message: role, content (text or parts), tool calls


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A turn's request in OpenAI's terms. ``messages`` are OpenAI chat messages: ``content``
    a string or a list of parts (``text``, ``image_url``), an assistant's ``tool_calls``, a
    ``tool`` message's ``tool_call_id``. ``options``: the client's other OpenAI request fields
    (``tools``, ``tool_choice``, ``response_format``, ``seed``, ``logprobs``, ``n``, ...)
    exactly as sent; each provider sends them on, translates them, or names them in
    ``unsupported``."""

    model: str  # the upstream's model id
    messages: list[Message]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


async def close_stream(stream: AsyncIterator[Chunk] | None) -> None:
    """Close a provider's chunk stream (``Provider.open``'s), which closes its upstream."""
    close: Any = getattr(stream, "aclose", None)
    if close is not None:
        await close()


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

    def unsupported(self, request: CompletionRequest) -> str | None:
        """The first parameter of ``request`` this provider cannot honour, named as OpenAI
        names it (``logit_bias``, ``messages[2].content[0]``), or None. Checked before the
        turn is admitted: the client gets 400 ``unsupported_parameter``, never a silent drop."""
        ...


# Options every provider honours: the completion limit is carried as ``max_tokens``.
CARRIED = frozenset({"max_completion_tokens"})
# Values that ask for nothing (a provider without the feature honours them as they are).
NEUTRAL: dict[str, Any] = {"n": 1, "logprobs": False, "parallel_tool_calls": True}


def first_unsupported(
    request: CompletionRequest,
    options: frozenset[str],
    *,
    parts: frozenset[str] = frozenset({"text"}),
    roles: frozenset[str] = frozenset({"system", "developer", "user", "assistant"}),
    message_fields: frozenset[str] = frozenset(),
) -> str | None:
    """The first thing in ``request`` outside what a provider honours: an option not in
    ``options``, a content part type not in ``parts``, a message role not in ``roles``, a
    message field (``tool_calls``, ``tool_call_id``, ``name``) not in ``message_fields``."""
    for key, value in request.options.items():
        if key not in options and key not in CARRIED and NEUTRAL.get(key) != value:
            return key
    for i, message in enumerate(request.messages):
        if message.get("role") not in roles:
            return f"messages[{i}].role"
        for key, value in message.items():
            if key not in ("role", "content") and not _empty(value) and key not in message_fields:
                return f"messages[{i}].{key}"
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in parts:
                    return f"messages[{i}].content[{j}]"
    return None


def first_non_function(request: CompletionRequest) -> str | None:
    """The first tool, tool choice or assistant tool call of ``request`` that is not a
    function (OpenAI's custom tools and ``allowed_tools`` choice), for a provider that has
    functions only; None when there is none."""
    for i, tool in enumerate(request.options.get("tools") or ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            return f"tools[{i}]"
    choice = request.options.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") != "function":
        return "tool_choice"
    for i, message in enumerate(request.messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            if not isinstance(call, dict) or call.get("type", "function") != "function":
                return f"messages[{i}].tool_calls[{j}]"
    return None


def _empty(value: Any) -> bool:
    """A message field that says nothing (an SDK's message object passed back carries
    ``annotations: []``, ``audio: null``, ``refusal: null``)."""
    return value is None or value == [] or value == {}


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


_STATUS_WORDS = {
    "upstream_auth": "the upstream refused the gateway's credentials",
    "upstream_rate_limited": "the upstream is rate limiting the gateway",
    "upstream_timeout": "the upstream timed out",
    "upstream_unavailable": "the upstream is unavailable",
    "upstream_bad_request": "the upstream rejected the request",
    "upstream_billing": "the upstream refused the gateway's account: its credit or quota is spent",
}
# A vendor's words for the gateway's own account out of credit or quota: OpenAI's 429
# ``insufficient_quota``, Anthropic's 402 ``billing_error`` and its 400 ``invalid_request_error``
# "Your credit balance is too low ..." (anthropic-sdk-typescript#618). The operator's to fix:
# no retry helps; a client is not blamed (no 400), hears our words only (never the vendor's
# about the account), and learns that the operators must act (its page says so).
_BILLING_KINDS = frozenset({"insufficient_quota", "billing_error"})
_BILLING_WORDS = "your credit balance is too low"  # its message's start: a vendor's 400 that
# echoes a client's field (which may say anything) does not begin with it
# What an upstream's error body may echo that must not reach a log: keys of the usual shapes.
_SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{6,}|AIza[0-9A-Za-z_\-]{20,}|eyJ[\w\-]+\.[\w\-]+\.[\w\-]*"
    r"|(?i:bearer)\s+\S+)"
)
MAX_LOGGED_BODY = 500
MAX_PARAM = 256  # characters of a vendor's ``param`` passed on
MAX_TOLD = 300  # of the vendor's own words on a request it rejected, what a client is told


def error_for_status(
    status: int, retry_after: str | None = None, body: str = "", secrets: tuple[str, ...] = ()
) -> UpstreamError:
    """Map a vendor's HTTP status to our upstream error codes, in our own words: the vendor's
    body never reaches a client (it may echo a key or a prompt); ``log_upstream_body`` logs it.
    One exception: a request the vendor called invalid (400, 422) is the client's to fix, often
    a field passed through as written, so it is a 400 ``upstream_bad_request`` with the
    message of the vendor's ``body``, redacted (``told``), and the field it named
    (``told_param``: OpenAI's ``param``, for the client's ``param``). Its other 4xx (a model it
    does not know) stay a 502 in our words, and the gateway's account out of credit or quota
    is a 502 ``upstream_billing`` whatever status the vendor gives it (``_billing``). None of
    these is worth a retry: ``x-should-retry: false`` for the SDKs."""
    error = _vendor_error(body)
    code = "upstream_billing" if _billing(status, error) else _code_for_status(status)
    message = f"{_STATUS_WORDS[code]} (HTTP {status})"
    invalid = code == "upstream_bad_request" and status in (400, 422)
    vendor_message = told(error, secrets) if invalid else None
    if vendor_message:
        message = f"{message}: {vendor_message}"
    vendor_param = told_param(error, secrets) if invalid else None
    retryable = code in ("upstream_rate_limited", "upstream_timeout", "upstream_unavailable")
    delay = retry_after_seconds(retry_after) if code != "upstream_timeout" else None
    err = UpstreamError(
        code, message, retryable=retryable, retry_after_s=delay, upstream_status=status
    )
    if code in ("upstream_bad_request", "upstream_billing"):
        err.headers["x-should-retry"] = "false"
        if invalid:
            err.status = 400
            if vendor_param is not None:
                err.details = {"param": vendor_param}
    return err


def _billing(status: int, error: dict[str, Any] | None) -> bool:
    """Whether a vendor's error says the gateway's account is out of credit or quota."""
    if status == 402:
        return True
    if error is None:
        return False
    if any(k in _BILLING_KINDS for k in (error.get("type"), error.get("code")) if type(k) is str):
        return True  # (either may be anything in a body that is not the vendor's: an object)
    message = error.get("message")
    return status == 400 and isinstance(message, str) and message.lower().startswith(_BILLING_WORDS)


def _code_for_status(status: int) -> str:
    if status in (401, 403):
        return "upstream_auth"
    if status == 429:
        return "upstream_rate_limited"
    if status in (408, 504):
        return "upstream_timeout"
    if status >= 500:
        return "upstream_unavailable"
    return "upstream_bad_request"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` bounded, with the keys we know and anything shaped like a key masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _SECRET_SHAPES.sub("[redacted]", text)
    return text if len(text) <= MAX_LOGGED_BODY else text[:MAX_LOGGED_BODY] + "…"


def _vendor_error(body: str) -> dict[str, Any] | None:
    """The ``error`` object of a vendor's JSON error body (OpenAI's, Anthropic's and Google's
    all have one), or None."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


def told(error: dict[str, Any] | None, secrets: tuple[str, ...] = ()) -> str | None:
    """The ``message`` of a vendor's ``error`` object, redacted and bounded, for the client
    whose request it rejected; None when it has none."""
    message = error.get("message") if error is not None else None
    if not isinstance(message, str) or not message.strip():
        return None
    text = redact(" ".join(message.split()), secrets)
    return text if len(text) <= MAX_TOLD else text[:MAX_TOLD] + "…"


def told_param(error: dict[str, Any] | None, secrets: tuple[str, ...] = ()) -> str | None:
    """The field a vendor's ``error`` object names (OpenAI's ``param``), redacted, when it is a
    short field name; None otherwise."""
    param = error.get("param") if error is not None else None
    if isinstance(param, str) and 0 < len(param) <= MAX_PARAM and param.isprintable():
        return redact(param, secrets)
    return None


def log_upstream_body(
    provider: str, status: int | None, body: str, secrets: tuple[str, ...] = ()
) -> None:
    """What the vendor said, for operators: redacted and bounded, never for the client."""
    log.warning("upstream.error_body", provider=provider, status=status, body=redact(body, secrets))


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


async def raise_for_status(
    resp: aiohttp.ClientResponse, *, provider: str = "openai", secrets: tuple[str, ...] = ()
) -> None:
    """Turn a non-2xx answer into ``UpstreamError`` (releasing the connection); the vendor's
    body goes to the log, redacted (``secrets``: the keys this provider sends), and only the
    message of a rejected request's body to the client (``error_for_status``)."""
    if resp.status < 300:
        return
    try:
        detail = await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError):
        detail = ""
    finally:
        resp.release()
    log_upstream_body(provider, resp.status, detail, secrets)
    raise error_for_status(resp.status, resp.headers.get("Retry-After"), detail, secrets)


def token_count(answer: dict[str, Any], key: str, call: str) -> int:
    """A token count from an upstream's counting call (``call`` names it in the error)."""
    total = answer.get(key)
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise UpstreamError("upstream_bad_response", f"malformed {call} answer")
    return total


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

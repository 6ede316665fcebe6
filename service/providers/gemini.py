"""Google's Gemini API spoken natively, over the shared aiohttp session (no SDK, no second stack).

Native rather than Gemini's OpenAI-compatible endpoint because only the native API gives exact
usage (thinking tokens included), per-request safety settings, the reason a prompt was blocked,
and ``countTokens`` for models we have no local tokenizer for.

Request (``models/{model}:streamGenerateContent?alt=sse``, key in ``x-goog-api-key``, never in
the URL): every ``system`` message goes to ``systemInstruction`` (Gemini has no system role);
``assistant`` becomes ``model``; consecutive messages of one role are merged into one content
with several parts, because Gemini wants the roles to alternate; a conversation opening with
the model (history trimmed to the window) loses those leading model turns, because Gemini wants
the user to speak first; empty messages are dropped (Gemini refuses empty text parts).
``GEMINI_SAFETY_SETTINGS`` is checked when the provider is built and sent with every turn.

Response: SSE frames (CRLF in practice) of ``GenerateContentResponse``; no ``[DONE]``, the
stream ends when the connection closes, so a stream that closes before any ``finishReason`` was
cut (``upstream_bad_response``). Text is the candidate's non-thought parts. Usage is read from
the frame carrying the finish reason (or a later one): Gemini repeats running counts on earlier
frames, and only the final one is the bill; ``thoughtsTokenCount`` counts as completion.

Finish reasons: ``STOP`` -> ``stop``; ``MAX_TOKENS`` -> ``length``; the filters (``SAFETY``,
``RECITATION``, ``BLOCKLIST``, ``PROHIBITED_CONTENT``, ``SPII``, ``LANGUAGE``, ``IMAGE_*``) ->
``content_filter``, and the turn completes with what was sent; anything else (``OTHER``,
``MALFORMED_FUNCTION_CALL``, reasons added later) -> ``other``: the turn completes, and the
odd reason stays visible in the record (the OpenAI route reports it as ``stop``).

A prompt blocked outright (``promptFeedback.blockReason``, no candidates) fails the turn with
``upstream_content_filtered``; it bills the prompt tokens Gemini reports, never a completion.
HTTP errors before the first token go through the shared retry policy; Google's error body gives
the message and, on 429, the ``RetryInfo`` delay (Gemini sends no ``Retry-After``); a 400 whose
reason is ``API_KEY_INVALID`` is an ``upstream_auth`` error, not a bad request.

``count_prompt`` asks ``countTokens`` for the contents, plus the system instruction counted once
per (model, system text) and cached: the system prompt is the same for every turn.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from service.errors import UpstreamError
from service.providers.base import (
    Chunk,
    CompletionRequest,
    Message,
    RetryPolicy,
    Usage,
    call_json,
    error_for_exception,
    error_for_status,
    first_unsupported,
    log_upstream_body,
    with_retries,
)
from service.providers.sse import SSEDecoder, SSEEvent, load_frame
from service.settings import SettingsError

LIST_TIMEOUT_S = 10.0  # the whole models.list walk, every page included
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10)  # one models.list page or one countTokens
SYSTEM_CACHE_SIZE = 64
FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
GENERATING = frozenset({"generateContent", "streamGenerateContent"})

Content = dict[str, Any]


def parse_safety_settings(raw: str | None) -> list[dict[str, str]]:
    """``GEMINI_SAFETY_SETTINGS``: a JSON list of ``{"category", "threshold"}`` objects."""
    if raw is None or not raw.strip():
        return []
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SettingsError("invalid setting GEMINI_SAFETY_SETTINGS: not valid JSON") from exc
    if not isinstance(value, list):
        raise SettingsError("invalid setting GEMINI_SAFETY_SETTINGS: expected a JSON list")
    for i, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or set(item) != {"category", "threshold"}
            or not all(isinstance(v, str) and v for v in item.values())
        ):
            raise SettingsError(
                f"invalid setting GEMINI_SAFETY_SETTINGS: item {i} must be an object with "
                'exactly "category" and "threshold" strings'
            )
    return value


def finish_reason(reason: str) -> str:
    if reason == "STOP":
        return "stop"
    if reason == "MAX_TOKENS":
        return "length"
    return "content_filter" if reason in FILTERED else "other"


def _plain(content: Any) -> str:
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


def to_contents(messages: list[Message]) -> tuple[list[str], list[Content]]:
    """Our messages as Gemini's (system texts, alternating contents opening with the user)."""
    system: list[str] = []
    contents: list[Content] = []
    for message in messages:
        text = _plain(message.get("content"))
        if not text:
            continue
        if message["role"] in ("system", "developer"):
            system.append(text)
            continue
        role = "model" if message["role"] == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append({"text": text})
        elif contents or role == "user":
            contents.append({"role": role, "parts": [{"text": text}]})
    return system, contents


def _resource(model: str) -> str:
    """``gemini-2.0-flash`` -> ``models/gemini-2.0-flash``; ``tunedModels/x`` stays as it is."""
    return model if "/" in model else f"models/{model}"


class GeminiProvider:
    name = "gemini"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str | None,
        safety_settings: str | None,
        retry: RetryPolicy,
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._safety = parse_safety_settings(safety_settings)
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["x-goog-api-key"] = api_key
        self._check = functools.partial(_raise_for_status, secrets=(api_key or "",))
        self._retry = retry
        self._timeout = timeout
        self._system_counts: dict[tuple[str, tuple[str, ...]], int] = {}

    def _body(self, req: CompletionRequest) -> bytes:
        system, contents = to_contents(req.messages)
        config: dict[str, Any] = {"maxOutputTokens": req.max_tokens}
        for key, value in (
            ("temperature", req.temperature),
            ("topP", req.top_p),
            ("stopSequences", req.stop),
        ):
            if value is not None:
                config[key] = value
        body: dict[str, Any] = {"contents": contents, "generationConfig": config}
        if system:
            body["systemInstruction"] = {"parts": [{"text": t} for t in system]}
        if self._safety:
            body["safetySettings"] = self._safety
        return orjson.dumps(body)

    async def open(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        body = self._body(request)
        url = f"{self._base}/{_resource(request.model)}:streamGenerateContent"
        headers = {**self._headers, "Accept": "text/event-stream"}

        async def attempt() -> aiohttp.ClientResponse:
            resp = await self._session.post(
                url, params={"alt": "sse"}, data=body, headers=headers, timeout=self._timeout
            )
            await self._check(resp)
            return resp

        resp = await with_retries(attempt, self._retry, provider=self.name)
        return _chunks(resp)

    async def list_models(self) -> set[str] | None:
        """``models.list``, every page: the ids (without ``models/``) that can generate text."""
        ids: set[str] = set()
        params = {"pageSize": "1000"}
        try:
            async with asyncio.timeout(LIST_TIMEOUT_S):
                while True:
                    page = await self._call("GET", f"{self._base}/models", params=params)
                    ids |= _generating_models(page)
                    token = page.get("nextPageToken")
                    if not token:
                        return ids
                    params = {"pageSize": "1000", "pageToken": str(token)}
        except TimeoutError as exc:
            raise error_for_exception(exc) from exc

    def unsupported(self, request: CompletionRequest) -> str | None:
        return first_unsupported(request, frozenset({"user", "metadata"}))

    async def count_prompt(self, request: CompletionRequest) -> int:
        system, contents = to_contents(request.messages)
        total = await self._count(request.model, contents) if contents else 0
        if system:
            total += await self._system_tokens(request.model, system)
        return total

    async def _system_tokens(self, model: str, system: list[str]) -> int:
        key = (model, tuple(system))
        count = self._system_counts.get(key)
        if count is None:
            as_user = {"role": "user", "parts": [{"text": t} for t in system]}
            count = await self._count(model, [as_user])
            if len(self._system_counts) >= SYSTEM_CACHE_SIZE:
                del self._system_counts[next(iter(self._system_counts))]
            self._system_counts[key] = count
        return count

    async def _count(self, model: str, contents: list[Content]) -> int:
        url = f"{self._base}/{_resource(model)}:countTokens"
        answer = await self._call("POST", url, body=orjson.dumps({"contents": contents}))
        total = answer.get("totalTokens")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise UpstreamError("upstream_bad_response", "malformed countTokens answer")
        return total

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


def _generating_models(page: dict[str, Any]) -> set[str]:
    models = page.get("models", [])
    if not isinstance(models, list):
        raise UpstreamError("upstream_bad_response", "malformed model list")
    return {
        str(m["name"]).removeprefix("models/")
        for m in models
        if isinstance(m, dict)
        and "name" in m
        and GENERATING & set(m.get("supportedGenerationMethods") or ())
    }


# ---------------------------------------------------------------------- errors
@dataclass(frozen=True, slots=True)
class _GoogleError:
    message: str
    reason: str | None = None  # google.rpc.ErrorInfo.reason, e.g. API_KEY_INVALID
    retry_delay: str | None = None  # google.rpc.RetryInfo.retryDelay, in seconds


def _google_error(raw: bytes) -> _GoogleError:
    """``{"error": {"code", "message", "status", "details": [...]}}``, or the raw text."""
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return _GoogleError(raw.decode("utf-8", errors="replace")[:500])
    reason = delay = None
    for detail in error.get("details") or ():
        kind = str(detail.get("@type", "")) if isinstance(detail, dict) else ""
        if kind.endswith("google.rpc.ErrorInfo"):
            reason = str(detail.get("reason"))
        elif kind.endswith("google.rpc.RetryInfo"):
            delay = str(detail.get("retryDelay", "")).removesuffix("s") or None
    return _GoogleError(f"{error.get('status', '')}: {error.get('message', '')}", reason, delay)


async def _raise_for_status(resp: aiohttp.ClientResponse, *, secrets: tuple[str, ...] = ()) -> None:
    """``base.raise_for_status`` reading Google's error body (reason, retry delay); the body
    itself goes to the log only, redacted."""
    if resp.status < 300:
        return
    try:
        raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    finally:
        resp.release()
    error = _google_error(raw)
    log_upstream_body("gemini", resp.status, error.message, secrets)
    if error.reason == "API_KEY_INVALID":
        raise UpstreamError(
            "upstream_auth",
            f"the upstream refused the gateway's credentials (HTTP {resp.status})",
            upstream_status=resp.status,
        )
    raise error_for_status(resp.status, resp.headers.get("Retry-After") or error.retry_delay)


# ---------------------------------------------------------------------- stream
async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    decoder = SSEDecoder()
    reader = _Reader()
    event: SSEEvent | None = None
    events: list[SSEEvent] = []
    chunk: Chunk | None = None
    try:
        async for data in resp.content.iter_any():
            events = decoder.feed(data)
            last = len(events) - 1
            for i, event in enumerate(events):
                chunk = reader.chunk(event.data)
                chunk.more = i < last
                yield chunk
                reader.raise_if_blocked()
            data, events, event, chunk = b"", [], None, None  # not held while the next read waits
        for event in decoder.finish():
            yield reader.chunk(event.data)
            reader.raise_if_blocked()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise error_for_exception(exc) from exc
    finally:
        resp.close()
    if not reader.finished:  # no [DONE] in Gemini: a close before a finish reason is a cut
        raise UpstreamError("upstream_bad_response", "the Gemini stream ended before finishing")


class _Reader:
    """One stream's frames: finished yet, the last usage report, a blocked prompt."""

    def __init__(self) -> None:
        self.finished = False
        self.usage: Usage | None = None
        self.blocked: UpstreamError | None = None

    def chunk(self, data: str) -> Chunk:
        frame = load_frame(data, "gemini")
        meta = frame.get("usageMetadata")
        if isinstance(meta, dict):
            self.usage = _usage(meta)
        candidates = frame.get("candidates")
        if not candidates:
            return self._without_candidate(frame)
        candidate = candidates[0] if isinstance(candidates, list) else None
        if not isinstance(candidate, dict):
            raise UpstreamError("upstream_bad_response", "malformed upstream frame")
        chunk = Chunk(text=_text(candidate))
        reason = candidate.get("finishReason")
        if reason:
            if not isinstance(reason, str):
                raise UpstreamError("upstream_bad_response", "malformed upstream frame")
            self.finished = True
            chunk.finish_reason = finish_reason(reason)
        if self.finished:
            chunk.usage = self.usage
        return chunk

    def _without_candidate(self, frame: dict[str, Any]) -> Chunk:
        feedback = frame.get("promptFeedback")
        block = feedback.get("blockReason") if isinstance(feedback, dict) else None
        if block:
            self.blocked = UpstreamError(
                "upstream_content_filtered", f"Gemini blocked the prompt ({block})"
            )
            usage = self.usage
            return Chunk(usage=Usage(usage.prompt_tokens, 0) if usage else None)
        return Chunk(usage=self.usage if self.finished else None)

    def raise_if_blocked(self) -> None:
        if self.blocked is not None:
            raise self.blocked


def _text(candidate: dict[str, Any]) -> str:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    return "".join(
        p["text"]
        for p in parts
        if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
    )


def _usage(meta: dict[str, Any]) -> Usage:
    def count(key: str) -> int:
        value = meta.get(key) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UpstreamError("upstream_bad_response", f"malformed usageMetadata.{key}")
        return value

    return Usage(
        count("promptTokenCount"), count("candidatesTokenCount") + count("thoughtsTokenCount")
    )

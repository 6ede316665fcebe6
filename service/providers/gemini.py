"""Google's Gemini API spoken natively, over the shared aiohttp session (no SDK, no second stack).

Native rather than Gemini's OpenAI-compatible endpoint because only the native API gives exact
usage (thinking tokens included), per-request safety settings, the reason a prompt was blocked,
and ``countTokens`` for models we have no local tokenizer for.

Request (``models/{model}:streamGenerateContent?alt=sse``, key in ``x-goog-api-key``, never in
the URL): the OpenAI request translated by ``gemini_translate`` (messages, tools, tool choice,
response format, images, sampling, thinking); what cannot be translated was refused before the
turn was admitted (``unsupported``). ``GEMINI_SAFETY_SETTINGS`` is checked when the provider is
built and sent with every turn. The client's ``user`` and ``metadata`` are labels: logged with
the turn (``upstream.labels``), not sent, since Gemini has no such fields.

Response: SSE frames (CRLF in practice) of ``GenerateContentResponse``; no ``[DONE]``, the
stream ends when the connection closes, so a stream that closes before any ``finishReason`` was
cut (``upstream_bad_response``). A frame of plain text parts is ``Chunk.text`` alone (the hot
path builds nothing else). Any other frame is also an OpenAI chunk (``Chunk.frame``): a
``functionCall`` part is a ``tool_calls`` delta (whole: Gemini sends a call's arguments at
once) with an id made here, and its ``thoughtSignature`` as
``extra_content.google.thought_signature`` (the client sends it back with the call; see
``gemini_translate``); a thought part (``"thought": true``, asked for with
``includeThoughts``) is ``reasoning_content``; ``logprobsResult`` is the choice's ``logprobs``.
An answer that called a function finishes with ``tool_calls`` (Gemini says ``STOP``). Usage is
read from the frame carrying the finish reason (or a later one): Gemini repeats running counts
on earlier frames, and only the final one is the bill; ``thoughtsTokenCount`` counts as
completion (and as its reasoning tokens), ``cachedContentTokenCount`` as the prompt's cached
tokens.

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

``count_prompt`` asks ``countTokens`` for the translated contents (as a whole
``generateContentRequest`` when tools or a response schema come with them, so those count
too), plus the system instruction counted once per (model, system text) and cached: the system
prompt is the same for every turn.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog

from service.errors import UpstreamError
from service.providers import gemini_translate
from service.providers.base import (
    Chunk,
    CompletionRequest,
    RetryPolicy,
    Usage,
    call_json,
    error_for_exception,
    error_for_status,
    log_upstream_body,
    token_count,
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

log = structlog.get_logger("service.providers")


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

    async def open(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        translation = gemini_translate.translate(request)
        if translation.labels:
            log.info("upstream.labels", provider=self.name, labels=translation.labels)
        body = orjson.dumps(translation.request(self._safety))
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
        return gemini_translate.unsupported(request)

    async def count_prompt(self, request: CompletionRequest) -> int:
        translation = gemini_translate.translate(request)
        total = 0
        if translation.contents:
            body: dict[str, Any] = {"contents": translation.contents}
            if not translation.plain:  # tools and a response schema count too
                whole = translation.request([])
                whole.pop("systemInstruction", None)  # counted on its own, below
                body = {"generateContentRequest": {"model": _resource(request.model), **whole}}
            total = await self._count(request.model, body)
        if translation.system:
            total += await self._system_tokens(request.model, translation.system)
        return total

    async def _system_tokens(self, model: str, system: list[str]) -> int:
        key = (model, tuple(system))
        count = self._system_counts.get(key)
        if count is None:
            as_user = {"role": "user", "parts": [{"text": t} for t in system]}
            count = await self._count(model, {"contents": [as_user]})
            if len(self._system_counts) >= SYSTEM_CACHE_SIZE:
                del self._system_counts[next(iter(self._system_counts))]
            self._system_counts[key] = count
        return count

    async def _count(self, model: str, body: dict[str, Any]) -> int:
        url = f"{self._base}/{_resource(model)}:countTokens"
        answer = await self._call("POST", url, body=orjson.dumps(body))
        return token_count(answer, "totalTokens", "countTokens")

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
    goes to the log, redacted, and a rejected request's message to the client."""
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
    retry_after = resp.headers.get("Retry-After") or error.retry_delay
    raise error_for_status(resp.status, retry_after, raw.decode(errors="replace"), secrets)


# ---------------------------------------------------------------------- stream
async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    decoder = SSEDecoder()
    reader = _Reader()
    event: SSEEvent | None = None
    events: Sequence[SSEEvent] = ()
    chunk: Chunk | None = None
    try:
        while data := await resp.content.readany():  # no iterator object kept per stream
            events = decoder.feed(data)
            last = len(events) - 1
            for i, event in enumerate(events):
                chunk = reader.chunk(event.data)
                chunk.more = i < last
                yield chunk
                reader.raise_if_blocked()
            data, events, event, chunk = b"", (), None, None  # not held while the next read waits
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
    """One stream's frames: finished yet, the last usage report, a blocked prompt, the function
    calls so far."""

    def __init__(self) -> None:
        self.finished = False
        self.usage: Usage | None = None
        self.blocked: UpstreamError | None = None
        self.calls = 0

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
            raise _malformed()
        chunk = self._content(candidate)
        reason = candidate.get("finishReason")
        if reason:
            if not isinstance(reason, str):
                raise _malformed()
            self.finished = True
            called = reason == "STOP" and self.calls
            chunk.finish_reason = "tool_calls" if called else finish_reason(reason)
        if self.finished:
            chunk.usage = self.usage
        return chunk

    def _content(self, candidate: dict[str, Any]) -> Chunk:
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            parts = []
        logprobs = candidate.get("logprobsResult")
        if logprobs is None:
            text = _plain_text(parts)
            if text is not None:
                return Chunk(text)
        return self._rich(parts, logprobs)

    def _rich(self, parts: list[Any], logprobs: Any) -> Chunk:
        """A frame that is more than text: thoughts, function calls, log probabilities."""
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in parts:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                (thoughts if part.get("thought") else texts).append(text)
            call = part.get("functionCall")
            if call is not None:
                calls.append(self._tool_call(call, part.get("thoughtSignature")))
        text, reasoning = "".join(texts), "".join(thoughts)
        lp = _logprobs(logprobs) if logprobs is not None else None
        if not (reasoning or calls or lp):
            return Chunk(text)
        delta: dict[str, Any] = {}
        if text:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            delta["tool_calls"] = calls
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}
        return Chunk(text, frame={"choices": [choice]})

    def _tool_call(self, call: Any, signature: Any) -> dict[str, Any]:
        """A ``functionCall`` as an OpenAI tool call delta, whole, with an id of its own."""
        if not isinstance(call, dict):
            raise _malformed()
        name, args = call.get("name"), call.get("args") or {}
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            raise _malformed()
        out: dict[str, Any] = {
            "index": self.calls,
            "id": "call_" + uuid.uuid4().hex,
            "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(args).decode()},
        }
        if isinstance(signature, str) and signature:
            out["extra_content"] = {"google": {"thought_signature": signature}}
        self.calls += 1
        return out

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


def _malformed() -> UpstreamError:
    return UpstreamError("upstream_bad_response", "malformed upstream frame")


def _plain_text(parts: list[Any]) -> str | None:
    """The text of parts that are text and nothing else (the usual frame), or None."""
    texts = []
    for part in parts:
        if type(part) is not dict or len(part) != 1:
            return None
        text = part.get("text")
        if type(text) is not str:
            return None
        texts.append(text)
    return "".join(texts)


def _logprobs(result: Any) -> dict[str, Any] | None:
    """``logprobsResult`` (chosen and top candidates per decoding step) as OpenAI's choice
    ``logprobs``, or None when it holds no step."""
    if not isinstance(result, dict):
        raise _malformed()
    chosen = result.get("chosenCandidates") or []
    tops = result.get("topCandidates") or []
    if not isinstance(chosen, list) or not isinstance(tops, list):
        raise _malformed()
    content = []
    for step, candidate in enumerate(chosen):
        top = tops[step] if step < len(tops) else None
        alternatives = top.get("candidates") if isinstance(top, dict) else None
        entry = _token(candidate)
        entry["top_logprobs"] = [_token(c) for c in alternatives or ()]
        content.append(entry)
    return {"content": content, "refusal": None} if content else None


def _token(candidate: Any) -> dict[str, Any]:
    token = candidate.get("token") if isinstance(candidate, dict) else None
    logprob = candidate.get("logProbability", 0.0) if isinstance(candidate, dict) else None
    if not isinstance(token, str) or not isinstance(logprob, int | float):
        raise _malformed()
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


_USAGE_KEYS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    # Tokens of built-in tools' prompts, billed as input (none is enabled today).
    "toolUsePromptTokenCount",
)


def _usage(meta: dict[str, Any]) -> Usage:
    """A frame's ``usageMetadata`` (every frame has one: keep this cheap)."""
    counts = [meta.get(key) or 0 for key in _USAGE_KEYS]
    for key, value in zip(_USAGE_KEYS, counts, strict=True):
        if type(value) is not int or value < 0:
            raise UpstreamError("upstream_bad_response", f"malformed usageMetadata.{key}")
    prompt, candidates, thoughts, cached, tool_use = counts
    if not (thoughts or cached):
        return Usage(prompt + tool_use, candidates)
    details: dict[str, Any] = {}
    if cached:
        details["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        details["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return Usage(prompt + tool_use, candidates + thoughts, cached, thoughts, details)

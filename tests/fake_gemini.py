"""A fake Gemini API on a real loopback socket, speaking its real REST and SSE wire formats.

``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` answers CRLF-framed SSE frames of
``GenerateContentResponse`` (running ``usageMetadata`` on every frame, the bill on the last, no
``[DONE]``); each call takes the next ``Script`` from the queue (or the default): chunks, an
HTTP error with Google's error body, a blocked prompt, a filter finish, a gate to hold the
stream, a reset; or whole parts per frame (``functionCall`` parts with their
``thoughtSignature``, ``"thought": true`` parts), ``logprobsResult`` on chosen frames, and
``thoughtsTokenCount`` / ``cachedContentTokenCount`` in the bill. With ``require_signatures``
it refuses, as Gemini 3 does, a model turn whose first function call comes back without its
thought signature. ``countTokens`` counts words (of a plain ``contents`` body or of a whole
``generateContentRequest``: its tools and schema too); ``GET /v1beta/models`` pages through
``models``. Every request is recorded (method, path, query, lower-cased headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
MODEL_VERSION = "gemini-2.0-flash-001"


def model(name: str, *methods: str) -> dict[str, Any]:
    """A ``models.list`` entry as Gemini writes it."""
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name,
        "description": f"fake {name}",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 8192,
        "supportedGenerationMethods": list(methods),
    }


DEFAULT_MODELS = [
    model("gemini-2.0-flash", "generateContent", "countTokens", "createCachedContent"),
    model("text-embedding-004", "embedContent"),
    model("gemini-2.5-pro", "generateContent", "countTokens"),
    model("aqa", "generateAnswer"),
    model("gemini-stream-only", "streamGenerateContent"),
]


IMAGE_TOKENS = 258  # what Gemini counts an image at (up to 384 px a side)


def count_words(contents: list[dict[str, Any]]) -> int:
    """The fake tokenizer: one token per whitespace-separated word of every text part, of the
    JSON of every function call and response, and 258 per image."""
    return sum(_part_tokens(p) for c in contents for p in c.get("parts", []))


def _part_tokens(part: dict[str, Any]) -> int:
    if "inlineData" in part:
        return IMAGE_TOKENS
    for key in ("functionCall", "functionResponse"):
        if key in part:
            return len(json.dumps(part[key]).split())
    return len(part.get("text", "").split())


def count_request(body: dict[str, Any]) -> int:
    """countTokens: ``{"contents"}``, or ``{"generateContentRequest"}`` with its tools and
    response schema counted as the words of their JSON."""
    request = body.get("generateContentRequest")
    if request is None:
        return count_words(body["contents"])
    extra = [request.get("tools"), request.get("generationConfig", {}).get("responseJsonSchema")]
    return count_words(request["contents"]) + sum(
        len(json.dumps(x).split()) for x in extra if x is not None
    )


@dataclass
class Script:
    chunks: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    status: int = 200  # != 200: answer Google's error body with this status
    error_reason: str | None = None  # google.rpc.ErrorInfo.reason, e.g. API_KEY_INVALID
    retry_delay: str | None = None  # google.rpc.RetryInfo.retryDelay, e.g. "0.2s"
    usage: tuple[int, int] | None = (21, 4)  # promptTokenCount, candidatesTokenCount
    thoughts: int | None = None  # thoughtsTokenCount
    thought_parts: list[str] = field(default_factory=list)  # sent first, with "thought": true
    finish_reason: str = "STOP"  # on the last text chunk, as Gemini does
    finish_after: int | None = None  # stop after this many chunks with ``finish_reason``
    block_reason: str | None = None  # promptFeedback.blockReason: no candidates at all
    gate_after: int | None = None  # wait for ``gate`` after sending this many chunks
    reset_after: int | None = None  # abort the connection after this many chunks
    send_finish: bool = True
    raw_after: dict[int, list[bytes]] = field(default_factory=dict)  # data lines before chunk i
    parts: list[list[dict[str, Any]]] | None = None  # each frame's parts, instead of ``chunks``
    logprobs: dict[int, dict[str, Any]] = field(default_factory=dict)  # logprobsResult of frame i
    cached: int | None = None  # cachedContentTokenCount


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class FakeGemini:
    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.default = Script()
        self.requests: list[Recorded] = []
        self.models = list(DEFAULT_MODELS)
        self.models_page_size = 2  # the server may return fewer than pageSize asks for
        self.models_status = 200
        self.count_status = 200
        self.require_signatures = False  # Gemini 3: function calls come back signed
        self.gate = asyncio.Event()
        self.reached_gate = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected_at: float | None = None
        self.finished = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ control
    def fail_first(self, attempts: int, status: int = 429, **kw: Any) -> None:
        """The next ``attempts`` stream calls fail with ``status``; the default answers after."""
        self.scripts.extend(Script(status=status, **kw) for _ in range(attempts))

    def calls(self, kind: str) -> list[Recorded]:
        """Recorded requests of one kind: ``streamGenerateContent``, ``countTokens``, ``list``."""
        if kind == "list":
            return [r for r in self.requests if r.method == "GET"]
        return [r for r in self.requests if r.path.endswith(":" + kind)]

    # ------------------------------------------------------------------ server
    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1beta/models/{call}", self.post)
        app.router.add_get("/v1beta/models", self.list_models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1beta"

    async def close(self) -> None:
        self.gate.set()
        if self.runner:
            await self.runner.cleanup()

    async def _record(self, request: web.Request) -> Recorded:
        body = await request.json() if request.can_read_body else None
        rec = Recorded(
            request.method,
            request.path,
            dict(request.query),
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        self.requests.append(rec)
        return rec

    @staticmethod
    def error(status: int, reason: str | None = None, retry_delay: str | None = None):
        details: list[dict[str, Any]] = []
        if reason:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            )
        if retry_delay:
            details.append(
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
            )
        body: dict[str, Any] = {
            "code": status,
            "message": f"scripted failure {status}",
            "status": GOOGLE_STATUS.get(status, "UNKNOWN"),
        }
        if details:
            body["details"] = details
        return web.json_response({"error": body}, status=status)

    async def list_models(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.models_status != 200:
            return self.error(self.models_status)
        size = min(int(request.query.get("pageSize", "50")), self.models_page_size)
        start = int(request.query.get("pageToken") or 0)
        page: dict[str, Any] = {"models": self.models[start : start + size]}
        if start + size < len(self.models):
            page["nextPageToken"] = str(start + size)
        return web.json_response(page)

    async def post(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        _, _, method = request.match_info["call"].partition(":")
        if method == "countTokens":
            if self.count_status != 200:
                return self.error(self.count_status)
            return web.json_response({"totalTokens": count_request(rec.body)})
        if method != "streamGenerateContent" or request.query.get("alt") != "sse":
            return self.error(404)
        if self.require_signatures and not signed(rec.body["contents"]):
            return self.error(400)
        script = self.scripts.pop(0) if self.scripts else self.default
        if script.status != 200:
            return self.error(script.status, script.error_reason, script.retry_delay)
        return await self.stream(request, script)

    # ------------------------------------------------------------------ stream
    @staticmethod
    def frame(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\r\n\r\n"  # CRLF, as Gemini frames

    @staticmethod
    def usage(script: Script, produced: int | None) -> dict[str, Any] | None:
        """Running usage on every frame (``produced`` chunks so far), the full bill at the end."""
        if script.usage is None:
            return None
        prompt, candidates = script.usage
        meta: dict[str, Any] = {"promptTokenCount": prompt}
        total = prompt
        if produced is None:
            meta["candidatesTokenCount"] = candidates
            total += candidates
            if script.thoughts is not None:
                meta["thoughtsTokenCount"] = script.thoughts
                total += script.thoughts
            if script.cached is not None:
                meta["cachedContentTokenCount"] = script.cached
        elif produced:
            meta["candidatesTokenCount"] = produced
            total += produced
        meta["totalTokenCount"] = total
        meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
        return meta

    def response(
        self, parts: list[dict[str, Any]] | None, finish: str | None, usage: dict | None
    ) -> dict[str, Any]:
        candidate: dict[str, Any] = {"index": 0}
        if parts is not None:
            candidate["content"] = {"parts": parts, "role": "model"}
        if finish:
            candidate["finishReason"] = finish
            if finish == "SAFETY":
                candidate["safetyRatings"] = [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                ]
        body: dict[str, Any] = {"candidates": [candidate]}
        if usage is not None:
            body["usageMetadata"] = usage
        body["modelVersion"] = MODEL_VERSION
        body["responseId"] = "fake-response-id"
        return body

    def blocked(self, script: Script) -> dict[str, Any]:
        body: dict[str, Any] = {
            "promptFeedback": {
                "blockReason": script.block_reason,
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH"},
                ],
            },
            "modelVersion": MODEL_VERSION,
        }
        if script.usage is not None:
            prompt = script.usage[0]
            body["usageMetadata"] = {"promptTokenCount": prompt, "totalTokenCount": prompt}
        return body

    async def stream(self, request: web.Request, script: Script) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await self._send(request, resp, script)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected_at = time.monotonic()
            self.disconnected.set()
            raise
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse, script: Script) -> None:
        if script.block_reason:
            await resp.write(self.frame(self.blocked(script)))
            await resp.write_eof()
            return
        if script.thought_parts:
            parts = [{"text": t, "thought": True} for t in script.thought_parts]
            await resp.write(self.frame(self.response(parts, None, self.usage(script, 0))))
        frames = script.parts or [[{"text": text}] for text in script.chunks]
        last = len(frames) - 1
        for i, parts in enumerate(frames):
            if script.gate_after == i:
                self.reached_gate.set()
                await self.gate.wait()
            if script.reset_after == i:
                request.transport.abort()  # type: ignore[union-attr]
                return
            for raw in script.raw_after.get(i, ()):
                await resp.write(b"data: " + raw + b"\r\n\r\n")
            if script.finish_after == i:
                body = self.response(None, script.finish_reason, self.usage(script, None))
                await resp.write(self.frame(body))
                break
            final = i == last and script.send_finish and script.finish_after is None
            finish = script.finish_reason if final else None
            usage = self.usage(script, None if final else i + 1)
            body = self.response(parts, finish, usage)
            if i in script.logprobs:
                body["candidates"][0]["logprobsResult"] = script.logprobs[i]
            await resp.write(self.frame(body))
        self.finished.set()
        await resp.write_eof()


def signed(contents: list[dict[str, Any]]) -> bool:
    """Whether every model turn's first function call carries a thought signature."""
    for content in contents:
        calls = [p for p in content["parts"] if "functionCall" in p]
        if content["role"] == "model" and calls and not calls[0].get("thoughtSignature"):
            return False
    return True

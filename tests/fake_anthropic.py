"""A fake Anthropic API on a real loopback socket, replaying recorded event streams byte for byte.

``POST /v1/messages`` answers the next ``Script`` (or the default): a recording from
``tests/anthropic_recordings.py`` written as given (``per_write`` events per network write),
or an HTTP error with Anthropic's error body (and ``retry-after``), a gate to hold the stream,
a reset. Like the real API it refuses a request without ``x-api-key`` (401
``authentication_error``) or without ``anthropic-version`` (400), and a non-streaming one.
``POST /v1/messages/count_tokens`` counts words; ``GET /v1/models`` pages with ``has_more`` /
``after_id``. Every request is recorded (method, path, query, lower-cased headers, JSON body).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.anthropic_recordings import TEXT

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def model(model_id: str, name: str) -> dict[str, Any]:
    """A ``GET /v1/models`` entry as Anthropic writes it."""
    return {
        "type": "model",
        "id": model_id,
        "display_name": name,
        "created_at": "2025-09-29T00:00:00Z",
    }


DEFAULT_MODELS = [
    model("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    model("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
    model("claude-opus-4-1-20250805", "Claude Opus 4.1"),
    model("claude-3-5-haiku-20241022", "Claude Haiku 3.5"),
    model("claude-3-haiku-20240307", "Claude Haiku 3"),
]


def words(value: Any) -> int:
    """The fake tokenizer: one token per whitespace-separated word of every string in it."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(v) for v in value)
    if isinstance(value, dict):
        return sum(words(v) for k, v in value.items() if k not in ("type", "role", "id"))
    return 0


@dataclass
class Script:
    recording: list[bytes] = field(default_factory=lambda: list(TEXT))
    status: int = 200  # != 200: Anthropic's error body of that status ...
    message: str | None = None  # ... saying this (else "scripted failure <status>")
    retry_after: str | None = None
    per_write: int = 1  # events per network write
    gate_after: int | None = None  # wait for ``gate`` after writing this many events
    reset_after: int | None = None  # abort the connection after this many events


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class FakeAnthropic:
    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.default = Script()
        self.requests: list[Recorded] = []
        self.models = list(DEFAULT_MODELS)
        self.models_page_size = 2  # the server may return fewer than ``limit`` asks for
        self.models_status = 200
        self.count_status = 200
        self.gate = asyncio.Event()
        self.reached_gate = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.finished = asyncio.Event()
        self.written: list[bytes] = []  # the network writes of the last stream
        self.runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ control
    def fail_first(self, attempts: int, status: int = 529, **kw: Any) -> None:
        """The next ``attempts`` message calls fail with ``status``; the default answers after."""
        self.scripts.extend(Script(status=status, **kw) for _ in range(attempts))

    def calls(self, kind: str) -> list[Recorded]:
        """Recorded requests of one kind: ``messages``, ``count_tokens``, ``models``."""
        path = {
            "messages": "/v1/messages",
            "count_tokens": "/v1/messages/count_tokens",
            "models": "/v1/models",
        }[kind]
        return [r for r in self.requests if r.path == path]

    # ------------------------------------------------------------------ server
    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.list_models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

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
    def error(status: int, message: str, retry_after: str | None = None) -> web.Response:
        body = {
            "type": "error",
            "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
            "request_id": "req_011CFakeRequestId",
        }
        headers = {"retry-after": retry_after} if retry_after else None
        return web.json_response(body, status=status, headers=headers)

    def refused(self, rec: Recorded) -> web.Response | None:
        """What the real API says to a request without the key or the version header."""
        if "x-api-key" not in rec.headers:
            return self.error(401, "x-api-key header is required")
        if rec.headers.get("anthropic-version") != "2023-06-01":
            return self.error(400, "anthropic-version: header is required")
        return None

    async def list_models(self, request: web.Request) -> web.Response:
        rec = await self._record(request)
        refused = self.refused(rec)
        if refused is not None:
            return refused
        if self.models_status != 200:
            return self.error(self.models_status, f"scripted failure {self.models_status}")
        size = min(int(request.query.get("limit", "20")), self.models_page_size)
        after = request.query.get("after_id")
        ids = [m["id"] for m in self.models]
        begin = ids.index(after) + 1 if after else 0
        page = self.models[begin : begin + size]
        return web.json_response(
            {
                "data": page,
                "has_more": begin + size < len(self.models),
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        rec = await self._record(request)
        refused = self.refused(rec)
        if refused is not None:
            return refused
        if self.count_status != 200:
            return self.error(self.count_status, f"scripted failure {self.count_status}")
        body = rec.body
        total = words(body.get("system")) + words(body["messages"]) + words(body.get("tools"))
        return web.json_response({"input_tokens": total})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        refused = self.refused(rec)
        if refused is not None:
            return refused
        if rec.body.get("stream") is not True or "max_tokens" not in rec.body:
            return self.error(400, "this fake streams only, and max_tokens is required")
        script = self.scripts.pop(0) if self.scripts else self.default
        if script.status != 200:
            message = script.message or f"scripted failure {script.status}"
            return self.error(script.status, message, script.retry_after)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "request-id": "req_1"}
        )
        await resp.prepare(request)
        try:
            await self._send(request, resp, script)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse, script: Script) -> None:
        self.written = []
        events = script.recording
        for i in range(0, len(events), script.per_write):
            if script.gate_after == i:
                self.reached_gate.set()
                await self.gate.wait()
            if script.reset_after is not None and i >= script.reset_after:
                request.transport.abort()  # type: ignore[union-attr]
                return
            data = b"".join(events[i : i + script.per_write])
            self.written.append(data)
            await resp.write(data)
        self.finished.set()
        await resp.write_eof()

"""A fake OpenAI-compatible upstream on a real loopback socket, speaking the real SSE wire format.

Each request takes the next ``Script`` from the queue (or the default): status codes, chunks,
usage, gates to hold the stream at a point, resets, stalls, malformed frames, a missing [DONE].
It records what it received and when a client went away.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Script:
    chunks: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    status: int = 200
    retry_after: str | None = None
    error_body: dict[str, Any] | None = None  # the body of a status != 200
    usage: tuple[int, int] | None = (21, 4)
    finish_reason: str = "stop"
    delay_s: float = 0.0
    gate_after: int | None = None  # wait for ``gate`` after sending this many chunks
    reset_after: int | None = None  # abort the connection after this many chunks
    stall_after: int | None = None  # stop sending (but keep the connection) after this many
    malformed_after: int | None = None
    raw_after: dict[int, list[bytes]] = field(default_factory=dict)  # data lines before chunk i
    send_done: bool = True
    send_finish: bool = True
    crlf: bool = False
    together: bool = False  # the whole stream in one write (one read, as a fast model's)
    set_cookie: str | None = None  # a Set-Cookie on the stream (a CDN's, as vendors' have)
    # A recorded stream, replayed frame by frame as given (then [DONE] unless one is an error
    # frame), and the non-streamed answer of the same upstream (``stream: false``).
    frames: list[dict[str, Any]] | None = None
    completion: dict[str, Any] | None = None


class FakeOpenAI:
    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.default = Script()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.gate = asyncio.Event()
        self.reached_gate = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected_at: float | None = None
        self.finished = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.listed = {"gpt-4o-mini"}  # what GET /v1/models answers
        self.models_status = 200
        self.models_requests = 0
        self.models_headers: list[dict[str, str]] = []

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        self.gate.set()
        if self.runner:
            await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        self.models_requests += 1
        self.models_headers.append(dict(request.headers))
        if self.models_status != 200:
            return web.json_response(
                {"error": {"message": "scripted failure", "type": "server_error"}},
                status=self.models_status,
            )
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "system"}
            for name in sorted(self.listed)
        ]
        return web.json_response({"object": "list", "data": data})

    def _frame(self, script: Script, body: Any) -> bytes:
        sep = "\r\n" if script.crlf else "\n"
        return f"data: {json.dumps(body)}{sep}{sep}".encode()

    def _chunk(
        self, text: str | None, finish: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    def _usage_chunk(self, usage: tuple[int, int]) -> dict[str, Any]:
        p, c = usage
        counts = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return {**self._chunk(None), "choices": [], "usage": counts}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        script = self.scripts.pop(0) if self.scripts else self.default
        if script.status != 200:
            headers = {"Retry-After": script.retry_after} if script.retry_after else None
            return web.json_response(
                script.error_body
                or {"error": {"message": "scripted failure", "type": "server_error"}},
                status=script.status,
                headers=headers,
            )
        if script.frames is not None:
            return await self._replay(request, script)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if script.set_cookie:
            resp.headers["Set-Cookie"] = script.set_cookie
        await resp.prepare(request)
        if script.together:
            return await self._together(resp, script)
        try:
            await resp.write(b": keep-alive\n\n")
            await resp.write(self._frame(script, self._chunk("", role=True)))
            for i, text in enumerate(script.chunks):
                if script.gate_after == i:
                    self.reached_gate.set()
                    await self.gate.wait()
                if script.reset_after == i:
                    request.transport.abort()  # type: ignore[union-attr]
                    return resp
                if script.stall_after == i:
                    await asyncio.sleep(3600)
                if script.malformed_after == i:
                    await resp.write(b"data: {not json\n\n")
                for raw in script.raw_after.get(i, ()):
                    await resp.write(b"data: " + raw + b"\n\n")
                if script.delay_s:
                    await asyncio.sleep(script.delay_s)
                await resp.write(self._frame(script, self._chunk(text)))
            if script.send_finish:
                await resp.write(self._frame(script, self._chunk(None, script.finish_reason)))
            if script.usage:
                await resp.write(self._frame(script, self._usage_chunk(script.usage)))
            if script.send_done:
                await resp.write(b"data: [DONE]\n\n")
            self.finished.set()
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected_at = time.monotonic()
            self.disconnected.set()
            raise
        return resp

    async def _together(self, resp: web.StreamResponse, script: Script) -> web.StreamResponse:
        frames = [self._chunk("", role=True), *map(self._chunk, script.chunks)]
        frames.append(self._chunk(None, script.finish_reason))
        if script.usage:
            frames.append(self._usage_chunk(script.usage))
        body = b"".join(self._frame(script, frame) for frame in frames) + b"data: [DONE]\n\n"
        await resp.write(body)
        self.finished.set()
        await resp.write_eof()
        return resp

    async def _replay(self, request: web.Request, script: Script) -> web.StreamResponse:
        if not self.requests[-1].get("stream"):
            return web.json_response(script.completion)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        assert script.frames is not None
        for body in script.frames:
            await resp.write(self._frame(script, body))
        if not any("error" in body for body in script.frames):
            await resp.write(b"data: [DONE]\n\n")
        self.finished.set()
        await resp.write_eof()
        return resp

"""A fake OpenAI-compatible upstream for the bench: cheap, paced, and speaking the real wire format.

``POST /v1/chat/completions`` with model ``n{N}-d{D}`` answers ``text/event-stream`` (chunked,
keep-alive): a role chunk, N content chunks with D ms between them (the first one at once; with
``n{N}-d{D}-f{F}``, F ms after the role chunk, as a model's time to its first token), a
finish chunk, a usage chunk and ``data: [DONE]`` - each event its own write, as a real upstream
flushes every token. ``GET /v1/models`` lists the models it was told about. Everything is
pre-encoded per model, so the upstream costs little CPU next to what it measures.

    python -m bench.upstream --port 0 --models n50-d20,n200-d0   # prints "ready <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import time

import orjson

MODEL = re.compile(rb'"model"\s*:\s*"(n(\d+)-d(\d+)(?:-f(\d+))?)"')
WORD = "lorem "  # one token in o200k_base
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(body: object) -> bytes:
    return _chunked(b"data: " + orjson.dumps(body) + b"\n\n")


def _json_response(status: str, body: object) -> bytes:
    payload = orjson.dumps(body)
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        len(payload),
        payload,
    )


class Script:
    """The pre-encoded frames of one model ``n{N}-d{D}`` (``-f{F}``)."""

    def __init__(self, model: str, n: int, delay_ms: int, first_ms: int = 0) -> None:
        self.n = n
        self.delay_s = delay_ms / 1000
        self.first_s = first_ms / 1000
        base = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _event({**base, "choices": [choice], "usage": None})

        self.role = chunk({"role": "assistant", "content": ""})
        self.content = chunk({"content": WORD})
        self.finish = chunk({}, "stop")
        usage = {"prompt_tokens": 25, "completion_tokens": n, "total_tokens": 25 + n}
        self.usage = _event({**base, "choices": [], "usage": usage})
        self.done = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Upstream:
    def __init__(self, models: list[str]) -> None:
        self.scripts: dict[str, Script] = {}
        self.listed = models
        self.streams = 0

    def script(self, body: bytes) -> Script | None:
        m = MODEL.search(body)
        if m is None:
            return None
        name = m.group(1).decode()
        script = self.scripts.get(name)
        if script is None:
            first = int(m.group(4) or 0)
            script = self.scripts[name] = Script(name, int(m.group(2)), int(m.group(3)), first)
        return script

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, _, rest = head.partition(b"\r\n")
                method, path, _ = line.split(b" ", 2)
                length = 0
                for h in rest.split(b"\r\n"):
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if method == b"GET" and path.startswith(b"/v1/models"):
                    data = [{"id": m, "object": "model", "owned_by": "bench"} for m in self.listed]
                    writer.write(_json_response("200 OK", {"object": "list", "data": data}))
                    continue
                script = self.script(body) if path == b"/v1/chat/completions" else None
                if script is None:
                    error = {"error": {"message": "unknown model or path", "type": "invalid"}}
                    writer.write(_json_response("404 Not Found", error))
                    continue
                await self.stream(script, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stream(self, script: Script, writer: asyncio.StreamWriter) -> None:
        self.streams += 1
        write, delay = writer.write, script.delay_s
        loop = asyncio.get_running_loop()
        write(HEAD + script.role)
        start = loop.time() + script.first_s
        for i in range(script.n):
            if (delay and i) or (script.first_s and not i):  # on a fixed schedule (chunk i at
                # F + i * D), as a model's pace does not slow down when this process is busy:
                # a late wake-up does not delay the rest
                await asyncio.sleep(max(0.0, start + i * delay - loop.time()))
            write(script.content)
            if writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()
            if writer.transport.is_closing():
                return
        write(script.finish + script.usage + script.done)
        await writer.drain()


async def main_async(port: int, models: list[str]) -> None:
    upstream = Upstream(models)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", port, backlog=8192)
    await serve_until_signalled(server)


async def serve_until_signalled(server: asyncio.Server) -> None:
    """Say ``ready <port>`` (what the bench waits for), then serve until SIGTERM or SIGINT."""
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--models", default="", help="comma-separated ids for GET /v1/models")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args.port, [m for m in args.models.split(",") if m]))


if __name__ == "__main__":
    main()

"""Server-sent events: the response both streaming HTTP routes send, and the SSE encoding.

``respond`` makes the response that writes a follower's events to a ``text/event-stream``
(``Cache-Control: no-cache, no-transform``, ``X-Accel-Buffering: no``), each as soon as it is
due: the follower hands over everything new since its offset at once, so a client that was slow
for a moment gets one write, not a backlog, and the turn never waits for it. A write that does
not complete within ``STREAM_SEND_TIMEOUT_S`` is the watcher's to end (``slow_client``: it
aborts the connection); a write that fails ends the following (``client_disconnect``). Either
way only the follower goes: the registry decides whether the turn goes on
(``StreamRegistry.leave``).

Chat events: ``id:`` is the event's offset (characters of the answer before the end of its
text, so ``Last-Event-ID`` says exactly what the client has), ``event:`` its name, one JSON
``data:`` line. Keep-alives are ``: ping`` comments, asked for by one ticker per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from service.logs import log_access
from service.settings import Settings
from service.stream.events import Delta, Event, Extra, Ping
from service.stream.live import Follower
from service.stream.registry import StreamRegistry

PING = b": ping\n\n"
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx and others: do not buffer the stream
}
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
USER_TIMEOUT_MARGIN_S = 10.0
# A push from the turn's task happens only while a write cannot pause the response (asyncio's
# transports pause their protocol above 64 KiB buffered): at most this much buffered, and
# frames of at most this size.
PUSH_BUFFERED = 16 * 1024
PUSH_BYTES = 16 * 1024

Encoder = Callable[[Event], bytes]


def frame(offset: int, name: str, data: object) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (offset, name.encode(), orjson.dumps(data))


def encode(event: Event) -> bytes:
    """A chat event as an SSE frame, ``id:`` its offset. A step with reasoning is an
    ``event: reasoning`` frame (``{"text": ...}``, the offset before it) and its text a delta."""
    if isinstance(event, Delta):  # ``frame(offset, "delta", {"text": ...})`` without the dict
        return _delta(event.offset, event.text)
    if isinstance(event, Extra):
        reasoning = event.reasoning()
        out = frame(event.offset - len(event.text), "reasoning", {"text": reasoning})
        out = out if reasoning else b""
        return out + _delta(event.offset, event.text) if event.text else out
    return frame(event.offset, event.name, event.data())


def _delta(offset: int, text: str) -> bytes:
    return b'id: %d\nevent: delta\ndata: {"text":%s}\n\n' % (offset, orjson.dumps(text))


def respond(
    registry: StreamRegistry,
    follower: Follower,
    settings: Settings,
    encoder: Encoder = encode,
    headers: dict[str, str] | None = None,
) -> FollowingResponse:
    """The response that streams ``follower``'s events, to be returned by the handler."""
    return FollowingResponse(registry, follower, settings, encoder, headers)


class FollowingResponse(web.StreamResponse):
    """A ``text/event-stream`` response that follows a turn until its terminal event (or until
    the client goes). The handler returns it at once and aiohttp streams it in ``prepare``, the
    way it sends a ``FileResponse``: neither the handler's frame nor the middleware's stays for
    the length of the stream (thousands are live at once). The middleware hands over the
    request's access line, written when the stream closes (``access_started``)."""

    def __init__(
        self,
        registry: StreamRegistry,
        follower: Follower,
        settings: Settings,
        encoder: Encoder,
        headers: dict[str, str] | None,
    ) -> None:
        super().__init__(headers={**HEADERS, **headers} if headers else HEADERS)
        self._following: tuple[StreamRegistry, Follower, Encoder] | None = (
            registry,
            follower,
            encoder,
        )
        self._send_timeout_s = settings.stream_send_timeout_s
        self.access_started: float | None = None

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """Stream the follower's events (one frame for all of it: thousands are live)."""
        following, self._following = self._following, None
        if following is None:  # streamed already (or being streamed)
            return await super().prepare(request)
        registry, follower, encoder = following
        del following
        reason = "client_disconnect"
        writer = None
        try:
            _tcp_user_timeout(request, self._send_timeout_s)
            writer = await super().prepare(request)
            follower.abort = request.transport
            follower.push = _Pusher(request, self, encoder)
            loop = asyncio.get_running_loop()
            async for event in follower:
                data = PING if isinstance(event, Ping) else encoder(event)
                # An event with nothing for this client (the /v1 route's start, whose role frame
                # goes with the first step; a tool call on a chat route) writes nothing, except
                # the headers when they have not gone yet: a client knows at once that it was
                # admitted.
                follower.writing_since = loop.time()
                await self.write(data)
                follower.writing_since = 0.0
            reason = "finished"
        except (ConnectionResetError, RuntimeError):  # RuntimeError: a write after the close
            pass
        except asyncio.CancelledError:
            self._access(request, 499)  # the client closed the connection
            raise
        finally:
            follower.abort = follower.push = None
            registry.leave(follower, reason)
        if self.prepared:
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await self.write_eof()
        self._access(request, self.status)
        return writer

    def _access(self, request: BaseRequest, status: int) -> None:
        if self.access_started is not None:
            log_access(request, status, self.access_started)


class _Pusher:
    """A delta written from the turn's task (``Follower.push``): only when the transport takes
    it at once (little is buffered for the client, so the write cannot wait for it). An object
    with slots, not a closure: one per live stream."""

    __slots__ = ("encoder", "request", "resp")

    def __init__(self, request: BaseRequest, resp: web.StreamResponse, encoder: Encoder) -> None:
        self.request, self.resp, self.encoder = request, resp, encoder

    async def __call__(self, delta: Delta) -> bool:
        transport = self.request.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > PUSH_BUFFERED
        ):
            return False
        data = self.encoder(delta)
        if len(data) > PUSH_BYTES:
            return False
        try:
            await self.resp.write(data)
        except (ConnectionResetError, RuntimeError):
            return False  # the client's own task finds out, and leaves
        return True


def _tcp_user_timeout(request: BaseRequest, send_timeout_s: float) -> None:
    """Let the kernel drop a peer that acknowledges nothing (gone without a word, while only
    keep-alives were written), but well after the watcher would have dropped a client whose
    write waits (twice ``STREAM_SEND_TIMEOUT_S`` and 10 s more): a client that stops reading is
    then always recorded as ``slow_client``, never as a reset that raced the watcher."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if _TCP_USER_TIMEOUT is None or sock is None or sock.family == socket.AF_UNIX:
        return
    with contextlib.suppress(OSError):
        ms = int((2 * send_timeout_s + USER_TIMEOUT_MARGIN_S) * 1000)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, ms)


class Heartbeats:
    """One ticker per process: every ``SSE_HEARTBEAT_S`` each idle follower that wants
    keep-alives gets one (``: ping`` while the model thinks), from its own writer."""

    def __init__(self, registry: StreamRegistry, interval_s: float) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sse-heartbeats")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.registry.ping()

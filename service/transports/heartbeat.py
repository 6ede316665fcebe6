"""``: ping`` heartbeats for every live SSE response of the process, from one ticker.

aiohttp-sse's ``EventSourceResponse`` pings from a task of its own per stream (a task, its
coroutine, a sleeping future and a timer for each of thousands of streams). ``SSEResponse`` is
that response (its headers, its ``TCP_USER_TIMEOUT`` from the send timeout) without the task:
``Heartbeats`` writes the comment to every registered response every ``SSE_HEARTBEAT_S``.

A ping never waits for a client: when the client's buffer is full the comment is queued behind
what is already there and the ticker moves on; the stream's own writes notice a stalled client
(``slow_client``), and the kernel does for an idle one (``TCP_USER_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest
from aiohttp_sse import EventSourceResponse

PING = b": ping\n\n"


class SSEResponse(EventSourceResponse):
    """``EventSourceResponse`` whose heartbeats come from ``Heartbeats``, not a task per stream."""

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        self._set_tcp_user_timeout(request)
        writer = await web.StreamResponse.prepare(self, request)
        self.enable_chunked_encoding()
        return writer

    def stop_streaming(self) -> None:
        """Nothing to stop: no ping task (the caller unregisters from ``Heartbeats``)."""


class Heartbeats:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.streams: set[web.StreamResponse] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sse-heartbeats")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def add(self, resp: web.StreamResponse) -> None:
        self.streams.add(resp)

    def discard(self, resp: web.StreamResponse) -> None:
        self.streams.discard(resp)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for resp in list(self.streams):
                ping(resp)


def ping(resp: web.StreamResponse) -> None:
    """Write the comment now if the transport takes it; never wait for the client."""
    write = resp.write(PING)
    try:
        write.send(None)
    except StopIteration:
        return  # written at once: the usual case
    except (ConnectionResetError, RuntimeError):
        return  # closed: the stream's own write or end notices
    write.close()  # queued behind a full buffer; not waited for

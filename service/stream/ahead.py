"""An upstream asked before its turn is admitted, read ahead until the turn takes it over.

A chat page's turn whose admission its replica expects asks its upstream beside its
reservation (``TurnProducer._open_early``), so the reservation's round trip hides behind the
model's time to its first token. Until the turn is admitted nobody reads that upstream, and
aiohttp raises a connection's error before the data it had buffered: an upstream that sent a
few chunks and then reset in that window would lose them. So what arrives meanwhile is read
into a buffer, which the turn reads first (``__anext__``); then ``Drained`` hands it the
upstream's own stream, so the rest of the answer costs nothing more per chunk.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.providers.base import Chunk


class Drained(Exception):
    """The read-ahead is all handed out: read ``stream`` from here on."""

    def __init__(self, stream: AsyncIterator[Chunk]) -> None:
        super().__init__()
        self.stream = stream


class Ahead:
    __slots__ = ("_buffer", "_end", "_opened", "_stream", "_taken", "_task")

    def __init__(self, opening: Awaitable[AsyncIterator[Chunk]]) -> None:
        self._buffer: deque[Chunk] = deque()
        self._end: Exception | None = None  # what ended the read-ahead: the end, or an error
        self._stream: AsyncIterator[Chunk] | None = None
        self._taken = False
        self._opened: asyncio.Future[AsyncIterator[Chunk]] = (
            asyncio.get_running_loop().create_future()
        )
        self._opened.add_done_callback(_retrieved)  # a refusal nobody took is nobody's
        self._task = asyncio.ensure_future(self._run(opening))

    async def _run(self, opening: Awaitable[AsyncIterator[Chunk]]) -> None:
        """Open, then read ahead at once (in the same task step: an upstream that resets right
        after its first chunks is read before its reset is) until the turn takes it over."""
        opened = self._opened
        try:
            stream = self._stream = await opening
        except Exception as exc:  # noqa: BLE001 - the upstream's refusal: the turn's (``take``)
            if not opened.done():
                opened.set_exception(exc)
            return
        except asyncio.CancelledError:
            opened.cancel()
            raise
        if not opened.done():
            opened.set_result(stream)
        while not self._taken:
            try:
                self._buffer.append(await anext(stream))
            except Exception as exc:  # noqa: BLE001 - the end, or an error: the turn's, in turn
                self._end = exc
                return

    async def take(self) -> AsyncIterator[Chunk]:
        """For the admitted turn: wait for the upstream's answer (raise its refusal), then read
        from here (``drop`` it if this is cancelled)."""
        stream = await self._opened
        self._taken = True
        return stream if self._task.done() and not self._buffer and self._end is None else self

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if not self._buffer and not self._task.done():
            await self._task  # its read in flight, the last (it was taken)
        if self._buffer:
            return self._buffer.popleft()
        if self._end is not None:
            raise self._end
        assert self._stream is not None
        raise Drained(self._stream)

    async def aclose(self) -> None:
        """Stop reading ahead and close the upstream."""
        self._taken = True
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        close: Any = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

    def drop(self, track: Callable[[asyncio.Task[Any]], None]) -> None:
        """Nobody will read it (the turn was refused, or admitted again): cancel the opening;
        had it opened, close the upstream."""
        self._taken = True
        track(asyncio.ensure_future(self.aclose()))


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()

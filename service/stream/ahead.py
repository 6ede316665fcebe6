"""An upstream asked before its turn is admitted, read ahead until the turn takes it over.

A turn whose admission its replica expects (``Expected``) but which must ask MongoDB for it (a
chat page's reservation; a program's lease that must grow) asks its upstream beside that
command (``TurnProducer._open_early``), so its round trip hides behind the model's time to its
first token. Until the turn is admitted nobody reads that upstream, and aiohttp raises a
connection's error before the data it had buffered: an upstream that sent a few chunks and then
reset in that window would lose them. So what arrives meanwhile is read into a buffer, which
the turn reads first (``__anext__``); then ``Drained`` hands it the upstream's own stream, so
the rest of the answer costs nothing more per chunk.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from service.providers.base import Chunk, close_stream
from service.store import ReserveRequest

USERS_SEEN = 10_000  # the users whose last admission ``Expected`` remembers


class Expected:
    """Whose next admission this replica expects: the user's latest admission here (a page's
    reservation, a lease's growth) went through, none was refused since, the message gap it
    set has passed, and what the month had left then holds the turn's ask. Only a hint
    (another replica may have spent the month or sent since): MongoDB's command decides."""

    __slots__ = ("_asking", "_seen")

    def __init__(self) -> None:
        # user -> (month, when their next turn may come, what the month had left); oldest first
        self._seen: dict[str, tuple[str, datetime, int]] = {}
        self._asking: set[str] = set()  # users a turn of whom asked early, not answered yet

    def asking(self, user_id: str) -> bool:
        """Whether a turn of ``user_id`` may ask its upstream early now: no other of theirs
        has whose admission is still unanswered (``answered``). If so, this one now has."""
        if user_id in self._asking:
            return False
        self._asking.add(user_id)
        return True

    def answered(self, user_id: str) -> None:
        """The admission of the user's turn that asked early has its answer."""
        self._asking.discard(user_id)

    def admitted(self, req: ReserveRequest, remaining: int) -> None:
        seen = self._seen
        seen.pop(req.user_id, None)
        gap = timedelta(milliseconds=req.rate_limit_ms)
        seen[req.user_id] = (req.period, req.now + gap, remaining)
        if len(seen) > USERS_SEEN:
            del seen[next(iter(seen))]

    def refused(self, user_id: str) -> None:
        self._seen.pop(user_id, None)

    def likely(self, req: ReserveRequest) -> bool:
        seen = self._seen.get(req.user_id)
        if seen is None:
            return False
        period, next_at, remaining = seen
        return period == req.period and req.now >= next_at and remaining >= req.want


class Drained(Exception):
    """The read-ahead is all handed out: read ``stream`` from here on."""

    def __init__(self, stream: AsyncIterator[Chunk]) -> None:
        super().__init__()
        self.stream = stream


# The read-ahead reached the upstream's end (``Ahead._end``). Not the StopAsyncIteration that said
# so: kept, its traceback would hold the read-ahead's frame, the read-ahead and so the turn in a
# cycle (every turn's objects then waited for the cyclic collector instead of going at once).
ENDED = StopAsyncIteration()


class Ahead:
    __slots__ = ("_buffer", "_end", "_opened", "_stream", "_taken", "_task")

    def __init__(self, opening: Awaitable[AsyncIterator[Chunk]]) -> None:
        self._buffer: deque[Chunk] = deque()
        # What ended the read-ahead: ``ENDED`` (the end), or an error.
        self._end: Exception | None = None
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
            except StopAsyncIteration:
                self._end = ENDED
                return
            except Exception as exc:  # noqa: BLE001 - an error: the turn's, in turn
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
        if self._end is ENDED:
            raise StopAsyncIteration  # a new one each time: ``ENDED`` is never raised
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
        await close_stream(self._stream)

    def drop(self, track: Callable[[asyncio.Task[Any]], None]) -> None:
        """Nobody will read it (the turn was refused, or admitted again): cancel the opening;
        had it opened, close the upstream."""
        self._taken = True
        track(asyncio.ensure_future(self.aclose()))


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()

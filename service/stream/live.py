"""A turn's answer while it is produced, and the followers that read it from an offset.

``LiveStream`` is what the turn's own task writes (``add`` text, ``end`` with the final) and
what any number of ``Follower``s read. The text is append-only and addressed by character
offset (Unicode code points); one notify wakes every waiting follower when it grows or ends. A
follower that was busy writing sends everything new since its offset in one event when it comes
back: that is the coalescing, with no queue between the turn and the client, and a slow client
never slows the turn (nor holds more than the turn's own text).

The same ``LiveStream`` stands for a turn another replica runs (``service.stream.mirror``): the
text then grows from that replica's checkpoints, and ``end`` comes from the stored record.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.stream.events import PING, Delta, Event, Extra, Final, Ping, Started, terminal

TEXT_BLOCK = 16  # the text's pieces are joined by this many (see ``LiveStream.add``)
MAX_DELTA_CHARS = 8192  # a follower far behind catches up in events of at most this much text
TAIL_SCAN = 4096  # further back than this, ``text_since`` joins the pieces first


class LiveStream:
    __slots__ = (
        "_waiters",
        "cancel_when_alone",
        "chat_id",
        "deadline",
        "final",
        "finish_seen",
        "followed_until",
        "followers",
        "length",
        "loose",
        "marks",
        "message_id",
        "meta",
        "model",
        "parts",
        "prompt_tokens",
        "reading",
        "reason",
        "saved",
        "task",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        message_id: str,
        chat_id: str | None,
        user_id: str,
        transport: str,
        model: str,
        *,
        cancel_when_alone: bool = False,
        prompt_tokens: int = 0,
    ) -> None:
        self.message_id = message_id
        self.chat_id = chat_id
        self.user_id = user_id
        self.transport = transport
        self.model = model
        # The prompt as the turn was admitted with it (0: not known here, as on a mirror), for
        # a transport that announces it before the upstream's usage (Anthropic's message_start).
        self.prompt_tokens = prompt_tokens
        # The last follower leaving stops the turn (stateless API turns, ON_DISCONNECT=cancel).
        self.cancel_when_alone = cancel_when_alone
        self.task: asyncio.Task[None] | None = None
        self.reason: str | None = None
        self.reading = False
        self.deadline = 0.0  # loop time by which the next stage (first token / end) must happen
        self.finish_seen = False  # the upstream sent its finish reason; only usage may follow
        self.followed_until = 0.0  # loop time until which a follower elsewhere wants it fast
        self.parts: list[str] = []  # the text so far, in pieces
        self.length = 0  # characters in ``parts``
        self.loose = 0  # pieces at the end of ``parts`` not yet joined into a block
        self.saved = 0  # characters the last checkpoint holds
        # The steps that are more than choice 0's text (``mark``): (start, end, frame), the
        # text they carry being [start, end). None until the first: a plain turn keeps none.
        self.marks: list[tuple[int, int, dict[str, Any]]] | None = None
        self.meta: dict[str, Any] | None = None  # system_fingerprint, service_tier as last sent
        self.final: Final | None = None
        self.followers = 0
        self._waiters: list[Follower] | None = None  # followers waiting for the next notify

    # ------------------------------------------------------------------ the turn's side
    def add(self, text: str) -> None:
        """Append text and wake the followers."""
        self.append(text)
        self.notify()

    def append(self, text: str) -> None:
        """Append text; the followers hear of it at the next ``publish`` or ``notify``.
        Every ``TEXT_BLOCK`` pieces are joined into one string: a token-sized string costs ~50
        bytes of header for ~4 characters, so a long answer held as deltas would cost a live
        stream ~13x its text."""
        parts = self.parts
        parts.append(text)
        self.length += len(text)
        self.loose += 1
        if self.loose == TEXT_BLOCK:
            parts[-TEXT_BLOCK:] = ["".join(parts[-TEXT_BLOCK:])]
            self.loose = 0

    def mark(self, frame: dict[str, Any], text: str) -> None:
        """Append a step that is more than text (``Chunk.frame``), with choice 0's text in it;
        followers hear of it like of text."""
        start = self.length
        if text:
            self.append(text)
        if self.marks is None:
            self.marks = []
        self.marks.append((start, self.length, frame))

    def marks_since(self, offset: int) -> int:
        """The index of the first mark a follower from ``offset`` has not seen: every mark from
        the start, else those whose text ends after it (one at exactly ``offset`` is taken as
        seen)."""
        marks = self.marks
        if not marks or offset == 0:
            return 0
        return next((i for i, m in enumerate(marks) if m[1] > offset), len(marks))

    async def publish(self) -> None:
        """For the turn's own task, once it has appended what one network read brought: a
        follower that is waiting and can take a write at once gets it written from here
        (``Follower.push``), so a client that keeps up costs no second task step per read;
        the others are woken, and write what they missed in one event."""
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for follower in waiters:
                if not await follower.push_now():
                    follower.wake()

    def end(self, final: Final) -> None:
        self.final = final
        self.notify()

    def cut(self, length: int) -> None:
        """Keep the first ``length`` characters only (the stored answer, shorter than what was
        produced): a follower past it gets the end at ``length`` with ``unsaved``."""
        if length < self.length:
            self.parts[:] = [self.text()[:length]]
            self.length, self.loose = length, 0
            if self.marks is not None:
                self.marks = [m for m in self.marks if m[1] <= length]

    def notify(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for follower in waiters:
                follower.wake()

    def cancel(self, reason: str) -> None:
        """Stop the turn: at once while it waits for its upstream (its task is cancelled, which
        closes the upstream request), else before its next read."""
        if self.reason is None:
            self.reason = reason
        if self.reading and self.task is not None and not self.task.done():
            self.task.cancel()

    def grown(self) -> bool:
        return self.length > self.saved

    # ------------------------------------------------------------------ the followers' side
    def text(self) -> str:
        return "".join(self.parts)

    def text_since(self, offset: int, limit: int = MAX_DELTA_CHARS) -> str:
        """Up to ``limit`` characters from ``offset`` on."""
        behind = self.length - offset
        if behind <= 0:
            return ""
        parts = self.parts
        if behind > TAIL_SCAN and len(parts) > 1:
            parts[:] = ["".join(parts)]  # far behind: one string from now on (same text)
            self.loose = 0
        if len(parts) == 1:
            return parts[0][offset : offset + limit]
        taken: list[str] = []
        need = behind
        for part in reversed(parts):
            if len(part) >= need:
                taken.append(part[len(part) - need :])
                break
            taken.append(part)
            need -= len(part)
        taken.reverse()
        text = "".join(taken)
        return text if len(text) <= limit else text[:limit]

    def started(self, offset: int) -> Started:
        return Started(self.message_id, self.chat_id, self.model, offset)

    def _wait(self, follower: Follower) -> None:
        if self._waiters is None:
            self._waiters = [follower]
        else:
            self._waiters.append(follower)


class Follower:
    """One client reading a ``LiveStream`` from an offset: ``async for event in follower``.

    Yields ``Started`` (at the start offset), then a ``Delta`` with everything new each time it
    comes back (at most ``MAX_DELTA_CHARS`` at once), then the terminal event; ``Ping`` when a
    keep-alive was asked for (``nudge``) and nothing else is due. ``writing_since`` is set by the
    transport around its writes, so the watcher can drop a client that stopped reading.

    A follower with nothing due waits on one future, which the stream's notify resolves with the
    next event: thousands wait at once, so none keeps a coroutine frame for it."""

    __slots__ = (
        "_done",
        "_started",
        "_wake",
        "abort",
        "keepalive",
        "live",
        "mark",
        "offset",
        "ping_due",
        "push",
        "reason",
        "transport",
        "writing_since",
    )

    def __init__(
        self, live: LiveStream, offset: int, transport: str, *, keepalive: bool = False
    ) -> None:
        self.live = live
        self.offset = offset
        self.mark = live.marks_since(offset)  # the next of ``live.marks`` to hand out
        self.transport = transport
        self.keepalive = keepalive
        self.ping_due = False
        self.writing_since = 0.0  # loop time a write began that has not completed; 0: none
        self.reason: str | None = None  # why it stopped following, when it was not the end
        self.abort: asyncio.Transport | None = None  # closed by the watcher on a stalled write
        self._started = False
        self._done = False
        # Set by a transport that can take a delta without waiting: ``push(delta)`` writes it
        # and says True, or says False (it would have to wait; the client's own task writes).
        self.push: Callable[[Delta], Awaitable[bool]] | None = None
        self._wake: asyncio.Future[Event | Ping] | None = None

    def __aiter__(self) -> AsyncIterator[Event | Ping]:
        return self

    def __anext__(self) -> asyncio.Future[Event | Ping]:
        waiter: asyncio.Future[Event | Ping] = asyncio.get_running_loop().create_future()
        if not self._resolve(waiter):
            self._wake = waiter
            self.live._wait(self)
        return waiter

    def wake(self) -> None:
        """The stream grew or ended (its notify): hand the waiting client its next event."""
        waiter = self._wake
        if waiter is None:
            return
        if waiter.done() or self._resolve(waiter):
            self._wake = None
        else:  # nothing for it yet (a read without text, say): it waits for the next notify
            self.live._wait(self)

    async def push_now(self) -> bool:
        """Write what is new from the turn's task, if this follower waits for it and its
        transport takes it at once; it then goes on waiting. False: wake it instead (also
        after a write, when more is due than one delta carries)."""
        waiter, push = self._wake, self.push
        if push is None or waiter is None or waiter.done() or not self._started:
            return False
        live = self.live
        if live.marks is not None and self.mark < len(live.marks):
            return False  # a mark is due: its own task hands it out
        text = live.text_since(self.offset)
        if not text or not await push(Delta(text, self.offset + len(text))):
            return False
        self.offset += len(text)
        self.ping_due = False  # the write kept the connection alive
        if live.length > self.offset:  # more than one delta's worth: its own task catches up
            return False
        live._wait(self)
        return True

    def nudge(self) -> None:
        """Ask for a keep-alive: the follower yields ``Ping`` unless text or the end is due."""
        self.ping_due = True
        self.wake()

    def _resolve(self, waiter: asyncio.Future[Event | Ping]) -> bool:
        """Give ``waiter`` the next event if one is due; False when there is none yet."""
        live = self.live
        if not self._started:
            self._started = True
            waiter.set_result(live.started(self.offset))
        elif live.marks is not None and (step := self._step(live.marks)) is not None:
            waiter.set_result(step)
        elif live.length > self.offset:
            text = live.text_since(self.offset)
            self.offset += len(text)
            waiter.set_result(Delta(text, self.offset))
        elif live.final is not None:
            if self._done:
                waiter.set_exception(StopAsyncIteration())
            else:
                self._done = True
                # At the answer's length, also for a follower past it (text a replica sent
                # and died before it checkpointed: the answer settled without it).
                waiter.set_result(terminal(live.final, live.length, self.offset))
        elif self.ping_due:
            self.ping_due = False
            waiter.set_result(PING)
        else:
            return False
        return True

    def _step(self, marks: list[tuple[int, int, dict[str, Any]]]) -> Delta | Extra | None:
        """The next event of a stream with marks: the text up to the next mark, then the mark;
        None when no mark is due (plain text, if any, is then handed out as usual)."""
        if self.mark >= len(marks):
            return None
        live = self.live
        start, end, frame = marks[self.mark]
        if self.offset < start:
            text = live.text_since(self.offset, min(MAX_DELTA_CHARS, start - self.offset))
            self.offset += len(text)
            return Delta(text, self.offset)
        self.mark += 1
        if self.offset > start:  # resumed inside it: the rest of its text, as text
            text = live.text_since(self.offset, end - self.offset)
            self.offset = end
            return Delta(text, end)
        text = live.text_since(start, end - start) if end > start else ""
        self.offset = end
        return Extra(frame, text, end)

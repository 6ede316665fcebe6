"""The registry of live streams on this replica, and the finalizations still running.

A ``LiveStream`` is cancelled by giving a reason. When the producer is waiting on the upstream
(``reading``) its task is cancelled at once, which closes the upstream connection; otherwise the
producer sees the reason before its next read. Either way it finalizes and ends the stream with
a terminal event. Shutdown waits for every tracked finalization before MongoDB is closed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from service.metrics import ACTIVE_STREAMS
from service.stream.finals import PendingFinals

TEXT_BLOCK = 16  # the text's pieces are joined by this many (see ``LiveStream.add``)


class LiveStream:
    __slots__ = (
        "chat_id",
        "deadline",
        "length",
        "loose",
        "message_id",
        "parts",
        "reading",
        "reason",
        "saved",
        "task",
        "transport",
        "user_id",
    )

    def __init__(self, message_id: str, chat_id: str | None, user_id: str, transport: str) -> None:
        self.message_id = message_id
        self.chat_id = chat_id
        self.user_id = user_id
        self.transport = transport
        self.task: asyncio.Task[object] | None = None
        self.reason: str | None = None
        self.reading = False
        self.deadline = 0.0  # loop time by which the next stage (first token / end) must happen
        self.parts: list[str] = []  # the text so far, in pieces (filled once persisted)
        self.length = 0  # characters in ``parts``
        self.loose = 0  # pieces at the end of ``parts`` not yet joined into a block
        self.saved = 0  # characters the last checkpoint holds

    def add(self, text: str) -> None:
        """Append a delta's text. Every ``TEXT_BLOCK`` deltas are joined into one string: a
        token-sized string costs ~50 bytes of header for ~4 characters, so a long answer held
        as deltas would cost a live stream ~13x its text (a 1,000-token answer: ~57 KB)."""
        parts = self.parts
        parts.append(text)
        self.length += len(text)
        self.loose += 1
        if self.loose == TEXT_BLOCK:
            parts[-TEXT_BLOCK:] = ["".join(parts[-TEXT_BLOCK:])]
            self.loose = 0

    def grown(self) -> bool:
        return self.length > self.saved

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.reading and self.task is not None and not self.task.done():
            self.task.cancel()


class StreamRegistry:
    def __init__(self) -> None:
        self.replica_id = uuid.uuid4().hex  # this process, in heartbeats and on its turns
        self.streams: dict[str, LiveStream] = {}
        self.draining = False
        self.pending = PendingFinals()  # final writes MongoDB could not take yet
        # MongoDB as the watcher last found it: failing, or back since (loop time) after an
        # outage. After an outage every replica's heartbeat is old at once: no turn is judged
        # dead until all had STALE_STREAM_S to write theirs and their pending final writes.
        self.store_failing = False
        self.store_back_at: float | None = None
        self._finalizers: set[asyncio.Task[object]] = set()

    def add(self, live: LiveStream) -> None:
        self.streams[live.message_id] = live
        ACTIVE_STREAMS.labels(live.transport).inc()

    def remove(self, message_id: str) -> None:
        live = self.streams.pop(message_id, None)
        if live is not None:
            ACTIVE_STREAMS.labels(live.transport).dec()

    def cancel(self, message_id: str, reason: str) -> bool:
        live = self.streams.get(message_id)
        if live is None:
            return False
        live.cancel(reason)
        return True

    def cancel_all(self, reason: str) -> None:
        for live in list(self.streams.values()):
            live.cancel(reason)

    def by_transport(self) -> Counter[str]:
        return Counter(live.transport for live in self.streams.values())

    def may_reap(self, now: float, stale_s: float) -> bool:
        """Whether a turn may be judged dead by its replica's heartbeat now (see above)."""
        if self.store_failing:
            return False
        return self.store_back_at is None or now - self.store_back_at >= stale_s

    def store_answered(self, now: float) -> None:
        if self.store_failing:
            self.store_failing, self.store_back_at = False, now

    def track(self, task: asyncio.Task[object]) -> None:
        self._finalizers.add(task)
        task.add_done_callback(self._finalizers.discard)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stream is live and no finalization runs; False on timeout."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self.streams or self._finalizers:
            if loop.time() >= end:
                return False
            if self._finalizers:
                # asyncio.wait, not wait_for(gather(...)): a timeout must never cancel the
                # finalizations themselves (a half-written final record stays 'streaming').
                await asyncio.wait(set(self._finalizers), timeout=end - loop.time())
            else:
                await asyncio.sleep(0.05)
        return True

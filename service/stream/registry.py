"""The registry of this replica's live turns, their tasks, and who follows them.

A turn runs as its own task from its records to its final write (``run``); transports only
follow it (``follow`` / ``leave``). Leaving never stops a turn by itself: when the last
follower goes, a chat turn goes on to its natural end (detached, resumable from any replica)
unless it is a stateless API turn or ``ON_DISCONNECT=cancel`` (``LiveStream.cancel_when_alone``).
Shutdown waits for every turn and every final write before MongoDB is closed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import structlog

from service.metrics import ACTIVE_STREAMS, DETACHED, FOLLOWERS
from service.stream.finals import PendingFinals, RollupBuffer
from service.stream.leases import Leases
from service.stream.live import Follower, LiveStream

log = structlog.get_logger("service.stream")


class StreamRegistry:
    def __init__(self) -> None:
        self.replica_id = uuid.uuid4().hex  # this process, in heartbeats and on its turns
        self.leases: Leases | None = None  # this replica's leases on users' months
        self.streams: dict[str, LiveStream] = {}
        self.followers: set[Follower] = set()
        self.followed: set[LiveStream] = set()  # this replica's turns followed from another
        # Chat turns whose records were written since the watcher last looked: it checks their
        # chats once (a delete flags only the records that exist when it runs).
        self.written: list[LiveStream] = []
        self.draining = False
        self.pending = PendingFinals()  # final writes MongoDB could not take yet
        # the rollup's increments, written each checkpoint round (its rounds marked as this
        # process's in the rollup's documents)
        self.rollups = RollupBuffer(replica=self.replica_id)
        # MongoDB as the watcher last found it: failing, or back since (loop time) after an
        # outage. After an outage every replica's heartbeat is old at once: no turn is judged
        # dead until all had STALE_STREAM_S to write theirs and their pending final writes.
        self.store_failing = False
        self.store_back_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ turns
    def add(self, live: LiveStream) -> None:
        self.streams[live.message_id] = live
        ACTIVE_STREAMS.labels(live.transport).inc()

    def remove(self, message_id: str) -> None:
        live = self.streams.pop(message_id, None)
        if live is not None:
            self.followed.discard(live)
            ACTIVE_STREAMS.labels(live.transport).dec()

    def run(self, live: LiveStream, turn: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """The turn's own task, tracked until it has finished (final write included)."""
        task = asyncio.create_task(turn)  # no name: a string per turn, for nothing
        live.task = task
        self.track(task)
        return task

    def cancel(self, message_id: str, reason: str) -> bool:
        live = self.streams.get(message_id)
        if live is None:
            return False
        live.cancel(reason)
        return True

    def cancel_chat(self, chat_id: str, reason: str) -> None:
        """Stop the chat's turns running here (a deleted chat's)."""
        for live in [live for live in self.streams.values() if live.chat_id == chat_id]:
            live.cancel(reason)

    def cancel_all(self, reason: str) -> None:
        for live in list(self.streams.values()):
            live.cancel(reason)

    def by_transport(self) -> Counter[str]:
        return Counter(live.transport for live in self.streams.values())

    # ------------------------------------------------------------------ followers
    def follow(
        self, live: LiveStream, offset: int, transport: str, *, keepalive: bool = False
    ) -> Follower:
        """A new follower of ``live`` from ``offset``; ``keepalive``: it gets ``ping``ed."""
        follower = Follower(live, offset, transport, keepalive=keepalive)
        live.followers += 1
        self.followers.add(follower)
        FOLLOWERS.labels(transport).inc()
        return follower

    def leave(self, follower: Follower, reason: str) -> None:
        """The follower is gone (its client, or the end of the turn). When it was the last one
        of a turn still running: stop it, or let it finish detached (see the module's text)."""
        if follower not in self.followers:
            return
        self.followers.discard(follower)
        FOLLOWERS.labels(follower.transport).dec()
        live = follower.live
        live.followers -= 1
        if live.followers or live.final is not None or live.message_id not in self.streams:
            return
        reason = follower.reason or reason
        if live.cancel_when_alone and not live.finish_seen:
            live.cancel(reason)
            return
        if not live.cancel_when_alone:
            DETACHED.labels(live.transport).inc()
            log.info(
                "stream.detached",
                message_id=live.message_id,
                chat_id=live.chat_id,
                user_id=live.user_id,
                transport=live.transport,
                reason=reason,
                offset=follower.offset,
            )
        # else: the answer is complete and only its usage is still to come: read it, so the
        # turn is billed exactly as if its client had stayed.

    def ping(self) -> None:
        """Ask every idle follower that wants keep-alives for one (SSE's ``: ping``)."""
        for follower in self.followers:
            if follower.keepalive and not follower.writing_since:
                follower.nudge()

    # ------------------------------------------------------------------ store health
    def may_reap(self, now: float, stale_s: float) -> bool:
        """Whether a turn may be judged dead by its replica's heartbeat now (see above)."""
        if self.store_failing:
            return False
        return self.store_back_at is None or now - self.store_back_at >= stale_s

    def store_answered(self, now: float) -> None:
        """MongoDB answered the watcher: logged once after it had failed (each failed round
        logs its error: ``stream.watch_failed``), or after start-up found it unreachable."""
        if self.store_failing:
            self.store_failing, self.store_back_at = False, now
            log.info("mongodb.available_again")

    # ------------------------------------------------------------------ shutdown
    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no turn is live and no final write runs; False on timeout."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self.streams or self._tasks:
            if loop.time() >= end:
                return False
            if self._tasks:
                # asyncio.wait, not wait_for(gather(...)): a timeout must never cancel the
                # turns themselves (a half-written final record stays 'streaming').
                await asyncio.wait(set(self._tasks), timeout=end - loop.time())
            else:
                await asyncio.sleep(0.05)
        return True

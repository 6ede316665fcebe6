"""The replica's group commit of new turns' records.

A turn's records (the question and the answer, ``streaming``) are inserted before its first
delta goes out, alongside the upstream's request (``Turn._begin``). Each insert was one
command; under load the turns starting together now share one: at most ``IN_FLIGHT`` inserts
run at a time, and the records of the turns that start while they run wait for the next one,
all of them in one unordered ``insert_many`` (``Store.insert_messages``). A turn alone (no
insert running) goes at once: at low load nothing waits, and nothing waits on a timer.

Each turn learns its own outcome: a record MongoDB refused fails that turn only (its error,
the others written; a group that fails otherwise than by an outage is written again turn by
turn, to find whose records it was); an outage fails the whole group, as it failed each insert
before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from service.errors import ServiceError
from service.store import Doc, Store

log = structlog.get_logger("service.stream")

IN_FLIGHT = 2  # inserts running at once; a slow one does not hold up every turn behind it
MAX_GROUP = 500  # the most turns in one insert


class RecordInserts:
    def __init__(self, store: Store, track: Callable[[asyncio.Task[Any]], None]) -> None:
        self.store = store
        self._track = track
        self._queue: list[tuple[list[Doc], asyncio.Future[None]]] = []
        self._running = 0

    def insert(self, docs: list[Doc]) -> asyncio.Future[None]:
        """Insert one turn's records with the others starting now; the future is done when
        they are written (or fails with the reason they are not)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((docs, done))
        if self._running < IN_FLIGHT:
            self._running += 1
            self._track(asyncio.ensure_future(self._drain()))
        return done

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                await self._write(group)
        finally:
            self._running -= 1

    async def _write(self, group: list[tuple[list[Doc], asyncio.Future[None]]]) -> None:
        failures: list[ServiceError | None]
        try:
            failures = await self.store.insert_messages([docs for docs, _ in group])
        except ServiceError as exc:  # MongoDB away: every turn's insert failed
            for _, done in group:
                if not done.done():
                    done.set_exception(exc)
            return
        except Exception as exc:  # not an outage: one turn's records (too large, say) must
            if len(group) > 1:  # not fail the others: each on its own, to find whose
                for one in group:
                    await self._write([one])
                return
            log.error("stream.records_refused", message_id=group[0][0][-1].get("_id"), exc_info=exc)
            failure = ServiceError("the turn's records could not be stored")
            failure.__cause__ = exc
            failures = [failure]
        except BaseException:  # cancelled (the loop is closing): so are the turns' waits
            for _, done in group:
                done.cancel()
            raise
        for (_, done), outcome in zip(group, failures, strict=True):
            if done.done():
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)

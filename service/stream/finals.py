"""A turn's final write (settle its tokens, write its final record), the replica's queue of
final writes that MongoDB could not take yet, and the final a stored record stands for.

The client is told how its turn ended before the final record is written; when MongoDB is
away at that moment, the write waits here and the replica's watcher retries it once MongoDB
answers again, so the record ends as the client was told (not ``interrupted`` by the reaper
minutes later). The queue is bounded: past ``MAX_PENDING`` the oldest write is given up and
left to the replica's own reaper (``watcher.reap_own``), with a log line.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from service.costs import Budget
from service.errors import ServiceError
from service.logs import error_text
from service.store import Doc, FinalOp, Rollup, Store
from service.stream.events import Final

log = structlog.get_logger("service.stream")

MAX_PENDING = 10_000
GATHER_S = 0.005  # how long the group commit gathers the final writes of turns ending together
MAX_GROUP = 500  # the most final writes in one group
# What a final record may go without when MongoDB refuses it whole (past its 16 MB: the
# answer's own characters are bounded, an upstream's reasoning or tool calls are not), the
# largest first, one at a time: a chat's tool loop needs its tool calls back.
SPARED = ("reasoning", "refusal", "tool_calls")


@dataclass(slots=True)
class FinalWrite:
    user_id: str
    period: str
    message_id: str
    grant: int  # the reservation to release
    billed: int  # the tokens to bill instead
    fields: Doc  # the final record's fields
    lease_id: str | None = None  # admitted from this lease: billed from it, once
    cost: int = 0  # nano-units of CURRENCY
    rollup: Rollup | None = None  # its line in the daily rollup
    key_account: str | None = None  # also reserved on this API key's own month
    settled: bool = False
    usage: Doc | None = field(default=None)
    # Called once its settlement is written or given up (``Leases.ended``: its lease's).
    landed: Callable[[], None] | None = None

    def let_go(self) -> None:
        """Its settlement is written, or left to the reaper: ``landed``, once."""
        landed, self.landed = self.landed, None
        if landed is not None:
            landed()

    def slim(self) -> str | None:
        """Drop the largest of the fields a record may go without (``SPARED``) from this
        write; its name, or None when it has none left."""
        present = [k for k in SPARED if self.fields.get(k)]
        if not present:
            return None
        largest = max(present, key=lambda k: len(orjson.dumps(self.fields[k])))
        self.fields = {k: v for k, v in self.fields.items() if k != largest}
        return largest

    def op(self) -> FinalOp:
        return FinalOp(
            self.user_id,
            self.period,
            self.message_id,
            self.grant,
            self.billed,
            self.lease_id,
            self.fields,
            cost=self.cost,
            rollup=self.rollup,
            key_account=self.key_account,
        )

    async def apply(self, store: Store, rollups: RollupBuffer) -> bool:
        """Settle (once) and write the final record on its own (the pending queue's retry; a
        turn's own final write goes with its group, ``FinalCommits``); True when this write
        ended the record (a record no longer ``streaming`` is left alone). Raises
        ``ServiceError`` (MongoDB away)."""
        if not self.settled:
            if self.key_account is not None:
                await store.settle_usage(
                    self.key_account,
                    self.period,
                    self.message_id,
                    billed=self.billed,
                    cost=self.cost,
                )
            if self.lease_id is None:
                self.usage = await store.settle_usage(
                    self.user_id,
                    self.period,
                    self.message_id,
                    billed=self.billed,
                    cost=self.cost,
                )
            else:
                self.usage = await store.settle_leased(
                    self.user_id,
                    self.period,
                    self.lease_id,
                    self.message_id,
                    billed=self.billed,
                    grant=self.grant,
                    cost=self.cost,
                )
            self.settled = True
        ended = await store.finish_message(self.message_id, self.fields, retried=True)
        if ended and self.rollup is not None:
            rollups.add([self.rollup])
        return ended


class FinalCommits:
    """The replica's group commit of final writes: the turns that end within ``GATHER_S`` of
    each other are settled and written in three commands (``Store.finish_many``), not two each.
    A turn's finalization waits for its group (a few milliseconds more before its final event);
    a group MongoDB refused fails each of its writes, which go to the pending queue. A group
    that fails otherwise than by an outage is written again write by write, to find whose it
    was; a write MongoDB refuses on its own (a record past its 16 MB, say) is written again
    without the largest of what a record may go without (its reasoning, a refusal, its tool
    calls: ``SPARED``), one at a time, so the record still ends as its client was told and
    billed, each logged (``stream.finalize_refused``); with none left to drop, it is left to
    the replica's own reaper (``PendingFinals.given_up``), which settles its record from its
    checkpoint."""

    def __init__(
        self,
        store: Store,
        track: Callable[[asyncio.Task[Any]], None],
        rollups: RollupBuffer,
        pending: PendingFinals,
    ) -> None:
        self.store = store
        self._track = track
        self.rollups = rollups
        self.pending = pending
        self._group: list[tuple[FinalWrite, asyncio.Future[bool]]] = []
        self._flush: asyncio.Task[None] | None = None

    async def apply(self, write: FinalWrite) -> bool:
        """Settle and write ``write`` with the others ending now; True when this write ended
        its record. Raises ``ServiceError`` (MongoDB away)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._group.append((write, done))
        if len(self._group) >= MAX_GROUP:
            group, self._group = self._group, []
            self._track(asyncio.ensure_future(self._commit(group)))
        elif self._flush is None:
            self._flush = asyncio.ensure_future(self._gathered())
            self._track(self._flush)
        return await done

    async def _gathered(self) -> None:
        await asyncio.sleep(GATHER_S)  # the turns ending now join the group meanwhile
        self._flush = None
        group, self._group = self._group, []
        if group:
            await self._commit(group)

    async def _commit(self, group: list[tuple[FinalWrite, asyncio.Future[bool]]]) -> None:
        ops = [w.op() for w, _ in group]
        try:
            usage, ended = await self.store.finish_many(ops)
        except ServiceError as exc:
            for _, done in group:
                if not done.done():
                    done.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - not an outage: whose write was refused?
            if len(group) > 1:  # each again (the settlement is idempotent: none billed twice)
                for one in group:
                    await self._commit([one])
                return
            write, done = group[0]
            dropped = write.slim()
            self.pending.refused(write.message_id, exc, dropped)
            if dropped is not None:
                await self._commit([(write, done)])  # again, without it
            elif not done.done():
                done.set_result(False)
            return
        self.rollups.add([op.rollup for op in ended if op.rollup is not None])
        finished = {op.message_id for op in ended}
        for write, done in group:
            write.settled = True
            write.usage = usage.get((write.user_id, write.period))
            if not done.done():
                done.set_result(write.message_id in finished)


class RollupBuffer:
    """The rollup's increments of the turns this replica ended, written together by the
    watcher's checkpoint round (``Store.roll_up``, one command per round whatever the number
    of turns) rather than one command per group of final writes. A replica that dies loses
    the increments of its last round: the analytics', never the billing's (the usage
    documents are written with the records).

    Each round is numbered, and each of its increments applies only where the document does
    not hold the round's mark (``applied.<replica>``), which it sets: a round whose answer did
    not come (MongoDB may have applied it, all or some of its documents) is sent again as it
    was, under its number, at the next round, and counts once. The turns ended meanwhile wait
    for the round after (so a document never sees this replica's rounds out of order): at most
    ``MAX_PENDING`` of them, past it the oldest are dropped, logged."""

    def __init__(self, limit: int = MAX_PENDING, replica: str | None = None) -> None:
        self.limit = limit
        self.replica = replica or uuid.uuid4().hex  # whose rounds (the process's)
        self._lines: list[Rollup] = []  # not sent yet
        self._sent: tuple[int, list[Rollup]] | None = None  # a round whose answer did not come
        self._rounds = 0

    def __len__(self) -> int:
        return len(self._lines) + (len(self._sent[1]) if self._sent is not None else 0)

    def add(self, lines: list[Rollup]) -> None:
        self._lines += lines
        if len(self._lines) > self.limit:
            dropped = len(self._lines) - self.limit
            del self._lines[:dropped]
            log.error("stream.rollup_dropped", turns=dropped, pending=self.limit)

    async def flush(self, store: Store, *, everything: bool = False) -> int:
        """Write one round (``everything``: until nothing waits): the round whose answer did
        not come again, else what waits; how many turns. Raises what MongoDB answered (the
        round is sent again as it was)."""
        written = 0
        while True:
            if self._sent is None:
                if not self._lines:
                    return written
                self._rounds += 1
                self._sent, self._lines = (self._rounds, self._lines), []
            n, lines = self._sent
            await store.roll_up(lines, mark=(self.replica, n))
            self._sent = None
            written += len(lines)
            if not everything:
                return written


class PendingFinals:
    """Final writes waiting for MongoDB, oldest first."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self._writes: OrderedDict[str, FinalWrite] = OrderedDict()
        # The turns whose write was given up: this replica's reaper settles them (no other
        # replica takes a live replica's turns for dead), ``watcher.reap_own``.
        self.given_up: set[str] = set()

    def __len__(self) -> int:
        return len(self._writes)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._writes

    def add(self, write: FinalWrite) -> None:
        self._writes[write.message_id] = write
        while len(self._writes) > self.limit:
            _, dropped = self._writes.popitem(last=False)
            self.given_up.add(dropped.message_id)
            dropped.let_go()
            log.error("stream.finalize_given_up", message_id=dropped.message_id, pending=self.limit)

    def refused(self, message_id: str, exc: Exception, dropped: str | None) -> None:
        """A final write MongoDB refused (not an outage: the same write again would be refused
        again). ``dropped``: the field it is written again without; None: its record is left
        to this replica's reaper, as a write given up is."""
        if dropped is None:
            self.given_up.add(message_id)
        log.error(
            "stream.finalize_refused",
            message_id=message_id,
            error=error_text(exc),
            **({"dropped": dropped} if dropped else {}),
        )

    async def retry(self, store: Store, rollups: RollupBuffer) -> int:
        """Apply the waiting writes in order until MongoDB fails again; how many were applied."""
        applied = 0
        while self._writes:
            message_id, write = next(iter(self._writes.items()))
            try:
                ended = await write.apply(store, rollups)
            except ServiceError as exc:
                log.warning(
                    "stream.finalize_retry_failed",
                    code=exc.code,
                    error=error_text(exc),
                    pending=len(self),
                )
                break
            except Exception as exc:  # noqa: BLE001 - refused, not an outage: not as it was
                dropped = write.slim()  # next, without it (still first in the queue)
                self.refused(message_id, exc, dropped)
                if dropped is None:
                    del self._writes[message_id]
                    write.let_go()
                continue
            del self._writes[message_id]
            write.let_go()
            applied += 1
            # ended False: the record was ended before, by the reaper, which took this replica
            # for dead while MongoDB was out of its reach (an attempt of this write whose
            # answer was lost counts as this write: ``Store.finish_message``)
            (log.info if ended else log.warning)(
                "stream.finalize_retried",
                message_id=message_id,
                status=write.fields["status"],
                ended=ended,
            )
        return applied


def final_of(doc: Doc, usage: Doc | None, budget: Budget) -> Final:
    """The final a stored (ended) record stands for, as the turn that wrote it told its
    client, with the budget as it is now."""
    tokens = doc.get("tokens") or {}
    error = doc.get("error") or {}
    limit = int((usage or {}).get("limit", budget.default_limit))
    spent = int((usage or {}).get("used", 0)) + int((usage or {}).get("reserved", 0))
    return Final(
        message_id=doc["_id"],
        status=doc["status"],
        reason=doc.get("reason") or doc["status"],
        finish_reason=doc.get("finish_reason"),
        prompt_tokens=int(tokens.get("prompt", 0)),
        completion_tokens=int(tokens.get("completion", 0)),
        token_source=str(tokens.get("source", "upstream")),
        budget_limit=limit,
        budget_remaining=max(0, limit - spent),
        error_code=error.get("code"),
        error_message=error.get("message"),
        cached_tokens=int(tokens.get("cached", 0)),
        reasoning_tokens=int(tokens.get("reasoning", 0)),
        usage_details=tokens.get("details"),
        cost=doc.get("cost"),
        currency=doc.get("currency", budget.currency),
        budget_unit=budget.label,
    )

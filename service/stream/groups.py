"""The replica's group commit of per-turn commands: the records' inserts, the page's reservations,
the chats' authorizations.

A turn's records (the question and the answer, ``streaming``) are inserted before its first
delta goes out, alongside the upstream's request (``Turn._begin``); a chat page's turn is
reserved (its budget and its message gap, ``Store.reserve``) before its upstream, and a chat's
turn authorized (the chat active and the user's, its seqs allocated: ``Store.begin_chat_turn``)
beside or before that. Each was one
MongoDB command per turn; under load the turns arriving together now share one: at most
``IN_FLIGHT`` commands run at a time, and the turns that arrive while they run wait for the next
one, all of them together. A turn alone (nothing running) goes at once: at low load nothing
waits, and nothing waits on a timer.

Each turn learns its own outcome: one MongoDB refused fails that turn only (its error, the
others done); a group that fails otherwise than by an outage is run again turn by turn, to find
whose it was (MongoDB may have applied the group all the same: a reservation already taken is
told as it is, ``Store.reserve``, not taken again); an outage fails the whole group, as it
failed each command before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog

from service.errors import BudgetExceeded, RateLimited, ServiceError, StoreUnavailable
from service.store import ChatTurn, Doc, Reservation, ReserveRequest, Store
from service.stream.ahead import Expected

log = structlog.get_logger("service.stream")

IN_FLIGHT = 2  # commands running at once; a slow one does not hold up every turn behind it

T = TypeVar("T")  # what a turn asks
R = TypeVar("R")  # what it is told


async def taken_or_given_back(done: asyncio.Future[R], give_back: Callable[[], None]) -> R:
    """Await a command that takes from a user's month (a reservation, a lease's growth). What
    it may have taken without its caller learning so is given back (``give_back``): at once
    when its answer is lost (``StoreUnavailable``: it may have been applied all the same), and
    when the caller leaves while it runs (its client gone), once it lands: it runs on."""
    try:
        return await asyncio.shield(done)
    except StoreUnavailable:
        give_back()
        raise
    except asyncio.CancelledError:
        done.add_done_callback(functools.partial(_landed, give_back))
        raise


def _landed(give_back: Callable[[], None], done: asyncio.Future[Any]) -> None:
    """A command whose caller left has ended: taken, or perhaps taken, it is given back."""
    if done.cancelled():
        return
    exc = done.exception()
    if exc is None or isinstance(exc, StoreUnavailable):
        give_back()


class GroupCommit(Generic[T, R]):
    """Run ``run`` on the items submitted together; each submitter gets its own outcome."""

    max_group = 500  # the most turns in one command

    def __init__(self, track: Callable[[asyncio.Task[Any]], None]) -> None:
        self._track = track
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._running = 0

    def __len__(self) -> int:
        """The turns waiting for the next command."""
        return len(self._queue)

    async def run(self, items: list[T]) -> list[R | ServiceError]:
        """The command for ``items``: each one's outcome, in order."""
        raise NotImplementedError

    def refused(self, item: T, exc: Exception) -> ServiceError:
        """What the turn whose ``item`` alone failed with ``exc`` (not an outage) is told."""
        raise NotImplementedError

    def submit(self, item: T) -> asyncio.Future[R]:
        """Run ``item`` with the others arriving now; the future has its outcome."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        if self._running < IN_FLIGHT:
            self._running += 1
            self._track(asyncio.ensure_future(self._drain()))
        return done

    async def _drain(self) -> None:
        try:
            while self._queue:
                cut = self.max_group
                group, self._queue = self._queue[:cut], self._queue[cut:]
                await self._commit(group)
        finally:
            self._running -= 1

    async def _commit(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        outcomes: list[R | ServiceError]
        try:
            outcomes = await self.run([item for item, _ in group])
        except ServiceError as exc:  # MongoDB away: every turn's command failed
            for _, done in group:
                if not done.done():
                    done.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - not an outage: one turn's item (too large,
            if len(group) > 1:  # say) must not fail the others: each on its own, to find whose
                for one in group:
                    await self._commit([one])
                return
            outcomes = [self.refused(group[0][0], exc)]
        except BaseException:  # cancelled (the loop is closing): so are the turns' waits
            for _, done in group:
                done.cancel()
            raise
        for (_, done), outcome in zip(group, outcomes, strict=True):
            if done.done():
                continue
            if isinstance(outcome, ServiceError):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)


class RecordInserts(GroupCommit[list[Doc], None]):
    """The records of the turns starting together, in one unordered ``insert_many``
    (``Store.insert_messages``): a record MongoDB refuses fails its own turn only."""

    def __init__(self, store: Store, track: Callable[[asyncio.Task[Any]], None]) -> None:
        super().__init__(track)
        self.store = store

    def insert(self, docs: list[Doc]) -> asyncio.Future[None]:
        """Insert one turn's records with the others starting now; the future is done when
        they are written (or fails with the reason they are not)."""
        return self.submit(docs)

    async def run(self, items: list[list[Doc]]) -> list[ServiceError | None]:
        return await self.store.insert_messages(items)

    def refused(self, item: list[Doc], exc: Exception) -> ServiceError:
        log.error("stream.records_refused", message_id=item[-1].get("_id"), exc_info=exc)
        failure = ServiceError("the turn's records could not be stored")
        failure.__cause__ = exc
        return failure


class Reservations(GroupCommit[ReserveRequest, Reservation]):
    """Turns reserved together on their months (the chat page's on their users', and those of
    API keys with a limit of their own on the keys'): alone, one conditional ``findAndModify``
    as before; several, one unordered bulk of the same conditional updates and one read of the
    months they touched (``Store.reserve_many``). At most 16 a group: a reserved turn waits for
    its whole group (MongoDB applies a bulk's updates one after the other), and 16 already take
    a group's commands to an eighth of one per turn (docs/performance.md, finding 22)."""

    max_group = 16

    def __init__(self, store: Store, track: Callable[[asyncio.Task[Any]], None]) -> None:
        super().__init__(track)
        self.store = store
        self.expected = Expected()  # whose next turn this replica expects to admit

    async def reserve(self, req: ReserveRequest) -> Reservation:
        """Reserve one turn with the others arriving now; raises its refusal (``RateLimited``,
        ``BudgetExceeded``) or the outage."""
        self.expected.refused(req.user_id)  # until it is admitted
        withdraw = functools.partial(self._withdraw, req)
        reservation = await taken_or_given_back(self.submit(req), withdraw)
        self.expected.admitted(req, reservation.allowance.remaining_tokens)
        return reservation

    def _withdraw(self, req: ReserveRequest) -> None:
        """A reservation whose answer did not come (its deadline passed, MongoDB went away)
        may have been taken all the same: give it back now (``Store.unreserve``, which does
        nothing when it was not), not when the reaper finds it old, the longest turn and
        ``STALE_STREAM_S`` later. In the background: the request's 503 does not wait for a
        database that is slow or away; a reservation applied after this runs is the reaper's."""

        async def withdraw() -> None:
            with contextlib.suppress(ServiceError):
                await self.store.unreserve(
                    req.user_id, req.period, req.message_id, now=req.now, gap_ms=req.rate_limit_ms
                )

        self._track(asyncio.ensure_future(withdraw()))

    async def run(self, items: list[ReserveRequest]) -> list[Reservation | ServiceError]:
        if len(items) > 1:
            return await self.store.reserve_many(items)
        try:
            return [await self.store.reserve(items[0])]
        except (RateLimited, BudgetExceeded) as refusal:  # its outcome, not an outage
            return [refusal]

    def refused(self, item: ReserveRequest, exc: Exception) -> ServiceError:
        log.error("stream.reservation_failed", message_id=item.message_id, exc_info=exc)
        failure = ServiceError("the turn could not be reserved")
        failure.__cause__ = exc
        return failure


class ChatAuthorizations(GroupCommit[ChatTurn, Doc | None]):
    """The chats' turns beginning together authorized together: alone, one conditional
    ``findAndModify`` as before; several, one unordered bulk of the same updates and one read
    of their chats (``Store.begin_chat_turns``). Each turn is told its chat with the seqs it
    took (``next_seq`` just past them), or None when the chat is gone or another's."""

    max_group = 64

    def __init__(self, store: Store, track: Callable[[asyncio.Task[Any]], None]) -> None:
        super().__init__(track)
        self.store = store

    def begin(self, user_id: str, chat_id: str, message_id: str) -> asyncio.Future[Doc | None]:
        return self.submit(ChatTurn(user_id, chat_id, message_id))

    async def run(self, items: list[ChatTurn]) -> list[Doc | ServiceError | None]:
        if len(items) > 1:
            return list(await self.store.begin_chat_turns(items))
        return [await self.store.begin_chat_turn(items[0].user_id, items[0].chat_id)]

    def refused(self, item: ChatTurn, exc: Exception) -> ServiceError:
        log.error("stream.authorization_failed", message_id=item.message_id, exc_info=exc)
        failure = ServiceError("the chat's turn could not be begun")
        failure.__cause__ = exc
        return failure

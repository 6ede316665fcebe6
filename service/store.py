"""The only module that speaks to MongoDB (through PyMongo's asyncio API, on the event loop).

Every method maps driver failures to ``StoreUnavailable`` (503) at this boundary. Rules that must
hold across replicas are single conditional MongoDB operations, never read-then-write:

- chat cap:   ``chat_counts`` {_id: user, active: n}, ``$inc`` only while ``active < cap``
              (an upsert that does not match raises DuplicateKeyError: the cap is full);
- budget and rate limits: ``usage`` {user_id, period, used, reserved, limit?, open: [{mid,
              grant, at}], next_at?, requests_due?}, unique (user_id, period); a turn is
              admitted by one ``$expr`` conditional update that checks the budget and the
              limits of its transport (the page: ``next_at``, one message per interval;
              programs: ``requests_due``, requests per minute, and the size of ``open``, turns
              at once) and reserves; reconciled with one ``$inc``.

The driver is PyMongo's own asyncio client (``AsyncMongoClient``): its commands run on the
event loop, with no thread pool to hand them to and back from (motor, past its end of life since
May 2026, did that: docs/performance.md, findings 38 and 39). No cancellation reaches it
(``_guarded``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import hashlib
import random
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import orjson
import pymongo
import structlog
from pymongo import ASCENDING, DESCENDING, TEXT, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
)

from service.analytics import line_key
from service.errors import (
    HELD,
    BadRequest,
    BudgetExceeded,
    BudgetHeld,
    Conflict,
    RateLimited,
    ServiceError,
    StoreUnavailable,
)
from service.limits import CONCURRENCY_RETRY_S, Allowance, request_interval, request_window
from service.logs import error_text
from service.metrics import MONGODB_SECONDS
from service.records import Status
from service.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import Histogram

log = structlog.get_logger("service.store")
P = ParamSpec("P")
R = TypeVar("R")
Doc = dict[str, Any]


# The records a chat's history shows: a regenerated answer, an edited question and what
# followed it are kept, marked ``superseded_by`` (``service/stream/branches.py``).
CHOSEN: Doc = {"superseded_by": {"$exists": False}}

IDEMPOTENCY_TTL_S = 86_400  # how long a claimed idempotency key is kept (at least a day)


async def _take_slot(counts: Any, user_id: str, cap: int, full: ServiceError) -> None:
    """One of the user's ``cap`` slots in ``counts`` ({_id: user, active: n}), or ``full``: an
    ``$inc`` only while ``active < cap`` (an upsert that does not match is a duplicate key)."""
    try:
        await counts.find_one_and_update(
            {"_id": user_id, "active": {"$lt": cap}}, {"$inc": {"active": 1}}, upsert=True
        )
    except DuplicateKeyError as exc:
        raise full from exc


def key_account(key_id: str) -> str:
    """The usage documents of an API key with its own limit: ``key:<id>``, one per month."""
    return f"key:{key_id}"


def utcnow() -> datetime:
    """Now in UTC, truncated to milliseconds (MongoDB's precision) so values round-trip exactly."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _unavailable(exc: PyMongoError) -> bool:
    return isinstance(exc, ConnectionFailure | ExecutionTimeout) or bool(
        getattr(exc, "timeout", False)
    )


BACKSTOP_S = 0.25  # past MONGODB_TIMEOUT_MS: the driver's own deadline ends its commands first


def db_call(
    fn: Callable[Concatenate[Store, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Store, P], Coroutine[Any, Any, R]]:
    """Bound the call by the client's ``timeoutMS`` (``MONGODB_TIMEOUT_MS``) from now, its wait
    for the indexes and for a pooled connection included; turn driver outages and timeouts into
    ``StoreUnavailable`` (``_guarded``)."""

    ok = MONGODB_SECONDS.labels(fn.__name__, "ok")
    failed = MONGODB_SECONDS.labels(fn.__name__, "error")

    @functools.wraps(fn)
    async def wrapper(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await _guarded(
            store, fn.__name__, store.timeout_s, lambda: fn(store, *args, **kwargs), ok, failed
        )

    return wrapper


async def _guarded(
    store: Store,
    name: str,
    timeout_s: float | None,
    call: Callable[[], Awaitable[R]],
    ok: Histogram,
    failed: Histogram,
) -> R:
    """``call`` once the indexes exist, the whole within ``timeout_s`` of now (None: the
    driver's own bounds), timed into ``ok`` or ``failed``; an outage or a timeout raised as
    ``StoreUnavailable``.

    The deadline is PyMongo's own (``pymongo.timeout``, absolute from now): the call's every
    command, its server selection, its wait for a pooled connection and a retried write end by
    it, each raising the driver's own timeout. The wait for the indexes (made off the call's
    path when MongoDB was away at start-up, ``Store.indexes``) is bounded by ``asyncio.timeout``
    from the same instant; and the caller's wait, by ``asyncio.timeout`` ``BACKSTOP_S`` later.

    No cancellation reaches the driver (``_undisturbed``): a caller cancelled (a client gone,
    a deadline) stops waiting; the call goes on in a task of its own to its end or the driver's
    deadline, as motor's thread did. PyMongo's asyncio code cancelled half-way closes the
    connection, can leave a pool slot or a server-side cursor behind, and on Python 3.11 meets
    ``asyncio.wait_for``'s races (docs/performance.md, finding 39); and a store method is never
    left half-done by its caller (a counter taken for a chat or a key it did not make)."""
    started = time.perf_counter()
    try:
        if timeout_s is None:
            if not store.indexes_ready:
                await store.indexes()
            result = await _undisturbed(store, name, call)
        else:
            with pymongo.timeout(timeout_s):
                async with asyncio.timeout(timeout_s + BACKSTOP_S):
                    if not store.indexes_ready:
                        async with asyncio.timeout(timeout_s):
                            await store.indexes()
                    result = await _undisturbed(store, name, call)
    except (PyMongoError, TimeoutError) as exc:
        failed.observe(time.perf_counter() - started)
        if isinstance(exc, TimeoutError) or _unavailable(exc):
            raise StoreUnavailable("the database is unavailable; try again shortly") from exc
        raise
    ok.observe(time.perf_counter() - started)
    return result


async def _undisturbed(store: Store, name: str, call: Callable[[], Awaitable[R]]) -> R:
    """``call()`` in a task of its own (this context's copy: its ``pymongo.timeout``), awaited
    through ``asyncio.shield``: cancelling the caller stops its wait, not the call. The store
    keeps each until it is done (``Store.close`` waits for them); a call that fails once its
    caller has gone is logged (``store.call_failed_unawaited``: nobody else sees it). A call
    made inside one (a store method calling another) is out of its caller's reach already: it
    runs in that task."""
    if asyncio.current_task() in store.undisturbed:
        return await call()
    task = asyncio.ensure_future(call())
    store.undisturbed.add(task)
    task.add_done_callback(store.let_go)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:  # the caller stopped waiting (gone, or its backstop)
        task.add_done_callback(functools.partial(_unawaited, name))  # done or not
        raise


def _unawaited(name: str, task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("store.call_failed_unawaited", call=name, error=error_text(exc))


def _retrieved(task: asyncio.Task[None]) -> None:
    """The index task's failure is its waiters' (each sees it): never 'never retrieved'."""
    if not task.cancelled():
        task.exception()


_PING = (MONGODB_SECONDS.labels("ping", "ok"), MONGODB_SECONDS.labels("ping", "error"))


async def _cond_wait(condition: Any, timeout: float | None) -> bool:  # noqa: ASYNC109 (PyMongo's signature)
    """PyMongo's wait on one of its conditions (server selection's, a pool's), bounded by
    ``timeout``, in the caller's own task: a cancellation of the caller ends it with the
    condition's lock taken back, as the caller's ``async with`` expects."""
    try:
        async with asyncio.timeout(timeout):
            return bool(await condition.wait())
    except TimeoutError:
        return False


def _keep_driver_waits_in_their_task() -> None:
    """On Python 3.11 PyMongo waits on its conditions with ``asyncio.wait_for``, which runs the
    wait in a task of its own. A caller cancelled while that task takes the lock back (our
    deadline, a client gone) returns without it; the caller's ``async with`` then releases a
    lock it does not hold, and the task takes it for good: every later command of the client
    waits on the topology's lock for ever (docs/performance.md, finding 39). Python 3.12's
    ``wait_for`` keeps the wait in the caller's task; so does this."""
    if sys.version_info >= (3, 12):
        return
    import pymongo.asynchronous.pool as pool
    import pymongo.asynchronous.topology as topology

    for module in (pool, topology):
        module._async_cond_wait = _cond_wait  # type: ignore[attr-defined]


_keep_driver_waits_in_their_task()


def make_client(settings: Settings) -> AsyncMongoClient[Doc]:
    timeout = settings.mongodb_timeout_ms
    return AsyncMongoClient(
        settings.mongodb_uri,
        appname="chat-gateway",
        tz_aware=True,
        # The whole operation (server selection, pool wait, the retry of a retryable write)
        # within MONGODB_TIMEOUT_MS, not each step of it: a restart must not hold a turn 3x longer.
        timeoutMS=timeout,
        serverSelectionTimeoutMS=timeout,
        connectTimeoutMS=timeout,
        socketTimeoutMS=timeout * 2,
        waitQueueTimeoutMS=timeout,
        maxPoolSize=settings.mongodb_max_pool_size,
    )


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Doc]
    next_cursor: str | None


def _encode_cursor(updated_at: datetime, chat_id: str) -> str:
    raw = orjson.dumps([int(updated_at.timestamp() * 1000), chat_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        ms, chat_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromtimestamp(int(ms) / 1000, UTC), str(chat_id)
    # A time no datetime can hold: OverflowError or OSError from the platform, ValueError
    # (year out of range) from datetime.
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc


class Store:
    def __init__(
        self, db: AsyncDatabase[Doc], *, idempotency_ttl_s: int = IDEMPOTENCY_TTL_S
    ) -> None:
        self.db = db
        self.idempotency_ttl_s = idempotency_ttl_s
        self.timeout_s: float | None = db.client.options.timeout  # MONGODB_TIMEOUT_MS
        self.undisturbed: set[asyncio.Future[Any]] = set()  # calls under way (``_guarded``)
        self.chats = db["chats"]
        self.messages = db["messages"]
        self.usage = db["usage"]
        self.chat_counts = db["chat_counts"]
        self.rate_limits = db["rate_limits"]
        self.replicas = db["replicas"]
        self.rollup = db["usage_rollup"]  # what analytics read: per user and month, and totals
        self.indexes_ready = False
        self.text_search = False  # a text index serves search (known once the indexes exist)
        self._index_lock = asyncio.Lock()
        self._index_task: asyncio.Task[None] | None = None

    def let_go(self, task: asyncio.Future[Any]) -> None:
        """A call done: forgotten, its error retrieved (its caller may be gone: ``shield``
        then leaves it unread)."""
        self.undisturbed.discard(task)
        if not task.cancelled():
            task.exception()

    async def close(self) -> None:
        """Stop making the indexes, if that is under way, and let the calls whose callers were
        cancelled end (each by its deadline), before the client closes."""
        task, self._index_task = self._index_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.undisturbed:  # each ends by its deadline; a driver past it is not waited for
            bound = None if self.timeout_s is None else self.timeout_s + BACKSTOP_S
            await asyncio.wait(list(self.undisturbed), timeout=bound)

    # ------------------------------------------------------------------ lifecycle
    async def ensure_indexes(self) -> None:
        """Create the indexes once (idempotent); while MongoDB is down, tried again by the next
        call (``indexes``)."""
        async with self._index_lock:
            if not self.indexes_ready:
                await self._create_indexes()
                self.indexes_ready = True

    async def indexes(self) -> None:
        """Wait for the indexes, made once. After start-up could not make them (MongoDB away),
        the first call since starts a task that makes them under the driver's own bounds and
        outlives that call's deadline: a caller only waits for it (within its own deadline), so
        /readyz keeps its second and a request its ``MONGODB_TIMEOUT_MS``, and a build slower
        than one caller's deadline is not begun again by the next. It runs in a context of its
        own: no caller's deadline (``pymongo.timeout``) and no request's log fields."""
        if self.indexes_ready:
            return
        task = self._index_task
        if task is None or task.done():  # never started, or failed: the next try
            task = self._index_task = asyncio.create_task(
                self.ensure_indexes(), name="mongodb-indexes", context=contextvars.Context()
            )
            task.add_done_callback(_retrieved)
        await asyncio.shield(task)

    async def _create_indexes(self) -> None:
        with contextlib.suppress(OperationFailure):  # replaced by ``flags`` (cancel or follow)
            await self.messages.drop_index("cancel_flags")
        await self.chats.create_index(
            [
                ("user_id", ASCENDING),
                ("is_active", ASCENDING),
                ("updated_at", DESCENDING),
                ("_id", DESCENDING),
            ],
            name="user_active_recent",
        )
        await self.messages.create_index(  # stateless turns (no chat) are outside it
            [("chat_id", ASCENDING), ("seq", ASCENDING)],
            name="chat_seq",
            unique=True,
            partialFilterExpression={"chat_id": {"$type": "string"}},
        )
        # The partial unique index above cannot serve a query on chat_id alone (the planner may
        # only use a partial index when the query implies its filter): history and pages use this.
        await self.messages.create_index(
            [("chat_id", ASCENDING), ("seq", ASCENDING)], name="chat_seq_lookup"
        )
        await self.messages.create_index(
            [("status", ASCENDING), ("checkpoint_at", ASCENDING)], name="status_checkpoint"
        )
        await self.messages.create_index(  # the watcher's poll: only turns with a cancel/follow
            [("status", ASCENDING)],
            name="flags",
            partialFilterExpression={"flagged": True},
        )
        await self.replicas.create_index(  # heartbeats of replicas long gone tidy themselves up
            [("alive_at", ASCENDING)], name="replica_ttl", expireAfterSeconds=REPLICA_TTL_S
        )
        await self.usage.create_index(
            [("user_id", ASCENDING), ("period", ASCENDING)], name="user_period", unique=True
        )
        await self.usage.create_index([("open.at", ASCENDING)], name="open_reservations")
        await self.rollup.create_index(
            [("month", ASCENDING), ("user_id", ASCENDING)], name="month_user", unique=True
        )
        await self.db["ws_tickets"].create_index(
            [("expires_at", ASCENDING)], name="ticket_ttl", expireAfterSeconds=0
        )
        keys = self.db["idempotency_keys"]
        await keys.create_index(
            [("user_id", ASCENDING), ("key", ASCENDING)], name="user_key", unique=True
        )
        await keys.create_index(
            [("created_at", ASCENDING)],
            name="key_ttl",
            expireAfterSeconds=self.idempotency_ttl_s,
        )
        await self._create_search_index()
        await self._create_api_key_indexes()
        await self._create_admin_indexes()

    async def _create_search_index(self) -> None:
        """A text index over each user's messages (MongoDB), or none where the server has no
        text indexes (SecantusDB): search then scans the user's messages (``find_messages``).
        No language: no stemming and no stop words, so a word is found as it was written, in
        any language, and the page highlights what matched."""
        try:
            await self.messages.create_index(
                [("user_id", ASCENDING), ("content", TEXT)],
                name="user_text",
                default_language="none",
            )
        except OperationFailure as exc:
            self.text_search = False
            reason = (exc.details or {}).get("errmsg") or str(exc)
            log.info("store.search_scans", reason=str(reason)[:200])
        else:
            self.text_search = True

    async def ping(self, timeout_s: float) -> None:
        """/readyz: the indexes and a ping, together within ``timeout_s`` (at most
        ``MONGODB_TIMEOUT_MS``)."""
        bound = timeout_s if self.timeout_s is None else min(timeout_s, self.timeout_s)
        await _guarded(self, "ping", bound, lambda: self.db.command("ping"), *_PING)

    # ------------------------------------------------------------------ chats
    @db_call
    async def create_chat(
        self, user_id: str, *, title: str | None, model: str | None, cap: int
    ) -> Doc:
        # A client that disconnects half-way does not stop it (``_guarded``). An insert that
        # fails gives its slot back, but not once the call's deadline is spent: that undo is
        # refused by the driver too, and the slot stays taken (a known gap).
        await _take_slot(
            self.chat_counts,
            user_id,
            cap,
            Conflict(
                f"chat limit reached ({cap} active chats); delete one first",
                code="chat_limit_reached",
                details={"limit": cap},
            ),
        )
        now = utcnow()
        chat = {
            "_id": str(uuid.uuid4()),
            "user_id": user_id,
            "title": title,
            "model": model,
            "created_at": now,
            "updated_at": now,
            "is_active": True,
            "deleted_at": None,
            "next_seq": 0,
        }
        try:
            await self.chats.insert_one(chat)
        except BaseException:
            await self.chat_counts.update_one({"_id": user_id}, {"$inc": {"active": -1}})
            raise
        return chat

    @db_call
    async def list_chats(self, user_id: str, *, limit: int, cursor: str | None) -> Page:
        query: Doc = {"user_id": user_id, "is_active": True}
        if cursor:
            at, chat_id = _decode_cursor(cursor)
            query["$or"] = [
                {"updated_at": {"$lt": at}},
                {"updated_at": at, "_id": {"$lt": chat_id}},
            ]
        docs = (
            await self.chats.find(query, projection=NOT_NOTES)
            .sort([("updated_at", DESCENDING), ("_id", DESCENDING)])
            .limit(limit + 1)
            .to_list(limit + 1)
        )
        more = len(docs) > limit
        docs = docs[:limit]
        nxt = _encode_cursor(docs[-1]["updated_at"], docs[-1]["_id"]) if more and docs else None
        return Page(docs, nxt)

    @db_call
    async def get_chat(self, user_id: str, chat_id: str) -> Doc | None:
        doc: Doc | None = await self.chats.find_one(
            {"_id": chat_id, "user_id": user_id, "is_active": True}, projection=NOT_NOTES
        )
        return doc

    @db_call
    async def list_messages(self, chat_id: str, *, after_seq: int, limit: int) -> list[Doc]:
        cursor = self.messages.find({"chat_id": chat_id, "seq": {"$gt": after_seq}, **CHOSEN}).sort(
            "seq", ASCENDING
        )
        docs: list[Doc] = await cursor.limit(limit).to_list(limit)
        return docs

    @db_call
    async def delete_chat(self, user_id: str, chat_id: str) -> datetime | None:
        now = utcnow()
        doc: Doc | None = await self.chats.find_one_and_update(
            {"_id": chat_id, "user_id": user_id, "is_active": True},
            {"$set": {"is_active": False, "deleted_at": now}},
            projection={"_id": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        await self.chat_counts.update_one({"_id": user_id}, {"$inc": {"active": -1}})
        # Its running answers stop as if cancelled (no one can read them now): flagged as the
        # cancel route flags one, for whichever replica runs each (``flagged_turns``).
        await self.messages.update_many(
            {
                "chat_id": chat_id,
                "user_id": user_id,
                "role": "assistant",
                "status": Status.STREAMING,
            },
            {"$set": {"cancel_requested": True, "flagged": True}},
        )
        return now

    @db_call
    async def rename_chat(self, user_id: str, chat_id: str, title: str) -> Doc | None:
        """Set the title of the user's active chat; None when there is none. Not activity: the
        chat keeps its place in the list (``updated_at`` is left alone)."""
        doc: Doc | None = await self.chats.find_one_and_update(
            {"_id": chat_id, "user_id": user_id, "is_active": True},
            {"$set": {"title": title}},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    # ------------------------------------------------------------------ search, feedback
    @db_call
    async def active_chats(self, user_id: str) -> list[Doc]:
        """Every active chat of the user, its title and time only (at most MAX_CHATS_PER_USER)."""
        docs: list[Doc] = await self.chats.find(
            {"user_id": user_id, "is_active": True},
            projection={"title": 1, "updated_at": 1, "created_at": 1},
        ).to_list(None)
        return docs

    @db_call
    async def find_messages(
        self, user_id: str, chat_ids: list[str], terms: list[str], *, limit: int
    ) -> list[Doc]:
        """Messages of the user, in these chats, that hold any of ``terms``: by the text index,
        best first, where there is one; else the newest ``limit`` that contain a term anywhere
        (case-insensitive). Always filtered on the user: never another user's text; only what
        the chats' histories show (not superseded versions)."""
        query: Doc = {
            "user_id": user_id,
            "chat_id": {"$in": chat_ids},
            "role": {"$in": ["user", "assistant"]},
            **CHOSEN,
        }
        projection: Doc = {"chat_id": 1, "role": 1, "content": 1, "created_at": 1}
        if self.text_search:
            query["$text"] = {"$search": " ".join(terms)}
            projection["score"] = {"$meta": "textScore"}
            order: Any = [("score", {"$meta": "textScore"})]
        else:
            query["$or"] = [
                {"content": {"$regex": re.escape(term), "$options": "i"}} for term in terms
            ]
            order = [("created_at", DESCENDING), ("_id", DESCENDING)]
        docs: list[Doc] = (
            await self.messages.find(query, projection=projection)
            .sort(order)
            .limit(limit)
            .to_list(limit)
        )
        return docs

    @db_call
    async def set_feedback(
        self, user_id: str, chat_id: str, message_id: str, feedback: Doc | None
    ) -> Doc | None:
        """Store (or, with None, remove) the user's rating of an answer that has ended; None
        when the chat or the answer is not theirs; Conflict while it is still being written."""
        if await self.get_chat(user_id, chat_id) is None:
            return None
        query = {"_id": message_id, "chat_id": chat_id, "user_id": user_id, "role": "assistant"}
        change = {"$set": {"feedback": feedback}} if feedback else {"$unset": {"feedback": ""}}
        doc: Doc | None = await self.messages.find_one_and_update(
            {**query, "status": {"$ne": Status.STREAMING}},
            change,
            projection={"feedback": 1, "status": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None and await self.messages.find_one(query, projection={"_id": 1}):
            raise Conflict(
                "the answer is still being written; rate it once it has ended",
                code="answer_streaming",
            )
        return doc

    # ------------------------------------------------------------------ turns
    @db_call
    async def begin_chat_turn(self, user_id: str, chat_id: str) -> Doc | None:
        """Authorize (active, owned) and allocate two message seqs, in one update."""
        doc: Doc | None = await self.chats.find_one_and_update(
            {"_id": chat_id, "user_id": user_id, "is_active": True},
            {"$inc": {"next_seq": 2}, "$set": {"updated_at": utcnow()}},
            projection={"next_seq": 1, "model": 1},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    @db_call
    async def unmove_chat(self, user_id: str, chat_id: str, seq: int) -> None:
        """A turn given the seqs ``seq`` and ``seq + 1`` was refused before it wrote a record:
        the chat's ``updated_at`` goes back to its last record's time (its creation's when it
        has none), unless a later turn has been given seqs since (``next_seq`` moved on)."""
        last: Doc | None = await self.messages.find_one(
            {"chat_id": chat_id, "user_id": user_id, "seq": {"$lt": seq}},
            projection={"created_at": 1},
            sort=[("seq", DESCENDING)],
        )
        at = last["created_at"] if last is not None else "$created_at"
        await self.chats.update_one(
            {"_id": chat_id, "user_id": user_id, "next_seq": seq + 2},
            [{"$set": {"updated_at": at}}],
        )

    @db_call
    async def begin_chat_turns(self, turns: list[ChatTurn]) -> list[Doc | None]:
        """Authorize several turns, as ``begin_chat_turn`` does each, in two commands (the
        replica's group commit, ``service/stream/groups.py``): one unordered bulk of its
        conditional updates, each also noting which turn took which seqs in the chat's
        ``began`` (its last ``BEGAN_KEPT``), then one read of the chats. A turn whose note is
        there was authorized with those seqs (two turns of one chat get two pairs); a turn whose
        chat is gone or another's is None; one whose note later turns (another replica's)
        pushed out is authorized again on its own (its first seqs go unused)."""
        now = utcnow()
        await self.chats.bulk_write(
            [
                UpdateOne(
                    {"_id": t.chat_id, "user_id": t.user_id, "is_active": True}, _began(t, now)
                )
                for t in turns
            ],
            ordered=False,
        )
        docs: list[Doc] = await self.chats.find(
            {"_id": {"$in": list({t.chat_id for t in turns})}, "is_active": True},
            projection={"user_id": 1, "model": 1, "began": 1},
        ).to_list(None)
        chats = {d["_id"]: d for d in docs}
        outcomes: list[Doc | None] = []
        for turn in turns:
            doc = chats.get(turn.chat_id)
            if doc is None or doc["user_id"] != turn.user_id:
                outcomes.append(None)
                continue
            seq = next(
                (e["seq"] for e in doc.get("began", ()) if e["mid"] == turn.message_id), None
            )
            if seq is None:
                outcomes.append(await self.begin_chat_turn(turn.user_id, turn.chat_id))
                continue
            outcomes.append({"_id": turn.chat_id, "next_seq": seq, "model": doc.get("model")})
        return outcomes

    @db_call
    async def recent_messages(
        self, chat_id: str, user_id: str, *, limit: int, before_seq: int | None = None
    ) -> list[Doc]:
        """The chat's last ``limit`` messages (before ``before_seq`` when given), oldest first,
        as its history shows them (not superseded). Filtered on the user, so it may run
        alongside the chat's authorization (``begin_chat_turn``) and save a round trip."""
        if limit <= 0:
            return []
        seq = {} if before_seq is None else {"seq": {"$lt": before_seq}}
        docs: list[Doc] = (
            await self.messages.find(
                {"chat_id": chat_id, "user_id": user_id, **seq, **CHOSEN},
                projection={
                    "_id": 0,
                    "role": 1,
                    "content": 1,
                    "status": 1,
                    "seq": 1,
                    "tool_calls": 1,
                    "results": 1,
                },
            )
            .sort("seq", DESCENDING)
            .limit(limit)
            .to_list(limit)
        )
        docs.reverse()
        return docs

    # ---- versions and branches (``service/stream/branches.py``)
    @db_call
    async def chat_message(self, user_id: str, chat_id: str, message_id: str) -> Doc | None:
        """A message of the user's chat, superseded or not."""
        doc: Doc | None = await self.messages.find_one(
            {"_id": message_id, "chat_id": chat_id, "user_id": user_id}
        )
        return doc

    @db_call
    async def chosen_tail(self, chat_id: str, *, before_seq: int, limit: int = 2) -> list[Doc]:
        """The chat's last ``limit`` chosen (not superseded) records below ``before_seq``,
        oldest first."""
        docs: list[Doc] = (
            await self.messages.find({"chat_id": chat_id, "seq": {"$lt": before_seq}, **CHOSEN})
            .sort("seq", DESCENDING)
            .limit(limit)
            .to_list(limit)
        )
        docs.reverse()
        return docs

    @db_call
    async def streaming_after(self, chat_id: str, seq: int, *, before_seq: int) -> bool:
        """Whether a chosen record after ``seq`` (and before ``before_seq``) is streaming."""
        doc = await self.messages.find_one(
            {
                "chat_id": chat_id,
                "seq": {"$gt": seq, "$lt": before_seq},
                "status": Status.STREAMING,
                **CHOSEN,
            },
            projection={"_id": 1},
        )
        return doc is not None

    @db_call
    async def supersede(self, chat_id: str, message_id: str, *, by: str) -> bool:
        """Mark one chosen, ended record superseded by turn ``by``; False when it is not (any
        more): another regenerate or edit took it first, or it is still streaming."""
        doc = await self.messages.find_one_and_update(
            {"_id": message_id, "chat_id": chat_id, "status": {"$ne": Status.STREAMING}, **CHOSEN},
            {"$set": {"superseded_by": by}},
            projection={"_id": 1},
        )
        return doc is not None

    @db_call
    async def supersede_after(self, chat_id: str, seq: int, *, before_seq: int, by: str) -> None:
        """Mark the chosen records between ``seq`` and ``before_seq`` superseded by turn ``by``."""
        await self.messages.update_many(
            {"chat_id": chat_id, "seq": {"$gt": seq, "$lt": before_seq}, **CHOSEN},
            {"$set": {"superseded_by": by}},
        )

    @db_call
    async def supersede_seqs(self, chat_id: str, seqs: list[int], *, by: str) -> None:
        """Mark the chat's records at ``seqs`` superseded by ``by``."""
        await self.messages.update_many(
            {"chat_id": chat_id, "seq": {"$in": seqs}}, {"$set": {"superseded_by": by}}
        )

    @db_call
    async def unsupersede(self, chat_id: str, by: str) -> None:
        """Undo what turn ``by`` superseded (it was refused before its records existed)."""
        await self.messages.update_many(
            {"chat_id": chat_id, "superseded_by": by}, {"$unset": {"superseded_by": ""}}
        )

    @db_call
    async def versions(self, chat_id: str, user_id: str, root: str) -> list[Doc]:
        """Every version of a message (the first is ``root``), in the order they were made."""
        docs: list[Doc] = (
            await self.messages.find(
                {
                    "chat_id": chat_id,
                    "user_id": user_id,
                    "$or": [{"_id": root}, {"version_of": root}],
                }
            )
            .sort("seq", ASCENDING)
            .to_list(None)
        )
        return docs

    @db_call
    async def reserve(self, req: ReserveRequest) -> Reservation:
        """Rate limits + budget in one conditional update; raise RateLimited / BudgetExceeded
        (each with the usage that refused). Once per request: a request already taken (its
        entry, its turn's id at its ``now``, is in ``open``: a group's bulk applied, then run
        again turn by turn) is told its entry, not reserved a second time."""
        doc = await self._admit(req, _reserve_update(req), once=True)
        return Reservation.from_doc(doc, req)

    @db_call
    async def reserve_many(self, reqs: list[ReserveRequest]) -> list[Reservation | ServiceError]:
        """Reserve several turns in two commands (the replica's group commit of the page's
        reservations, ``service/stream/groups.py``): one unordered bulk of the conditional
        updates ``reserve`` makes one by one, then one read of the months they touched. A turn
        whose entry is in its month was reserved; one refused is told the rule that refuses it
        (a second turn of the same user in the group meets the gap the first one moved, as it
        would have one after the other); one whose month has no document yet, or whose rule no
        longer refuses when read, is reserved on its own (``reserve``)."""
        await self.usage.bulk_write(
            [UpdateOne({**_reserve_filter(r), **_not_taken(r)}, _reserve_update(r)) for r in reqs],
            ordered=False,
        )
        months = await self._months({(r.user_id, r.period) for r in reqs})
        outcomes: list[Reservation | ServiceError] = []
        for req in reqs:
            doc = months.get((req.user_id, req.period))
            if doc is not None and _entry(doc, req) is not None:
                outcomes.append(Reservation.from_doc(doc, req))
                continue
            refusal = _refusal(doc, req) if doc is not None else None
            if refusal is not None:
                outcomes.append(refusal)
                continue
            try:
                doc = await self._admit(req, _reserve_update(req), once=True)
            except (RateLimited, BudgetExceeded) as exc:
                outcomes.append(exc)
                continue
            outcomes.append(Reservation.from_doc(doc, req))
        return outcomes

    @db_call
    async def unreserve(
        self, user_id: str, period: str, message_id: str, *, now: datetime, gap_ms: int
    ) -> None:
        """Undo a reservation whose turn will not run, as if it had never been taken: its grant
        (what its entry in ``open`` holds) leaves ``reserved``, its entry ``open``, and the
        message gap it moved (``gap_ms``, from ``now``) is back to ``now``, unless a later send
        moved it since. The entry is the one taken at ``now`` (the turn's id may be reserved
        again, after a prediction missed). Nothing when it was not taken (a reservation whose
        answer was lost)."""
        moved: Doc = {}
        if gap_ms:
            ours = now + timedelta(milliseconds=gap_ms)
            moved["next_at"] = {"$cond": [{"$eq": ["$next_at", ours]}, now, "$next_at"]}
        ours_only = {"$and": [{"$eq": ["$$this.mid", message_id]}, {"$eq": ["$$this.at", now]}]}
        open_: Doc = {"$ifNull": ["$open", []]}
        await self.usage.update_one(
            {
                "user_id": user_id,
                "period": period,
                "open": {"$elemMatch": {"mid": message_id, "at": now}},
            },
            [
                {"$set": {"_entry": {"$first": {"$filter": {"input": open_, "cond": ours_only}}}}},
                {
                    "$set": {
                        "reserved": {"$subtract": ["$reserved", "$_entry.grant"]},
                        "open": {"$filter": {"input": open_, "cond": {"$not": [ours_only]}}},
                        **moved,
                    }
                },
                {"$unset": "_entry"},
            ],
        )

    @db_call
    async def take_lease(self, req: LeaseRequest) -> Doc:
        """Grow this replica's lease on the user's month by what fits of ``req``'s wants, in
        the one conditional update that checks every rule for one more turn (the rules and
        their refusals are ``reserve``'s). The usage document after it, its lease entry's
        ``took`` saying what this call added."""
        return await self._admit(req.turn, _lease_update(req), credit=req.credit)

    async def _admit(
        self, req: ReserveRequest, update: list[Doc], *, credit: int = 0, once: bool = False
    ) -> Doc:
        """``update`` the user's month where every rule of ``req`` holds (its budget less
        ``credit``, what a lease already holds free for it); else raise the rule that refuses
        (one read tells which). A month with no document yet gets one first; a refusal that no
        longer holds when read (a turn settled in between) is tried again. ``once``: not where
        ``req``'s own entry is already (``_not_taken``), and a month that holds it is
        returned as it is."""
        month = {"user_id": req.user_id, "period": req.period}
        query = {**_reserve_filter(req, credit), **(_not_taken(req) if once else {})}
        for attempt in range(RESERVE_ATTEMPTS):
            if attempt > 1:  # contended: concurrent turns of one user settled in between
                await asyncio.sleep(0.002 * attempt * random.random())
            doc: Doc | None = await self.usage.find_one_and_update(
                query,
                update,
                projection={"settled": 0},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc
            existing = await self.usage.find_one(month, projection={"settled": 0})
            if existing is None:  # first turn of the period: create the document, then reserve
                with contextlib.suppress(DuplicateKeyError):
                    await self.usage.insert_one(await self._new_month(month))
                continue
            if once and _entry(existing, req) is not None:  # taken by an earlier run of it
                return existing
            refusal = _refusal(existing, req, credit)
            if refusal is not None:
                raise refusal
        raise StoreUnavailable("could not reserve the token budget under contention")

    @db_call
    async def settle_leased(
        self,
        user_id: str,
        period: str,
        lease_id: str,
        message_id: str,
        *,
        billed: int,
        grant: int,
        cost: int = 0,
    ) -> Doc | None:
        """Bill a turn admitted from a lease, once (its id joins ``settled``): ``used`` grows by
        ``billed``, and the lease (while it is held) shrinks by as much of it as the turn was
        granted (what an upstream bills past the grant was never the lease's, as it is never a
        reservation's). The usage after it."""
        doc: Doc | None = await self.usage.find_one_and_update(
            {"user_id": user_id, "period": period, "settled": {"$ne": message_id}},
            _leased_settlement(lease_id, billed, min(billed, grant), [message_id], cost),
            projection={"settled": 0},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:  # settled before (or no document: nothing to bill against)
            doc = await self.usage.find_one(
                {"user_id": user_id, "period": period}, projection={"settled": 0}
            )
        return doc

    @db_call
    async def finish_many(
        self, finals: list[FinalOp]
    ) -> tuple[dict[tuple[str, str], Doc], list[FinalOp]]:
        """Settle and write the final records of many turns in three commands (the replica's
        group commit of final writes): one unordered bulk write on ``usage`` (a lease's turns
        billed together, once: none of their ids settled yet; a reserved turn's settlement
        pulls its ``open`` entry, as ``settle_usage``), one on ``messages`` (a record no longer
        ``streaming`` is left alone), and one read of the usage documents they leave. When the
        settlement is one update (one user's turns, at low load nearly every group), it returns
        the usage it leaves: two commands. A group the settlement did not bill (one of its
        turns settled before: a retry) is settled turn by turn, which is idempotent. Returns the
        usage by (user, period), and the finals that ended their record (those the rollup
        counts: ``RollupBuffer``)."""
        groups: dict[tuple[str, str, str], list[FinalOp]] = {}
        ops: list[tuple[Doc, Doc | list[Doc]]] = []  # (filter, update) on ``usage``
        for op in finals:
            if op.lease_id is not None:
                groups.setdefault((op.user_id, op.period, op.lease_id), []).append(op)
            else:
                ops.append(_reserved_settlement(op.user_id, op))
            if op.key_account is not None:  # the same on the key's own month
                ops.append(_reserved_settlement(op.key_account, op))
        for (user_id, period, lease_id), group in groups.items():
            mids = [op.message_id for op in group]
            billed = sum(op.billed for op in group)
            moved = sum(min(op.billed, op.grant) for op in group)
            cost = sum(op.cost for op in group)
            ops.append(
                (
                    {"user_id": user_id, "period": period, "settled": {"$nin": mids}},
                    _leased_settlement(lease_id, billed, moved, mids, cost),
                )
            )
        left: Doc | None = None  # the usage the one update left
        matched = True
        if len(ops) == 1:
            left = await self.usage.find_one_and_update(
                *ops[0], projection={"settled": 0}, return_document=ReturnDocument.AFTER
            )
            matched = left is not None
        elif ops:
            result = await self.usage.bulk_write(
                [UpdateOne(query, update) for query, update in ops], ordered=False
            )
            matched = result.matched_count == len(ops)
        if not matched:  # some settled before: each on its own
            left = None
            for op in finals:
                if op.lease_id is not None:
                    await self.settle_leased(
                        op.user_id,
                        op.period,
                        op.lease_id,
                        op.message_id,
                        billed=op.billed,
                        grant=op.grant,
                        cost=op.cost,
                    )
        written = await self.messages.bulk_write(
            [
                UpdateOne({"_id": op.message_id, "status": Status.STREAMING}, {"$set": op.fields})
                for op in finals
            ],
            ordered=False,
        )
        ended = finals
        if written.modified_count < len(finals):  # some were ended before: by this write?
            ended = await self._ended_by(finals)
        keys = {(op.user_id, op.period) for op in finals}
        if left is not None and len(keys) == 1:
            return {(left["user_id"], left["period"]): left}, ended
        return await self._months(keys), ended

    async def _months(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Doc]:
        """The usage documents of ``keys`` (user, period), by key, in one read. The filter is
        ``$in`` on each field of the ``(user_id, period)`` index, not an ``$or`` of pairs: MongoDB
        takes both through the index, but SecantusDB scans its whole collection for an ``$or``
        (82 ms at 3,000 months, against 1 ms; docs/performance.md, finding 30). The few
        documents the product of the two lists adds (another pair's user in a listed month)
        are left out."""
        users, periods = sorted({u for u, _ in keys}), sorted({p for _, p in keys})
        docs: list[Doc] = await self.usage.find(
            {"user_id": {"$in": users}, "period": {"$in": periods}}, projection={"settled": 0}
        ).to_list(None)
        found = ((d["user_id"], d["period"]) for d in docs)
        return {key: d for key, d in zip(found, docs, strict=True) if key in keys}

    async def _ended_by(self, finals: list[FinalOp]) -> list[FinalOp]:
        """Which of ``finals`` ended their record (the record has their end time and status: a
        retried write whose first attempt wrote the record, not the reaper's end)."""
        docs = await self.messages.find(
            {"_id": {"$in": [op.message_id for op in finals]}},
            projection={"status": 1, "completed_at": 1},
        ).to_list(None)
        now = {d["_id"]: d for d in docs}
        return [op for op in finals if _ends(now.get(op.message_id) or {}, op.fields)]

    @db_call
    async def roll_up(self, lines: list[Rollup], *, mark: tuple[str, int] | None = None) -> None:
        """Add turns to the rollup (``service/analytics.py``): one unordered bulk of upserts,
        one per (user, month) the turns touch and one to each month's totals. Two replicas
        creating the same document at once: the loser's upsert is a duplicate key, applied
        again as an update of the winner's document. ``mark`` (replica, round): each upsert
        applies only where that replica's round is not marked yet, and marks it
        (``rollup_ops``), so the same round sent again (its answer lost) counts once; a
        document that refuses it again as a duplicate key holds the mark already. A document
        MongoDB refuses for itself (not a duplicate key, nor a moment's error: a primary
        stepping down, a shutdown, ``TRANSIENT_WRITE_ERRORS``, for which the round is sent
        again) is logged and its increments left out: the same round again would be refused
        again."""
        if not lines:
            return
        ops = rollup_ops(lines, mark)
        try:
            await self.rollup.bulk_write(
                [op for *_, op in ops], ordered=False, comment=REPLICA_WORK
            )
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or any(e.get("code") in TRANSIENT_WRITE_ERRORS for e in errors):
                raise  # a write concern error, a primary stepping down: the round is kept
            for error in errors:
                if error.get("code") != DUPLICATE_KEY:
                    log.error(
                        "stream.rollup_refused",
                        month=ops[error["index"]][0],
                        user_id=ops[error["index"]][1],
                        code=error.get("code"),
                        error=str(error.get("errmsg", ""))[:200],
                    )
            again = [ops[e["index"]][2] for e in errors if e.get("code") == DUPLICATE_KEY]
            if not again:
                return
            try:
                await self.rollup.bulk_write(again, ordered=False, comment=REPLICA_WORK)
            except BulkWriteError as twice:
                errors = twice.details.get("writeErrors", [])
                if (
                    mark is None
                    or not errors
                    or any(e.get("code") != DUPLICATE_KEY for e in errors)
                ):
                    raise
                # the documents exist and do not match: they hold this round's mark already

    @db_call
    async def undo_growth(
        self, user_id: str, period: str, lease_id: str, growth: int, *, interval_ms: int
    ) -> None:
        """Undo a growth of a lease whose answer was lost, as if it had never been taken: what
        it added (its entry's ``took``) leaves the entry's grant and turns and ``reserved``, and
        its requests go back to the bucket (``interval_ms`` each). Nothing when it was not
        taken, or when the lease has grown since (the entry notes its latest growth only; the
        lost one's then goes back with the lease, ``release_lease``)."""
        ours = {"$and": [{"$eq": ["$$this.mid", lease_id]}, {"$eq": ["$$this.took.n", growth]}]}
        took = {
            "$first": {
                "$map": {
                    "input": {"$filter": {"input": "$open", "cond": ours}},
                    "in": "$$this.took",
                }
            }
        }
        less = {
            "grant": {"$subtract": ["$$this.grant", "$_took.tokens"]},
            "turns": {"$subtract": [{"$ifNull": ["$$this.turns", 0]}, "$_took.turns"]},
            "took": {"tokens": 0, "turns": 0, "requests": 0},
        }
        unused: Doc = {}
        if interval_ms:
            due = {"$ifNull": ["$requests_due", EPOCH]}
            spent = {"$multiply": ["$_took.requests", interval_ms]}
            unused["requests_due"] = {"$subtract": [due, spent]}
        await self.usage.update_one(
            {
                "user_id": user_id,
                "period": period,
                "open": {"$elemMatch": {"mid": lease_id, "took.n": growth}},
            },
            [
                {"$set": {"_took": took}},
                {
                    "$set": {
                        "reserved": {"$subtract": ["$reserved", "$_took.tokens"]},
                        "open": {
                            "$map": {
                                "input": "$open",
                                "in": {
                                    "$cond": [ours, {"$mergeObjects": ["$$this", less]}, "$$this"]
                                },
                            }
                        },
                        **unused,
                    }
                },
                {"$unset": "_took"},
            ],
        )

    @db_call
    async def release_lease(
        self, user_id: str, period: str, lease_id: str, requests: int = 0, interval_ms: int = 0
    ) -> Doc | None:
        """Give a lease back: what it still holds leaves ``reserved``, its turns are free, and
        the ``requests`` it took and did not use go back to the bucket (``interval_ms`` each)."""
        entry = {"$arrayElemAt": [_entries(lease_id, "$eq"), 0]}
        unused = _unused_requests(requests, interval_ms)
        doc: Doc | None = await self.usage.find_one_and_update(
            {"user_id": user_id, "period": period, "open.mid": lease_id},
            [
                {"$set": {"_lease": entry}},
                {
                    "$set": {
                        "reserved": {"$subtract": ["$reserved", "$_lease.grant"]},
                        "open": _entries(lease_id, "$ne"),
                        **unused,
                    }
                },
                {"$unset": "_lease"},
            ],
            projection={"settled": 0},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    @db_call
    async def shrink_lease(
        self,
        user_id: str,
        period: str,
        lease_id: str,
        *,
        shrink: int,
        tokens: int,
        turns: int,
        requests: int = 0,
        interval_ms: int = 0,
    ) -> Doc | None:
        """Give back part of a lease: ``tokens`` of its grant leave ``reserved``, ``turns`` of
        its turn slots are free, and ``requests`` go back to the bucket (``interval_ms`` each).
        Relative, so a settlement of its turns still on its way shrinks what is left as it
        would have; once (``shrink``, its number on the replica, is noted in the entry's
        ``shrunk``: asked again after its answer was lost, it changes nothing when it was
        applied). The usage after it (None: the lease is no longer there)."""
        due = {"$ifNull": ["$requests_due", EPOCH]}
        fresh = {"$ne": [{"$ifNull": ["$_lease.shrunk", 0]}, shrink]}  # not applied yet
        unused: Doc = {}
        if requests and interval_ms:
            less_due = {"$subtract": [due, requests * interval_ms]}
            unused["requests_due"] = {"$cond": [fresh, less_due, "$requests_due"]}
        less = {
            "grant": {"$subtract": ["$$this.grant", tokens]},
            "turns": {"$subtract": [{"$ifNull": ["$$this.turns", 0]}, turns]},
            "shrunk": shrink,
        }
        ours = {"$and": [fresh, {"$eq": ["$$this.mid", lease_id]}]}
        doc: Doc | None = await self.usage.find_one_and_update(
            {"user_id": user_id, "period": period, "open.mid": lease_id},
            [
                {"$set": {"_lease": {"$arrayElemAt": [_entries(lease_id, "$eq"), 0]}}},
                {
                    "$set": {
                        "reserved": {
                            "$cond": [fresh, {"$subtract": ["$reserved", tokens]}, "$reserved"]
                        },
                        "open": {
                            "$map": {
                                "input": "$open",
                                "in": {
                                    "$cond": [ours, {"$mergeObjects": ["$$this", less]}, "$$this"]
                                },
                            }
                        },
                        **unused,
                    }
                },
                {"$unset": "_lease"},
            ],
            projection={"settled": 0},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    @db_call
    async def dead_leases(self, live: list[str], *, limit: int = 100) -> list[Doc]:
        """Usage documents holding a lease of a replica not in ``live``. Every entry of
        ``open`` has its time (``at``), so asking for one of any time lets MongoDB take the
        ``open_reservations`` index (documents with entries: the users with turns or leases
        now); on the replica alone, which no index holds, it would read every user's every
        month at each reaper round."""
        docs: list[Doc] = (
            await self.usage.find(
                {
                    "open": {
                        "$elemMatch": {
                            "at": {"$gte": EPOCH},
                            "replica": {"$exists": True, "$nin": live},
                        }
                    }
                },
                projection={"user_id": 1, "period": 1, "open": 1},
                comment=REPLICA_WORK,
            )
            .limit(limit)
            .to_list(limit)
        )
        return docs

    @db_call
    async def insert_messages(self, groups: list[list[Doc]]) -> list[ServiceError | None]:
        """Insert the records of several turns in one command (the replica's group commit,
        ``service/stream/groups.py``): for each turn, None when its records are written, or
        the error of one MongoDB refused (the others are written regardless). An outage
        raises ``StoreUnavailable`` for all of them."""
        failures: list[ServiceError | None] = [None] * len(groups)
        try:
            await self.messages.insert_many([d for docs in groups for d in docs], ordered=False)
        except BulkWriteError as exc:
            owner = [turn for turn, docs in enumerate(groups) for _ in docs]
            for error in exc.details.get("writeErrors", []):
                turn = owner[error["index"]]
                log.error(
                    "stream.records_refused",
                    message_id=groups[turn][-1].get("_id"),
                    code=error.get("code"),
                    error=str(error.get("errmsg", ""))[:200],
                )
                failures[turn] = ServiceError("the turn's records could not be stored")
        return failures

    @db_call
    async def checkpoint_many(self, texts: list[tuple[str, str]]) -> None:
        """Save the text of many live streams in one command (the replica's checkpoint round):
        one unordered bulk write, not one command per stream. A stream finalized meanwhile is
        left alone (``status`` is no longer ``streaming``)."""
        now = utcnow()
        try:
            await self.messages.bulk_write(
                [
                    UpdateOne(
                        {"_id": message_id, "status": Status.STREAMING},
                        {"$set": {"content": content, "checkpoint_at": now, "alive_at": now}},
                    )
                    for message_id, content in texts
                ],
                ordered=False,
                comment=REPLICA_WORK,
            )
        except BulkWriteError as exc:  # the others were written; never log the text itself
            for error in exc.details.get("writeErrors", []):
                log.error(
                    "stream.checkpoint_refused",
                    message_id=texts[error["index"]][0],
                    code=error.get("code"),
                    error=str(error.get("errmsg", ""))[:200],
                )

    @db_call
    async def settle_usage(
        self, user_id: str, period: str, message_id: str, *, billed: int, cost: int = 0
    ) -> Doc | None:
        """Turn a reservation into actual usage, once: a second call for a turn is a no-op.
        What its entries hold leaves ``reserved`` (``_settlement``)."""
        doc: Doc | None = await self.usage.find_one_and_update(
            *_settlement(user_id, period, message_id, billed=billed, cost=cost),
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            doc = await self.usage.find_one({"user_id": user_id, "period": period})
        return doc

    @db_call
    async def finish_message(self, message_id: str, fields: Doc, *, retried: bool = False) -> bool:
        """End a record still ``streaming`` with ``fields``; True when it ends as they say: by
        this write, or by an earlier try of the same write whose answer was lost (the record
        has their status and end time: one read, only when this write changed nothing). A
        record ended otherwise (the reaper's end) is left alone: False."""
        result = await self.messages.update_one(
            {"_id": message_id, "status": Status.STREAMING}, {"$set": fields}
        )
        if result.modified_count or not retried:
            return bool(result.modified_count)
        doc = await self.messages.find_one(
            {"_id": message_id}, projection={"status": 1, "completed_at": 1}
        )
        return doc is not None and _ends(doc, fields)

    @db_call
    async def request_cancel(self, user_id: str, chat_id: str, message_id: str) -> Doc | None:
        """Flag a running turn for cancellation (any replica notices); None when not found, or
        its chat is deleted (as every route answers for a deleted chat; its running answers were
        flagged by the delete already). The chat is looked at beside the flag."""
        query = {"_id": message_id, "chat_id": chat_id, "user_id": user_id, "role": "assistant"}
        looks: tuple[Doc | None, Doc | None] = await asyncio.gather(
            self.chats.find_one(
                {"_id": chat_id, "user_id": user_id, "is_active": True}, projection={"_id": 1}
            ),
            self.messages.find_one_and_update(
                {**query, "status": Status.STREAMING},
                {"$set": {"cancel_requested": True, "flagged": True}},
                projection={"status": 1},
            ),
        )
        chat, doc = looks
        if chat is None:
            return None
        if doc is None:
            doc = await self.messages.find_one(query, projection={"status": 1})
        return doc

    @db_call
    async def flagged_turns(self) -> list[Doc]:
        """Every running turn, on any replica, with a cancel request or a follower on another
        replica (``cancel_requested``, ``followed_until``): served by the partial ``flags``
        index, so it costs O(flagged turns), not O(live streams)."""
        docs: list[Doc] = await self.messages.find(
            {"flagged": True, "status": Status.STREAMING},
            projection={"_id": 1, "cancel_requested": 1, "followed_until": 1},
            comment=REPLICA_WORK,
        ).to_list(None)
        return docs

    @db_call
    async def deleted_chats(self, chat_ids: list[str]) -> set[str]:
        """Which of these chats are deleted (the watcher's look at the turns written since its
        last round: a turn whose records came after its chat's delete flagged the chat's turns)."""
        docs: list[Doc] = await self.chats.find(
            {"_id": {"$in": chat_ids}, "is_active": False},
            projection={"_id": 1},
            comment=REPLICA_WORK,
        ).to_list(None)
        return {d["_id"] for d in docs}

    @db_call
    async def follow_turns(self, message_ids: list[str], *, until: datetime) -> None:
        """This replica follows these running turns until ``until``: their replicas checkpoint
        them every FOLLOW_INTERVAL_S meanwhile (renewed while anyone follows)."""
        await self.messages.update_many(
            {"_id": {"$in": message_ids}, "status": Status.STREAMING},
            {"$set": {"flagged": True, "followed_until": until}},
            comment=REPLICA_WORK,
        )

    @db_call
    async def read_turns(self, message_ids: list[str]) -> list[Doc]:
        """The records of turns followed from here (their text so far, or their end)."""
        docs: list[Doc] = await self.messages.find(
            {"_id": {"$in": message_ids}}, comment=REPLICA_WORK
        ).to_list(None)
        return docs

    @db_call
    async def running_turn(self, user_id: str, chat_id: str) -> Doc | None:
        """The chat's answer being produced now, if any (its latest)."""
        docs: list[Doc] = (
            await self.messages.find(
                {"chat_id": chat_id, "user_id": user_id, "status": Status.STREAMING},
                projection={"_id": 1},
            )
            .sort("seq", DESCENDING)
            .limit(1)
            .to_list(1)
        )
        return docs[0] if docs else None

    @db_call
    async def heartbeat(self, replica_id: str) -> None:
        """This replica is alive: one small write per interval, however many streams it runs."""
        await self.replicas.update_one(
            {"_id": replica_id}, {"$set": {"alive_at": utcnow()}}, upsert=True, comment=REPLICA_WORK
        )

    @db_call
    async def live_replicas(self, *, since: datetime) -> list[str]:
        docs = await self.replicas.find(
            {"alive_at": {"$gte": since}}, projection={"_id": 1}, comment=REPLICA_WORK
        ).to_list(None)
        return [d["_id"] for d in docs]

    @db_call
    async def own_streaming(
        self, replica_id: str, *, older_than: datetime, limit: int = 100
    ) -> list[Doc]:
        """This replica's records still ``streaming`` and not saved since ``older_than``."""
        docs: list[Doc] = (
            await self.messages.find(
                {
                    "status": Status.STREAMING,
                    "checkpoint_at": {"$lt": older_than},
                    "replica": replica_id,
                },
                comment=REPLICA_WORK,
            )
            .limit(limit)
            .to_list(limit)
        )
        return docs

    @db_call
    async def stale_streams(self, *, older_than: datetime, limit: int = 100) -> list[Doc]:
        """Turns left ``streaming`` by a dead process: not saved since ``older_than`` and their
        replica's heartbeat is older too (or gone)."""
        alive = await self.live_replicas(since=older_than)
        docs: list[Doc] = (
            await self.messages.find(
                {
                    "status": Status.STREAMING,
                    "alive_at": {"$lt": older_than},
                    "replica": {"$nin": alive},
                },
                comment=REPLICA_WORK,
            )
            .limit(limit)
            .to_list(limit)
        )
        return docs

    async def dead_among(self, docs: list[Doc], *, older_than: datetime) -> list[Doc]:
        """Those of ``docs`` (messages just read) that a dead process left ``streaming``."""
        candidates = [
            d
            for d in docs
            if d.get("status") == Status.STREAMING
            and d.get("alive_at") is not None
            and d["alive_at"] < older_than
        ]
        if not candidates:
            return []
        alive = set(await self.live_replicas(since=older_than))
        return [d for d in candidates if d.get("replica") not in alive]

    @db_call
    async def old_reservations(self, *, older_than: datetime, limit: int = 100) -> list[Doc]:
        """Reservations whose turn never settled (e.g. the process died before persisting);
        leases are the dead replicas' to release (``dead_leases``), whatever their age."""
        docs: list[Doc] = (
            await self.usage.find(
                {
                    "open": {
                        "$elemMatch": {"at": {"$lt": older_than}, "replica": {"$exists": False}}
                    }
                },
                projection={"user_id": 1, "period": 1, "open": 1},
                comment=REPLICA_WORK,
            )
            .limit(limit)
            .to_list(limit)
        )
        return docs

    @db_call
    async def get_message(self, message_id: str) -> Doc | None:
        doc: Doc | None = await self.messages.find_one({"_id": message_id})
        return doc

    @db_call
    async def get_usage(self, user_id: str, period: str) -> Doc | None:
        doc: Doc | None = await self.usage.find_one({"user_id": user_id, "period": period})
        return doc

    # ---- WebSocket tickets
    # A ticket is stored under its SHA-256 only; consuming it is one find_one_and_delete filtered
    # on "not expired", so it works once, on any replica. The TTL index only tidies up.
    # A ticket asked for with an API key names the key (its scope is read again when the ticket
    # is used, so a key revoked meanwhile opens nothing); ``admin`` is the asker's admin flag.
    @db_call
    async def create_ws_ticket(
        self,
        ticket: str,
        *,
        user_id: str,
        token_expires_at: float,
        expires_at: datetime,
        key_id: str | None = None,
        admin: bool = False,
    ) -> None:
        await self.db["ws_tickets"].insert_one(
            {
                "_id": hashlib.sha256(ticket.encode()).hexdigest(),
                "user_id": user_id,
                "token_expires_at": token_expires_at,
                "expires_at": expires_at,
                "created_at": utcnow(),
                "key_id": key_id,
                "admin": admin,
            }
        )

    @db_call
    async def consume_ws_ticket(self, ticket: str, *, now: datetime) -> Doc | None:
        doc: Doc | None = await self.db["ws_tickets"].find_one_and_delete(
            {"_id": hashlib.sha256(ticket.encode()).hexdigest(), "expires_at": {"$gt": now}}
        )
        return doc

    # ---- idempotency keys
    # A key is claimed by inserting it (unique on user and key) before the turn asks anything of
    # its upstream; a claim older than IDEMPOTENCY_TTL_S counts as gone even before MongoDB's TTL
    # monitor (which runs about once a minute) has removed it.
    @db_call
    async def claim_key(self, claim: Doc) -> Doc | None:
        """Insert ``claim`` (``user_id``, ``key``, ...); None when it is now ours, else the
        claim that holds the key."""
        keys = self.db["idempotency_keys"]
        expired = claim["created_at"] - timedelta(seconds=self.idempotency_ttl_s)
        for _ in range(3):
            try:
                await keys.insert_one(claim)
                return None
            except DuplicateKeyError:
                held: Doc | None = await keys.find_one(
                    {"user_id": claim["user_id"], "key": claim["key"]}
                )
            if held is None:
                continue  # released meanwhile: claim it again
            if held["created_at"] > expired:
                return held
            await keys.delete_one({"_id": held["_id"], "created_at": held["created_at"]})
        raise StoreUnavailable("the idempotency key could not be claimed; try again")

    @db_call
    async def get_claim(self, claim_id: Any) -> Doc | None:
        doc: Doc | None = await self.db["idempotency_keys"].find_one({"_id": claim_id})
        return doc

    @db_call
    async def admit_claim(self, claim_id: Any) -> None:
        """The claimed turn has started streaming: a retry now follows it."""
        await self.db["idempotency_keys"].update_one(
            {"_id": claim_id}, {"$set": {"state": "admitted"}}
        )

    @db_call
    async def release_claim(self, claim_id: Any) -> None:
        """The claimed turn was refused before streaming: a retry is evaluated afresh."""
        await self.db["idempotency_keys"].delete_one({"_id": claim_id, "state": "starting"})

    # ------------------------------------------------------------------ API keys
    # ``api_keys`` {_id: "key_…", user_id, name, hash (SHA-256 of the secret, unique), prefix,
    # created_at, last_used_at, expires_at, models, limit, admin, revoked_at}. The cap on a
    # user's keys is ``api_key_counts`` {_id: user, active: n}, as for chats: one conditional
    # ``$inc`` (an upsert that does not match raises DuplicateKeyError: the cap is full).
    async def _create_api_key_indexes(self) -> None:
        keys = self.db["api_keys"]
        await keys.create_index([("hash", ASCENDING)], name="key_hash", unique=True)
        await keys.create_index(
            [("user_id", ASCENDING), ("created_at", DESCENDING)], name="user_keys"
        )
        await keys.create_index(  # every user's keys, newest first (an operator's audit); the
            # revoked ones apart, so that keys made and revoked in a loop slow no page of it
            [
                ("revoked_at", ASCENDING),
                ("admin", ASCENDING),
                ("created_at", DESCENDING),
                ("_id", DESCENDING),
            ],
            name="live_keys_audit",
        )

    @db_call
    async def create_api_key(self, doc: Doc, *, cap: int) -> None:
        """Insert a key doc (``revoked_at: None``) unless its user has ``cap`` keys not revoked;
        409 ``key_limit_reached`` then. A client gone half-way does not stop it (``_guarded``);
        a failed insert gives its slot back (not once the deadline is spent, as for chats)."""
        counts = self.db["api_key_counts"]
        await _take_slot(
            counts,
            doc["user_id"],
            cap,
            Conflict(
                f"API key limit reached ({cap} keys); revoke one first",
                code="key_limit_reached",
                details={"limit": cap},
            ),
        )
        try:
            await self.db["api_keys"].insert_one(doc)
        except BaseException:
            await counts.update_one({"_id": doc["user_id"]}, {"$inc": {"active": -1}})
            raise

    @db_call
    async def list_api_keys(self, user_id: str) -> list[Doc]:
        """The user's keys not revoked, newest first (at most the cap of them)."""
        docs: list[Doc] = (
            await self.db["api_keys"]
            .find({"user_id": user_id, "revoked_at": None}, {"hash": 0})
            .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
            .to_list(None)
        )
        return docs

    @db_call
    async def revoke_api_key(self, user_id: str, key_id: str) -> Doc | None:
        """Mark the user's key revoked; None when it has no such key (or it is revoked)."""
        return await self._revoke_api_key(user_id, key_id)

    async def _revoke_api_key(self, user_id: str, key_id: str) -> Doc | None:
        doc: Doc | None = await self.db["api_keys"].find_one_and_update(
            {"_id": key_id, "user_id": user_id, "revoked_at": None},
            {"$set": {"revoked_at": utcnow()}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            await self.db["api_key_counts"].update_one({"_id": user_id}, {"$inc": {"active": -1}})
        return doc

    @db_call
    async def find_api_key(
        self, *, hash_hex: str | None = None, key_id: str | None = None
    ) -> Doc | None:
        """A key by its secret's hash or by its id, revoked or not."""
        query: Doc = {"hash": hash_hex} if hash_hex is not None else {"_id": key_id}
        doc: Doc | None = await self.db["api_keys"].find_one(query)
        return doc

    @db_call
    async def touch_api_key(self, key_id: str, at: datetime) -> None:
        await self.db["api_keys"].update_one({"_id": key_id}, {"$max": {"last_used_at": at}})

    @db_call
    async def key_months(self, key_ids: list[str], period: str) -> dict[str, Doc]:
        """The ``period`` usage documents of these keys' own months (``key_account``), by key
        id, in one read; a key whose month has no document yet (no turn) is left out."""
        accounts = {key_account(key_id): key_id for key_id in key_ids}
        docs: list[Doc] = await self.usage.find(
            {"user_id": {"$in": list(accounts)}, "period": period},
            projection={"user_id": 1, "used": 1, "reserved": 1, "limit": 1},
        ).to_list(None)
        return {accounts[doc["user_id"]]: doc for doc in docs}

    @db_call
    async def all_api_keys(
        self, *, admin: bool | None, limit: int, after: tuple[datetime, str] | None
    ) -> list[Doc]:
        """Every user's keys not revoked (only admin keys, or only others, when ``admin`` says),
        newest first, after the ``(created_at, _id)`` of the previous page; ``limit + 1`` at
        most, to tell a next page. Both values of ``admin`` are asked for when it is None, so
        that MongoDB merges the index's two runs in order instead of sorting every key."""
        query: Doc = {
            "admin": {"$in": [False, True]} if admin is None else admin,
            "revoked_at": None,
        }
        if after is not None:
            at, key_id = after
            query["$or"] = [{"created_at": {"$lt": at}}, {"created_at": at, "_id": {"$lt": key_id}}]
        docs: list[Doc] = (
            await self.db["api_keys"]
            .find(query, {"hash": 0})
            .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
            .limit(limit + 1)
            .to_list(limit + 1)
        )
        return docs

    # ================================================================== admin (operators)
    # /api/admin (``service/api/admin.py``): a user's standing limit (``users``: {_id: user,
    # limit, updated_at, updated_by}, taken by each new month's usage document), the current
    # month's limit set or its usage reset, users by usage, and analytics over the daily rollup
    # (``usage_rollup``, written at settlement). Usage documents of API keys' own limits
    # (``user_id: "key:<key_id>"``) are not users: never listed, never given a standing limit.

    async def _create_admin_indexes(self) -> None:
        await self.usage.create_index(  # users by usage: one month, most used first
            [("period", ASCENDING), ("used", DESCENDING), ("user_id", ASCENDING)],
            name="period_used",
        )  # analytics read the rollup by its unique (month, user_id) index

    async def _new_month(self, month: Doc) -> Doc:
        """A user's first usage document of a month: with their standing limit when an admin
        set one (one read, once per user and month)."""
        doc: Doc = {**month, "used": 0, "reserved": 0}
        if not month["user_id"].startswith(KEY_ACCOUNT):
            user = await self.db["users"].find_one({"_id": month["user_id"]}, {"limit": 1})
            if user is not None and user.get("limit") is not None:
                doc["limit"] = user["limit"]
        return doc

    @db_call
    async def standing_limit(self, user_id: str) -> int | None:
        """The limit an admin set for ``user_id``'s months (None: the default's)."""
        doc: Doc | None = await self.db["users"].find_one({"_id": user_id}, {"limit": 1})
        return None if doc is None or doc.get("limit") is None else int(doc["limit"])

    @db_call
    async def set_user_limit(self, user_id: str, period: str, limit: int, *, by: str) -> Doc:
        """Set ``user_id``'s standing limit and the ``period``'s (the current month's), so the
        next admission on any replica holds to it. The usage document as it was before
        (``{}``: none yet)."""
        await self.db["users"].update_one(
            {"_id": user_id},
            {"$set": {"limit": limit, "updated_at": utcnow(), "updated_by": by}},
            upsert=True,
        )
        for _ in range(2):  # a first turn may create the month's document at the same time
            try:
                before: Doc | None = await self.usage.find_one_and_update(
                    {"user_id": user_id, "period": period},
                    {"$set": {"limit": limit}, "$setOnInsert": {"used": 0, "reserved": 0}},
                    projection={"settled": 0},
                    upsert=True,
                    return_document=ReturnDocument.BEFORE,
                )
            except DuplicateKeyError:
                continue
            return before or {}
        raise StoreUnavailable("could not set the limit under contention; try again")

    @db_call
    async def reset_usage(self, user_id: str, period: str) -> Doc:
        """Zero the month's ``used`` and ``cost``, and those of the user's API keys' own months
        (a key held to its own limit would otherwise stay spent); ``reserved`` and ``open``
        stay, so turns running now still settle (what they spend counts from zero). The user's
        document as it was (``{}``: none, and none is made)."""
        zero = {"$set": {"used": 0, "cost": 0}}
        before: Doc | None = await self.usage.find_one_and_update(
            {"user_id": user_id, "period": period},
            zero,
            projection={"settled": 0},
            return_document=ReturnDocument.BEFORE,
        )
        keys: list[Doc] = (
            await self.db["api_keys"]
            .find({"user_id": user_id, "limit": {"$ne": None}}, {"_id": 1})
            .to_list(None)
        )
        if keys:
            accounts = [key_account(k["_id"]) for k in keys]
            await self.usage.update_many({"user_id": {"$in": accounts}, "period": period}, zero)
        return before or {}

    @db_call
    async def users_by_usage(
        self, period: str, *, limit: int, after: tuple[int, str] | None
    ) -> list[Doc]:
        """Users' usage documents of ``period``, most used first (ties by user id), after the
        ``(used, user_id)`` of the previous page; ``limit + 1`` at most, to tell a next page."""
        query: Doc = {"period": period, "user_id": {"$not": re.compile("^" + KEY_ACCOUNT)}}
        if after is not None:
            used, user_id = after
            query["$or"] = [{"used": {"$lt": used}}, {"used": used, "user_id": {"$gt": user_id}}]
        docs: list[Doc] = (
            await self.usage.find(
                query,
                projection={"user_id": 1, "used": 1, "reserved": 1, "limit": 1, "cost": 1},
            )
            .sort([("used", DESCENDING), ("user_id", ASCENDING)])
            .limit(limit + 1)
            .to_list(limit + 1)
        )
        return docs

    async def rollup_docs(self, selections: list[Doc]) -> list[Doc]:
        """The rollup's documents ``selections`` name (``UsageQuery.selections``: one
        equality on the index each), to group in the service. Whole documents: SecantusDB
        serves a projection slower than the document itself. Each read (a month) is held to
        ``MONGODB_TIMEOUT_MS`` on its own: a year's export is twelve of them."""
        docs: list[Doc] = []
        for selection in selections:
            docs += await self.read_rollup(selection)
        return docs

    @db_call
    async def read_rollup(self, selection: Doc) -> list[Doc]:
        docs: list[Doc] = await self.rollup.find(selection, {"applied": 0}).to_list(None)
        return docs


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The turns the user's ``open`` entries hold (a lease's entry holds ``turns`` of them).
OPEN_TURNS: Doc = {
    "$sum": {"$map": {"input": {"$ifNull": ["$open", []]}, "in": {"$ifNull": ["$$this.turns", 1]}}}
}
SETTLED_KEPT = 500  # ids of the last turns settled from leases, so none is billed twice
# A replica whose heartbeat is missing counts as dead, so its document may go once it is far
# older than any STALE_STREAM_S.
REPLICA_TTL_S = 86_400
# The ``comment`` of the replica's own commands (the watcher's polls, heartbeats, checkpoints, the
# reaper's queries, and the lookup of live replicas, also made when a chat read finds a stale
# stream), as opposed to a turn's: MongoDB's profiler, logs and currentOp show it.
REPLICA_WORK = "gateway:replica"
RESERVE_ATTEMPTS = 10
DUPLICATE_KEY = 11000
# A write's errors that say nothing of the write itself, only of the moment (the server's own
# "retryable" codes: a primary stepping down or shutting down, a network error, a timeout).
TRANSIENT_WRITE_ERRORS = frozenset(
    {6, 7, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436, 50}
)
KEY_ACCOUNT = key_account("")  # the user_id prefix of API keys' own months


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """A chat turn to authorize (``Store.begin_chat_turns``)."""

    user_id: str
    chat_id: str
    message_id: str


BEGAN_KEPT = 16  # the turns a chat remembers having begun (its group commit's notes)
NOT_NOTES = {"began": 0}  # a chat as read for a client: without its group commit's notes


def _began(turn: ChatTurn, now: datetime) -> list[Doc]:
    """``begin_chat_turn``'s update as a pipeline that also notes the seqs ``turn`` took."""
    taken = {"$add": [{"$ifNull": ["$next_seq", 0]}, 2]}
    noted = [{"mid": turn.message_id, "seq": taken}]
    return [
        {
            "$set": {
                "next_seq": taken,
                "updated_at": now,
                "began": {
                    "$slice": [{"$concatArrays": [{"$ifNull": ["$began", []]}, noted]}, -BEGAN_KEPT]
                },
            }
        }
    ]


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    user_id: str
    period: str
    message_id: str
    want: int  # prompt + the largest completion the model may produce
    need: int  # the least that makes a turn worthwhile (prompt + a few tokens)
    default_limit: int
    rate_limit_ms: int  # the page's rule: at least this long between two messages (0: off)
    now: datetime
    requests_per_minute: int = 0  # programs' rule (0: off), see ``service.limits``
    max_concurrent: int = 0  # programs' rule: turns of the user open at once (0: off)


@dataclass(frozen=True, slots=True)
class FinalOp:
    """One turn's final write: its settlement (``lease_id``: billed from that lease; else its
    own reservation ``grant`` released) and its final record's ``fields``."""

    user_id: str
    period: str
    message_id: str
    grant: int
    billed: int
    lease_id: str | None
    fields: Doc
    cost: int = 0  # nano-units of CURRENCY, added to the month's ``cost``
    rollup: Rollup | None = None  # its line in the daily rollup
    key_account: str | None = None  # an API key's own month it was also reserved on


@dataclass(frozen=True, slots=True)
class Rollup:
    """A turn's line in the daily rollup (``usage_daily``, what the analytics read): counted
    once, when its record is ended (by its turn, or by the reaper)."""

    # The UTC day it was admitted, YYYY-MM-DD: in the month it is billed to (its ``period``),
    # also when it ends (or is reaped) in the next, so a month's analytics equal its usage.
    day: str
    user_id: str
    model: str
    key_id: str | None
    outcome: str  # completed | cancelled | failed | interrupted
    prompt: int
    completion: int
    cached: int
    reasoning: int
    cost: int  # nano-units of CURRENCY

    def counters(self) -> dict[str, int]:
        return {
            "turns": 1,
            self.outcome: 1,
            "prompt": self.prompt,
            "completion": self.completion,
            "cached": self.cached,
            "reasoning": self.reasoning,
            "cost": self.cost,
        }


def rollup_ops(
    lines: list[Rollup], mark: tuple[str, int] | None = None
) -> list[tuple[str, str | None, UpdateOne]]:
    """The rollup's upserts for ``lines``, each with its document's month and user: one
    ``$inc`` per (month, user) document of the counters of each of its (day, model, key)
    lines, and one per month's totals (``user_id`` null, per (day, model)). ``mark``
    (replica, round): each only where the document's ``applied.<replica>`` is not at or past
    that round (missing, or older), and setting it: a round sent again (its answer lost), or
    a copy of it landing after a later round, is not counted again."""
    sums: dict[tuple[str, str | None], dict[str, int]] = {}
    for line in lines:
        month = line.day[:7]
        for user, key in ((line.user_id, line.key_id), (None, None)):
            counters = sums.setdefault((month, user), {})
            path = "lines." + line_key(line.day, line.model, key)
            for name, value in line.counters().items():
                counters[f"{path}.{name}"] = counters.get(f"{path}.{name}", 0) + value
    unmarked: Doc = {}
    marking: Doc = {}
    if mark is not None:
        replica, n = mark
        unmarked = {f"applied.{replica}": {"$not": {"$gte": n}}}
        marking = {"$set": {f"applied.{replica}": n}}
    return [
        (
            month,
            user,
            UpdateOne(
                {"month": month, "user_id": user, **unmarked},
                {"$inc": counters, **marking},
                upsert=True,
            ),
        )
        for (month, user), counters in sums.items()
    ]


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """What a replica asks of a user's month for its lease: room for one more turn (``turn``'s
    rules: its ``need``, a turn slot, a request), and as much more as fits of the wants."""

    turn: ReserveRequest
    lease_id: str
    replica: str
    want_tokens: int
    want_turns: int
    want_requests: int
    growth: int = 0  # this growth's number on the replica (``Store.undo_growth`` names it)
    shrunk: int = 0  # the lease's shrink whose answer was lost (``Store.shrink_lease``), if any
    credit: int = 0  # what the lease holds free already: the turn needs that much less


@dataclass(frozen=True, slots=True)
class Reservation:
    grant: int
    allowance: Allowance  # the usage right after this reservation
    lease_id: str | None = None  # admitted from this replica's lease (``service.stream.leases``)

    @classmethod
    def from_doc(cls, doc: Doc, req: ReserveRequest) -> Reservation:
        entry = _entry(doc, req)
        assert entry is not None, "the month holds the reservation"
        allowance = allowance_of(doc, req.default_limit, req.now)
        return cls(grant=int(entry["grant"]), allowance=allowance)


def allowance_of(doc: Doc, default_limit: int, at: datetime) -> Allowance:
    """What a usage document (``{}``: none yet) allows at ``at``."""
    return Allowance(
        at=at,
        limit=int(doc.get("limit", default_limit)),
        used=int(doc.get("used", 0)),
        reserved=int(doc.get("reserved", 0)),
        requests_due=doc.get("requests_due"),
    )


def _available(default_limit: int) -> Doc:
    limit = {"$ifNull": ["$limit", default_limit]}
    spent = {"$add": [{"$ifNull": ["$used", 0]}, {"$ifNull": ["$reserved", 0]}]}
    return {"$subtract": [limit, spent]}


def _requests_due_by(req: ReserveRequest) -> datetime:
    """The latest ``requests_due`` that still leaves room for one request now."""
    rpm = req.requests_per_minute
    return req.now + request_window(rpm) - request_interval(rpm)


def _reserve_filter(req: ReserveRequest, credit: int = 0) -> Doc:
    # The replica's clock (NTP-synced), not $$NOW: SecantusDB evaluates $$NOW in update
    # pipelines but not in a query's $expr, and the filter must behave the same everywhere.
    # Every rule here has its twin in ``_refusal``, which tells a client which one refused.
    # ``credit``: what a lease already holds free for the turn (it needs that much less).
    conditions: list[Doc] = [{"$gte": [_available(req.default_limit), req.need - credit]}]
    if req.rate_limit_ms:
        conditions.append({"$lte": [{"$ifNull": ["$next_at", EPOCH]}, req.now]})
    if req.max_concurrent:
        conditions.append({"$lt": [OPEN_TURNS, req.max_concurrent]})
    if req.requests_per_minute:
        due = {"$ifNull": ["$requests_due", EPOCH]}
        conditions.append({"$lte": [due, _requests_due_by(req)]})
    return {"user_id": req.user_id, "period": req.period, "$expr": {"$and": conditions}}


def _ends(record: Doc, fields: Doc) -> bool:
    """Whether ``record`` ended as the final write of ``fields`` says (its status and end
    time: an end time is the write's own)."""
    at = fields.get("completed_at")
    return at is not None and (record.get("status"), record.get("completed_at")) == (
        fields.get("status"),
        at,
    )


def _not_taken(req: ReserveRequest) -> Doc:
    """The filter's condition that ``req`` is not reserved yet: no entry of its turn's id at
    its ``now`` in ``open``. So a reservation's command taken twice (a group's bulk MongoDB
    applied but answered with an error that is not an outage, each turn then run on its own)
    reserves once. A turn reserved again under its id at a later ``now`` (a prediction that
    missed) is another request."""
    return {"open": {"$not": {"$elemMatch": {"mid": req.message_id, "at": req.now}}}}


def _entry(doc: Doc, req: ReserveRequest) -> Doc | None:
    """``req``'s entry in its month's ``open`` (its turn's id, taken at its ``now``, to the
    millisecond as MongoDB keeps it)."""
    at = req.now.replace(microsecond=req.now.microsecond // 1000 * 1000)
    return next(
        (e for e in doc.get("open") or () if e["mid"] == req.message_id and e["at"] == at), None
    )


def _reserve_update(req: ReserveRequest) -> list[Doc]:
    moved: Doc = {}  # only the rules this turn is held to move
    if req.rate_limit_ms:
        moved["next_at"] = req.now + timedelta(milliseconds=req.rate_limit_ms)
    if req.requests_per_minute:
        due = {"$max": [{"$ifNull": ["$requests_due", EPOCH]}, req.now]}
        interval_ms = request_interval(req.requests_per_minute) // timedelta(milliseconds=1)
        moved["requests_due"] = {"$add": [due, interval_ms]}
    return [
        {"$set": {"_grant": {"$min": [req.want, _available(req.default_limit)]}}},
        {
            "$set": {
                "reserved": {"$add": [{"$ifNull": ["$reserved", 0]}, "$_grant"]},
                **moved,
                "open": {
                    "$concatArrays": [
                        {"$ifNull": ["$open", []]},
                        [{"mid": req.message_id, "grant": "$_grant", "at": req.now}],
                    ]
                },
            }
        },
        {"$unset": "_grant"},
    ]


def _reserved_settlement(account: str, op: FinalOp) -> tuple[Doc, list[Doc]]:
    """``_settlement`` of ``op``'s turn on ``account``'s month (the user's, or its API key's)."""
    return _settlement(account, op.period, op.message_id, billed=op.billed, cost=op.cost)


def _settlement(
    account: str, period: str, message_id: str, *, billed: int, cost: int
) -> tuple[Doc, list[Doc]]:
    """Bill a reserved turn on ``account``'s month (a user's, or an API key's own), once: its
    ``open`` entries are pulled, so a second settlement matches nothing, and what their grants
    hold leaves ``reserved``. One entry as a rule; two when the turn was reserved again under
    its id while the first could not be undone (a prediction that missed, ``Store.unreserve``
    failing): pulling both while giving back one grant would leave the other in ``reserved``
    for the rest of the month, with no entry the reaper could release. (filter, update)"""
    open_: Doc = {"$ifNull": ["$open", []]}
    ours = {"$filter": {"input": open_, "cond": {"$eq": ["$$this.mid", message_id]}}}
    held = {"$sum": {"$map": {"input": ours, "in": "$$this.grant"}}}
    return (  # one stage: each expression reads the document as it was (SecantusDB: cheaper)
        {"user_id": account, "period": period, "open.mid": message_id},
        [
            {
                "$set": {
                    "used": {"$add": [{"$ifNull": ["$used", 0]}, billed]},
                    "cost": {"$add": [{"$ifNull": ["$cost", 0]}, cost]},
                    "reserved": {"$subtract": [{"$ifNull": ["$reserved", 0]}, held]},
                    "open": {
                        "$filter": {"input": open_, "cond": {"$ne": ["$$this.mid", message_id]}}
                    },
                }
            }
        ],
    )


def _leased_settlement(
    lease_id: str, billed: int, moved: int, mids: list[str], cost: int = 0
) -> list[Doc]:
    """Bill ``billed`` (budget units) of a lease's turns ``mids``: ``used`` grows (and ``cost``
    by their ``cost``), the lease (while it is held) shrinks by ``moved`` (what of it the turns
    were granted), the ids join the month's last ``SETTLED_KEPT`` settled ones."""
    held = {"$gt": [{"$size": _entries(lease_id, "$eq")}, 0]}
    shrunk = {"grant": {"$subtract": ["$$this.grant", moved]}}
    return [
        {
            "$set": {
                "used": {"$add": [{"$ifNull": ["$used", 0]}, billed]},
                "cost": {"$add": [{"$ifNull": ["$cost", 0]}, cost]},
                "reserved": {"$cond": [held, {"$subtract": ["$reserved", moved]}, "$reserved"]},
                "open": {
                    "$map": {
                        "input": {"$ifNull": ["$open", []]},
                        "in": {
                            "$cond": [
                                {"$eq": ["$$this.mid", lease_id]},
                                {"$mergeObjects": ["$$this", shrunk]},
                                "$$this",
                            ]
                        },
                    }
                },
                "settled": {
                    "$slice": [
                        {"$concatArrays": [{"$ifNull": ["$settled", []]}, mids]},
                        -SETTLED_KEPT,
                    ]
                },
            }
        }
    ]


def _entries(lease_id: str, op: str) -> Doc:
    """The ``open`` entries whose id is (``$eq``) or is not (``$ne``) ``lease_id``."""
    return {
        "$filter": {"input": {"$ifNull": ["$open", []]}, "cond": {op: ["$$this.mid", lease_id]}}
    }


def _unused_requests(requests: int, interval_ms: int) -> Doc:
    """The ``$set`` that gives ``requests`` a lease took and did not use back to the bucket."""
    if not (requests and interval_ms):
        return {}
    due = {"$ifNull": ["$requests_due", EPOCH]}
    return {"requests_due": {"$subtract": [due, requests * interval_ms]}}


def _lease_update(req: LeaseRequest) -> list[Doc]:
    """Grow the lease entry by what fits: tokens up to ``want_tokens`` of what is available
    (at most half of it beyond one turn's ``want``, so other replicas keep room),
    turns up to ``want_turns`` of the free ones, requests up to ``want_requests`` of the
    bucket's (the filter already holds room for one of each)."""
    turn = req.turn
    available = _available(turn.default_limit)
    half = {"$max": [turn.want, {"$floor": {"$divide": [available, 2]}}]}  # room for others
    # Never below nothing: a month spent past its limit (a limit lowered, a turn billed past
    # its grant) has less than nothing available, and a growth asking for a request alone, or
    # credited with what the lease holds, would otherwise give back reservations it does not hold.
    free: Doc = {"_tokens": {"$max": [0, {"$min": [req.want_tokens, half, available]}]}}
    if turn.max_concurrent:
        free["_turns"] = {
            "$min": [req.want_turns, {"$subtract": [turn.max_concurrent, OPEN_TURNS]}]
        }
    else:
        free["_turns"] = req.want_turns
    moved: Doc = {}
    if turn.requests_per_minute:
        interval_ms = request_interval(turn.requests_per_minute) // timedelta(milliseconds=1)
        due = {"$max": [{"$ifNull": ["$requests_due", EPOCH]}, turn.now]}
        window = request_window(turn.requests_per_minute) // timedelta(milliseconds=1)
        room = {"$subtract": [{"$add": [turn.now, window]}, due]}
        free["_requests"] = {
            "$min": [req.want_requests, {"$floor": {"$divide": [room, interval_ms]}}]
        }
        moved["requests_due"] = {"$add": [due, {"$multiply": ["$_requests", interval_ms]}]}
    else:
        free["_requests"] = req.want_requests
    old = {"$arrayElemAt": [_entries(req.lease_id, "$eq"), 0]}
    entry = {
        "mid": req.lease_id,
        "replica": req.replica,
        "grant": {"$add": [{"$ifNull": ["$_old.grant", 0]}, "$_tokens"]},
        "turns": {"$add": [{"$ifNull": ["$_old.turns", 0]}, "$_turns"]},
        "at": turn.now,
        # The latest shrink applied: kept (asked again, it changes nothing); in an entry made
        # anew, the shrink whose answer was lost, meant for the entry that is gone.
        "shrunk": {"$ifNull": ["$_old.shrunk", req.shrunk]},
        "took": {
            "tokens": "$_tokens",
            "turns": "$_turns",
            "requests": "$_requests",
            "n": req.growth,
        },
    }
    return [
        {"$set": {**free, "_old": old}},
        {
            "$set": {
                "reserved": {"$add": [{"$ifNull": ["$reserved", 0]}, "$_tokens"]},
                **moved,
                "open": {"$concatArrays": [_entries(req.lease_id, "$ne"), [entry]]},
            }
        },
        {"$unset": ["_tokens", "_turns", "_requests", "_old"]},
    ]


# A rate limit that refuses: how long to wait, what to say, the error's details.
Wait = tuple[float, str, Doc]


def _refusal(doc: Doc, req: ReserveRequest, credit: int = 0) -> ServiceError | None:
    """Which rule refuses ``req`` by ``doc`` (None: none does now). Of the rate limits that
    refuse, the one with the longest wait is named, so its Retry-After is enough for all; the
    budget is named only when no rate limit refuses (``credit``: what a lease holds free for
    the turn, the user's to spend: in what remains)."""
    allowance = allowance_of(doc, req.default_limit, req.now)
    checks = (_message_wait(doc, req), _concurrency_wait(doc, req), _requests_wait(doc, req))
    waits = [w for w in checks if w is not None]
    if waits:
        wait_s, message, details = max(waits, key=lambda w: w[0])
        return RateLimited(message, retry_after_s=wait_s, details=details, allowance=allowance)
    if allowance.remaining_tokens + credit >= req.need:
        return None
    details = {
        "limit": allowance.limit,
        "remaining": allowance.remaining_tokens + credit,
        "needed": req.need,
        "period": req.period,
    }
    if allowance.limit - allowance.used >= req.need:  # once what runs now gives back its rest
        details["reserved"] = allowance.reserved
        return BudgetHeld(
            f"the rest of the monthly budget {HELD}", details=details, allowance=allowance
        )
    return BudgetExceeded("monthly token budget exhausted", details=details, allowance=allowance)


def _message_wait(doc: Doc, req: ReserveRequest) -> Wait | None:
    next_at = doc.get("next_at")
    if not req.rate_limit_ms or next_at is None or next_at <= req.now:
        return None
    return (
        (next_at - req.now).total_seconds(),
        "too many messages; wait before sending another",
        {"rule": "message_rate", "min_interval_ms": req.rate_limit_ms},
    )


def open_turns(doc: Doc) -> int:
    """Turns the user's open entries hold: one a turn's, ``turns`` a replica's lease."""
    return sum(int(e.get("turns", 1)) for e in doc.get("open") or ())


def _concurrency_wait(doc: Doc, req: ReserveRequest) -> Wait | None:
    running = open_turns(doc)
    if not req.max_concurrent or running < req.max_concurrent:
        return None
    return (
        CONCURRENCY_RETRY_S,
        f"too many turns at once ({running} running, at most {req.max_concurrent});"
        " retry when one has ended",
        {"rule": "concurrent_turns", "max_concurrent_turns": req.max_concurrent},
    )


def _requests_wait(doc: Doc, req: ReserveRequest) -> Wait | None:
    due = doc.get("requests_due")
    if not req.requests_per_minute or due is None or due <= _requests_due_by(req):
        return None
    return (
        (due - _requests_due_by(req)).total_seconds(),
        f"too many requests (at most {req.requests_per_minute} a minute);"
        " wait before sending another",
        {"rule": "requests_per_minute", "requests_per_minute": req.requests_per_minute},
    )

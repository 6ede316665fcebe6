"""The only module that speaks to MongoDB (through motor).

Every method maps driver failures to ``StoreUnavailable`` (503) at this boundary. Rules that must
hold across replicas are single conditional MongoDB operations, never read-then-write:

- chat cap:   ``chat_counts`` {_id: user, active: n}, ``$inc`` only while ``active < cap``
              (an upsert that does not match raises DuplicateKeyError: the cap is full);
- rate limit: ``rate_limits`` {_id: user, next_at}, moved forward only when ``next_at <= now``;
- budget:     ``usage`` {user_id, period, used, reserved, limit?}, unique (user_id, period),
              reserved with one ``$expr`` conditional update, reconciled with one ``$inc``.

Motor is in maintenance; keeping it behind this module makes a switch to PyMongo's async API a
change of one file.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
from motor.motor_asyncio import AsyncIOMotorClient, AsyncIOMotorDatabase
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    PyMongoError,
)

from service.errors import BadRequest, Conflict, StoreUnavailable
from service.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")
Doc = dict[str, Any]


def utcnow() -> datetime:
    """Now in UTC, truncated to milliseconds (MongoDB's precision) so values round-trip exactly."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _unavailable(exc: PyMongoError) -> bool:
    return isinstance(exc, ConnectionFailure | ExecutionTimeout) or bool(
        getattr(exc, "timeout", False)
    )


def db_call(
    fn: Callable[Concatenate[Store, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Store, P], Coroutine[Any, Any, R]]:
    """Ensure the indexes exist; turn driver outages and timeouts into ``StoreUnavailable``."""

    @functools.wraps(fn)
    async def wrapper(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            if not store.indexes_ready:
                await store.ensure_indexes()
            return await fn(store, *args, **kwargs)
        except PyMongoError as exc:
            if _unavailable(exc):
                raise StoreUnavailable("the database is unavailable; try again shortly") from exc
            raise

    return wrapper


def make_client(settings: Settings) -> AsyncIOMotorClient[Doc]:
    timeout = settings.mongodb_timeout_ms
    return AsyncIOMotorClient(
        settings.mongodb_uri,
        appname="chat-gateway",
        tz_aware=True,
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
    except (ValueError, TypeError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc


class Store:
    def __init__(self, db: AsyncIOMotorDatabase[Doc]) -> None:
        self.db = db
        self.chats = db["chats"]
        self.messages = db["messages"]
        self.usage = db["usage"]
        self.chat_counts = db["chat_counts"]
        self.rate_limits = db["rate_limits"]
        self.indexes_ready = False
        self._index_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def ensure_indexes(self) -> None:
        """Create the indexes once (idempotent); retried by the next call while MongoDB is down."""
        async with self._index_lock:
            if not self.indexes_ready:
                await self._create_indexes()
                self.indexes_ready = True

    async def _create_indexes(self) -> None:
        await self.chats.create_index(
            [
                ("user_id", ASCENDING),
                ("is_active", ASCENDING),
                ("updated_at", DESCENDING),
                ("_id", DESCENDING),
            ],
            name="user_active_recent",
        )
        await self.messages.create_index(
            [("chat_id", ASCENDING), ("seq", ASCENDING)], name="chat_seq", unique=True
        )
        await self.messages.create_index(
            [("status", ASCENDING), ("checkpoint_at", ASCENDING)], name="status_checkpoint"
        )
        await self.usage.create_index(
            [("user_id", ASCENDING), ("period", ASCENDING)], name="user_period", unique=True
        )

    @db_call
    async def ping(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self.db.command("ping")
        except TimeoutError as exc:
            raise StoreUnavailable("the database did not answer in time") from exc

    # ------------------------------------------------------------------ chats
    @db_call
    async def create_chat(
        self, user_id: str, *, title: str | None, model: str | None, cap: int
    ) -> Doc:
        # Shielded: a client that disconnects half-way must not leave the counter incremented.
        return await asyncio.shield(self._create_chat(user_id, title, model, cap))

    async def _create_chat(
        self, user_id: str, title: str | None, model: str | None, cap: int
    ) -> Doc:
        try:
            await self.chat_counts.find_one_and_update(
                {"_id": user_id, "active": {"$lt": cap}}, {"$inc": {"active": 1}}, upsert=True
            )
        except DuplicateKeyError as exc:
            raise Conflict(
                f"chat limit reached ({cap} active chats); delete one first",
                code="chat_limit_reached",
                details={"limit": cap},
            ) from exc
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
            await self.chats.find(query)
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
            {"_id": chat_id, "user_id": user_id, "is_active": True}
        )
        return doc

    @db_call
    async def list_messages(self, chat_id: str, *, after_seq: int, limit: int) -> list[Doc]:
        cursor = self.messages.find({"chat_id": chat_id, "seq": {"$gt": after_seq}}).sort(
            "seq", ASCENDING
        )
        docs: list[Doc] = await cursor.limit(limit).to_list(limit)
        return docs

    @db_call
    async def delete_chat(self, user_id: str, chat_id: str) -> datetime | None:
        return await asyncio.shield(self._delete_chat(user_id, chat_id))

    async def _delete_chat(self, user_id: str, chat_id: str) -> datetime | None:
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
        return now

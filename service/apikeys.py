"""API keys for programs: created, listed and revoked by their user (and listed and revoked by
an operator, ``service/api/admin_keys.py``), used wherever a token is.

A secret is ``cgw-`` and 32 random bytes (URL-safe base64), shown once, when it is created;
MongoDB keeps only its SHA-256 (a unique index) and its first characters (``prefix``) for
lists. ``Authenticator.verify`` hands every credential that starts with ``cgw-`` to
``ApiKeys.resolve``, which returns the key's user as a ``Principal`` with the key's scope
(``KeyScope``: its models and its own limit) and its admin flag.

Every replica keeps a lookup (by the secret's hash) for at most ``API_KEY_CACHE_S``, so a key
revoked on one replica stops on every replica within that; the replica that revoked it drops
it at once. The key's expiry is checked on every request, also when the lookup is cached.
``last_used_at`` is written at most once a minute per key and replica, in the background: a
failure to write it is logged and never fails the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, MutableSequence, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from service.auth import API_KEY_PREFIX, KeyScope, Principal
from service.costs import Budget
from service.errors import BadRequest, Unauthorized
from service.store import Doc, Store, utcnow

log = structlog.get_logger("service.apikeys")

MAX_KEYS_PER_USER = 100  # keys not revoked, per user
PREFIX_CHARS = 8  # of the secret after ``cgw-``, shown in lists
TOUCH_INTERVAL_S = 60.0  # last_used_at is written at most this often per key and replica
CACHE_SIZE = 4096  # key lookups a replica remembers (LRU)
# The expiry of a principal whose key never expires (9999-12-31T23:59:59Z): a finite number,
# because timers are set from it (the WebSocket closes when its credential expires).
NEVER = 253_402_300_799.0


def new_secret() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_view(doc: Doc, budget: Budget, month: Doc | None = None) -> dict[str, Any]:
    """A key as the API shows it: never its hash (nor, but at creation, its secret); its own
    limit in the budget's unit and, for a key that has one, what it used of it this month and
    has left (``month``: the key's usage document of the month, None before its first turn);
    both null for a key without one (its turns count in its user's month alone)."""
    use: dict[str, Any] = {"used": None, "remaining": None}
    if doc.get("limit") is not None:
        use = _month_use(int(doc["limit"]), month or {}, budget)
    return {
        "id": doc["_id"],
        "name": doc["name"],
        "prefix": doc["prefix"],
        "created_at": doc["created_at"],
        "expires_at": doc.get("expires_at"),
        "models": doc.get("models"),
        "limit": None if doc.get("limit") is None else budget.show(int(doc["limit"])),
        "admin": bool(doc.get("admin")),
        "last_used_at": doc.get("last_used_at"),
        **use,
    }


def _month_use(limit: int, month: Doc, budget: Budget) -> dict[str, Any]:
    """``used`` and ``remaining`` (less what running turns hold) as ``GET /api/usage`` counts
    them; the month's document holds the limit its admissions read."""
    limit = int(month.get("limit", limit))
    used, reserved = int(month.get("used", 0)), int(month.get("reserved", 0))
    return {"used": budget.show(used), "remaining": budget.show(max(0, limit - used - reserved))}


def _bad_expiry(message: str, problem: str) -> BadRequest:
    return BadRequest(
        message,
        code="validation_error",
        details=[{"field": "expires_at", "problem": problem, "type": "value_error"}],
    )


def parse_expiry(value: str, now: datetime) -> datetime:
    """An RFC 3339 time with its offset, in the future; 400 otherwise."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise _bad_expiry(
            "expires_at must be an RFC 3339 date-time with an offset, e.g. 2030-01-31T00:00:00Z",
            "not an RFC 3339 date-time",
        )
    try:
        at = at.astimezone(UTC).replace(microsecond=at.microsecond // 1000 * 1000)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is past year 9999 in UTC
        raise _bad_expiry(
            "expires_at must fall within years 1..9999 in UTC", "out of range in UTC"
        ) from None
    if at <= now:
        raise _bad_expiry("expires_at must be in the future", "in the past")
    return at


def principal_of(doc: Doc, now: datetime) -> Principal:
    """The principal a key doc stands for; 401 when it is revoked or has expired."""
    if doc.get("revoked_at") is not None:
        raise Unauthorized("invalid API key: revoked")
    expires_at: datetime | None = doc.get("expires_at")
    if expires_at is not None and expires_at <= now:
        raise Unauthorized("invalid API key: expired")
    models = doc.get("models")
    return Principal(
        user_id=str(doc["user_id"]),
        expires_at=expires_at.timestamp() if expires_at is not None else NEVER,
        key=KeyScope(
            key_id=str(doc["_id"]),
            models=frozenset(models) if models is not None else None,
            limit=doc.get("limit"),
        ),
        admin=bool(doc.get("admin")),
    )


class ApiKeys:
    """Creates, lists and revokes keys, and resolves a secret to its principal."""

    def __init__(self, store: Store, *, cache_s: float) -> None:
        self.store = store
        self.cache_s = cache_s
        self._cache: OrderedDict[str, tuple[float, Doc]] = OrderedDict()  # hash: (read at, doc)
        self._by_id: dict[str, tuple[float, Doc | None]] = {}  # key id: (read at, doc)
        self._reading: dict[str, asyncio.Future[Doc | None]] = {}  # hash: the read under way
        self._touched: dict[str, float] = {}  # key id: when last_used_at was last written
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ managing keys
    async def create(
        self,
        user_id: str,
        *,
        name: str,
        expires_at: datetime | None,
        models: Iterable[str] | None,
        limit: int | None,
        admin: bool,
    ) -> tuple[Doc, str]:
        """A new key and its secret (which is not stored)."""
        secret = new_secret()
        doc: Doc = {
            "_id": "key_" + secrets.token_hex(6),
            "user_id": user_id,
            "name": name,
            "hash": secret_hash(secret),
            "prefix": secret[len(API_KEY_PREFIX) :][:PREFIX_CHARS],
            "created_at": utcnow(),
            "last_used_at": None,
            "expires_at": expires_at,
            "models": sorted(set(models)) if models is not None else None,
            "limit": limit,
            "admin": admin,
            "revoked_at": None,
        }
        await self.store.create_api_key(doc, cap=MAX_KEYS_PER_USER)
        return doc, secret

    async def list(self, user_id: str) -> list[Doc]:
        return await self.store.list_api_keys(user_id)

    async def views(
        self, docs: Sequence[Doc], budget: Budget, period: str
    ) -> Sequence[dict[str, Any]]:
        """``key_view`` of each doc, with the ``period``'s use of the keys that have a limit of
        their own: one read for all of them, none when no key has one."""
        limited = [str(doc["_id"]) for doc in docs if doc.get("limit") is not None]
        months = await self.store.key_months(limited, period) if limited else {}
        return [key_view(doc, budget, months.get(str(doc["_id"]))) for doc in docs]

    async def revoke(self, user_id: str, key_id: str) -> bool:
        try:
            doc = await self.store.revoke_api_key(user_id, key_id)
        finally:  # also when the answer is lost (timeout, cancelled): the write may have landed
            self._forget(key_id)  # this replica stops at once; others within cache_s
        return doc is not None

    def _forget(self, key_id: str) -> None:
        self._by_id.pop(key_id, None)
        for digest in [d for d, (_, doc) in self._cache.items() if doc.get("_id") == key_id]:
            del self._cache[digest]

    async def revoke_all(
        self, user_id: str, into: MutableSequence[str] | None = None
    ) -> Sequence[str]:
        """Revoke every key of ``user_id`` not revoked yet, one by one as ``revoke`` does; the
        ids of those this call revoked (one revoked meanwhile by another call is not among
        them), appended to ``into`` as they go (a failure half-way leaves the list of those
        done). A key created after the list was read is not revoked."""
        revoked: MutableSequence[str] = [] if into is None else into
        for doc in await self.list(user_id):
            if await self.revoke(user_id, str(doc["_id"])):
                revoked.append(str(doc["_id"]))
        return revoked

    # ------------------------------------------------------------------ authentication
    async def resolve(self, secret: str) -> Principal:
        """The principal of the key ``secret``; 401 when unknown, revoked or expired."""
        digest = secret_hash(secret)
        doc = await self._lookup(digest)
        if doc is None:
            raise Unauthorized("invalid API key: unknown")
        principal = principal_of(doc, utcnow())
        self._touch(str(doc["_id"]))
        return principal

    async def resolve_id(self, key_id: str) -> Principal:
        """The principal of the key ``key_id``, read afresh (a WebSocket ticket's key)."""
        doc = await self.store.find_api_key(key_id=key_id)
        if doc is None:
            raise Unauthorized("invalid API key: unknown")
        principal = principal_of(doc, utcnow())
        self._touch(key_id)
        return principal

    async def check(self, key_id: str) -> None:
        """401 once the key ``key_id`` is revoked, expired or gone: what an open WebSocket
        asks every ``cache_s``. Its read is shared by every socket of the key for as long."""
        now = time.monotonic()
        cached = self._by_id.get(key_id)
        if cached is None or now - cached[0] >= self.cache_s:
            cached = self._by_id[key_id] = (now, await self.store.find_api_key(key_id=key_id))
            for old in [k for k, (at, _) in self._by_id.items() if now - at >= self.cache_s]:
                del self._by_id[old]  # the keys no socket asked about lately
        if cached[1] is None:
            raise Unauthorized("invalid API key: unknown")
        principal_of(cached[1], utcnow())

    async def _read(self, digest: str) -> Doc | None:
        """One read of a key however many requests ask for it at once (a busy key's cache
        entry expiring must not send each of its requests to MongoDB)."""
        pending = self._reading.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self.store.find_api_key(hash_hex=digest))
            self._reading[digest] = pending
            pending.add_done_callback(lambda _: self._reading.pop(digest, None))
        return await asyncio.shield(pending)  # one caller cancelled: the others still read

    async def _lookup(self, digest: str) -> Doc | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_s:
            self._cache.move_to_end(digest)
            return cached[1]
        doc = await self._read(digest)
        if doc is None:  # unknown secrets are not remembered: guesses must not evict real keys
            self._cache.pop(digest, None)
            return None
        self._cache[digest] = (now, doc)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return doc

    # ------------------------------------------------------------------ last_used_at
    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        last = self._touched.get(key_id)
        if last is not None and now - last < TOUCH_INTERVAL_S:
            return
        self._touched[key_id] = now
        if len(self._touched) > CACHE_SIZE:  # forget the oldest writes
            for old in sorted(self._touched, key=self._touched.__getitem__)[: CACHE_SIZE // 2]:
                del self._touched[old]
        task = asyncio.create_task(self._write_used(key_id, utcnow()), name="api-key-touch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_used(self, key_id: str, at: datetime) -> None:
        try:
            await self.store.touch_api_key(key_id, at)
        except Exception as exc:  # noqa: BLE001 - a lost last_used_at never fails a request
            log.warning("api_key.touch_failed", key_id=key_id, error=type(exc).__name__)

    async def close(self) -> None:
        """Wait briefly for the last_used_at writes under way (MongoDB closes next)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        for task in self._tasks:
            task.cancel()

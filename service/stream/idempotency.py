"""Send once: a retried send with the same ``Idempotency-Key`` follows the first turn.

The first request with a key claims it for its user (one insert, unique on user and key, before
anything is asked of the upstream; the claim's id is the turn's message id). The claim starts as
``starting``; the turn marks it ``admitted`` once it streams, or deletes it when it was refused
before streaming (budget, rate limit, model, upstream), so a retry is then evaluated afresh. A
retry with the same key and payload:

- while the claim is ``starting``: waits for it (polling, with a deadline: 409 after it); a
  claim still starting a minute after it was made is taken as abandoned, and claimed anew,
  unless its turn's record shows it answered (the claim was never marked: MongoDB away then, or
  its process killed), or is still streaming on a live replica: then it is marked ``admitted``
  and followed; while that record is ``streaming`` on a replica whose heartbeat stopped, the
  retry waits (the reaper ends it);
- once ``admitted``: follows the turn from offset 0 on any replica (``Resumes.find``: from
  memory, from another replica, or the stored answer and its terminal event once it has ended);
  nothing is asked of the upstream and nothing is billed again.

The same key with another payload is 422 ``idempotency_key_reused``. Claims are kept
``IDEMPOTENCY_TTL_S`` (a TTL index; an older one counts as gone).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import structlog

from service.errors import BadRequest, Conflict, ServiceError
from service.http import not_found
from service.metrics import RESUMES
from service.records import Status
from service.store import Reservation, Store, utcnow
from service.stream.live import LiveStream
from service.stream.mirror import Resumes
from service.stream.producer import TurnInput, TurnProducer

log = structlog.get_logger("service.stream")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
KEY_RULE = f"1 to {MAX_KEY_CHARS} printable ASCII characters"
WAIT_S = 30.0  # how long a retry waits for the first request to stream or be refused
# A claim still starting this long after it was made belongs to a request that died before its
# turn could settle the claim (its process was killed, MongoDB failed it): the key is free again.
ABANDONED = timedelta(seconds=2 * WAIT_S)
POLL_S = 0.05


class KeyReused(ServiceError):
    status = 422
    code = "idempotency_key_reused"


def parse_key(raw: str | None) -> str | None:
    """The header's value (or a WebSocket frame's ``key``): 1 to 255 printable ASCII
    characters; None when absent."""
    if raw is None:
        return None
    if not valid_key(raw):
        raise BadRequest(f"{HEADER} must be {KEY_RULE}", code="invalid_idempotency_key")
    return raw


def valid_key(raw: object) -> bool:
    return (
        isinstance(raw, str)
        and 1 <= len(raw) <= MAX_KEY_CHARS
        and all(" " <= c <= "~" for c in raw)
    )


def fingerprint(payload: dict[str, Any]) -> str:
    """What makes two sends the same request: their canonical JSON's SHA-256."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def chat_send_payload(chat_id: str, message: str, model: str | None) -> str:
    """A chat send's fingerprint, the same over SSE and WebSocket (a page may retry on
    either)."""
    return fingerprint({"route": "chat", "chat_id": chat_id, "message": message, "model": model})


def branch_payload(
    kind: str, chat_id: str, target: str, message: str | None, model: str | None
) -> str:
    """A regenerate's or an edit's fingerprint, the same over SSE and WebSocket."""
    return fingerprint(
        {"route": kind, "chat_id": chat_id, "target": target, "message": message, "model": model}
    )


@dataclass(frozen=True, slots=True)
class Admission:
    live: LiveStream
    replayed: bool  # a retry that follows (or replays) the first request's turn
    created: int  # when the first request came, in Unix seconds (a completion's ``created``)
    reservation: Reservation | None = None  # this request's, when it started the turn


class Admissions:
    def __init__(self, producer: TurnProducer, resumes: Resumes, store: Store) -> None:
        self.producer = producer
        self.resumes = resumes
        self.store = store

    async def admit(self, inp: TurnInput, payload: str | None = None) -> Admission:
        """Start ``inp``'s turn, or, when its key is already claimed with the same
        ``payload`` (a ``fingerprint``), follow the turn that claimed it."""
        if inp.key is None:
            turn = await self.producer.start(inp)
            return Admission(turn.live, False, int(time.time()), turn.admitted())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            now = utcnow()
            claim_id = str(uuid.uuid4())
            held = await self.store.claim_key(
                {
                    "_id": claim_id,
                    "user_id": inp.user_id,
                    "key": inp.key,
                    "fingerprint": payload,
                    "chat_id": inp.chat_id,
                    "state": "starting",
                    "created_at": now,
                }
            )
            if held is None:
                turn = await self.producer.start(inp, message_id=claim_id)
                return Admission(turn.live, False, int(now.timestamp()), turn.admitted())
            if held.get("state") != "admitted" and held["created_at"] < now - ABANDONED:
                ran = await self._ran(held)
                if ran is False:
                    await self.store.release_claim(held["_id"])  # its request died starting
                    continue
                if ran:
                    # Its turn answered, but the claim was never marked (MongoDB away then, or
                    # its process killed just then): the turn is the key's, as if it had been.
                    await self.store.admit_claim(held["_id"])
                    held["state"] = "admitted"
            if held.get("fingerprint") != payload:
                raise KeyReused(
                    f"this {HEADER} was used for a different request",
                    details={"header": HEADER},
                )
            if held.get("state") == "admitted":
                return await self._follow(inp, held)
            if loop.time() > deadline:
                raise Conflict(
                    f"the first request with this {HEADER} is still starting; retry",
                    code="idempotency_key_in_progress",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(POLL_S)

    async def _ran(self, held: dict[str, Any]) -> bool | None:
        """Whether the turn of a claim left ``starting`` answered: its record ended with
        something of an answer (text, reasoning, a tool call, completion tokens), or is still
        ``streaming`` on a live replica (followed as it goes). False: no record, or one ended
        with nothing (refused, or its process died before the upstream answered: the reaper
        bills the prompt of such a record, but the client got nothing). None: ``streaming`` on
        a replica whose heartbeat stopped, undecided until the reaper ends it: the retry
        waits."""
        doc = await self.store.get_message(held["_id"])
        if doc is None:
            return False
        if doc["status"] == Status.STREAMING:
            since = utcnow() - timedelta(seconds=self.producer.settings.stale_stream_s)
            live = await self.store.live_replicas(since=since)
            return True if doc.get("replica") in live else None
        completion = (doc.get("tokens") or {}).get("completion")
        answered = ("content", "reasoning", "tool_calls", "refusal")
        return bool(completion) or any(doc.get(k) for k in answered)

    async def _follow(self, inp: TurnInput, held: dict[str, Any]) -> Admission:
        """Follow (or replay) the turn that claimed the key: only for a caller who may see it,
        an API key with a model list included (the key was the user's, claimed by any of its
        credentials)."""
        user_id = inp.user_id
        chat_id = held.get("chat_id")
        found = await self.resumes.find(user_id, chat_id, held["_id"], stateless=True)
        if found is None:  # its chat was deleted since (a stateless turn's answer is kept)
            raise not_found("chat" if chat_id is not None else "message")
        live, source = found
        key = inp.api_key
        if key is not None and not key.may_use(live.model):
            raise key.not_allowed(live.model)
        RESUMES.labels(source).inc()
        log.info(
            "stream.replayed",  # a send whose key an earlier send claimed: no new turn
            message_id=live.message_id,
            chat_id=live.chat_id,
            user_id=user_id,
            source=source,
        )
        return Admission(live, True, int(held["created_at"].timestamp()))

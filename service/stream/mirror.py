"""Following a turn from any replica: from memory, from another replica, or from its record.

``Resumes.find`` gives a ``LiveStream`` to follow for a user's message:

- **memory**: this replica runs the turn; its own ``LiveStream``.
- **replica**: another replica runs it. A mirror ``LiveStream`` is fed from MongoDB: this
  replica marks the turn followed (``followed_until``, renewed while anyone follows), the owner's
  watcher sees the mark with its cancel poll and checkpoints that turn every
  ``FOLLOW_INTERVAL_S`` instead of every ``CHECKPOINT_INTERVAL_S``, and one poll per replica
  (not per client, not per turn) reads every mirrored turn's record every ``FOLLOW_INTERVAL_S``:
  new text grows the mirror, an ended record ends it with its final. A turn whose replica died
  is settled by the poll itself (``interrupted``, its checkpointed text), so no follower hangs.
  Turns nobody follows elsewhere cost no MongoDB operation at all.
- **stored**: the turn has ended: a ``LiveStream`` of the record, already final.

Why not change streams: one cursor per replica would also do, but the text still has to reach
MongoDB first (the fast checkpoints above); polling the few followed records needs nothing a
plain replica set (or SecantusDB) may lack, and the poll doubles as the status check with a
deadline that a wake-up alone cannot give (see docs/architecture.md for the measured delay).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import structlog

from service.errors import ServiceError
from service.logs import error_text
from service.records import Status
from service.settings import Settings
from service.store import Doc, Store, utcnow
from service.stream.finals import final_of
from service.stream.live import LiveStream
from service.stream.registry import StreamRegistry
from service.stream.watcher import settle_interrupted

log = structlog.get_logger("service.stream")

LEASE_S = 5.0  # how long one mark keeps a turn followed; renewed every RENEW_S
RENEW_S = 1.5
DEAD_CHECK_S = 1.0  # how often the poll looks whether a mirrored turn's replica died


class Resumes:
    def __init__(self, store: Store, registry: StreamRegistry, settings: Settings) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.mirrors: dict[str, LiveStream] = {}
        self._poll: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll

    async def find(
        self, user_id: str, chat_id: str | None, message_id: str, *, stateless: bool = False
    ) -> tuple[LiveStream, str] | None:
        """The user's answer ``message_id`` (of chat ``chat_id``, when given) to follow, and
        where it comes from (``memory``, ``replica``, ``stored``); None when it is not theirs,
        not an answer of an active chat, or not there. ``stateless``: a turn of no chat may
        be followed too (one started with an Idempotency-Key)."""
        live = self.registry.streams.get(message_id)
        doc: Doc | None = None
        owner: str | None
        chat: str | None
        if live is not None:
            owner, chat = live.user_id, live.chat_id
        else:
            doc = await self.store.get_message(message_id)
            if doc is None or doc.get("role") != "assistant":
                return None
            owner, chat = doc.get("user_id"), doc.get("chat_id")
        if owner != user_id or (chat is None and not stateless):
            return None
        if chat_id is not None and chat != chat_id:
            return None
        if chat is not None and await self.store.get_chat(user_id, chat) is None:
            return None  # deleted
        if live is not None:
            return live, "memory"
        assert doc is not None
        if doc["status"] == Status.STREAMING:
            return await self._mirror(doc), "replica"
        return await self._stored(doc), "stored"

    async def running(self, user_id: str, chat_id: str) -> tuple[LiveStream, str] | None:
        """The chat's answer being produced now, to follow; None when none runs."""
        for live in self.registry.streams.values():
            if live.chat_id == chat_id and live.user_id == user_id:
                return live, "memory"
        doc = await self.store.running_turn(user_id, chat_id)
        if doc is None:
            return None
        return await self.find(user_id, chat_id, doc["_id"])

    async def _stored(self, doc: Doc) -> LiveStream:
        usage = await self.store.get_usage(doc["user_id"], doc["period"])
        live = _of_record(doc)
        live.end(final_of(doc, usage, self.settings.budget))
        return live

    async def _mirror(self, doc: Doc) -> LiveStream:
        live = self.mirrors.get(doc["_id"])
        if live is None:
            live = self.mirrors[doc["_id"]] = _of_record(doc)
            await self.store.follow_turns([doc["_id"]], until=utcnow() + _lease())
            # The poll may have dropped it meanwhile (nobody followed it yet): put back.
            live = self.mirrors.setdefault(doc["_id"], live)
        # Whoever follows a mirror sees the poll running: the first follower's mark may have
        # failed (503) after its mirror was made, and the poll drops a mirror nobody follows.
        if self._poll is None or self._poll.done():
            self._poll = asyncio.create_task(self._run(), name="resume-mirrors")
        return live

    # ------------------------------------------------------------------ the poll
    async def _run(self) -> None:
        """Every FOLLOW_INTERVAL_S while any mirror is followed: read the mirrored records
        (one query), renew the marks (one update every RENEW_S), settle those whose replica
        died (a check every DEAD_CHECK_S)."""
        loop = asyncio.get_running_loop()
        renew_at = dead_check_at = loop.time() + RENEW_S
        while self.mirrors:
            await asyncio.sleep(self.settings.follow_interval_s)
            for message_id in [m for m, live in self.mirrors.items() if not live.followers]:
                del self.mirrors[message_id]  # nobody follows it any more (or it ended)
            if not self.mirrors:
                return
            now = loop.time()
            try:
                docs = await self.store.read_turns(list(self.mirrors))
                if now >= dead_check_at:
                    dead_check_at = now + DEAD_CHECK_S
                    docs = await self._settle_dead(docs)
                for doc in docs:
                    await self._update(doc)
                if now >= renew_at:
                    renew_at = now + RENEW_S
                    await self.store.follow_turns(list(self.mirrors), until=utcnow() + _lease())
            except ServiceError as exc:
                log.warning(
                    "stream.follow_failed",
                    code=exc.code,
                    error=error_text(exc),
                    mirrors=len(self.mirrors),
                )
            except Exception as exc:  # one failed round must not end the poll
                log.error(  # (its followers would hang until a new mirror started it again)
                    "stream.follow_failed",
                    error=error_text(exc),
                    mirrors=len(self.mirrors),
                    exc_info=exc,
                )

    async def _settle_dead(self, docs: list[Doc]) -> list[Doc]:
        cutoff = utcnow() - timedelta(seconds=self.settings.stale_stream_s)
        now = asyncio.get_running_loop().time()
        if not self.registry.may_reap(now, self.settings.stale_stream_s):
            return docs
        dead = await self.store.dead_among(docs, older_than=cutoff)
        for doc in dead:
            await settle_interrupted(self.store, doc, self.settings.budget)
        if not dead:
            return docs
        return await self.store.read_turns([d["_id"] for d in docs])

    async def _update(self, doc: Doc) -> None:
        live = self.mirrors.get(doc["_id"])
        if live is None or live.final is not None:
            return
        content = doc.get("content") or ""
        if len(content) > live.length:
            live.add(content[live.length :])
        if doc["status"] != Status.STREAMING:
            usage = await self.store.get_usage(doc["user_id"], doc["period"])
            live.end(final_of(doc, usage, self.settings.budget))
            del self.mirrors[doc["_id"]]


def _of_record(doc: Doc) -> LiveStream:
    live = LiveStream(
        doc["_id"], doc.get("chat_id"), doc["user_id"], doc.get("transport") or "sse", doc["model"]
    )
    live.meta = doc.get("meta")  # the upstream's system_fingerprint / service_tier
    if doc.get("reasoning"):
        live.mark(_step({"role": "assistant", "reasoning_content": doc["reasoning"]}), "")
    content = doc.get("content") or ""
    if content:
        live.add(content)
    calls, refusal = doc.get("tool_calls"), doc.get("refusal")
    if calls or refusal:  # what the record keeps of the answer's other steps, as one step
        delta: Doc = {"role": "assistant"} if not live.marks and not content else {}
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        if refusal:
            delta["refusal"] = refusal
        live.mark(_step(delta), "")
    return live


def _step(delta: Doc) -> Doc:
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def _lease() -> timedelta:
    return timedelta(seconds=LEASE_S)

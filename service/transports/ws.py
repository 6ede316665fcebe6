"""The WebSocket transport: many turns followed over one socket (protocol v2, docs/websocket.md).

One ``Connection`` per socket. Only the handler task reads; each followed turn (a ``send`` or a
``resume``) is a slot whose task encodes the turn's events into frames; ONE writer task sends
them, fed by a bounded queue. A client that stops reading fills the queue: the socket is closed
(1013, ``slow_client``). The handler's own replies (``pong``, error frames) go into the same
queue, and frames a client sent together are handled without a step of the writer between
them: past half the queue the handler waits for the writer (``_room``) before it handles the
next, so a client that reads everything is never taken for a slow one however fast it sends;
one whose socket does not drain for ``STREAM_SEND_TIMEOUT_S`` meanwhile is. Whatever closes
the socket (the peer, a bad frame, token expiry, shutdown) only stops the following: the turns
themselves go on to their end (resumable), unless ``ON_DISCONNECT=cancel``. A ``cancel`` frame
stops a turn, on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from service.apikeys import ApiKeys
from service.auth import Principal
from service.errors import BadRequest, ServiceError, Unauthorized
from service.http import not_found
from service.logs import error_text
from service.metrics import RESUMES as RESUMES_TOTAL
from service.records import Status
from service.settings import Settings
from service.store import Store
from service.stream.branches import Branch
from service.stream.events import Delta, Done, Error, Event, Extra, Ping, Started
from service.stream.idempotency import (
    KEY_RULE,
    Admissions,
    branch_payload,
    chat_send_payload,
    valid_key,
)
from service.stream.live import LiveStream
from service.stream.mirror import Resumes
from service.stream.producer import TurnInput
from service.stream.registry import StreamRegistry

log = structlog.get_logger("service.ws")

PROTOCOL_VERSION = 2
MAX_ID_CHARS = 128
MAX_RAW_MESSAGE_CHARS = 200_000  # the producer enforces MAX_MESSAGE_CHARS after trimming
MAX_MODEL_CHARS = 100

CLOSE_TOKEN_EXPIRED = 4001  # also: the socket's API key was revoked
Frame = dict[str, Any]


class FrameError(Exception):
    """A client frame that is not valid protocol v2; answered with an ``invalid_frame`` error."""

    def __init__(self, message: str, turn_id: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.turn_id = turn_id
        self.field = field


@dataclass(frozen=True, slots=True)
class SendFrame:
    """A ``send``, or a ``regenerate`` / ``edit`` of a message of the chat (``branch``)."""

    id: str
    chat_id: str
    message: str | None  # None: a regenerate (it asks the question again)
    model: str | None
    key: str | None = None  # an idempotency key, as the HTTP routes' Idempotency-Key
    branch: Branch | None = None

    def payload(self) -> str:
        """The idempotency key's fingerprint: the SSE route's for the same turn."""
        if self.branch is None:
            assert self.message is not None
            return chat_send_payload(self.chat_id, self.message, self.model)
        return branch_payload(
            self.branch.kind, self.chat_id, self.branch.target, self.message, self.model
        )


@dataclass(frozen=True, slots=True)
class ResumeFrame:
    id: str
    message_id: str
    after: int


MAX_OFFSET = 10**9


def parse_frame(raw: str) -> Frame:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FrameError("frame is not valid JSON") from exc
    if not isinstance(data, dict):
        raise FrameError("frame must be a JSON object")
    if not isinstance(data.get("type"), str):
        raise FrameError("frame needs a string 'type'", _id_of(data), "type")
    return data


def _id_of(data: Frame) -> str | None:
    value = data.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS else None


def _turn_id(data: Frame) -> str:
    value = data.get("id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise FrameError(f"'id' must be a string of 1 to {MAX_ID_CHARS} characters", None, "id")
    return value


def _check_keys(data: Frame, allowed: set[str], turn_id: str | None) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise FrameError(f"unknown field '{extra[0]}'", turn_id, extra[0])


SEND_FIELDS = {
    "send": {"type", "id", "chat_id", "message", "model", "key"},
    "regenerate": {"type", "id", "chat_id", "message_id", "model", "key"},
    "edit": {"type", "id", "chat_id", "message_id", "message", "model", "key"},
}


def _uuid_field(data: Frame, name: str, turn_id: str) -> str:
    value = data.get(name)
    try:
        value = str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        value = None
    if value is None:
        raise FrameError(f"'{name}' must be a UUID string", turn_id, name)
    return value


def parse_send(data: Frame) -> SendFrame:
    """A ``send``, ``regenerate`` or ``edit`` frame (``data["type"]``, one of SEND_FIELDS)."""
    kind = data["type"]
    turn_id = _turn_id(data)
    _check_keys(data, SEND_FIELDS[kind], turn_id)
    chat_id = _uuid_field(data, "chat_id", turn_id)
    branch = None if kind == "send" else Branch(kind, _uuid_field(data, "message_id", turn_id))
    message = data.get("message")
    if kind != "regenerate" and (
        not isinstance(message, str) or len(message) > MAX_RAW_MESSAGE_CHARS
    ):
        raise FrameError("'message' must be a string", turn_id, "message")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS):
        raise FrameError(
            f"'model' must be a string of 1 to {MAX_MODEL_CHARS} characters", turn_id, "model"
        )
    key = data.get("key")
    if key is not None and not valid_key(key):
        raise FrameError(f"'key' must be {KEY_RULE}", turn_id, "key")
    return SendFrame(turn_id, chat_id, message, model, key, branch)


def parse_resume(data: Frame) -> ResumeFrame:
    turn_id = _turn_id(data)
    _check_keys(data, {"type", "id", "message_id", "after"}, turn_id)
    message_id = data.get("message_id")
    try:
        message_id = str(uuid.UUID(message_id)) if isinstance(message_id, str) else None
    except ValueError:
        message_id = None
    if message_id is None:
        raise FrameError("'message_id' must be a UUID string", turn_id, "message_id")
    after = data.get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_OFFSET:
        raise FrameError("'after' must be a whole number of characters", turn_id, "after")
    return ResumeFrame(turn_id, message_id, after)


def refusal_frame(turn_id: str | None, exc: ServiceError) -> Frame:
    """An ``error`` frame for a turn refused before it streamed (the HTTP error, as a frame)."""
    frame: Frame = {
        "type": "error",
        "id": turn_id,
        "code": exc.code,
        "message": exc.message,
        "status": exc.status,
    }
    if exc.details is not None:
        frame["details"] = exc.details
        if isinstance(exc.details, dict) and "retry_after_ms" in exc.details:
            frame["retry_after_ms"] = exc.details["retry_after_ms"]
    return frame


def event_frame(turn_id: str, event: Event) -> Frame:
    if isinstance(event, Delta):
        return {"type": "delta", "id": turn_id, "offset": event.offset, "text": event.text}
    if isinstance(event, Extra):  # the text, and the model's reasoning when there is some
        frame: Frame = {"type": "delta", "id": turn_id, "offset": event.offset, "text": event.text}
        if reasoning := event.reasoning():
            frame["reasoning"] = reasoning
        return frame
    if isinstance(event, Started):
        return {"type": "started", "id": turn_id, **event.data(), "offset": event.offset}
    if isinstance(event, Done):
        return {"type": "done", "id": turn_id, **event.data(), "offset": event.offset}
    return {**_final_error(turn_id, event), "offset": event.offset}


def _empty(event: Event | Ping) -> bool:
    """A step with neither text nor reasoning (a signed thinking block's signature, a tool
    call's arguments: this protocol has no field for them) is not sent: its offset moves
    nothing."""
    return isinstance(event, Extra) and not event.text and not event.reasoning()


def _final_error(turn_id: str, event: Error) -> Frame:
    final = event.final
    frame: Frame = {"type": "error", "id": turn_id, **event.data()}
    frame.setdefault("code", "cancelled" if final.status == Status.CANCELLED else "stream_failed")
    frame.setdefault("message", f"the turn was stopped ({final.reason})")
    return frame


@dataclass(slots=True)
class Slot:
    """One followed turn on this socket, from its ``send`` or ``resume`` to its terminal frame."""

    id: str
    task: asyncio.Task[None] | None = None
    live: LiveStream | None = None
    cancelled: bool = False  # the client sent ``cancel`` (maybe before the turn had started)
    reason: str | None = None  # why the socket stopped following it

    def stop(self, reason: str) -> None:
        """Stop following (the socket closes); the turn itself is the registry's to decide."""
        if self.reason is None:
            self.reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()


@dataclass(slots=True)
class Closing:
    code: int
    message: str
    reason: str  # the cancel reason given to the socket's turns
    flush: bool  # deliver the turns' terminal frames before closing
    task: asyncio.Task[None] | None = field(default=None)


@dataclass(frozen=True, slots=True)
class Services:
    """What a socket's turns need of the app."""

    admissions: Admissions  # starts a send's turn, or follows the one its key claimed
    registry: StreamRegistry
    resumes: Resumes
    store: Store
    settings: Settings
    api_keys: ApiKeys | None = None  # checks an API key's socket (revoked: closed)


class Connection:
    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        *,
        principal: Principal,
        services: Services,
    ) -> None:
        self.request = request
        self.ws = ws
        self.principal = principal
        self.services = services
        self.settings = services.settings
        self.id = uuid.uuid4().hex
        self.slots: dict[str, Slot] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue(services.settings.ws_send_queue)
        # The handler reads the next frame only while the queue is under half full; once it
        # has waited, the writer lets it go on at a quarter (``_room``, ``_write``).
        self.high = services.settings.ws_send_queue // 2
        self.low = services.settings.ws_send_queue // 4
        self.drained = asyncio.Event()
        self.closing: Closing | None = None
        self.broken = False
        self.turns_started = 0
        self._writer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._key_watch: asyncio.Task[None] | None = None
        self.log = log.bind(ws_id=self.id, user_id=principal.user_id, transport="ws")

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve the socket until it closes; every turn is stopped and awaited before returning."""
        loop = asyncio.get_running_loop()
        self._writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.id}")
        # Closed when an HTTP request with the same credentials would be refused, not before.
        ends = self.principal.accepted_until(self.settings.jwt_leeway_s)
        delay = max(0.0, ends - time.time())
        self._expiry = loop.call_later(delay, self._token_expired)
        if self.principal.key is not None and self.services.api_keys is not None:
            self._key_watch = asyncio.create_task(
                self._watch_key(self.principal.key.key_id), name=f"ws-key-{self.id}"
            )
        self.log.info("ws.connected", max_turns=self.settings.ws_max_turns_per_connection)
        self.send({"type": "ready", "v": PROTOCOL_VERSION, "max_turns": self._max_turns})
        try:
            await self._read()
        finally:
            self.close(WSCloseCode.OK, "", "client_disconnect", flush=False)
            closing = self.closing
            assert closing is not None and closing.task is not None
            try:
                # Shielded: if the handler is cancelled (peer gone) the slots still leave cleanly.
                watch = [self._key_watch] if self._key_watch is not None else []
                await asyncio.shield(
                    asyncio.gather(closing.task, *self.tasks, *watch, return_exceptions=True)
                )
            finally:
                self.log.info(
                    "ws.closed",
                    code=int(closing.code),  # what this side sent (or 1000 when the peer closed)
                    peer_code=self.ws.close_code,
                    reason=closing.reason,
                    turns=self.turns_started,
                )

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                if self.closing is None:
                    self._on_text(msg.data)
                    if self.queue.qsize() >= self.high:
                        await self._room()
            elif msg.type is WSMsgType.BINARY:
                self.close(
                    WSCloseCode.UNSUPPORTED_DATA,
                    "binary frames are not supported",
                    "protocol_error",
                )
            elif msg.type is WSMsgType.ERROR:
                # aiohttp has closed the socket already (1009 for an oversize frame).
                self.log.info("ws.protocol_error", error=str(msg.data))
                self.close(WSCloseCode.OK, "", "protocol_error", flush=False)
                return

    async def _room(self) -> None:
        """Before the next frame, until the writer has sent the queue down to a quarter: the
        frames a client sent together are all in aiohttp's buffer, and handling them without a
        pause would fill the queue with their replies before the writer could send one (a
        client that reads everything taken for a slow one). A socket that does not drain for
        STREAM_SEND_TIMEOUT_S is a slow client (1013), as when a turn's frames fill the queue."""
        self.drained.clear()
        try:
            async with asyncio.timeout(self.settings.stream_send_timeout_s):
                while self.queue.qsize() > self.low and self.closing is None and not self.broken:
                    await self.drained.wait()
                    self.drained.clear()
        except TimeoutError:
            self._slow_client()

    @property
    def _max_turns(self) -> int:
        return self.settings.ws_max_turns_per_connection

    async def _watch_key(self, key_id: str) -> None:
        """A socket opened with an API key is closed soon after the key's revocation (within
        ``API_KEY_CACHE_S`` or a second, whichever is longer, twice that at most), as a token's
        at its expiry; its turns go on."""
        assert self.services.api_keys is not None
        interval = max(self.services.api_keys.cache_s, 1.0)
        while self.closing is None:
            await asyncio.sleep(interval)
            try:
                await self.services.api_keys.check(key_id)
            except Unauthorized as exc:
                self.log.info("ws.key_refused", reason=exc.message)
                self.close(CLOSE_TOKEN_EXPIRED, f"{exc.message}; reconnect", "token_expired")
                return
            except ServiceError:  # MongoDB away: the key is checked again next round
                continue

    def _token_expired(self) -> None:
        self.log.info("ws.token_expired")
        self.close(CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a new one", "token_expired")

    def close(self, code: int, message: str, reason: str, *, flush: bool = True) -> None:
        """Start closing (once): stop following every turn (``reason``), send what is queued
        (``flush``), then close with ``code``."""
        if self.closing is not None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        if self._key_watch is not None and self._key_watch is not asyncio.current_task():
            self._key_watch.cancel()
        self.closing = Closing(code, message, reason, flush and not self.ws.closed)
        self.drained.set()  # a handler waiting for room goes back to reading (and ignoring)
        for slot in self.slots.values():
            slot.stop(reason)
        self.closing.task = asyncio.create_task(
            self._close(self.closing), name=f"ws-close-{self.id}"
        )

    async def _close(self, closing: Closing) -> None:
        timeout = self.settings.stream_send_timeout_s
        if closing.flush:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    if self.tasks:
                        await asyncio.wait(set(self.tasks))
                    await self.queue.join()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self.ws.closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.ws.close(code=closing.code, message=closing.message.encode())
        except TimeoutError:
            self.log.warning("ws.close_timeout", code=closing.code)
            transport = self.request.transport
            if transport is not None:
                transport.abort()

    # ------------------------------------------------------------------ sending
    def send(self, frame: Frame) -> bool:
        """Queue a frame for the writer; never waits. A full queue closes the socket (1013)."""
        if self.broken or (self.closing is not None and not self.closing.flush):
            return False
        try:
            self.queue.put_nowait(orjson.dumps(frame).decode())
        except asyncio.QueueFull:
            self._slow_client()
            return False
        return True

    def _slow_client(self) -> None:
        self.log.warning("ws.slow_client", queued=self.queue.qsize(), running_turns=len(self.slots))
        self.close(
            WSCloseCode.TRY_AGAIN_LATER,
            "slow_client: the send buffer is full",
            "slow_client",
            flush=False,
        )

    async def _write(self) -> None:
        """The one writer: frames leave in queue order, so each turn's events stay in order."""
        while True:
            text = await self.queue.get()
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                self.broken = True  # the peer is gone; the reader sees it and closes
                while not self.queue.empty():
                    self.queue.get_nowait()
                    self.queue.task_done()
            finally:
                self.queue.task_done()
                if self.queue.qsize() <= self.low:
                    self.drained.set()  # the handler may read on (``_room``)

    # ------------------------------------------------------------------ receiving
    def _on_text(self, raw: str) -> None:
        try:
            data = parse_frame(raw)
            kind = data["type"]
            if kind in SEND_FIELDS:  # send, regenerate, edit
                req = parse_send(data)
                self._open_slot(req.id, lambda slot: self._run_send(slot, req))
            elif kind == "resume":
                res = parse_resume(data)
                self._open_slot(res.id, lambda slot: self._run_resume(slot, res))
            elif kind == "cancel":
                turn_id = _turn_id(data)
                _check_keys(data, {"type", "id"}, turn_id)
                slot = self.slots.get(turn_id)
                if slot is not None:
                    self._cancel(slot)
            elif kind == "ping":
                _check_keys(data, {"type"}, None)
                self.send({"type": "pong"})
            else:
                raise FrameError(f"unknown frame type '{kind}'", _id_of(data), "type")
        except FrameError as exc:
            self.log.info("ws.invalid_frame", problem=exc.message, field=exc.field)
            frame: Frame = {
                "type": "error",
                "id": exc.turn_id,
                "code": "invalid_frame",
                "message": exc.message,
                "status": 400,
            }
            if exc.field is not None:
                frame["details"] = {"field": exc.field}
            self.send(frame)

    def _open_slot(self, turn_id: str, run: Callable[[Slot], Coroutine[Any, Any, None]]) -> None:
        if turn_id in self.slots:
            self.send(
                {
                    "type": "error",
                    "id": turn_id,
                    "code": "duplicate_id",
                    "message": "a turn with this id is already running on this connection",
                    "status": 409,
                }
            )
            return
        if len(self.slots) >= self._max_turns:
            self.send(
                {
                    "type": "error",
                    "id": turn_id,
                    "code": "too_many_turns",
                    "message": f"at most {self._max_turns} turns may run at once on a connection",
                    "status": 429,
                    "details": {"max_turns": self._max_turns},
                }
            )
            return
        slot = Slot(turn_id)
        self.slots[turn_id] = slot
        self.turns_started += 1
        task = asyncio.create_task(self._run_slot(slot, run), name=f"ws-turn-{self.id}-{turn_id}")
        slot.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _cancel(self, slot: Slot) -> None:
        """The client's ``cancel``: stop the turn itself, here or on the replica running it."""
        slot.cancelled = True
        live = slot.live
        if live is None:
            return  # still starting: stopped as soon as it has
        local = self.services.registry.streams.get(live.message_id)
        if local is not None:
            local.cancel("user_cancel")
        elif live.final is None and live.chat_id is not None:
            task = asyncio.create_task(self._cancel_elsewhere(live.chat_id, live.message_id))
            self.tasks.add(task)  # awaited with the socket's other tasks
            task.add_done_callback(self.tasks.discard)

    async def _push(self, turn_id: str, delta: Delta) -> bool:
        """A delta queued from the turn's task (the queue never waits; full, it closes)."""
        return self.send(event_frame(turn_id, delta))

    async def _cancel_elsewhere(self, chat_id: str, message_id: str) -> None:
        """Flag the turn in MongoDB: the replica running it stops it within WATCH_INTERVAL_S."""
        try:
            await self.services.store.request_cancel(self.principal.user_id, chat_id, message_id)
        except ServiceError as exc:
            self.log.warning(
                "ws.cancel_failed", code=exc.code, error=error_text(exc), message_id=message_id
            )

    # ------------------------------------------------------------------ one slot
    async def _run_slot(self, slot: Slot, run: Callable[[Slot], Coroutine[Any, Any, None]]) -> None:
        try:
            await run(slot)
        except ServiceError as exc:  # refused before it streamed (or a resume not found)
            self.send(refusal_frame(slot.id, exc))
        except Exception:  # one turn's bug must not take the socket down
            self.log.exception("ws.turn_failed", turn_id=slot.id)
            self.send(
                {
                    "type": "error",
                    "id": slot.id,
                    "code": "internal_error",
                    "message": "internal error; see the log",
                    "status": 500,
                }
            )
        finally:
            self.slots.pop(slot.id, None)

    async def _run_send(self, slot: Slot, req: SendFrame) -> None:
        admission = await self.services.admissions.admit(
            TurnInput(
                user_id=self.principal.user_id,
                api_key=self.principal.key,
                transport="ws",
                chat_id=req.chat_id,
                text=req.message,
                model=req.model,
                key=req.key,
                branch=req.branch,
            ),
            req.payload() if req.key else None,
        )
        await self._follow(slot, admission.live, 0, replayed=admission.replayed)

    async def _run_resume(self, slot: Slot, req: ResumeFrame) -> None:
        found = await self.services.resumes.find(self.principal.user_id, None, req.message_id)
        if found is None:
            raise not_found("message")
        live, source = found
        if req.after > live.length and (live.final is not None or source == "memory"):
            raise BadRequest(
                f"offset {req.after} is past the end of the answer ({live.length} characters)",
                code="invalid_offset",
                details={"length": live.length},
            )
        RESUMES_TOTAL.labels(source).inc()
        await self._follow(slot, live, req.after)

    async def _follow(
        self, slot: Slot, live: LiveStream, offset: int, *, replayed: bool = False
    ) -> None:
        slot.live = live
        if slot.cancelled:  # cancelled while it was starting
            self._cancel(slot)
        registry = self.services.registry
        follower = registry.follow(live, offset, "ws")
        follower.push = functools.partial(self._push, slot.id)
        try:
            async for event in follower:
                if isinstance(event, Ping) or _empty(event):
                    continue
                frame = event_frame(slot.id, event)
                if replayed and isinstance(event, Started):
                    frame["replayed"] = True  # a send whose key an earlier send claimed
                self.send(frame)
        finally:
            registry.leave(follower, slot.reason or "client_disconnect")


async def serve(
    request: web.Request,
    ws: web.WebSocketResponse,
    *,
    principal: Principal,
    services: Services,
    connections: set[Connection],
) -> None:
    """Run one prepared socket; registered in ``connections`` so shutdown can close it (1001)."""
    conn = Connection(request, ws, principal=principal, services=services)
    connections.add(conn)
    try:
        await conn.run()
    finally:
        connections.discard(conn)


async def close_all(registry: set[Connection], timeout_s: float) -> None:
    """on_shutdown: close every socket with 1001 GOING_AWAY; their turns stop as ``shutdown``."""
    conns = list(registry)
    for conn in conns:
        conn.close(WSCloseCode.GOING_AWAY, "server shutting down", "shutdown")
    tasks = [c.closing.task for c in conns if c.closing is not None and c.closing.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)

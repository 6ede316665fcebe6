"""Write a turn's events to a streaming HTTP response: what is already read goes out together.

The SSE and OpenAI transports differ only in how an event becomes bytes; this is their shared
write loop. Each step of the event generator is first run synchronously:

- when it completes without waiting (the upstream sent several chunks in one read, so the next
  delta is already decoded), its frame is kept and the next step runs;
- when it has to wait (for the upstream, or for MongoDB at the end of the turn), the frames kept
  so far are written in ONE write before the wait - never after it.

So a delta is never held back to batch it: it is written the moment the producer would otherwise
sit idle, together with the ones read in the same network read. At one delta per upstream read
this is exactly one write per delta, as before.

A write costs no timer unless it has to wait for the client (the send buffer is full); only then
does ``STREAM_SEND_TIMEOUT_S`` apply (``slow_client``). A failed or stalled write ends the stream
as before: the reason is set, the event generator is closed (the producer finalizes the turn as
cancelled, bills what was generated and closes the upstream request).
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from aiohttp import web

from service.keys import HEARTBEATS
from service.settings import Settings
from service.stream.events import Event
from service.stream.producer import Turn
from service.stream.registry import LiveStream
from service.transports.heartbeat import SSEResponse

MAX_BATCH_BYTES = 1 << 16  # a batch this big is written even if more is already read


async def stream_events(
    request: web.Request, turn: Turn, settings: Settings, encode: Callable[[Event], bytes]
) -> web.StreamResponse:
    """The ``text/event-stream`` response both SSE routes send: heartbeats, no caching or
    transformation by proxies, every event of ``turn`` through ``pump``, then a clean end."""
    resp = SSEResponse(allow_all_methods=True, send_timeout=settings.stream_send_timeout_s)
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    heartbeats = request.app[HEARTBEATS]  # ``: ping`` comments; SSE clients skip them
    try:
        await resp.prepare(request)
        heartbeats.add(resp)
        await pump(resp, turn, encode, settings.stream_send_timeout_s)
    finally:
        heartbeats.discard(resp)
        if resp.prepared:
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await resp.write_eof()
    return resp


async def pump(
    resp: web.StreamResponse,
    turn: Turn,
    encode: Callable[[Event], bytes],
    send_timeout_s: float,
) -> None:
    """Write every event of ``turn`` to the prepared ``resp``; close the events in the end."""
    events = turn.events()
    live = turn.live
    pending: list[bytes] = []
    size = 0
    try:
        while True:
            step = events.asend(None)
            try:
                waiting = step.send(None)
            except StopIteration as ready:  # already read: keep it, no wait involved
                pending.append(encode(ready.value))
                size += len(pending[-1])
                if size >= MAX_BATCH_BYTES:
                    await write(resp, b"".join(pending), send_timeout_s)
                    pending.clear()
                    size = 0
                continue
            except StopAsyncIteration:
                break
            if pending:  # the producer waits now: send what it has produced first
                await _write_while_waiting(
                    resp, b"".join(pending), send_timeout_s, live, step, waiting
                )
                pending.clear()
                size = 0
            try:  # (no event or frame kept in a local while the next one is awaited)
                pending.append(encode(await _resume(step, waiting)))
            except StopAsyncIteration:
                break
            size += len(pending[-1])
        if pending:
            await write(resp, b"".join(pending), send_timeout_s)
    except TimeoutError:
        live.cancel("slow_client")
    except (ConnectionResetError, RuntimeError):
        live.cancel("client_disconnect")  # RuntimeError: a write after the transport closed
    finally:
        await events.aclose()


async def write(resp: web.StreamResponse, data: bytes, timeout_s: float) -> None:
    """``resp.write(data)``; a timer only when the write has to wait for the client."""
    coro = resp.write(data)
    try:
        waiting = coro.send(None)
    except StopIteration:
        return  # written at once: the usual case
    async with asyncio.timeout(timeout_s):
        await _resume(coro, waiting)


async def _write_while_waiting(
    resp: web.StreamResponse,
    data: bytes,
    timeout_s: float,
    live: LiveStream,
    step: Coroutine[Any, Any, Event],
    waiting: Any,
) -> None:
    """Write while the producer's step is suspended (usually on its upstream read).

    A cancel aimed at that read (``user_cancel``, ``timeout``) must not land on this write: the
    stream is marked not-reading meanwhile, and a reason that arrived is delivered after it. If
    the write fails, the turn is stopped the way a cancel stops it (the reason set, the read
    cancelled) and the suspended step is run to its end, so the producer finalizes as usual.
    """
    reading, live.reading = live.reading, False
    try:
        await write(resp, data, timeout_s)
    except BaseException as exc:
        live.reading = reading
        live.cancel(_reason_of(exc))
        with contextlib.suppress(StopAsyncIteration, asyncio.CancelledError):
            await _resume(step, waiting)  # the producer absorbs our cancel and finalizes
        raise
    live.reading = reading
    if reading and live.reason is not None:
        live.cancel(live.reason)  # it came during the write: cancel the read now


def _reason_of(exc: BaseException) -> str:
    return "slow_client" if isinstance(exc, TimeoutError) else "client_disconnect"


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, Any, Any]:
    """Go on with a coroutine already run up to ``waiting`` (what it awaits), as ``await`` would.

    The awaited future is handed to the task as is, and whatever the task sends or throws in
    (its result, a cancellation) is passed on to the coroutine.
    """
    while True:
        try:
            sent = yield waiting
        except BaseException as exc:  # noqa: BLE001 - every throw goes on to the coroutine
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration as done:
                return done.value

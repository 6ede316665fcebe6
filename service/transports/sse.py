"""The SSE transport: each event as ``id:`` (sequence), ``event:`` (its name), one JSON ``data:``.

aiohttp-sse provides the response (headers, ``: ping`` heartbeats while the model thinks, POST
support). A failed or stalled write ends the stream: closing the event generator finalizes the
turn as cancelled (``client_disconnect`` / ``slow_client``) and closes the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from service.settings import Settings
from service.stream.producer import Turn


def frame(seq: int, name: str, data: object) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), orjson.dumps(data))


async def stream_turn(request: web.Request, turn: Turn, settings: Settings) -> web.StreamResponse:
    resp = EventSourceResponse(
        allow_all_methods=True,
        ping_interval=settings.sse_heartbeat_s,
        send_timeout=settings.stream_send_timeout_s,
    )
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    events = turn.events()
    try:
        await resp.prepare(request)
        seq = 0
        async for event in events:
            seq += 1
            async with asyncio.timeout(settings.stream_send_timeout_s):
                await resp.write(frame(seq, event.name, event.data()))
    except TimeoutError:
        turn.live.cancel("slow_client")
    except (ConnectionResetError, RuntimeError):
        turn.live.cancel("client_disconnect")  # RuntimeError: a write after the transport closed
    finally:
        await events.aclose()
        if resp.prepared:
            resp.stop_streaming()
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await resp.write_eof()
    return resp

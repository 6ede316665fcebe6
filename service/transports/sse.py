"""The SSE transport: each event as ``id:`` (sequence), ``event:`` (its name), one JSON ``data:``.

aiohttp-sse provides the response (headers, ``: ping`` heartbeats while the model thinks, POST
support). A failed or stalled write ends the stream: closing the event generator finalizes the
turn as cancelled (``client_disconnect`` / ``slow_client``) and closes the upstream request.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import web

from service.settings import Settings
from service.stream.events import Delta, Event
from service.stream.producer import Turn
from service.transports.pump import stream_events


def frame(seq: int, name: str, data: object) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), orjson.dumps(data))


def delta_frame(seq: int, text: str) -> bytes:
    """``frame(seq, "delta", {"text": text})``, without building the dict."""
    return b'id: %d\nevent: delta\ndata: {"text":%s}\n\n' % (seq, orjson.dumps(text))


class _Encoder:
    """Numbers the events of one stream (``id:``) as it encodes them."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq = 0

    def encode(self, event: Event) -> bytes:
        self.seq += 1
        if isinstance(event, Delta):
            return delta_frame(self.seq, event.text)
        return frame(self.seq, event.name, event.data())


def stream_turn(
    request: web.Request, turn: Turn, settings: Settings
) -> Coroutine[Any, Any, web.StreamResponse]:
    """The streamed response (no frame of its own while it streams: it returns the pump's)."""
    return stream_events(request, turn, settings, _Encoder().encode)

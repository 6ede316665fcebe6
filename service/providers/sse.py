"""An incremental decoder for ``text/event-stream`` bodies (the WHATWG event-stream format).

CR, LF and CRLF all end a line; an event is dispatched at a blank line; ``data:`` lines of one
event are joined with LF; comment lines (``:``) and other fields are ignored except ``event``.
An event larger than ``max_event_bytes`` is a protocol error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from service.errors import UpstreamError
from service.providers.base import log_upstream_body


@dataclass(slots=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEDecoder:
    __slots__ = ("_buf", "max_event_bytes")  # one per live stream: kept small

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = b""
        self.max_event_bytes = max_event_bytes

    def feed(self, data: bytes) -> list[SSEEvent]:
        return [e for e in map(self.event, self.blocks(data)) if e is not None]

    def finish(self) -> list[SSEEvent]:
        """At end of stream: dispatch what a final CR completes; drop an unterminated event."""
        return [e for e in map(self.event, self.ending()) if e is not None]

    def blocks(self, data: bytes) -> list[bytes]:
        """The events ``data`` completes, each as it came (its lines LF-separated): for a
        reader that recognises its usual events' bytes (``event`` reads any)."""
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            tail = b"\r" if buf.endswith(b"\r") else b""  # maybe the first half of a CRLF
            if tail:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        *blocks, rest = buf.split(b"\n\n")
        if len(rest) > self.max_event_bytes:
            raise UpstreamError("upstream_bad_response", "upstream event too large")
        self._buf = rest
        return blocks

    def ending(self) -> list[bytes]:
        """``blocks`` at end of stream."""
        buf, self._buf = self._buf.replace(b"\r", b"\n"), b""
        *blocks, _unterminated = buf.split(b"\n\n")
        return blocks

    def event(self, block: bytes) -> SSEEvent | None:
        """One of ``blocks`` read: None when it has no data (a comment, say)."""
        # The usual upstream event is one ``data: ...`` line: take it without the line loop.
        limit = self.max_event_bytes
        if block.startswith(b"data: ") and b"\n" not in block and len(block) <= limit:
            return SSEEvent(block[6:].decode("utf-8", errors="replace"))
        return self._parse(block)

    def _parse(self, block: bytes) -> SSEEvent | None:
        if len(block) > self.max_event_bytes:
            raise UpstreamError("upstream_bad_response", "upstream event too large")
        data: list[str] = []
        name = "message"
        for raw in block.split(b"\n"):
            if not raw or raw.startswith(b":"):
                continue
            field, _, value = raw.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value.decode("utf-8", errors="replace"))
            elif field == b"event":
                name = value.decode("utf-8", errors="replace")
        if not data:
            return None
        return SSEEvent("\n".join(data), name)


def load_frame(data: str, provider: str) -> dict[str, Any]:
    """An event's JSON object; a malformed frame or a vendor's ``{"error": ...}`` frame raises
    ``upstream_bad_response`` (the vendor's words go to the log, redacted, never to a client)."""
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("upstream_bad_response", "malformed upstream frame") from exc
    if not isinstance(frame, dict):
        raise UpstreamError("upstream_bad_response", "malformed upstream frame (not an object)")
    if "error" in frame:
        log_upstream_body(provider, None, data)
        raise UpstreamError("upstream_bad_response", "the upstream reported an error mid-stream")
    return frame

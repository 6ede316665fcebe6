"""The upstream SSE decoder follows the event-stream format, whatever the chunking."""

from __future__ import annotations

import pytest

from service.errors import UpstreamError
from service.providers.sse import SSEDecoder

STREAM = (
    b": keep-alive\n\n"
    b"data: one\n\n"
    b"event: error\ndata: two-a\ndata: two-b\n\n"
    b"id: 7\nretry: 10\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ("message", "one"),
    ("error", "two-a\ntwo-b"),
    ("message", "no-space"),
    ("message", "[DONE]"),
]


def decode(chunks: list[bytes]) -> list[tuple[str, str]]:
    decoder = SSEDecoder()
    events = [e for c in chunks for e in decoder.feed(c)] + decoder.finish()
    return [(e.event, e.data) for e in events]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_any_line_ending_and_any_split(newline: bytes, size: int):
    data = STREAM.replace(b"\n", newline)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert decode(chunks) == EXPECTED


def test_event_without_blank_line_at_eof_is_not_dispatched():
    decoder = SSEDecoder()
    decoder = SSEDecoder()
    events = decoder.feed(b"data: complete\n\ndata: cut")
    assert [e.data for e in events] == ["complete"]
    assert decoder.finish() == []


def test_oversized_event_is_rejected():
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(UpstreamError) as err:
        decoder.feed(b"data: " + b"x" * 100)
    assert err.value.code == "upstream_bad_response"

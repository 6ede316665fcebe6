"""A stream's plain text events are read exactly, however they are read: an event shaped as
the stream's last plain text event is read as its text alone (``service.providers.templates``),
the text of one network read's such events goes out as one chunk, and anything else is read
whole. For OpenAI-compatible streams (a template spans OpenAI's ``obfuscation`` padding) and
Anthropic's (a template spans the spaces Anthropic puts before an object's last brace).

The reference is each event read whole (``_parse``, ``Reader.whole``): the fast read must give
the same text, the same rich frames, usage, finish reasons and meta, and the same errors after
the same text."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from service.errors import UpstreamError
from service.providers import anthropic_stream
from service.providers.base import Chunk
from service.providers.openai import _Frames, _parse
from service.providers.sse import SSEDecoder
from tests import anthropic_recordings as rec
from tests.fake_openai import Script
from tests.openai_recordings import RECORDINGS

HEAD = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1764600000}
MIDDLE = '},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"'
TEXTS = ["lorem ", "é", '"', "\\", "\\u0041", MIDDLE, "\u2028𝄞", "", "a\nb", '"}]}', "x"]


def frame(delta: Any, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**HEAD, "model": "m", "choices": [choice], "usage": None, **extra}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return frame({"content": value}, **extra)


def compact(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


def spaced(body: dict[str, Any]) -> bytes:  # Python's json: spaces, non-ASCII as \u escapes
    return json.dumps(body).encode()


def padded(body: dict[str, Any]) -> bytes:  # OpenAI's obfuscation, a different length each
    return orjson.dumps({**body, "obfuscation": "Xq" * (len(str(body)) % 5)})


ENCODINGS: list[Callable[[dict[str, Any]], bytes]] = [compact, spaced, padded]

STREAMS = {
    "plain": [frame({"role": "assistant", "content": ""})] + [text(t) for t in TEXTS * 2],
    "same shape, other values": [
        text("a"),
        text("b"),
        frame({"content": "c"}, "stop"),  # a finish where the template has null
        text("d"),
        frame({"content": None}),
        frame({"content": "e", "tool_calls": [{"index": 0, "id": "t", "type": "function"}]}),
        text("f"),
        {**text("g"), "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
        text("h"),
    ],
    "the meta changes and changes back": [
        text("a", system_fingerprint="fp_1"),
        text("b", system_fingerprint="fp_1"),
        text("c", system_fingerprint="fp_2"),
        text("d", system_fingerprint="fp_1"),
        text("e", system_fingerprint="fp_1"),
    ],
    "another choice": [
        text("a"),
        text("b"),
        {**text("c"), "choices": [{"index": 1, "delta": {"content": "x"}, "finish_reason": None}]},
        text("d"),
    ],
    "padding of another type": [text("a"), text("b"), {**text("c"), "obfuscation": 7}, text("d")],
}
STREAMS.update({f"recorded {name}": list(frames) for name, (frames, _) in RECORDINGS.items()})


def whole(payloads: list[bytes]) -> list[Chunk]:
    """The reference: every frame parsed whole."""
    meta, chunks = None, []
    for payload in payloads:
        chunk = _parse(payload.decode("utf-8", errors="replace"), meta)
        meta = chunk.meta or meta
        chunks.append(chunk)
    return chunks


def fast(payloads: list[bytes], per_read: int) -> list[Chunk]:
    decoder, chunks = SSEDecoder(), []
    frames = _Frames(decoder)
    wire = [b"data: " + p + b"\n\n" for p in payloads]
    for i in range(0, len(wire), per_read):
        read, failure = frames.read(decoder.blocks(b"".join(wire[i : i + per_read])))
        assert failure is None
        chunks.extend(read)
    return chunks


def steps(chunks: list[Chunk]) -> list[Any]:
    """Plain text merged: the text between the steps that carry more than text, and those."""
    out: list[Any] = [""]
    for c in chunks:
        if (c.frame, c.usage, c.finish_reason, c.meta) == (None, None, None, None):
            out[-1] += c.text
        else:
            out.extend([(c.text, c.frame, c.usage, c.finish_reason, c.meta), ""])
    return out


def frames_with_text(chunks: list[Chunk]) -> int:
    return sum(c.frames for c in chunks if c.text or c.frame is not None)


@pytest.mark.parametrize("encode", ENCODINGS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("per_read", [1, 3, 100])
def test_the_fast_read_agrees_with_every_frame_parsed_whole(name, encode, per_read):
    payloads = [encode(body) for body in STREAMS[name]]
    reference = whole(payloads)
    read = fast(payloads, per_read)
    assert steps(read) == steps(reference)
    assert frames_with_text(read) == frames_with_text(reference)


@pytest.mark.parametrize("encode", ENCODINGS, ids=lambda f: f.__name__)
def test_one_reads_plain_frames_are_one_chunk_of_their_text(encode):
    payloads = [encode(text(t)) for t in ["a", "b", "c", "d", "e", "f"]]
    decoder = SSEDecoder()
    frames = _Frames(decoder)
    first, _ = frames.read(decoder.blocks(b"data: " + payloads[0] + b"\n\n"))
    assert [c.text for c in first] == ["a"] and frames.template is not None  # learnt from it
    rest = b"".join(b"data: " + p + b"\n\n" for p in payloads[1:])
    assert frames.read(decoder.blocks(rest)) == ([Chunk("bcdef", frames=5)], None)


@pytest.mark.parametrize(
    "bad",
    [
        b'{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1764600000,"model":"m","choices":[{"index":0,"delta":{"content":5},"logprobs":null,"finish_reason":null}],"usage":null}',
        b"{not json",
        b'{"error":{"message":"overloaded"}}',
    ],
    ids=["text slot not a string", "not json", "error frame"],
)
def test_a_bad_frame_in_a_read_comes_after_the_text_before_it(bad):
    wire = b"".join(b"data: " + compact(text(t)) + b"\n\n" for t in "abc") + b"data: " + bad
    decoder = SSEDecoder()
    got, failure = _Frames(decoder).read(decoder.blocks(wire + b"\n\n"))
    assert failure is not None and failure.code == "upstream_bad_response"
    assert "".join(c.text for c in got) == "abc"


def wire_whole(wire: bytes) -> tuple[list[Any], str | None]:
    """Every event parsed whole: the steps up to the first bad one, and its error."""
    meta, chunks = None, []
    for event in SSEDecoder().feed(wire):
        try:
            chunk = _parse(event.data, meta)
        except UpstreamError as exc:
            return steps(chunks), exc.code
        meta = chunk.meta or meta
        chunks.append(chunk)
    return steps(chunks), None


def wire_fast(wire: bytes) -> tuple[list[Any], str | None]:
    decoder = SSEDecoder()
    chunks, failure = _Frames(decoder).read(decoder.blocks(wire))
    return steps(chunks), failure and failure.code


# The head and tail of the template the first event teaches
SHAPE = (b"data: " + compact(text("x"))).split(b'"x"')
ODD_EVENTS = {
    "its text after a line break": SHAPE[0] + b'\n"y"' + SHAPE[1],
    "its text before a line break": SHAPE[0] + b'"y"\n' + SHAPE[1],
    "its text with spaces": SHAPE[0] + b' "y" ' + SHAPE[1],
    "a comment line first": b": hi\n" + SHAPE[0] + b'"y"' + SHAPE[1],
    "no space after data:": SHAPE[0].replace(b"data: ", b"data:") + b'"y"' + SHAPE[1],
    "an event name": b"event: x\n" + SHAPE[0] + b'"y"' + SHAPE[1],
    "two data lines": SHAPE[0] + b'"y"\ndata: ' + SHAPE[1],
    "a second text": SHAPE[0] + b'"y","content":"z"' + SHAPE[1],
    "a huge text": SHAPE[0] + b'"' + b"y" * 70_000 + b'"' + SHAPE[1],
}


@pytest.mark.parametrize("odd", ODD_EVENTS)
def test_an_event_of_another_form_is_read_as_a_whole_read_reads_it(odd):
    first = b"data: " + compact(text("x")) + b"\n\n"
    wire = first + ODD_EVENTS[odd] + b"\n\n" + first
    assert wire_fast(wire) == wire_whole(wire)


def test_an_event_over_the_limit_after_templated_texts_comes_after_them():
    first = b"data: " + compact(text("x")) + b"\n\n"
    decoder = SSEDecoder(max_event_bytes=len(first) + 20)
    frames = _Frames(decoder)
    assert frames.read(decoder.blocks(first))[0] == [Chunk("x")] and frames.template is not None
    wire = b"".join(b"data: " + compact(text(t)) + b"\n\n" for t in "ab")
    wire += b"data: " + compact(text("c" * 100)) + b"\n\n"
    chunks, failure = frames.read(decoder.blocks(wire))
    assert chunks == [Chunk("ab", frames=2)]
    assert failure is not None and failure.code == "upstream_bad_response"


def test_a_frame_with_a_byte_that_is_not_utf8_is_read_as_before():
    good = compact(text("ab"))
    bad = good.replace(b'"ab"', b'"a\xffb"')
    payloads = [good, bad, good]
    assert steps(fast(payloads, 3)) == steps(whole(payloads)) == ["ab" + "a\ufffdb" + "ab"]


# ------------------------------------------------------------------------------ Anthropic
ANTHROPIC = {
    name: getattr(rec, name)
    for name in (
        "TEXT", "THINKING", "THINKING_TOOL_USE", "REDACTED", "TOOL_USE",
        "TOOL_FOLLOW_UP", "CACHED", "MID_ERROR", "REFUSAL", "MAX_TOKENS",
    )
}  # fmt: skip
START = rec.start("msg_01X", rec.MODEL, rec.usage(21, 1))
ODD_TEXTS = [t for t in TEXTS if t] + ['"}}', '"}}   }', "\t"]
ANTHROPIC["odd texts and paddings"] = [
    START,
    rec.block_start(0, {"type": "text", "text": ""}),
    *(rec.text(0, t, pad) for i, t in enumerate(ODD_TEXTS) for pad in (0, i % 7, 13)),
    rec.text(0, "tab").replace(b"}}", b"}\t}"),  # other white space before the brace
    rec.text(1, "another block"),
    rec.delta(0, "thinking_delta", "thinking", "a thought in the text's shape"),
    rec.delta(0, "text_delta", "text", "x", 3).replace(b"text_delta", b"text_deltx"),
    rec.text(0, "back"),
    rec.block_stop(0),
    rec.message_delta("end_turn", rec.usage(21, 30)),
    rec.STOP,
    rec.text(0, "after the end"),
]  # fmt: skip


def anthropic_whole(events: list[bytes]) -> tuple[list[Any], str | None]:
    decoder = SSEDecoder()
    reader = anthropic_stream.Reader(decoder)
    chunks: list[Chunk] = []
    for event in decoder.feed(b"".join(events)):
        try:
            chunk = reader.whole(event)
        except UpstreamError as exc:
            return steps(chunks), exc.code
        if chunk is not None:
            chunks.append(chunk)
        if reader.ended:
            break
    return steps(chunks), None


def anthropic_fast(events: list[bytes], per_read: int) -> tuple[list[Any], str | None]:
    decoder = SSEDecoder()
    reader = anthropic_stream.Reader(decoder)
    chunks: list[Chunk] = []
    for i in range(0, len(events), per_read):
        read, failure = reader.read(decoder.blocks(b"".join(events[i : i + per_read])))
        chunks.extend(read)
        if failure is not None:
            return steps(chunks), failure.code
        if reader.ended:
            break
    return steps(chunks), None


@pytest.mark.parametrize("name", ANTHROPIC)
@pytest.mark.parametrize("per_read", [1, 3, 1000])
def test_anthropics_fast_read_agrees_with_every_event_read_whole(name, per_read):
    events = ANTHROPIC[name]
    assert anthropic_fast(events, per_read) == anthropic_whole(events)


def test_anthropics_text_deltas_padded_alike_or_not_are_one_chunk():
    decoder = SSEDecoder()
    reader = anthropic_stream.Reader(decoder)
    first, _ = reader.read(decoder.blocks(START + rec.text(0, "a", 10)))
    assert [c.text for c in first] == ["", "a"] and reader.template is not None  # the usage
    rest = rec.text(0, "b") + rec.text(0, "c", 3) + rec.PING + rec.text(0, "d", 12)
    assert reader.read(decoder.blocks(rest)) == (
        [Chunk("bc", frames=2), Chunk("d")],  # a ping between them is read whole: no text
        None,
    )


async def test_a_stream_read_at_once_is_relayed_whole_and_logged_frame_by_frame(
    stream_client, auth, fake_openai, logs
):
    words = [f"w{i} " for i in range(40)]
    fake_openai.default = Script(chunks=words, together=True)
    resp = await stream_client.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        headers=auth(),
    )
    assert resp.status == 200
    deltas = []
    async for line in resp.content:
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                deltas.append(choice["delta"].get("content") or "")
    assert "".join(deltas) == "".join(words)
    assert len([d for d in deltas if d]) < len(words)  # one read: fewer deltas than frames
    (ended,) = [e for e in logs if e["event"] == "stream.ended"]  # logged before the last frame
    assert ended["chunks"] == len(words) and ended["outcome"] == "completed"

"""A stream's plain text events read as their text alone (docs/performance.md, finding 28).

One plain text event of a stream differs from the next only in its text, and, depending on the
vendor, in its padding: OpenAI's ``obfuscation`` string, Anthropic's spaces before an object's
last brace. So once one has been read whole, an event of the same shape needs only its text
read. ``TextEvents`` reads a stream's events a network read at a time. An event that fits the
stream's ``Template`` is read as its text; the text of one read's consecutive such events is
one chunk. Any other event is read whole (``whole``), as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import ClassVar

import aiohttp
import orjson

from service.errors import UpstreamError
from service.providers.base import Chunk, error_for_exception
from service.providers.sse import SSEDecoder, SSEEvent

TRIES = 4  # a stream whose events vary in more than their text is read whole after this many
MAX_TEMPLATED = 1 << 16  # a larger event is read whole (so is one over the decoder's limit)
PROBE = b'"\\u0001"'
PROBE_TEXT = "\x01"
STRING = rb'("(?:[^"\\]|\\.)*")'


class Template:
    """A plain text event cut around its text. Its shape is ``head TEXT tail``, or ``head TEXT
    middle PAD tail`` with padding.
    - TEXT and PAD are each exactly one JSON string, with no white space around: so no line
      break, and the event stays an ``event:`` line and one ``data:`` line.
    - ``tail`` may have spaces before its last brace, as many as each event likes.

    An event of that shape is the same JSON as the one the template was cut from, with another
    text (and padding). So it is read as its TEXT alone. ``proven`` reads a probe of the shape
    whole, to show the cut is right."""

    __slots__ = ("head", "limit", "middle", "tail")  # one per live stream: kept small

    def __init__(self, head: bytes, middle: bytes | None, tail: bytes, limit: int) -> None:
        self.head, self.middle, self.tail = head, middle, tail  # ``tail`` without its last "}"
        self.limit = limit  # a larger event is read whole (where the decoder's limit applies)

    @classmethod
    def of(
        cls,
        block: bytes,
        text: str,
        key: re.Pattern[bytes],
        pad: re.Pattern[bytes] | None,
        limit: int,
    ) -> Template | None:
        """The template of ``block``, an event whose text is ``text``, found after ``key``
        (``pad``: its padding string, group 1), for events up to ``limit`` bytes; None when
        the event has no such shape."""
        lines = block.split(b"\n")
        if len(block) > limit or not block.endswith(b"}"):
            return None
        if not lines[-1].startswith(b"data: "):
            return None
        if len(lines) > 2 or (len(lines) == 2 and not lines[0].startswith(b"event: ")):
            return None
        data_at = len(block) - len(lines[-1])
        for token in {orjson.dumps(text), json.dumps(text).encode()}:  # UTF-8, or \u-escaped
            found = key.search(block, data_at)
            while found is not None and not block.startswith(token, found.end()):
                found = key.search(block, found.end())
            if found is None:
                continue
            head, rest = block[: found.end()], block[found.end() + len(token) : -1].rstrip(b" ")
            padding = pad.search(rest) if pad is not None else None
            if padding is None:
                return cls(head, None, rest, limit)
            return cls(head, rest[: padding.start(1)], rest[padding.end(1) :], limit)
        return None

    def proven(self, read: Callable[[bytes], Chunk | None]) -> bool:
        """A probe of the shape, ``read`` whole, is its text alone, and ``text`` cuts it so."""
        padding = b"" if self.middle is None else self.middle + PROBE
        probe = self.head + PROBE + padding + self.tail + b"}"
        try:
            chunk = read(probe)
        except (UpstreamError, UnicodeDecodeError):
            return False
        return chunk == Chunk(PROBE_TEXT) and self.text(probe) == PROBE_TEXT

    def text(self, block: bytes) -> str | None:
        """The event's text if it has the template's shape, else None."""
        head = self.head
        if not (block.startswith(head) and block.endswith(b"}")) or len(block) > self.limit:
            return None
        tail, last = self.tail, len(block) - 1
        if block.endswith(tail, 0, last):  # no spaces before the last brace, as the template
            end = last - len(tail)
        else:  # spaces before the last brace: JSON's white space, the same object
            core = block[:-1].rstrip(b" ")  # a prefix of ``block``: its offsets are block's
            if not core.endswith(tail):
                return None
            end = len(core) - len(tail)
        if self.middle is None:
            return _string(block[len(head) : end])
        cut = block.find(self.middle, len(head), end)
        if cut < 0 or _string(block[cut + len(self.middle) : end]) is None:
            return None
        return _string(block[len(head) : cut])


async def read_stream(
    resp: aiohttp.ClientResponse, events: TextEvents, cut: str
) -> AsyncIterator[Chunk]:
    """The chunks of one upstream stream, those one network read brought together
    (``Chunk.more`` on all but the last of them). A stream that closes before ``events`` is
    ``complete`` was cut (``cut`` says so). Closing the iterator closes the connection."""
    decoder = events.decoder
    chunks: Sequence[Chunk] = ()
    chunk: Chunk | None = None
    try:
        while data := await resp.content.readany():  # no iterator object kept per stream
            chunks, failure = events.read(decoder.blocks(data))
            last = len(chunks) - 1
            for i, chunk in enumerate(chunks):
                chunk.more = i < last
                yield chunk
            if failure is not None:  # after what came before it in this read
                raise failure
            data, chunks, chunk = b"", (), None  # not held while the next read waits
            if events.ended:
                return
        chunks, failure = events.read(decoder.ending())
        for chunk in chunks:
            yield chunk
        if failure is not None:
            raise failure
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise error_for_exception(exc) from exc
    finally:
        resp.close()
    if not events.complete():
        raise UpstreamError("upstream_bad_response", cut)


class TextEvents:
    """One stream's events, read a network read at a time (``read``). Each provider says where
    a text is (``key``, ``pad``) and how to read any event whole (``whole``, ``probe``), and
    when its stream is complete."""

    __slots__ = ("_tries", "decoder", "ended", "template")
    key: ClassVar[re.Pattern[bytes]]
    pad: ClassVar[re.Pattern[bytes] | None] = None

    def __init__(self, decoder: SSEDecoder) -> None:
        self.decoder = decoder
        self.template: Template | None = None
        self.ended = False  # nothing after the event that ended the stream is read
        self._tries = TRIES

    def complete(self) -> bool:
        """The stream may close now without being cut."""
        raise NotImplementedError

    def whole(self, event: SSEEvent) -> Chunk | None:
        """Read an event whole, as the stream's state goes (may set ``ended``, drop the
        template, raise ``UpstreamError``)."""
        raise NotImplementedError

    def probe(self, event: SSEEvent) -> Chunk | None:
        """Read an event whole without changing the stream's state."""
        raise NotImplementedError

    def read(self, blocks: list[bytes]) -> tuple[list[Chunk], UpstreamError | None]:
        """The chunks of ``SSEDecoder.blocks``; a bad event ends them, with its error."""
        chunks: list[Chunk] = []
        texts: list[str] = []
        for block in blocks:
            template = self.template
            if template is not None and (text := template.text(block)) is not None:
                if text:
                    texts.append(text)
                continue
            if texts:
                chunks.append(Chunk("".join(texts), frames=len(texts)))
                texts = []
            try:
                event = self.decoder.event(block)
                chunk = None if event is None else self.whole(event)
            except UpstreamError as exc:
                return chunks, exc
            if chunk is not None:
                if self._tries and chunk.text and chunk == Chunk(chunk.text):  # plain text
                    self._learn(block, chunk.text)
                chunks.append(chunk)
            if self.ended:
                return chunks, None
        if texts:
            chunks.append(Chunk("".join(texts), frames=len(texts)))
        return chunks, None

    def _learn(self, block: bytes, text: str) -> None:
        self._tries -= 1
        limit = min(MAX_TEMPLATED, self.decoder.max_event_bytes)
        learnt = Template.of(block, text, self.key, self.pad, limit)
        self.template = learnt if learnt and learnt.proven(self._probe) else None

    def _probe(self, block: bytes) -> Chunk | None:
        event = self.decoder.event(block)
        return None if event is None else self.probe(event)


def _string(token: bytes) -> str | None:
    """``token`` as the JSON string it is exactly, else None."""
    if not (token.startswith(b'"') and token.endswith(b'"')):
        return None
    try:
        value = orjson.loads(token)
    except orjson.JSONDecodeError:
        return None
    return value if type(value) is str else None

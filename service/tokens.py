"""Token counting: a local BPE tokenizer that works offline, and a conservative estimate.

Order of preference for a turn's numbers: what the upstream reports (``source="upstream"``), the
local tokenizer for OpenAI-family encodings (``"tokenizer"``), the character estimate as the last
resort (``"estimate"``). ``bpe-openai`` ships its encodings inside the wheel; loading one takes
about half a second, so it happens once per process, off the event loop.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import bpe_openai
import orjson

DEFAULT_ENCODING = "o200k_base"
# OpenAI chat format: every message costs a few tokens of framing, the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3
# A picture the upstream does not count for us: what OpenAI bills a 1024x1024 image at high
# detail (a low-detail one costs 85; the budget errs on the high side, settled exactly after).
IMAGE_TOKENS = 765
# At most this many characters go to the encoder at once: fewer than its limit of 200,000
# tokens per input whatever the text (a token is at least one character).
SLICE_CHARS = 100_000
# A chat's history is counted again at each of its turns: the counts of the texts counted with
# ``remember`` are kept (by the text, so an equal text read again from MongoDB is found too),
# up to this many texts and characters, the least recently used forgotten first.
REMEMBERED_TEXTS = 8192
REMEMBERED_CHARS = 4_000_000
_SPECIAL = re.compile(r"[^\w]", re.UNICODE)


@functools.cache
def load_encoding(name: str) -> Any:
    return bpe_openai.get_encoding(name)


def estimate_tokens(text: str) -> int:
    """A conservative estimate (overcounting is safer for a budget than undercounting):
    length/4, +2% per special (non-word) character, +3% buffer.

    The special-character factor is capped at 1.5: uncapped it grows without bound on long texts.
    """
    if not text:
        return 0
    base = math.ceil(len(text) / 4)
    special = min(1.0 + 0.02 * len(_SPECIAL.findall(text)), 1.5)
    return math.ceil(base * special * 1.03)


class TokenCounter:
    """Counts with one encoding; ``None`` means "no tokenizer for this model": estimate."""

    def __init__(self, encoding: str | None = DEFAULT_ENCODING) -> None:
        self._enc = load_encoding(encoding) if encoding else None
        self.source = "tokenizer" if self._enc is not None else "estimate"
        self._remembered: dict[str, int] = {}  # text: its count, least recently used first
        self._remembered_chars = 0

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._enc is None:
            return estimate_tokens(text)
        if len(text) <= SLICE_CHARS:
            return len(self._enc.encode(text))
        # The encoder refuses one input of more than 200,000 tokens: count a long text in
        # slices (the few tokens a cut splits in two count twice: a bill never rounds down).
        return sum(
            len(self._enc.encode(text[i : i + SLICE_CHARS]))
            for i in range(0, len(text), SLICE_CHARS)
        )

    def count_remembered(self, text: str) -> int:
        """``count``, kept for the next time (a stored chat's history, counted at every turn)."""
        remembered = self._remembered
        n = remembered.pop(text, None)
        if n is None:
            n = self.count(text)
            if len(text) > REMEMBERED_CHARS // 8:  # a rare giant: not worth what it evicts
                return n
            self._remembered_chars += len(text)
            while remembered and (
                len(remembered) >= REMEMBERED_TEXTS or self._remembered_chars > REMEMBERED_CHARS
            ):
                oldest = next(iter(remembered))
                del remembered[oldest]
                self._remembered_chars -= len(oldest)
        remembered[text] = n  # the most recently used, last
        return n

    @functools.lru_cache(maxsize=64)  # noqa: B019 - the system prompt, and a few others, repeat
    def count_cached(self, text: str) -> int:
        return self.count(text)

    def count_messages(
        self, messages: Sequence[dict[str, Any]], *, cached_first: bool = True
    ) -> int:
        total = REPLY_PRIMING
        for i, msg in enumerate(messages):
            content = msg.get("content")
            if cached_first and i == 0 and isinstance(content, str) and len(msg) <= 2:
                total += TOKENS_PER_MESSAGE + self.count_cached(content)  # the system prompt
            else:
                total += self.count_message(msg)
        return total

    def count_message(self, msg: dict[str, Any], *, remember: bool = False) -> int:
        """One message with its framing: its text, ``IMAGE_TOKENS`` a picture, and the JSON of
        whatever else it carries (tool calls, a tool call's id, a name). ``remember``: its text's
        count is kept for the next time (``count_remembered``)."""
        content = msg.get("content")
        if isinstance(content, str) and len(msg) <= 2:  # role + text: the common case
            count = self.count_remembered if remember else self.count
            return TOKENS_PER_MESSAGE + count(content)
        n = TOKENS_PER_MESSAGE
        if isinstance(content, str):
            n += self.count(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    n += self.count(part["text"])
                elif part.get("type") == "image_url":
                    n += IMAGE_TOKENS
                else:
                    n += self.count(orjson.dumps(part).decode())
        rest = {k: v for k, v in msg.items() if k not in ("role", "content") and v is not None}
        if rest:
            n += self.count(orjson.dumps(rest).decode())
        return n

"""The built-in offline demo model: real-looking Markdown answers at a realistic pace, no network.

It is named ``demo`` everywhere it appears, so nobody mistakes it for a real model. It honours
``max_tokens`` (finishing with ``length`` and billing exactly ``max_tokens`` then) and reports
exact usage, as a real upstream would.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator

from service.providers.base import Chunk, CompletionRequest, Message, Usage, first_unsupported
from service.tokens import TokenCounter

ANSWERS = (
    "Here is a short overview.\n\n1. **Start small**: pick one concrete goal.\n"
    "2. **Measure**: decide how you will know it worked.\n3. **Iterate**: change one thing at "
    "a time and compare.\n\nIf you tell me more about your situation, I can be more specific.",
    "Good question. The short answer is *it depends on the trade-off you care about*.\n\n"
    "- If latency matters most, keep the path short and avoid extra round trips.\n"
    "- If cost matters most, batch work and cache what repeats.\n"
    "- If correctness matters most, make every step observable and testable.\n\n"
    "Most real systems need a balance of all three.",
    "Let me think about that step by step.\n\nFirst, restate the problem in your own words. "
    "Second, list what you already know and what is missing. Third, try the simplest thing "
    "that could work, then look at where it falls short.\n\n> A good plan today beats a "
    "perfect plan tomorrow.\n\nWant me to walk through an example?",
)
DEMO_OPTIONS = frozenset({"seed", "user", "metadata"})
_WORDS = re.compile(r"\S+\s*|\s+")


class DemoProvider:
    name = "demo"

    def __init__(self, counter: TokenCounter, *, delay_s: float) -> None:
        self._counter = counter
        self._delay = delay_s

    def answer_for(self, messages: list[Message]) -> str:
        content = messages[-1].get("content") if messages else ""
        question = content if isinstance(content, str) else ""
        pick = hashlib.sha256(question.encode()).digest()[0] % len(ANSWERS)
        topic = " ".join(question.split()[:8])
        return f"(demo model) You asked: “{topic}”.\n\n{ANSWERS[pick]}"

    async def open(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        return self._stream(request)

    async def list_models(self) -> set[str] | None:
        return None  # built in: always live

    async def count_prompt(self, request: CompletionRequest) -> int | None:
        return None

    def unsupported(self, request: CompletionRequest) -> str | None:
        """Text in, text out: no tools, images or structured output. ``seed`` is honoured
        (its answers are deterministic anyway), ``user`` and ``metadata`` only label."""
        return first_unsupported(request, DEMO_OPTIONS)

    async def _stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        """Word by word until ``max_tokens``. A length stop bills ``max_tokens`` exactly, as a
        real model's does: the word that does not fit is cut to the tokens left."""
        count = self._counter.count
        prompt = self._counter.count_messages(request.messages)
        text = ""
        for piece in _WORDS.findall(self.answer_for(request.messages)):
            if count(text + piece) > request.max_tokens:
                cut = self._fit(text, piece, request.max_tokens)
                if cut:
                    yield Chunk(text=cut)
                yield Chunk(finish_reason="length", usage=Usage(prompt, request.max_tokens))
                return
            if self._delay:
                await asyncio.sleep(self._delay)
            text += piece
            yield Chunk(text=piece)
        yield Chunk(finish_reason="stop", usage=Usage(prompt, count(text)))

    def _fit(self, text: str, piece: str, tokens: int) -> str:
        """A start of ``piece`` that ``text`` can take within ``tokens``, one character more
        being too many: by halves, a count each (the piece can be a prompt's word of
        thousands of characters, and a count per character held the loop for seconds)."""
        fits, over = 0, len(piece)  # the whole piece is too many (the caller's count)
        while over - fits > 1:
            mid = (fits + over) // 2
            if self._counter.count(text + piece[:mid]) <= tokens:
                fits = mid
            else:
                over = mid
        return piece[:fits]

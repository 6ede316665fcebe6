"""Search of one user's chats: the words of a query, how well a text matches them, and a snippet
with the matches marked.

The store finds the candidates (its text index, or a scan where the server has none); the
ranking, the snippets and the highlights are computed here, the same way for both, so the order
a user sees does not depend on which MongoDB serves them:

- score: 10 for each distinct query word a text holds, plus its occurrences (at most 5 counted
  per word), plus 5 when it holds the whole query as typed; a chat's title counts double (it
  names the whole chat). Ties go to the newest.
- snippet: about ``SNIPPET_CHARS`` characters around the first match, cut at spaces, with "…"
  where text was left out, whitespace collapsed and Markdown's marks left out (``**``, `` ` ``,
  heading and list markers, table bars, code fences: answers are Markdown, a snippet is text);
  ``highlights`` are ``[start, end)`` offsets of every match in the snippet, in characters
  (code points), as every offset in this API.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.errors import BadRequest

MAX_TERMS = 8
MAX_TERM_CHARS = 64
SNIPPET_CHARS = 160
CONTEXT_BEFORE = 50  # characters of text shown before the first match
MAX_COUNTED = 5  # occurrences of one word that add to the score
TITLE_WEIGHT = 2

_WORD = re.compile(r"\w+")
# Markdown's marks, not its text: emphasis, code spans, headings, quotes, list markers (left
# out), code fences and table bars (a space), links (their text). A lone * or _ inside a word
# (a*b, snake_case) stays.
_MARKS = re.compile(
    r"\*\*|__|`(?!``)|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)"
    r"|^[ \t]*(?:#{1,6}[ \t]+|>[ \t]?|[-*+][ \t]+|\d+[.)][ \t]+)",
    re.M,
)
_BREAKS = re.compile(r"```[^\n]*|^[ \t]*\|?[ \t]*:?-{3,}.*$|\|", re.M)
_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\s]*\)")


def plain(text: str) -> str:
    """``text`` without its Markdown marks (for a snippet)."""
    return _MARKS.sub("", _BREAKS.sub(" ", _LINK.sub(r"\1", text)))


@dataclass(frozen=True, slots=True)
class Query:
    text: str  # as typed, whitespace collapsed
    terms: tuple[str, ...]  # its distinct words, lower case
    pattern: re.Pattern[str]  # any of them, case-insensitive

    @classmethod
    def parse(cls, raw: str) -> Query:
        text = " ".join(raw.split())
        terms: list[str] = []
        for word in _WORD.findall(text):  # words first: "İ" lowercases to "i" and a combining
            low = word.lower()  # dot, which would cut the word in two ("i", "stanbul")
            term = low if len(low) == len(word) else word  # as sent: the match ignores case
            if term not in terms and len(terms) < MAX_TERMS:
                terms.append(term[:MAX_TERM_CHARS])
        if not terms:
            raise BadRequest(
                "the search needs at least one word (letters or digits)",
                code="invalid_query",
                details={"field": "q"},
            )
        longest_first = sorted(terms, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(t) for t in longest_first), re.IGNORECASE)
        return cls(text=text, terms=tuple(terms), pattern=pattern)

    def score(self, text: str) -> int:
        counts: dict[str, int] = {}
        for match in self.pattern.finditer(text):
            word = match.group().lower()
            counts[word] = counts.get(word, 0) + 1
        if not counts:
            return 0
        whole = 5 if len(self.terms) > 1 and self.text.lower() in text.lower() else 0
        return 10 * len(counts) + sum(min(n, MAX_COUNTED) for n in counts.values()) + whole


@dataclass(frozen=True, slots=True)
class Snippet:
    text: str
    highlights: list[tuple[int, int]]


def snippet(query: Query, markdown: str) -> Snippet:
    """The part of ``markdown`` around its first match, as text, with every match marked."""
    text = plain(markdown)
    first = query.pattern.search(text)
    start = 0 if first is None else max(0, first.start() - CONTEXT_BEFORE)
    if start:
        space = text.find(" ", start, first.start() if first else start)
        start = space + 1 if space != -1 else start
    end = min(len(text), start + SNIPPET_CHARS)
    if end < len(text):
        space = text.rfind(" ", start + SNIPPET_CHARS // 2, end)
        end = space if space != -1 else end
    body = " ".join(text[start:end].split())
    shown = ("…" if start else "") + body + ("…" if end < len(text) else "")
    marks = [(m.start(), m.end()) for m in query.pattern.finditer(shown)]
    return Snippet(shown, marks)


@dataclass(frozen=True, slots=True)
class Hit:
    kind: str  # "chat" (its title matched) or "message"
    chat: dict[str, Any]
    at: datetime
    score: int
    snippet: Snippet
    message: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "chat_id": self.chat["_id"],
            "chat_title": self.chat.get("title"),
            "created_at": self.at,
            "score": self.score,
            "snippet": self.snippet.text,
            "highlights": [list(span) for span in self.snippet.highlights],
        }
        if self.message is not None:
            out["message_id"] = self.message["_id"]
            out["role"] = self.message["role"]
        return out


def rank(query: Query, chats: list[dict[str, Any]], messages: list[dict[str, Any]]) -> list[Hit]:
    """Every chat whose title matches and every message that matches, best first."""
    by_id = {c["_id"]: c for c in chats}
    hits: list[Hit] = []
    for chat in chats:
        title = chat.get("title") or ""
        score = query.score(title) * TITLE_WEIGHT
        if score:
            hits.append(Hit("chat", chat, chat["updated_at"], score, snippet(query, title)))
    for msg in messages:
        content = msg.get("content")
        owner = by_id.get(msg.get("chat_id"))
        if not isinstance(content, str) or owner is None:
            continue
        # A text index may match what the words do not (it ignores diacritics): still a hit.
        score = max(query.score(content), 1)
        hits.append(Hit("message", owner, msg["created_at"], score, snippet(query, content), msg))
    hits.sort(key=lambda h: (h.score, h.at), reverse=True)
    return hits

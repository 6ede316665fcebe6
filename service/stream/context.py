"""A turn's prompt: the system prompt, recent history (partials marked), the new message."""

from __future__ import annotations

from service.store import Doc
from service.tokens import TOKENS_PER_MESSAGE, TokenCounter

PARTIAL_STATUSES = frozenset({"cancelled", "failed", "interrupted"})
PARTIAL_MARK = "\n\n[this answer was cut off before it finished]"


def history_messages(docs: list[Doc]) -> list[dict[str, str]]:
    out = []
    for doc in docs:
        content = doc.get("content") or ""
        if not content:
            continue
        if doc["role"] == "assistant" and doc.get("status") in PARTIAL_STATUSES:
            content += PARTIAL_MARK
        out.append({"role": doc["role"], "content": content})
    return out


def fit_to_window(
    system: list[dict[str, str]],
    history: list[dict[str, str]],
    tail: list[dict[str, str]],
    counter: TokenCounter,
    budget_tokens: int,
) -> list[dict[str, str]]:
    """Drop the oldest history messages until the prompt fits ``budget_tokens``."""
    costs = [TOKENS_PER_MESSAGE + counter.count(m["content"]) for m in history]
    fixed = counter.count_messages([*system, *tail])
    total = fixed + sum(costs)
    start = 0
    while total > budget_tokens and start < len(history):
        total -= costs[start]
        start += 1
    return [*system, *history[start:], *tail]

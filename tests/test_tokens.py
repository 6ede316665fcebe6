"""Token counting never fails a turn: the encoder refuses one input of over 200,000 tokens, so a
long text is counted in slices (a turn of 2,000,000 characters once lost its final record)."""

from __future__ import annotations

from service import tokens
from service.stream.context import fit_to_window
from service.tokens import SLICE_CHARS, TokenCounter


def test_a_text_of_any_length_is_counted():
    counter = TokenCounter()
    piece = "é" * 4000 + " word"
    text = piece * 500  # about 2 million characters, well over 200,000 tokens
    assert len(text) > 10 * SLICE_CHARS
    n = counter.count(text)
    exact_part = counter.count(text[:SLICE_CHARS])
    slices = -(-len(text) // SLICE_CHARS)
    assert exact_part * (slices - 1) <= n <= exact_part * slices + slices


def test_short_texts_are_counted_exactly():
    counter = TokenCounter()
    assert counter.count("hello world") == 2
    assert counter.count("") == 0


def test_remembered_counts_are_the_counts_and_stay_bounded(monkeypatch):
    """A stored chat's history is counted at every turn: its texts' counts are kept, least
    recently used forgotten first, within a number of texts and of characters."""
    monkeypatch.setattr(tokens, "REMEMBERED_TEXTS", 4)
    counter = TokenCounter()
    texts = [f"message number {i}, with some words" for i in range(10)]  # 33 characters each
    for text in texts[:6]:
        assert counter.count_remembered(text) == counter.count(text)
    assert list(counter._remembered) == texts[2:6]  # at most 4 texts
    counter.count_remembered(texts[3])  # used again: the most recent
    counter.count_remembered(texts[0])
    assert list(counter._remembered) == [texts[4], texts[5], texts[3], texts[0]]

    monkeypatch.setattr(tokens, "REMEMBERED_TEXTS", 100)
    monkeypatch.setattr(tokens, "REMEMBERED_CHARS", 300)
    counter = TokenCounter()
    for text in texts:
        counter.count_remembered(text)
    assert list(counter._remembered) == texts[1:]  # 9 x 33 characters fit in 300, not 10
    assert counter._remembered_chars == sum(map(len, counter._remembered)) == 297
    giant = "word " * 10  # over an eighth of the characters' bound: counted, not kept
    assert counter.count_remembered(giant) == counter.count(giant)
    assert giant not in counter._remembered and counter._remembered_chars == 297


def test_the_window_s_total_is_the_prompt_s_count():
    """``fit_to_window`` counts the prompt it returns exactly as ``count_messages`` would (the
    turn's prompt tokens come from it), trimmed or not, a tool result skipped at the start."""
    counter = TokenCounter()
    system = [{"role": "system", "content": "You are helpful."}]
    tail = [{"role": "user", "content": "And now?"}]
    history = [
        {"role": "user", "content": "What is the weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 degrees " * 5},
        {"role": "assistant", "content": "It is sunny."},
    ]
    whole = counter.count_messages([*system, *history, *tail])
    for budget in (whole, whole - 1, whole - 30, 0):
        messages, total = fit_to_window(system, history, tail, counter, budget)
        assert total == counter.count_messages(messages)
        if budget == whole:
            assert messages == [*system, *history, *tail]
    messages, _ = fit_to_window(system, history, tail, counter, whole - 30)
    assert messages[1]["role"] != "tool"

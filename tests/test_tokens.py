"""Token counting never fails a turn: the encoder refuses one input of over 200,000 tokens, so a
long text is counted in slices (a turn of 2,000,000 characters once lost its final record)."""

from __future__ import annotations

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

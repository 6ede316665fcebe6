"""The Anthropic route's two translations, without a server: a Messages request into the one
internal representation (OpenAI-shaped messages and options, with Anthropic's own details kept
for a provider that speaks Anthropic), and a turn's OpenAI-shaped steps into content blocks
(what a native provider adds: thinking signatures, redacted thinking)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.api.anthropic_request import MessagesRequest, Translation, effort, parse
from service.errors import BadRequest
from service.limits import Allowance, anthropic_rate_limit_headers, rfc3339
from service.providers.anthropic_request import NativeFields
from service.stream.events import Delta, Done, Extra, Final, Started
from service.transports.anthropic_events import Accumulator, Blocks, EventEncoder, usage_of

PNG = "iVBORw0KGgo="
REQUEST: dict[str, Any] = {
    "model": "m",
    "max_tokens": 4000,
    "system": [
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Answer in French."},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in it?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.test/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Look closer.", "signature": "sig-1"},
                {"type": "text", "text": "Let me zoom."},
                {"type": "tool_use", "id": "toolu_1", "name": "zoom", "input": {"x": 1}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "no such image",
                    "is_error": True,
                },
                {"type": "text", "text": "Try again."},
            ],
        },
    ],
    "tools": [
        {
            "name": "zoom",
            "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral"},
        }
    ],
    "thinking": {"type": "enabled", "budget_tokens": 3000},
    "top_k": 40,
    "metadata": {"user_id": "u-1"},
}


def translated(native: bool, **changes: Any) -> Translation:
    data = {**REQUEST, **changes}
    return Translation(parse(MessagesRequest, data), data, native=native)


def test_a_request_in_openais_shape_for_an_openai_compatible_provider():
    t = translated(False, top_k=None)
    assert t.messages == [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Answer in French."},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in it?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me zoom.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "zoom", "arguments": '{"x":1}'},
                }
            ],
            "reasoning_content": "Look closer.",
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "no such image"},
        {"role": "user", "content": "Try again."},
    ]
    assert t.options == {
        "tools": [
            {"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}
        ],
        "reasoning_effort": "high",
        "user": "u-1",
    }


def test_a_native_provider_gets_anthropics_own_details():
    t = translated(True, speed="fast")
    system, _, assistant, tool, _ = t.messages
    assert system["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert assistant["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Look closer.", "signature": "sig-1"}
    ]
    assert "reasoning_content" not in assistant
    assert tool["is_error"] is True
    assert t.options["thinking"] == REQUEST["thinking"]
    assert t.options["top_k"] == 40
    # the fields this route does not know, as written, in the one container the provider
    # sends on unchecked (a JSON value never is a NativeFields)
    assert t.options["anthropic_fields"] == {"speed": "fast"}
    assert isinstance(t.options["anthropic_fields"], NativeFields)
    assert "speed" not in t.options
    assert t.options["tools"][0]["cache_control"] == {"type": "ephemeral"}
    assert "reasoning_effort" not in t.options


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({}, "top_k"),
        ({"top_k": None, "speed": "fast"}, "speed"),
        ({"top_k": None, "stop_sequences": ["1", "2", "3", "4", "5"]}, "stop_sequences"),
    ],
)
def test_what_openais_shape_cannot_carry_is_refused_by_name(changes, param):
    def translate_and_stop() -> None:
        translated(False, **changes).stop()

    with pytest.raises(BadRequest) as info:
        translate_and_stop()
    assert info.value.code == "unsupported_parameter"
    assert info.value.details["param"] == param


def test_a_providers_refusal_is_named_as_the_client_named_it():
    t = translated(False, top_k=None)
    assert t.anthropic_param("messages[1].content[1]") == "messages.0.content.1"
    assert t.anthropic_param("messages[2].reasoning_content") == "messages.1"
    assert t.anthropic_param("messages[3].role") == "messages.2.content.0"
    assert t.anthropic_param("messages[4].content[0]") == "messages.2.content.1"
    assert t.anthropic_param("messages[4].name") == "messages.2"
    assert t.anthropic_param("messages[0].content[1]") == "system.1"
    assert t.anthropic_param("reasoning_effort") == "thinking"
    assert t.anthropic_param("parallel_tool_calls") == "tool_choice.disable_parallel_tool_use"


@pytest.mark.parametrize(
    ("budget", "name"), [(1024, "low"), (2000, "medium"), (2048, "medium"), (64_000, "high")]
)
def test_the_thinking_budget_as_an_effort(budget, name):
    assert effort(budget) == name


# --------------------------------------------------------------------------- the answer
def final(**kw: Any) -> Final:
    values: dict[str, Any] = {
        "message_id": "m",
        "status": "complete",
        "reason": "finished",
        "finish_reason": "stop",
        "prompt_tokens": 100,
        "completion_tokens": 30,
        "token_source": "upstream",
        "budget_limit": 1000,
        "budget_remaining": 870,
    }
    values.update(kw)
    return Final(**values)


def step(delta: dict[str, Any], text: str = "") -> Extra:
    return Extra({"choices": [{"index": 0, "delta": delta}]}, text, 0)


NATIVE_STEPS = [
    step({"reasoning_content": "Hmm."}),
    step({"thinking_blocks": [{"type": "thinking", "thinking": "Hmm.", "signature": "sig-9"}]}),
    step({"thinking_blocks": [{"type": "redacted_thinking", "data": "EmwK"}]}),
    step({"content": "Yes."}, "Yes."),
]


def test_a_native_providers_signatures_and_redacted_thinking_become_blocks():
    blocks, acc = Blocks(), Accumulator()
    for event in NATIVE_STEPS:
        acc.apply(blocks.frame(event.frame, event.text))
    assert acc.blocks() == [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig-9"},
        {"type": "redacted_thinking", "data": "EmwK"},
        {"type": "text", "text": "Yes."},
    ]


def test_a_signature_ends_its_thinking_block():
    """Two signed thinking blocks in a row stay two blocks, each with its own signature."""
    blocks, acc = Blocks(), Accumulator()
    for thought, signature in (("First.", "sig-1"), ("Second.", "sig-2")):
        whole = {"type": "thinking", "thinking": thought, "signature": signature}
        for event in (step({"reasoning_content": thought}), step({"thinking_blocks": [whole]})):
            acc.apply(blocks.frame(event.frame, event.text))
    assert acc.blocks() == [
        {"type": "thinking", "thinking": "First.", "signature": "sig-1"},
        {"type": "thinking", "thinking": "Second.", "signature": "sig-2"},
    ]


def test_the_encoder_writes_each_step_once_and_in_order():
    enc = EventEncoder("msg_1", "m")
    out = b"".join(
        enc.encode(e)
        for e in [Started("m", None, "m"), *NATIVE_STEPS, Delta(" Sure.", 9), Done(final(), 9)]
    ).decode()
    names = [line[7:] for line in out.split("\n") if line.startswith("event: ")]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",  # thinking
        "content_block_delta",
        "content_block_delta",  # its signature
        "content_block_stop",
        "content_block_start",  # redacted
        "content_block_stop",
        "content_block_start",  # text
        "content_block_delta",
        "content_block_delta",  # the plain delta, by the fast path
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"index":2,"delta":{"type":"text_delta","text":" Sure."}' in out


def test_usage_takes_anthropics_counting():
    details = {"cache_creation_input_tokens": 10}
    got = usage_of(final(cached_tokens=60, reasoning_tokens=12, usage_details=details))
    assert got == {
        "input_tokens": 30,
        "cache_creation_input_tokens": 10,
        "cache_read_input_tokens": 60,
        "output_tokens": 30,
        "output_tokens_details": {"thinking_tokens": 12},
    }


def test_usage_of_an_anthropic_model_is_anthropics_own():
    """The Anthropic provider keeps Anthropic's counts under ``anthropic`` in the details; the
    prompt it reports is their sum."""
    details = {
        "prompt_tokens_details": {"cached_tokens": 1792},
        "anthropic": {
            "input_tokens": 14,
            "cache_creation_input_tokens": 256,
            "cache_read_input_tokens": 1792,
            "output_tokens": 9,
        },
    }
    got = usage_of(
        final(prompt_tokens=2062, completion_tokens=9, cached_tokens=1792, usage_details=details)
    )
    assert got == {
        "input_tokens": 14,
        "cache_creation_input_tokens": 256,
        "cache_read_input_tokens": 1792,
        "output_tokens": 9,
    }


def test_anthropics_rate_limit_headers_say_when_in_rfc3339():
    at = datetime(2026, 11, 30, 23, 59, 58, 500_000, tzinfo=UTC)
    allowance = Allowance(
        at, limit=1000, used=100, reserved=50, requests_due=at + timedelta(seconds=5)
    )
    assert anthropic_rate_limit_headers(allowance, rpm=60) == {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-remaining": "55",
        "anthropic-ratelimit-requests-reset": "2026-12-01T00:00:04Z",
        "anthropic-ratelimit-tokens-limit": "1000",
        "anthropic-ratelimit-tokens-remaining": "850",
        "anthropic-ratelimit-tokens-reset": "2026-12-01T00:00:00Z",
    }
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"


def test_a_tool_call_whose_id_comes_with_every_delta_is_one_block():
    blocks, acc = Blocks(), Accumulator()
    for piece in ('{"x"', ": 1}"):
        call = {"index": 0, "id": "call_1", "function": {"name": "zoom", "arguments": piece}}
        acc.apply(blocks.frame({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}, ""))
    assert acc.blocks() == [{"type": "tool_use", "id": "call_1", "name": "zoom", "input": {"x": 1}}]

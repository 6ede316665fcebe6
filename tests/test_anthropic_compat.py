"""The Anthropic-compatible route (``/v1/messages``) through the official ``anthropic`` SDK: text,
a tool-use loop and thinking, streamed and not, token counts, errors in Anthropic's shape, and
the same accounting, limits and records as every other route.

The upstreams are the demo model, the fake OpenAI upstream replaying recorded frames
(``tests/openai_recordings.py``) and the fake Anthropic API replaying recorded event streams
(``tests/anthropic_recordings.py``): the route translates to and from the one internal
representation, so what the SDK gets from an OpenAI-compatible model's tool calls and reasoning
is checked here frame by frame; an Anthropic model also gets what only it can take (signed
thinking blocks across a tool loop, cache_control, is_error, a prefill, top_k, fields this
service does not know) as the client wrote it, and reports its usage exactly.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from anthropic import AsyncAnthropic

from service.app import create_app
from service.keys import STORE
from service.store import utcnow
from service.stream.producer import period_of
from tests import anthropic_recordings as rec
from tests.conftest import TEST_MODELS
from tests.fake_anthropic import FakeAnthropic
from tests.fake_anthropic import Script as Recorded
from tests.fake_openai import Script
from tests.faults import settled
from tests.openai_recordings import MID_ERROR, recording

ANTHROPIC_KEY = "sk-ant-api03-upstream-secret-key-0123456789abcdef"
CLAUDE = {
    "name": "claude",
    "provider": "anthropic",
    "upstream_id": "claude-sonnet-4-5",
    "context_window": 200000,
    "max_output_tokens": 8192,
}
# Every model the SDK is driven against: the demo model, an OpenAI-compatible one, an Anthropic one.
MODELS = ["demo", "gpt-test", "claude"]
HI = [{"role": "user", "content": "Hi there"}]
ASK = {"role": "user", "content": "What's the weather and the time in Paris?"}
TOOLS = [
    {
        "name": name,
        "description": f"{name} of a place",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    for name in ("get_weather", "get_time")
]
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": t["name"],
            "parameters": t["input_schema"],
            "description": t["description"],
        },
    }
    for t in TOOLS
]
THINKING = {"type": "enabled", "budget_tokens": 2000}


def sdk_for(client, token: str, **kw: Any) -> AsyncAnthropic:
    """The SDK as Claude Code configures it: the service's root as base URL (the SDK adds
    ``/v1/messages``), the service's token as the key."""
    return AsyncAnthropic(base_url=str(client.make_url("")), api_key=token, max_retries=0, **kw)


@pytest.fixture
async def fake_anthropic():
    fake = FakeAnthropic()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def stream_settings(stream_settings, fake_anthropic):
    """The shared stream settings, with the Anthropic model on the fake Anthropic API."""

    def factory(**overrides: Any):
        values: dict[str, Any] = {
            "models": json.dumps([*TEST_MODELS, CLAUDE]),
            "anthropic_base_url": fake_anthropic.url,
            "anthropic_api_key": ANTHROPIC_KEY,
        }
        return stream_settings(**{**values, **overrides})

    return factory


@pytest.fixture
async def claude(stream_client, token_for):
    sdk = sdk_for(stream_client, token_for("alice"))
    yield sdk
    await sdk.close()


async def raw_events(client, headers: dict[str, str], body: dict[str, Any]) -> list[Any]:
    """The stream as sent: (event name, data) pairs."""
    resp = await client.post("/v1/messages", json={**body, "stream": True}, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    out = []
    for block in (await resp.read()).decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def replay(fake_openai, name: str, then: list[Script] | None = None) -> None:
    frames, completion = recording(name)
    fake_openai.scripts = [Script(frames=frames, completion=completion), *(then or [])]


def play(fake_anthropic, *recordings: list[bytes]) -> None:
    fake_anthropic.scripts = [Recorded(recording=r) for r in recordings]


# --------------------------------------------------------------------------- text
@pytest.mark.parametrize("model", MODELS)
async def test_create_and_stream_give_the_same_message(claude, model, fake_openai):
    ask = {"model": model, "max_tokens": 200, "messages": HI}
    created = await claude.messages.create(**ask)
    async with claude.messages.stream(**ask) as stream:
        texts = [text async for text in stream.text_stream]
        streamed = await stream.get_final_message()
    for message in (created, streamed):
        assert message.type == "message" and message.role == "assistant"
        assert message.model == model and message.id.startswith("msg_")
        assert [b.type for b in message.content] == ["text"]
        assert message.stop_reason == "end_turn" and message.stop_sequence is None
        assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert "".join(texts) == streamed.content[0].text == created.content[0].text
    assert streamed.usage == created.usage
    if model == "demo":
        assert created.content[0].text.startswith("(demo model)")
    elif model == "claude":
        assert created.content[0].text == rec.TEXT_ANSWER
        assert (created.usage.input_tokens, created.usage.output_tokens) == (21, 12)
    else:
        assert created.content[0].text == "Hello, world!"
        assert (created.usage.input_tokens, created.usage.output_tokens) == (21, 4)


async def test_the_stream_is_anthropics_event_sequence(stream_client, auth):
    events = await raw_events(
        stream_client, auth(), {"model": "demo", "max_tokens": 300, "messages": HI}
    )
    names = [name for name, _ in events]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "demo"
    assert events[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0 and delta["usage"]["input_tokens"] > 0


async def test_max_tokens_stops_with_max_tokens(claude):
    message = await claude.messages.create(model="demo", max_tokens=3, messages=HI)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


async def test_system_stop_sequences_temperature_and_user_reach_the_upstream(claude, fake_openai):
    await claude.messages.create(
        model="gpt-test",
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=HI,
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "u-42"},
        extra_body={"temperature": 0.2, "top_p": 0.9},  # this SDK no longer offers them
    )
    sent = fake_openai.requests[-1]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *HI]
    assert sent["stop"] == ["\n\nHuman:"]
    assert (sent["temperature"], sent["top_p"], sent["user"]) == (0.2, 0.9, "u-42")
    assert sent["max_tokens"] == 100
    for anthropic_only in ("thinking", "top_k", "metadata", "system", "stop_sequences"):
        assert anthropic_only not in sent


# --------------------------------------------------------------------------- tools
async def test_a_tool_use_loop_streamed_then_not(claude, fake_openai):
    """tool_use -> tool_result -> answer, as an SDK program runs it, on a stateless request:
    each recorded tool call (split across chunks, two in parallel) is one tool_use block."""
    replay(fake_openai, "tool_calls", [Script(chunks=["Sunny, 21 °C; it is 14:05."])])
    async with claude.messages.stream(
        model="gpt-test", max_tokens=200, messages=[ASK], tools=TOOLS
    ) as stream:
        kinds = [event.type async for event in stream]
        called = await stream.get_final_message()
    assert "input_json" in kinds
    assert called.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in called.content] == [
        ("tool_use", "call_W1", "get_weather", {"city": "Paris"}),
        ("tool_use", "call_T2", "get_time", {"tz": "CET"}),
    ]
    # Anthropic's usage: the cached prompt tokens apart from the rest
    assert called.usage.input_tokens == 82 - 64
    assert called.usage.cache_read_input_tokens == 64
    assert called.usage.output_tokens == 51
    results = [
        {"type": "tool_result", "tool_use_id": "call_W1", "content": '{"sky": "sunny", "c": 21}'},
        {
            "type": "tool_result",
            "tool_use_id": "call_T2",
            "content": [{"type": "text", "text": "14:05"}],
        },
    ]
    answer = await claude.messages.create(
        model="gpt-test",
        max_tokens=200,
        tools=TOOLS,
        messages=[
            ASK,
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": results},
        ],
    )
    assert answer.content[0].text == "Sunny, 21 °C; it is 14:05."
    assert answer.stop_reason == "end_turn"
    sent = fake_openai.requests[-1]
    assert sent["tools"] == OPENAI_TOOLS
    assert sent["messages"] == [
        ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_W1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_T2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_W1", "content": '{"sky": "sunny", "c": 21}'},
        {"role": "tool", "tool_call_id": "call_T2", "content": "14:05"},
    ]


async def test_a_non_streamed_tool_call_is_what_the_stream_adds_up_to(
    claude, fake_openai, stream_client, auth
):
    replay(fake_openai, "tool_calls")
    created = await claude.messages.create(
        model="gpt-test", max_tokens=200, messages=[ASK], tools=TOOLS
    )
    replay(fake_openai, "tool_calls")
    events = await raw_events(
        stream_client,
        auth(),
        {"model": "gpt-test", "max_tokens": 200, "messages": [ASK], "tools": TOOLS},
    )
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts == [
        {"type": "tool_use", "id": "call_W1", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_T2", "name": "get_time", "input": {}},
    ]
    pieces = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert pieces == ['{"ci', 'ty": "Par', 'is"}', '{"tz": ', '"CET"}']
    assert [n for n, _ in events].count("content_block_stop") == 2
    assert created.model_dump()["content"] == [
        {
            "type": "tool_use",
            "id": "call_W1",
            "name": "get_weather",
            "input": {"city": "Paris"},
            "caller": None,
            "toolset_name": None,
        },
        {
            "type": "tool_use",
            "id": "call_T2",
            "name": "get_time",
            "input": {"tz": "CET"},
            "caller": None,
            "toolset_name": None,
        },
    ]


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
            {
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                "parallel_tool_calls": False,
            },
        ),
    ],
)
async def test_tool_choice_takes_openais_form(claude, fake_openai, choice, sent):
    await claude.messages.create(
        model="gpt-test", max_tokens=50, messages=[ASK], tools=TOOLS, tool_choice=choice
    )
    request = fake_openai.requests[-1]
    assert {k: request.get(k) for k in sent} == sent


async def test_a_strict_tool_is_sent_on_as_strict(claude, fake_openai, fake_anthropic):
    """Anthropic's ``strict`` on a tool (schema-valid inputs) is carried: to an Anthropic model
    as written, to an OpenAI-compatible one as its function's ``strict``."""
    strict = {**TOOLS[0], "strict": True}
    await claude.messages.create(model="claude", max_tokens=50, messages=[ASK], tools=[strict])
    assert fake_anthropic.calls("messages")[-1].body["tools"] == [strict]
    await claude.messages.create(model="gpt-test", max_tokens=50, messages=[ASK], tools=[strict])
    assert fake_openai.requests[-1]["tools"] == [
        {**OPENAI_TOOLS[0], "function": {**OPENAI_TOOLS[0]["function"], "strict": True}}
    ]


async def test_a_tools_fields_this_service_does_not_know_reach_an_anthropic_model(
    claude, fake_anthropic
):
    """A tool's own fields the route has no OpenAI form for (``input_examples``,
    ``eager_input_streaming``, ``defer_loading``, ...) are Anthropic's to honour: sent as
    written to an Anthropic model (and to its token count); other models refuse them by name."""
    tool = {**TOOLS[0], "input_examples": [{"city": "Paris"}], "eager_input_streaming": True}
    await claude.messages.create(model="claude", max_tokens=50, messages=[ASK], tools=[tool])
    assert fake_anthropic.calls("messages")[-1].body["tools"] == [tool]
    await claude.messages.count_tokens(model="claude", messages=[ASK], tools=[tool])
    assert fake_anthropic.calls("count_tokens")[-1].body["tools"] == [tool]
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude.messages.create(model="gpt-test", max_tokens=50, messages=[ASK], tools=[tool])
    assert "'tools.0.input_examples' is not supported with model 'gpt-test'" in str(info.value)


# --------------------------------------------------------------------------- thinking
async def test_reasoning_is_a_thinking_block_streamed_and_not(claude, fake_openai):
    replay(fake_openai, "reasoning")
    created = await claude.messages.create(
        model="gpt-test", max_tokens=4000, messages=HI, thinking=THINKING
    )
    replay(fake_openai, "reasoning")
    async with claude.messages.stream(
        model="gpt-test", max_tokens=4000, messages=HI, thinking=THINKING
    ) as stream:
        thoughts = [e.thinking async for e in stream if e.type == "thinking"]
        streamed = await stream.get_final_message()
    assert "".join(thoughts) == "The user wants a number; 6 times 7 is 42."
    for message in (created, streamed):
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "The user wants a number; 6 times 7 is 42."
        assert message.content[0].signature == ""
        assert message.content[1].text == "It is 42."
        assert (message.usage.input_tokens, message.usage.output_tokens) == (20, 40)
        assert message.usage.output_tokens_details.thinking_tokens == 28
    # thinking enabled is OpenAI's reasoning_effort; the thinking goes back as reasoning_content
    assert fake_openai.requests[-1]["reasoning_effort"] == "medium"
    assert "thinking" not in fake_openai.requests[-1]
    await claude.messages.create(
        model="gpt-test",
        max_tokens=4000,
        thinking=THINKING,
        messages=[
            *HI,
            {"role": "assistant", "content": created.content},
            {"role": "user", "content": "Sure?"},
        ],
    )
    assert fake_openai.requests[-1]["messages"][1] == {
        "role": "assistant",
        "content": "It is 42.",
        "reasoning_content": "The user wants a number; 6 times 7 is 42.",
    }


@pytest.mark.parametrize(("budget", "effort"), [(1024, "low"), (2048, "medium"), (2049, "high")])
async def test_the_thinking_budget_maps_to_a_reasoning_effort(claude, fake_openai, budget, effort):
    await claude.messages.create(
        model="gpt-test",
        max_tokens=8000,
        messages=HI,
        thinking={"type": "enabled", "budget_tokens": budget},
    )
    assert fake_openai.requests[-1]["reasoning_effort"] == effort


@pytest.mark.parametrize(
    "thinking",
    [{"type": "adaptive", "display": "summarized"}, {**THINKING, "display": "omitted"}],
)
async def test_thinking_display_reaches_an_anthropic_model_as_written(
    claude, fake_anthropic, thinking
):
    """How thinking comes back (``display``: newer models omit it unless asked for a summary)
    is Anthropic's to honour: sent as written, not refused."""
    await claude.messages.create(model="claude", max_tokens=4000, messages=HI, thinking=thinking)
    assert fake_anthropic.calls("messages")[-1].body["thinking"] == thinking


async def test_thinking_disabled_asks_for_nothing(claude, fake_openai, fake_anthropic):
    for model in MODELS:
        message = await claude.messages.create(
            model=model, max_tokens=50, messages=HI, thinking={"type": "disabled"}
        )
        assert message.content[0].type == "text"
    assert "reasoning_effort" not in fake_openai.requests[-1]
    assert fake_anthropic.calls("messages")[-1].body["thinking"] == {"type": "disabled"}


async def test_an_anthropic_models_stop_sequence_is_named_streamed_and_not(
    claude, fake_anthropic, stream_client, auth
):
    """The sequence that stopped an Anthropic model's answer reaches the SDK as Anthropic said
    it (``stop_reason: "stop_sequence"``, ``stop_sequence``), not as an ``end_turn``."""
    fake_anthropic.scripts = [Recorded(recording=rec.STOP_SEQUENCE) for _ in range(3)]
    ask: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 50,
        "messages": HI,
        "stop_sequences": ["three"],
    }
    message = await claude.messages.create(**ask)
    async with claude.messages.stream(**ask) as stream:
        streamed = await stream.get_final_message()
    for got in (message, streamed):
        assert (got.stop_reason, got.stop_sequence) == ("stop_sequence", "three")
        assert got.content[0].text == "One, two"
    events = await raw_events(stream_client, auth(), ask)
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "three"}


async def test_a_refusal_is_text_with_stop_reason_refusal(claude, fake_openai):
    replay(fake_openai, "refusal")
    message = await claude.messages.create(model="gpt-test", max_tokens=50, messages=HI)
    assert message.stop_reason == "refusal"
    assert message.content[0].text == "I'm sorry, I can't help with that."


# --------------------------------------------------------------------------- an Anthropic model
WEATHER = {"role": "user", "content": "What's the weather in Paris?"}


async def test_a_tool_loop_keeps_thinking_with_the_signed_block_sent_back(
    claude, fake_anthropic, stream_client
):
    """Step one streams Anthropic's signed thinking block (its signature_delta relayed) and a
    tool_use; the SDK program sends the assistant's content back with the tool result, and the
    next step still thinks: Anthropic gets the block as it wrote it, signature included."""
    play(fake_anthropic, rec.THINKING_TOOL_USE, rec.THINKING_TOOL_USE, rec.TOOL_FOLLOW_UP)
    ask = {"model": "claude", "max_tokens": 4000, "thinking": THINKING, "tools": TOOLS}
    async with claude.messages.stream(**ask, messages=[WEATHER]) as stream:
        kinds = [event.type async for event in stream]
        called = await stream.get_final_message()
    created = await claude.messages.create(**ask, messages=[WEATHER])
    assert "signature" in kinds and "thinking" in kinds
    assert created.model_dump() == {**called.model_dump(), "id": created.id}
    thinking, call = called.content
    assert (thinking.type, thinking.thinking) == ("thinking", rec.LOOP_THINKING)
    assert thinking.signature == rec.LOOP_SIGNATURE
    assert (call.type, call.id, call.name, call.input) == (
        "tool_use",
        "toolu_01LoopW7cX2",
        "get_weather",
        {"city": "Paris"},
    )
    assert called.stop_reason == "tool_use"
    assert called.usage.output_tokens_details.thinking_tokens == 52
    first = fake_anthropic.calls("messages")[0].body
    assert first["thinking"] == THINKING and "reasoning_effort" not in first

    result = {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 °C"}
    answer = await claude.messages.create(
        **ask,
        messages=[
            WEATHER,
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [result]},
        ],
    )
    assert answer.content[0].text == rec.TOOL_FOLLOW_UP_ANSWER
    second = fake_anthropic.calls("messages")[-1].body
    assert second["thinking"] == THINKING  # the loop's next step still thinks
    assert second["messages"] == [
        WEATHER,
        {
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": rec.LOOP_THINKING,
                    "signature": rec.LOOP_SIGNATURE,
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01LoopW7cX2",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {"role": "user", "content": [result]},
    ]
    # the record keeps the reasoning's text, not the signature
    record = await stream_client.app[STORE].messages.find_one({"content": "", "model": "claude"})
    assert record["reasoning"] == rec.LOOP_THINKING and record["finish_reason"] == "tool_calls"
    assert rec.LOOP_SIGNATURE not in repr(record)


async def test_a_tool_loop_step_without_the_thinking_block_does_not_think(claude, fake_anthropic):
    """A client that sends back only the tool call has no signed block for Anthropic: that
    step runs without thinking rather than failing."""
    play(fake_anthropic, rec.TOOL_FOLLOW_UP)
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}
    await claude.messages.create(
        model="claude",
        max_tokens=4000,
        thinking=THINKING,
        tools=TOOLS,
        messages=[
            WEATHER,
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
        ],
    )
    assert "thinking" not in fake_anthropic.calls("messages")[-1].body


async def test_redacted_thinking_is_relayed_and_sent_back_as_written(
    claude, fake_anthropic, stream_client, auth
):
    play(fake_anthropic, rec.REDACTED, rec.REDACTED, rec.TEXT)
    ask = {"model": "claude", "max_tokens": 4000, "thinking": THINKING, "messages": HI}
    created = await claude.messages.create(**ask)
    events = await raw_events(stream_client, auth(), ask)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "redacted_thinking", "data": rec.REDACTED_DATA},
        {"type": "text", "text": ""},
    ]
    signatures = [
        (d["index"], d["delta"]["signature"])
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "signature_delta"
    ]
    assert signatures == [(0, rec.SIGNATURE)]
    assert [b.type for b in created.content] == ["thinking", "redacted_thinking", "text"]
    assert created.content[1].data == rec.REDACTED_DATA
    assert created.content[0].signature == rec.SIGNATURE
    await claude.messages.create(
        **{
            **ask,
            "messages": [
                *HI,
                {"role": "assistant", "content": created.content},
                {"role": "user", "content": "Go on"},
            ],
        }
    )
    sent = fake_anthropic.calls("messages")[-1].body["messages"][1]["content"]
    assert sent == [
        {"type": "thinking", "thinking": rec.REDACTED_THINKING, "signature": rec.SIGNATURE},
        {"type": "redacted_thinking", "data": rec.REDACTED_DATA},
        {"type": "text", "text": rec.REDACTED_ANSWER},
    ]


async def test_cache_usage_is_reported_as_anthropic_reports_it(
    claude, fake_anthropic, stream_client
):
    play(fake_anthropic, rec.CACHED, rec.CACHED)
    ask = {"model": "claude", "max_tokens": 100, "messages": HI}
    created = await claude.messages.create(**ask)
    # The recording bills far more prompt (2062) than the fake counts for these messages (2);
    # a lease whose turn billed beyond its grant is left short (service/stream/leases.py), so
    # the next turn waits for it to go back.
    await settled(stream_client.app[STORE].db)
    async with claude.messages.stream(**ask) as stream:
        streamed = await stream.get_final_message()
    for message in (created, streamed):
        usage = message.usage
        assert usage.input_tokens == 14
        assert usage.cache_creation_input_tokens == 256
        assert usage.cache_read_input_tokens == 1792
        assert usage.output_tokens == 9
    assert created.content[0].text == rec.CACHED_ANSWER


@pytest.mark.parametrize("model", MODELS)
async def test_message_start_carries_the_prompt_the_turn_was_admitted_with(
    stream_client, auth, logs, model
):
    events = await raw_events(
        stream_client, auth(), {"model": model, "max_tokens": 50, "messages": HI}
    )
    start = events[0][1]["message"]["usage"]
    started = next(e for e in logs if e["event"] == "stream.started")
    assert start["input_tokens"] == started["prompt_tokens"] > 0
    assert start["output_tokens"] == 0


async def test_anthropics_own_fields_reach_an_anthropic_model_as_written(claude, fake_anthropic):
    """cache_control on the system, a text block, a tool, a tool_use and a tool_result; a tool
    result's is_error and image; top_k; more than 4 stop sequences; a field this service does
    not know; a last assistant message (a prefill, continued)."""
    cache = {"type": "ephemeral"}
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    call = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_weather",
        "input": {"city": "Atlantis"},
        "cache_control": cache,
    }
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "no such city"}, image],
        "is_error": True,
        "cache_control": cache,
    }
    prefill = {"role": "assistant", "content": "Atlantis"}
    system = [{"type": "text", "text": "Be brief.", "cache_control": {**cache, "ttl": "1h"}}]
    stops = ["\n\nHuman:", "END", "STOP", "###", "---"]
    message = await claude.messages.create(
        model="claude",
        max_tokens=300,
        system=system,
        tools=[{**TOOLS[0], "cache_control": cache}],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather?", "cache_control": cache}],
            },
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
            prefill,
        ],
        stop_sequences=stops,
        metadata={"user_id": "u-42"},
        extra_body={"top_k": 40, "context_management": {"edits": []}},
    )
    assert message.content[0].text == rec.TEXT_ANSWER
    body = fake_anthropic.calls("messages")[-1].body
    assert body["system"] == system
    assert body["tools"] == [{**TOOLS[0], "cache_control": cache}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather?", "cache_control": cache}]},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [result]},
        prefill,
    ]
    assert body["stop_sequences"] == stops and body["top_k"] == 40
    assert body["metadata"] == {"user_id": "u-42"}
    assert body["context_management"] == {"edits": []}
    assert (body["model"], body["max_tokens"], body["stream"]) == ("claude-sonnet-4-5", 300, True)


# --------------------------------------------------------------------------- count_tokens
@pytest.mark.parametrize("model", MODELS)
async def test_count_tokens_is_the_prompt_a_turn_is_admitted_with(
    claude, model, logs, fake_anthropic
):
    ask: dict[str, Any] = {"model": model, "messages": HI, "system": "Be brief."}
    if model != "demo":
        ask["tools"] = TOOLS
    counted = await claude.messages.count_tokens(**ask)
    await claude.messages.create(max_tokens=50, **ask)
    started = next(e for e in logs if e["event"] == "stream.started")
    assert started["transport"] == "anthropic"
    assert counted.input_tokens == started["prompt_tokens"] > 0
    if model == "claude":  # Anthropic's own count: the messages with the tools, the system once
        counts = fake_anthropic.calls("count_tokens")
        assert counts[0].body["messages"] == HI
        assert [t["name"] for t in counts[0].body["tools"]] == ["get_weather", "get_time"]
        assert any(c.body.get("system") == [{"type": "text", "text": "Be brief."}] for c in counts)
        assert counts[0].headers["x-api-key"] == ANTHROPIC_KEY


@pytest.mark.parametrize("content", ["", []])
async def test_a_message_with_no_content_is_refused_as_anthropic_refuses_it(
    claude, fake_anthropic, content
):
    """Only a final assistant message (a prefill) may be empty; any other is a 400 naming it,
    for a turn and for a count, and nothing is asked of the model or billed."""
    asks = [
        [{"role": "user", "content": content}],
        [*HI, {"role": "assistant", "content": content}, *HI],
    ]
    for messages in asks:
        where = f"messages.{len(messages) - 1 if len(messages) == 1 else 1}"
        for call in (claude.messages.create, claude.messages.count_tokens):
            extra = {"max_tokens": 20} if call == claude.messages.create else {}
            with pytest.raises(anthropic.BadRequestError) as info:
                await call(model="claude", messages=messages, **extra)
            assert f"{where}: all messages must have non-empty" in info.value.message
    assert fake_anthropic.calls("messages") == [] and fake_anthropic.calls("count_tokens") == []
    await claude.messages.create(  # a prefill may be empty
        model="claude", max_tokens=20, messages=[*HI, {"role": "assistant", "content": content}]
    )
    assert len(fake_anthropic.calls("messages")) == 1


async def test_count_tokens_refuses_what_the_model_cannot_take(claude):
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude.messages.count_tokens(model="demo", messages=HI, tools=TOOLS)
    assert "'tools'" in info.value.message


async def test_a_count_the_vendor_makes_takes_a_request_from_the_users_bucket(
    aiohttp_client, stream_settings, token_for, fake_anthropic
):
    """Three requests a minute: three counts of an Anthropic model (each a call on the
    operator's key) go through, the fourth is a 429 ``rate_limit_error`` that never reaches
    Anthropic; a count by a local tokenizer takes nothing. Before, any number of counts
    reached the vendor."""
    client = await aiohttp_client(create_app(stream_settings(v1_requests_per_minute=3)))
    sdk = sdk_for(client, token_for("alice"))
    for _ in range(3):
        assert (await sdk.messages.count_tokens(model="claude", messages=HI)).input_tokens > 0
    asked = len(fake_anthropic.calls("count_tokens"))
    with pytest.raises(anthropic.RateLimitError) as info:
        await sdk.messages.count_tokens(model="claude", messages=HI)
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    assert len(fake_anthropic.calls("count_tokens")) == asked
    for _ in range(5):  # the bucket is empty: a local count takes nothing from it
        assert (await sdk.messages.count_tokens(model="demo", messages=HI)).input_tokens > 0
    await sdk.close()


async def test_a_spent_month_still_counts_and_keeps_its_reservations(
    aiohttp_client, stream_settings, token_for, fake_anthropic
):
    """A month spent past its limit (a limit lowered after the spending): a count takes a
    request, never tokens, and leaves ``reserved`` as it was. Before, the request's growth
    took "what fits" of nothing, less than nothing here, off the month's reservations."""
    client = await aiohttp_client(
        create_app(stream_settings(v1_requests_per_minute=60, default_token_limit=10))
    )
    store = client.app[STORE]
    await store.usage.insert_one(
        {"user_id": "alice", "period": period_of(utcnow()), "used": 50, "reserved": 0}
    )
    sdk = sdk_for(client, token_for("alice"))
    assert (await sdk.messages.count_tokens(model="claude", messages=HI)).input_tokens > 0
    await sdk.close()
    doc = await store.usage.find_one({"user_id": "alice"})
    assert doc["used"] == 50 and doc["reserved"] == 0
    assert all(e.get("grant", 0) >= 0 for e in doc.get("open") or ())


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("model", MODELS)
async def test_a_rate_limit_is_a_rate_limit_error_with_retry_after(
    aiohttp_client, stream_settings, token_for, model
):
    client = await aiohttp_client(create_app(stream_settings(v1_requests_per_minute=1)))
    sdk = sdk_for(client, token_for("alice"))
    first = await sdk.messages.with_raw_response.create(model=model, max_tokens=20, messages=HI)
    assert first.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert first.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert int(first.headers["anthropic-ratelimit-tokens-remaining"]) > 0
    with pytest.raises(anthropic.RateLimitError) as info:
        await sdk.messages.create(model=model, max_tokens=20, messages=HI)
    err = info.value
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    assert err.body["type"] == "error" and err.body["error"]["type"] == "rate_limit_error"
    assert err.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    await sdk.close()


async def test_the_budget_is_a_rate_limit_error_the_sdk_does_not_retry(
    aiohttp_client, stream_settings, token_for
):
    client = await aiohttp_client(create_app(stream_settings(default_token_limit=10)))
    sdk = sdk_for(client, token_for("alice"))
    with pytest.raises(anthropic.RateLimitError) as info:
        await sdk.messages.create(model="demo", max_tokens=20, messages=HI)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.response.headers["anthropic-ratelimit-tokens-limit"] == "10"
    await sdk.close()


@pytest.mark.parametrize("model", MODELS)
async def test_a_bad_key_is_an_authentication_error(stream_client, model, fake_anthropic):
    sdk = sdk_for(stream_client, "not-a-token")
    with pytest.raises(anthropic.AuthenticationError) as info:
        await sdk.messages.create(model=model, max_tokens=20, messages=HI)
    assert info.value.body["error"]["type"] == "authentication_error"
    assert not fake_anthropic.calls("messages")  # refused before any upstream call
    await sdk.close()


async def test_x_api_key_carries_the_token(stream_client, token_for):
    """What Claude Code sends for ANTHROPIC_API_KEY, with its ``?beta=true``."""
    body = {"model": "demo", "max_tokens": 20, "messages": HI}
    headers = {"x-api-key": token_for("alice"), "anthropic-version": "2023-06-01"}
    resp = await stream_client.post("/v1/messages?beta=true", json=body, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["content"][0]["type"] == "text"
    resp = await stream_client.post("/v1/messages/count_tokens", json=body, headers=headers)
    assert resp.status == 200 and (await resp.json())["input_tokens"] > 0
    for bad in ({}, {"x-api-key": "nope"}, {"x-api-key": ""}):
        resp = await stream_client.post("/v1/messages", json=body, headers=bad)
        assert resp.status == 401
        answer = await resp.json()
        assert answer["type"] == "error"
        assert answer["error"]["type"] == "authentication_error"
        assert answer["request_id"] == resp.headers["X-Request-ID"] == resp.headers["request-id"]
    # x-api-key is the Anthropic routes' own: elsewhere the bearer token is the one way in
    resp = await stream_client.get("/v1/models", headers={"x-api-key": token_for("alice")})
    assert resp.status == 401


@pytest.mark.parametrize(
    ("model", "asked", "param"),
    [
        ("demo", {"tools": TOOLS}, "tools"),
        ("demo", {"thinking": THINKING, "max_tokens": 4000}, "thinking"),
        ("demo", {"top_k": 5}, "top_k"),
        ("gpt-test", {"top_k": 5}, "top_k"),
        ("gpt-test", {"frobnicate": 1}, "frobnicate"),
        ("gpt-test", {"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        (
            "gpt-test",
            {"thinking": {**THINKING, "display": "summarized"}, "max_tokens": 4000},
            "thinking.display",
        ),
        (
            "demo",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "iVBORw0KGgo=",
                                },
                            },
                        ],
                    }
                ]
            },
            "messages.0.content.1",
        ),
        (
            "gpt-test",
            {
                "messages": [
                    *HI,
                    {
                        "role": "assistant",
                        "content": [{"type": "redacted_thinking", "data": "EmwK"}],
                    },
                    {"role": "user", "content": "Go on"},
                ]
            },
            "messages.1.content.0",
        ),
        (
            "gpt-test",
            {"messages": [*HI, {"role": "assistant", "content": "The answer is"}]},
            "messages.1",
        ),
        # Anthropic's own rules while the model thinks, named before anything is sent
        ("claude", {"thinking": THINKING, "max_tokens": 4000, "top_k": 5}, "top_k"),
        (
            "claude",
            {
                "thinking": THINKING,
                "max_tokens": 4000,
                "tools": TOOLS,
                "tool_choice": {"type": "any"},
            },
            "tool_choice",
        ),
        ("claude", {"thinking": THINKING, "max_tokens": 4000, "temperature": 0.5}, "temperature"),
    ],
)
async def test_what_a_model_cannot_take_is_a_400_naming_it(
    claude, stream_client, model, asked, param, fake_anthropic
):
    """Nothing dropped silently: the parameter is named as the client named it, before anything
    is reserved."""
    body = {"messages": HI, "max_tokens": 100, **asked}
    messages, max_tokens = body.pop("messages"), body.pop("max_tokens")
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude.messages.create(
            model=model, max_tokens=max_tokens, messages=messages, extra_body=body
        )
    err = info.value
    assert err.body["error"]["type"] == "invalid_request_error"
    assert (
        f"'{param}'" in err.body["error"]["message"]
        and f"'{model}'" in err.body["error"]["message"]
    )
    # nothing billed (one refused when the turn opens gives its reservation back)
    await settled(stream_client.app[STORE].db)
    usage = await stream_client.app[STORE].usage.find_one({"user_id": "alice"})
    assert usage is None or usage["used"] == 0
    assert not fake_anthropic.calls("messages")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": "demo", "messages": HI}, "max_tokens: Field required"),
        ({"model": "demo", "max_tokens": 0, "messages": HI}, "max_tokens"),
        ({"model": "demo", "max_tokens": 10, "messages": HI, "temperature": 1.5}, "temperature"),
        (
            {
                "model": "demo",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": [{"type": "text"}]}],
            },
            "messages.0.content.0.text.text: Field required",
        ),
        (
            {"model": "demo", "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {
                "model": "demo",
                "max_tokens": 1000,
                "messages": HI,
                "thinking": {"type": "enabled", "budget_tokens": 1000},
            },
            "thinking.budget_tokens",
        ),
        (
            {
                "model": "demo",
                "max_tokens": 10,
                "messages": HI,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "server tool",
        ),
    ],
)
async def test_an_invalid_request_is_a_400_in_anthropics_shape(stream_client, auth, body, named):
    resp = await stream_client.post("/v1/messages", json=body, headers=auth())
    assert resp.status == 400
    answer = await resp.json()
    assert set(answer) == {"type", "error", "request_id"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert named in answer["error"]["message"]


async def test_unknown_model_and_route_are_not_found_errors(claude, stream_client, auth):
    with pytest.raises(anthropic.NotFoundError) as info:
        await claude.messages.create(model="claude-nope", max_tokens=10, messages=HI)
    assert info.value.body["error"]["type"] == "not_found_error"
    resp = await stream_client.post("/v1/messages/batches", json={}, headers=auth())
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found_error"


async def test_a_failure_after_the_start_is_an_error_event(claude, fake_openai, stream_client):
    fake_openai.default = Script(frames=MID_ERROR)
    texts: list[str] = []

    async def read() -> None:
        async with claude.messages.stream(model="gpt-test", max_tokens=50, messages=HI) as stream:
            async for text in stream.text_stream:
                texts.append(text)

    with pytest.raises(anthropic.APIStatusError) as info:
        await read()
    assert "".join(texts) == "Partial "
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "api_error"
    record = await stream_client.app[STORE].messages.find_one({"content": "Partial "})
    assert record["status"] == "failed" and record["transport"] == "anthropic"


# --------------------------------------------------------------------------- records, keys
async def test_the_record_keeps_the_transport_usage_and_tool_calls(
    claude, fake_openai, stream_client
):
    replay(fake_openai, "tool_calls")
    message = await claude.messages.create(
        model="gpt-test", max_tokens=200, messages=[ASK], tools=TOOLS
    )
    store = stream_client.app[STORE]
    record = await store.messages.find_one({"transport": "anthropic"})
    assert message.id == "msg_" + record["_id"].replace("-", "")
    assert record["status"] == "complete" and record["finish_reason"] == "tool_calls"
    assert record["tokens"]["prompt"] == 82 and record["tokens"]["completion"] == 51
    assert record["tokens"]["cached"] == 64 and record["tokens"]["source"] == "upstream"
    assert [c["function"]["arguments"] for c in record["tool_calls"]] == [
        '{"city": "Paris"}',
        '{"tz": "CET"}',
    ]
    await settled(store.db)  # the replica's lease on the month given back
    usage = await store.usage.find_one({"user_id": "alice"})
    assert usage["used"] == 133 and usage["reserved"] == 0


async def test_an_idempotency_key_sends_once(claude, fake_openai):
    replay(fake_openai, "tool_calls")
    key = {"Idempotency-Key": "anthropic-once"}
    ask = {"model": "gpt-test", "max_tokens": 200, "messages": [ASK], "tools": TOOLS}
    first = await claude.messages.with_raw_response.create(**ask, extra_headers=key)
    again = await claude.messages.with_raw_response.create(**ask, extra_headers=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(fake_openai.requests) == 1
    assert (await again.parse()).model_dump() == (await first.parse()).model_dump()
    with pytest.raises(anthropic.UnprocessableEntityError):
        await claude.messages.create(**{**ask, "max_tokens": 100}, extra_headers=key)


async def test_a_stored_chat_header_is_refused(claude):
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude.messages.create(
            model="demo", max_tokens=10, messages=HI, extra_headers={"X-Chat-Id": "x"}
        )
    assert "X-Chat-Id" in info.value.message


async def test_too_large_and_overloaded_take_anthropics_error_types(
    aiohttp_client, stream_settings, token_for, fake_openai
):
    client = await aiohttp_client(create_app(stream_settings(max_body_bytes=4096)))
    sdk = sdk_for(client, token_for("alice"))
    fake_openai.default = Script(status=503)
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await sdk.messages.create(model="gpt-test", max_tokens=10, messages=HI)
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    resp = await client.post(
        "/v1/messages",
        json={
            "model": "demo",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "x" * 5000}],
        },
        headers={"x-api-key": token_for("alice")},
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "request_too_large"
    await sdk.close()


# --------------------------------------------------------------------------- models
async def test_the_sdk_lists_and_retrieves_models_in_anthropics_shape(claude, stream_client, auth):
    """``/v1/models`` asked by an Anthropic client (``anthropic-version``) answers Anthropic's
    Models API: ``ModelInfo`` objects, paged by ``limit`` and ``after_id`` (the SDK's
    auto-pagination walks them), errors in Anthropic's shape."""
    listed = [m async for m in claude.models.list(limit=2)]
    assert [m.id for m in listed] == ["gpt-test", "demo", "claude"]
    first = listed[0]
    assert first.type == "model" and first.display_name == "gpt-test"
    assert first.created_at.tzinfo is not None
    assert first.max_input_tokens == 16000 and first.max_tokens == 256
    page = await claude.models.list(limit=2)
    assert (page.first_id, page.last_id, page.has_more) == ("gpt-test", "demo", True)
    back = await claude.models.list(before_id="claude", limit=1)
    assert [m.id for m in back.data] == ["demo"] and back.has_more
    assert (await claude.models.retrieve("claude")).max_input_tokens == 200000
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude.models.retrieve("gpt-nope")
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await claude.models.list(limit=1001)
    assert bad.value.body["error"]["type"] == "invalid_request_error"


async def test_claude_code_lists_models_with_its_key_in_x_api_key(stream_client, token_for):
    """Claude Code sends its key as ``x-api-key``: taken on the models' routes too when the
    request is an Anthropic client's; an OpenAI client's request there is as before."""
    anthropic_headers = {"x-api-key": token_for("alice"), "anthropic-version": "2023-06-01"}
    resp = await stream_client.get("/v1/models", headers=anthropic_headers)
    assert resp.status == 200
    body = await resp.json()
    assert [m["id"] for m in body["data"]] == ["gpt-test", "demo", "claude"]
    assert body["has_more"] is False and body["data"][0]["type"] == "model"
    resp = await stream_client.get("/v1/models/demo", headers=anthropic_headers)
    assert (await resp.json())["type"] == "model"
    for limit in ("0", "²", "1" * 5000, "-1", "x"):  # each a 400 in Anthropic's shape, no 500
        resp = await stream_client.get(
            "/v1/models", params={"limit": limit}, headers=anthropic_headers
        )
        assert resp.status == 400 and (await resp.json())["type"] == "error", limit
    resp = await stream_client.get("/v1/models", headers={"x-api-key": token_for("alice")})
    assert resp.status == 401 and "type" not in await resp.json()  # OpenAI's error shape
    openai_headers = {"Authorization": f"Bearer {token_for('alice')}"}
    body = await (await stream_client.get("/v1/models", headers=openai_headers)).json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"

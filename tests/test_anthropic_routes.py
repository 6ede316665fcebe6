"""Anthropic models through every front door: the real app over real HTTP, SecantusDB, and the
fake Anthropic API replaying recorded streams (the chat SSE route, WebSocket, and
``/v1/chat/completions`` through the official ``openai`` SDK)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from service.app import create_app
from service.keys import SETTINGS, STORE
from service.models import load_catalogue
from service.providers.anthropic import AnthropicProvider
from service.providers.registry import build_providers
from service.store import utcnow
from service.stream.producer import period_of
from service.tokens import TokenCounter
from tests import anthropic_recordings as rec
from tests.fake_anthropic import FakeAnthropic, Script, words
from tests.faults import settled
from tests.sse_client import collect, text_of

KEY = "sk-ant-api03-upstream-secret-key-0123456789abcdef"
MODELS = [
    {
        "name": "claude",
        "provider": "anthropic",
        "upstream_id": "claude-sonnet-4-5",
        "context_window": 200000,
        "max_output_tokens": 4096,
    },
    {
        "name": "claude-retired",
        "provider": "anthropic",
        "upstream_id": "claude-2.1",
        "max_output_tokens": 256,
    },
    {"name": "demo", "provider": "demo", "context_window": 8000, "max_output_tokens": 512},
]
HI = [{"role": "user", "content": "Hi there"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name.removeprefix('get_')} of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for name in ("get_weather", "get_time")
]


@pytest.fixture
async def fake_anthropic():
    fake = FakeAnthropic()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def anthropic_settings(make_settings, fake_anthropic):
    def factory(**overrides: Any):
        values: dict[str, Any] = {
            "models": json.dumps(MODELS),
            "default_model": "claude",
            "anthropic_base_url": fake_anthropic.url,
            "anthropic_api_key": KEY,
            "upstream_retry_base_s": 0.01,
            "upstream_retry_max_s": 0.05,
            "upstream_idle_timeout_s": 5.0,
            "watch_interval_s": 0.1,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


@pytest.fixture
async def client(aiohttp_client, anthropic_settings):
    return await aiohttp_client(create_app(anthropic_settings()))


@pytest.fixture
async def oai(client, token_for):
    sdk = AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=token_for("alice"), max_retries=0
    )
    yield sdk
    await sdk.close()


# --------------------------------------------------------------------------- helpers
async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", headers=headers)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def send(client, chat_id, headers, message="Hi there"):
    return await client.post(
        f"/api/chat/{chat_id}/message", json={"message": message}, headers=headers
    )


async def records(client, chat_id):
    return await client.app[STORE].messages.find({"chat_id": chat_id}).sort("seq", 1).to_list(None)


async def usage_doc(client, user="alice"):
    return await client.app[STORE].usage.find_one({"user_id": user, "period": period_of(utcnow())})


def system_words(client) -> int:
    return words(client.app[SETTINGS].system_prompt)


def ended(logs, **match):
    lines = [e for e in logs if e["event"] == "stream.ended"]
    return [e for e in lines if all(e.get(k) == v for k, v in match.items())]


def replay(fake, *recordings: list[bytes]) -> None:
    fake.scripts = [Script(recording=r) for r in recordings]


# --------------------------------------------------------------------------- SSE chat route
async def test_a_chat_turn_streams_text_and_bills_the_upstreams_usage(
    client, fake_anthropic, auth, logs
):
    """The chat's system prompt goes as ``system``, the reservation is sized with
    count_tokens (no local tokenizer), the bill is Anthropic's own usage, and the key only
    ever travels in ``x-api-key``."""
    replay(fake_anthropic, rec.TEXT)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "Say hello"))
    names = [e["event"] for e in evs]
    assert names[0] == "started" and names[-1] == "done" and set(names[1:-1]) == {"delta"}
    assert text_of(evs) == rec.TEXT_ANSWER
    done = evs[-1]["data"]
    assert done["status"] == "complete" and done["finish_reason"] == "stop"
    assert done["tokens"] == {"prompt": 21, "completion": 12, "total": 33, "source": "upstream"}

    (call,) = fake_anthropic.calls("messages")
    assert call.body["system"] == [{"type": "text", "text": client.app[SETTINGS].system_prompt}]
    assert call.body["messages"] == [{"role": "user", "content": "Say hello"}]
    assert call.body["max_tokens"] == 4096 and call.body["model"] == "claude-sonnet-4-5"
    _, assistant = await records(client, chat_id)
    assert assistant["content"] == rec.TEXT_ANSWER and assistant["status"] == "complete"
    assert assistant["prompt_tokens"] == 2 + system_words(client)  # count_tokens, not estimated
    assert assistant["tokens"]["source"] == "upstream" and assistant["tokens"]["total"] == 33
    usage = await usage_doc(client)
    assert usage["used"] == 33 and usage["reserved"] == 0
    assert all(r.headers["x-api-key"] == KEY for r in fake_anthropic.requests)
    assert KEY not in repr(logs)
    assert ended(logs, outcome="completed", token_source="upstream")


async def test_thinking_is_its_own_event_on_the_chat_route_and_kept_on_the_record(
    client, fake_anthropic, auth
):
    replay(fake_anthropic, rec.THINKING)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "What is 6 times 7?"))
    names = [e["event"] for e in evs]
    reasoning = [e for e in evs if e["event"] == "reasoning"]
    assert "".join(e["data"]["text"] for e in reasoning) == rec.THINKING_TEXT
    assert all(int(e["id"]) == 0 for e in reasoning)  # before any answer text
    assert names.index("delta") > max(i for i, n in enumerate(names) if n == "reasoning")
    assert text_of(evs) == rec.THINKING_ANSWER
    _, assistant = await records(client, chat_id)
    assert assistant["content"] == rec.THINKING_ANSWER
    assert assistant["reasoning"] == rec.THINKING_TEXT
    assert assistant["tokens"]["reasoning"] == 71 and assistant["tokens"]["completion"] == 88
    assert rec.SIGNATURE not in repr(assistant)  # the record keeps the text, not the signature


async def test_cache_usage_is_recorded_with_the_cached_tokens(client, fake_anthropic, auth):
    replay(fake_anthropic, rec.CACHED)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert evs[-1]["data"]["tokens"] == {
        "prompt": 2062,
        "completion": 9,
        "total": 2071,
        "cached": 1792,
        "source": "upstream",
    }
    _, assistant = await records(client, chat_id)
    tokens = assistant["tokens"]
    assert tokens["cached"] == 1792
    assert tokens["details"]["prompt_tokens_details"] == {"cached_tokens": 1792}
    assert tokens["details"]["anthropic"]["cache_creation_input_tokens"] == 256
    assert (await usage_doc(client))["used"] == 2071


async def test_cache_writes_are_priced_as_written_for_five_minutes_or_an_hour(
    aiohttp_client, anthropic_settings, fake_anthropic, auth
):
    """Anthropic bills a prompt token written to its cache 1.25x input (2x for the 1-hour
    cache) and one read from it 0.1x: the record's cost, and the month's, are priced so."""
    price = {
        "input": "3",
        "cached_input": "0.30",
        "cache_write_input": "3.75",
        "cache_write_1h_input": "6",
        "output": "15",
    }
    models = [{**MODELS[0], "price": price}, *MODELS[1:]]
    client = await aiohttp_client(create_app(anthropic_settings(models=json.dumps(models))))
    split = {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 56}
    opening = {**rec.usage(14, 1, cache_write=256, cache_read=1792), "cache_creation": split}
    replay(fake_anthropic, [rec.start("msg_01CacheHour", rec.MODEL, opening), *rec.CACHED[1:]])
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    # per token, in nano-units: 3,000 input, 300 read, 3,750 written, 6,000 for an hour, 15,000
    cost = 14 * 3_000 + 1792 * 300 + 200 * 3_750 + 56 * 6_000 + 9 * 15_000
    assert cost == 1_800_600
    assert evs[-1]["data"]["cost"] == "0.0018006"
    _, assistant = await records(client, chat_id)
    assert assistant["cost"] == cost and assistant["price"]["cache_write_1h_input"] == "6"
    assert (await usage_doc(client))["cost"] == cost


async def test_an_answer_cut_before_its_bill_keeps_the_prompt_anthropic_reported(
    aiohttp_client, anthropic_settings, fake_anthropic, auth
):
    """``message_start`` says what the prompt cost (read from the cache, written to it, the
    rest); the answer's bill comes only in ``message_delta``. A turn cut before it (an error
    event, a cancel) is billed that prompt as Anthropic reported it, its cache reads and
    writes priced as such, and its answer counted here: not the prompt as ``count_tokens``
    counted it, priced whole at the input price."""
    price = {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75", "output": "15"}
    models = [{**MODELS[0], "price": price}, *MODELS[1:]]
    client = await aiohttp_client(create_app(anthropic_settings(models=json.dumps(models))))
    replay(fake_anthropic, [*rec.CACHED[:4], rec.OVERLOADED_EVENT])  # "From the cache," then
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "From the cache," and evs[-1]["event"] == "error"
    _, assistant = await records(client, chat_id)
    tokens = assistant["tokens"]
    completion = tokens["completion"]
    assert completion > 0 and tokens["source"] == "estimate"  # the answer: counted here
    assert tokens["prompt"] == 14 + 256 + 1792 and tokens["cached"] == 1792
    assert tokens["details"]["anthropic"]["cache_creation_input_tokens"] == 256
    # per token, in nano-units: 3,000 input, 300 read, 3,750 written, 15,000 output
    cost = 14 * 3_000 + 1792 * 300 + 256 * 3_750 + completion * 15_000
    assert assistant["cost"] == cost
    usage = await usage_doc(client)
    assert usage["cost"] == cost and usage["used"] == tokens["total"] and usage["reserved"] == 0


async def test_an_error_event_mid_answer_ends_the_turn_with_its_partial_text(
    client, fake_anthropic, auth, logs
):
    replay(fake_anthropic, rec.MID_ERROR)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == rec.MID_ERROR_TEXT
    err = evs[-1]
    assert err["event"] == "error" and err["data"]["code"] == "upstream_unavailable"
    assert err["data"]["status"] == "failed"
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == rec.MID_ERROR_TEXT
    assert assistant["tokens"]["completion"] > 0  # what was generated is billed
    assert (await usage_doc(client))["reserved"] == 0
    assert ended(logs, outcome="failed", reason="upstream_error")


async def test_an_overloaded_anthropic_is_retried_before_the_first_token(
    client, fake_anthropic, auth, logs
):
    fake_anthropic.fail_first(2, status=529, retry_after="0.01")
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert evs[-1]["event"] == "done" and text_of(evs) == rec.TEXT_ANSWER
    assert len(fake_anthropic.calls("messages")) == 3
    assert len([e for e in logs if e["event"] == "upstream.retry"]) == 2


async def test_count_tokens_down_falls_back_to_the_estimate(client, fake_anthropic, auth, logs):
    fake_anthropic.count_status = 529
    replay(fake_anthropic, rec.TEXT)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "still answered"))
    assert evs[-1]["event"] == "done" and text_of(evs) == rec.TEXT_ANSWER
    (failed,) = [e for e in logs if e["event"] == "stream.count_tokens_failed"]
    assert failed["code"] == "upstream_unavailable" and failed["error"]
    prompt = [
        {"role": "system", "content": client.app[SETTINGS].system_prompt},
        {"role": "user", "content": "still answered"},
    ]
    _, assistant = await records(client, chat_id)
    assert assistant["prompt_tokens"] == TokenCounter(None).count_messages(prompt)


async def test_the_system_prompt_is_counted_once(client, fake_anthropic, auth):
    replay(fake_anthropic, rec.TEXT, rec.TEXT)
    h = auth()
    chat_id = await new_chat(client, h)
    await collect(await send(client, chat_id, h, "one two three"))
    after_first = len(fake_anthropic.calls("count_tokens"))
    await collect(await send(client, chat_id, h, "four five"))
    counts = fake_anthropic.calls("count_tokens")
    assert after_first == 3 and len(counts) == 4  # the second turn counts only its messages
    assert "system" not in counts[-1].body
    _, first, _, second = await records(client, chat_id)
    assert first["prompt_tokens"] == 3 + system_words(client)
    history = words(["one two three", rec.TEXT_ANSWER, "four five"])
    assert second["prompt_tokens"] == history + system_words(client)


# --------------------------------------------------------------------------- WebSocket
async def test_a_websocket_turn_on_an_anthropic_model(client, fake_anthropic, auth):
    replay(fake_anthropic, rec.THINKING)
    h = auth()
    chat_id = await new_chat(client, h)
    ws = await client.ws_connect("/api/ws", headers=h)
    frames: list[dict[str, Any]] = []
    try:
        assert (await ws.receive_json(timeout=5))["type"] == "ready"
        await ws.send_json({"type": "send", "id": "t1", "chat_id": chat_id, "message": "6x7?"})
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(await ws.receive_json(timeout=5))
    finally:
        await ws.close()
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "stop"
    deltas = [f for f in frames if f["type"] == "delta"]
    assert "".join(f.get("reasoning", "") for f in deltas) == rec.THINKING_TEXT
    assert "".join(f["text"] for f in deltas) == rec.THINKING_ANSWER
    # the thinking block's signature is a step with neither: no empty frame for it
    assert all(f["text"] or f.get("reasoning") for f in deltas), deltas


# --------------------------------------------------------------------------- /v1 (openai SDK)
async def test_the_openai_sdk_streams_an_anthropic_model(oai, fake_anthropic, client):
    replay(fake_anthropic, rec.CACHED)
    stream = await oai.chat.completions.create(
        model="claude",
        messages=[{"role": "developer", "content": "Be quick."}, *HI],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=100,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        rec.CACHED_ANSWER
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2062, 9, 2071)
    assert usage.prompt_tokens_details.cached_tokens == 1792
    (call,) = fake_anthropic.calls("messages")
    assert call.body["system"] == [{"type": "text", "text": "Be quick."}]
    assert call.body["messages"] == HI and call.body["max_tokens"] == 100


async def test_the_openai_sdk_gets_a_whole_completion_from_an_anthropic_model(oai, fake_anthropic):
    replay(fake_anthropic, rec.MAX_TOKENS)
    completion = await oai.chat.completions.create(model="claude", messages=HI)
    choice = completion.choices[0]
    assert choice.message.content == "Once upon a time" and choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == 21 and completion.usage.completion_tokens == 4
    assert completion.model == "claude"


SIGNED_BLOCK = {
    "index": 0,
    "type": "thinking",
    "thinking": rec.THINKING_TEXT,
    "signature": rec.SIGNATURE,
}


async def test_thinking_reaches_the_sdk_as_reasoning_content(oai, fake_anthropic):
    """``reasoning_effort`` asks Anthropic to think (a budget below max_tokens); its thinking
    deltas come back as ``reasoning_content``, streamed and not, and the signed block whole
    as ``thinking_blocks`` (an extra key the SDK keeps as it came)."""
    replay(fake_anthropic, rec.THINKING, rec.THINKING)
    stream = await oai.chat.completions.create(
        model="claude", messages=HI, reasoning_effort="low", stream=True
    )
    chunks = [c async for c in stream]
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    assert reasoning == rec.THINKING_TEXT
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        rec.THINKING_ANSWER
    )
    blocks = [
        block
        for c in chunks
        if c.choices
        for block in (c.choices[0].delta.model_extra or {}).get("thinking_blocks", ())
    ]
    assert blocks == [SIGNED_BLOCK]
    completion = await oai.chat.completions.create(
        model="claude", messages=HI, reasoning_effort="low"
    )
    message = completion.choices[0].message
    assert message.content == rec.THINKING_ANSWER
    assert message.model_extra["reasoning_content"] == rec.THINKING_TEXT
    assert message.model_extra["thinking_blocks"] == [SIGNED_BLOCK]
    assert completion.usage.completion_tokens_details.reasoning_tokens == 71
    bodies = [c.body for c in fake_anthropic.calls("messages")]
    assert all(b["thinking"] == {"type": "enabled", "budget_tokens": 2048} for b in bodies)


async def test_the_openai_sdks_stream_helper_puts_the_thinking_blocks_together(oai, fake_anthropic):
    """``chat.completions.stream`` merges list deltas by ``index``: a signed block and a
    redacted one are two entries of the final message's ``thinking_blocks``."""
    replay(fake_anthropic, rec.REDACTED)
    async with oai.chat.completions.stream(
        model="claude", messages=HI, reasoning_effort="low"
    ) as stream:
        completion = await stream.get_final_completion()
    message = completion.choices[0].message
    assert message.content == rec.REDACTED_ANSWER
    assert message.model_extra["reasoning_content"] == rec.REDACTED_THINKING
    assert message.model_extra["thinking_blocks"] == [
        {
            "index": 0,
            "type": "thinking",
            "thinking": rec.REDACTED_THINKING,
            "signature": rec.SIGNATURE,
        },
        {"index": 1, "type": "redacted_thinking", "data": rec.REDACTED_DATA},
    ]


async def test_a_tool_loop_keeps_thinking_when_the_answer_is_handed_back(oai, fake_anthropic):
    """The answer handed back as it came carries its ``thinking_blocks``: the tool loop's
    next step sends the signed block back first in the assistant message, and still thinks."""
    replay(fake_anthropic, rec.THINKING_TOOL_USE, rec.TOOL_FOLLOW_UP)
    ask = {"role": "user", "content": "What's the weather in Paris?"}
    first = await oai.chat.completions.create(
        model="claude", messages=[ask], tools=TOOLS, reasoning_effort="low"
    )
    answer = first.choices[0].message
    assert [c.model_dump() for c in answer.tool_calls] == [rec.LOOP_CALL]
    result = {"role": "tool", "tool_call_id": rec.LOOP_CALL["id"], "content": "Sunny, 21 °C"}
    second = await oai.chat.completions.create(
        model="claude", messages=[ask, answer, result], tools=TOOLS, reasoning_effort="low"
    )
    assert second.choices[0].message.content == rec.TOOL_FOLLOW_UP_ANSWER
    body = fake_anthropic.calls("messages")[-1].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["messages"][1]["content"][0] == {
        "type": "thinking",
        "thinking": rec.LOOP_THINKING,
        "signature": rec.LOOP_SIGNATURE,
    }
    assert [b["type"] for b in body["messages"][1]["content"]] == ["thinking", "tool_use"]


async def test_an_answer_handed_back_as_it_came_is_the_next_turns_context(oai, fake_anthropic):
    """``messages.append(completion.choices[0].message)``: the SDK sends the answer back with
    its reasoning_content, thinking_blocks, refusal and annotations; the text and the signed
    thinking block go to Anthropic (which drops a finished turn's thinking itself), the rest
    not."""
    replay(fake_anthropic, rec.THINKING, rec.TEXT)
    first = await oai.chat.completions.create(model="claude", messages=HI, reasoning_effort="low")
    answer = first.choices[0].message
    assert answer.model_extra["reasoning_content"] == rec.THINKING_TEXT
    follow_up = {"role": "user", "content": "Thanks!"}
    second = await oai.chat.completions.create(model="claude", messages=[*HI, answer, follow_up])
    assert second.choices[0].message.content == rec.TEXT_ANSWER
    body = fake_anthropic.calls("messages")[-1].body
    signed = {k: v for k, v in SIGNED_BLOCK.items() if k != "index"}
    assert body["messages"] == [
        *HI,
        {"role": "assistant", "content": [signed, {"type": "text", "text": rec.THINKING_ANSWER}]},
        follow_up,
    ]


async def test_a_stateless_tool_loop_in_two_steps(oai, fake_anthropic):
    """Step one: the SDK gets Anthropic's two tool_use blocks as tool calls. Step two: the
    client sends them back with the results; Anthropic gets tool_use and tool_result blocks."""
    replay(fake_anthropic, rec.TOOL_USE, rec.TOOL_FOLLOW_UP)
    ask = {"role": "user", "content": "Weather and time in Paris?"}
    stream = await oai.chat.completions.create(
        model="claude", messages=[ask], tools=TOOLS, tool_choice="auto", stream=True
    )
    chunks = [c async for c in stream]
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in calls.values()
    ] == rec.TOOL_CALLS
    assistant = {"role": "assistant", "content": rec.TOOL_TEXT, "tool_calls": rec.TOOL_CALLS}
    results = [
        {"role": "tool", "tool_call_id": "toolu_01Weather4Kp8Xz", "content": "Sunny, 21 °C"},
        {"role": "tool", "tool_call_id": "toolu_01Time9Qm3Vw", "content": "14:05"},
    ]
    completion = await oai.chat.completions.create(
        model="claude", messages=[ask, assistant, *results], tools=TOOLS
    )
    assert completion.choices[0].message.content == rec.TOOL_FOLLOW_UP_ANSWER
    first, second = (c.body for c in fake_anthropic.calls("messages"))
    assert first["tool_choice"] == {"type": "auto"}
    assert [t["name"] for t in first["tools"]] == ["get_weather", "get_time"]
    assert second["messages"] == [
        ask,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": rec.TOOL_TEXT},
                {
                    "type": "tool_use",
                    "id": "toolu_01Weather4Kp8Xz",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01Time9Qm3Vw",
                    "name": "get_time",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01Weather4Kp8Xz",
                    "content": "Sunny, 21 °C",
                },
                {"type": "tool_result", "tool_use_id": "toolu_01Time9Qm3Vw", "content": "14:05"},
            ],
        },
    ]


async def test_a_tool_loop_on_a_stored_chat_sends_the_chats_history(
    oai, client, fake_anthropic, auth
):
    """With X-Chat-Id the second step's context is the chat's record: the answer's tool calls
    (kept on it) as tool_use blocks, the stored results as tool_result blocks."""
    replay(fake_anthropic, rec.TOOL_USE, rec.TOOL_FOLLOW_UP)
    h = auth()
    chat_id = await new_chat(client, h)
    ask = {"role": "user", "content": "Weather and time in Paris?"}
    first = await oai.chat.completions.create(
        model="claude", messages=[ask], tools=TOOLS, extra_headers={"X-Chat-Id": chat_id}
    )
    calls = [c.model_dump() for c in first.choices[0].message.tool_calls]
    assert calls == rec.TOOL_CALLS and first.choices[0].finish_reason == "tool_calls"
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": f"result {i}"}
        for i, c in enumerate(calls)
    ]
    assistant = {"role": "assistant", "content": rec.TOOL_TEXT, "tool_calls": calls}
    second = await oai.chat.completions.create(
        model="claude",
        messages=[ask, assistant, *results],
        tools=TOOLS,
        extra_headers={"X-Chat-Id": chat_id},
    )
    assert second.choices[0].message.content == rec.TOOL_FOLLOW_UP_ANSWER
    body = fake_anthropic.calls("messages")[-1].body
    assert body["system"] == [{"type": "text", "text": client.app[SETTINGS].system_prompt}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert [b["type"] for b in body["messages"][1]["content"]] == ["text", "tool_use", "tool_use"]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": c["id"], "content": f"result {i}"}
        for i, c in enumerate(calls)
    ]
    stored = await records(client, chat_id)
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"] == rec.TOOL_CALLS


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"seed": 7}, "seed"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"type": "custom", "custom": {"name": "run_sql"}}]}, "tools[0]"),
        (
            {
                "tools": TOOLS,
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": "auto", "tools": TOOLS[:1]},
                },
            },
            "tool_choice",
        ),
        (
            {
                "messages": [
                    *HI,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "custom",
                                "custom": {"name": "run_sql", "input": "SELECT 1"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "1"},
                ]
            },
            "messages[1].tool_calls[0]",
        ),
    ],
)
async def test_what_anthropic_cannot_honour_is_a_400_naming_it(
    oai, client, fake_anthropic, asked, param
):
    body = {"messages": HI, **asked}
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="claude", messages=body.pop("messages"), extra_body=body
        )
    err = info.value
    assert err.code == "unsupported_parameter" and err.param == param
    assert "'claude" in err.message and "anthropic" in err.message
    assert not fake_anthropic.calls("messages")
    await settled(client.app[STORE].db)  # one refused when the turn opens: the lease goes back
    usage = await usage_doc(client)
    assert usage is None or usage["used"] == 0


async def test_tool_call_arguments_that_do_not_parse_are_an_invalid_value(oai, fake_anthropic):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="claude",
            messages=[
                *HI,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
        )
    assert info.value.code == "invalid_value"
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    assert not fake_anthropic.calls("messages") and not fake_anthropic.calls("count_tokens")


# --------------------------------------------------------------------------- models
async def test_the_model_list_offers_what_anthropic_lists(oai, fake_anthropic):
    """``claude-sonnet-4-5`` is an alias of a listed dated id; ``claude-2.1`` is not listed."""
    listed = [m.id async for m in oai.models.list()]
    assert "claude" in listed and "claude-retired" not in listed and "demo" in listed
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="claude-retired", messages=HI)
    assert fake_anthropic.calls("models")


async def test_the_provider_is_built_from_settings(anthropic_settings):
    settings = anthropic_settings()
    async with aiohttp.ClientSession() as session:
        providers = build_providers(settings, session, load_catalogue(settings))
    assert isinstance(providers["anthropic"], AnthropicProvider)
    assert {m.name: m.encoding for m in load_catalogue(settings).all()}["claude"] is None


async def test_an_anthropic_model_with_a_local_encoding_stops_start_up(anthropic_settings):
    from service.settings import SettingsError

    entry = {**MODELS[0], "encoding": "o200k_base"}
    settings = anthropic_settings(models=json.dumps([entry]))
    with pytest.raises(SettingsError, match=r"model 'claude': encoding: .*count_tokens"):
        load_catalogue(settings)

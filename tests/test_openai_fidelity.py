"""The OpenAI route relays what the upstream sent: recorded streams (tool calls split across
chunks, parallel tool calls, reasoning, a refusal, logprobs, n=2, usage with cached and reasoning
tokens) reach the official SDK as they would from the upstream directly, streamed and not.

Each recording is asked of the fake upstream twice: directly (the SDK pointed at it) and through
the gateway; the SDK's parsed objects must be equal field by field, minus the ids the gateway
owns (``id``, ``created``, ``model``), and so must the raw frames, in each choice's order. Where
the gateway may differ from the upstream by design, the comparison says so: a slow client gets
consecutive plain text deltas in one frame, the gateway's own first frame (the role) is sent
before the upstream's fingerprint is known, and OpenAI's ``obfuscation`` padding is not relayed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from service.keys import STORE
from tests.fake_openai import Script
from tests.openai_recordings import FP, MID_ERROR, RECORDINGS, TOOLS_USAGE, recording

HI = [{"role": "user", "content": "Hi there"}]
GATEWAY_OWNED = ("id", "created", "model")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} of a place",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for name in ("get_weather", "get_time")
]
# What each recording is asked with (the gateway reserves n answers, sends the tools on, ...).
ASKED: dict[str, dict[str, Any]] = {
    "tool_calls": {"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": True},
    "reasoning": {"reasoning_effort": "low"},
    "refusal": {},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "n2": {"n": 2, "seed": 7},
}


@pytest.fixture
async def direct(fake_openai):
    sdk = AsyncOpenAI(base_url=fake_openai.url, api_key="sk-upstream-secret", max_retries=0)
    yield sdk
    await sdk.close()


@pytest.fixture
async def oai(stream_client, token_for):
    sdk = AsyncOpenAI(
        base_url=str(stream_client.make_url("/v1")), api_key=token_for("alice"), max_retries=0
    )
    yield sdk
    await sdk.close()


def replay(fake_openai, name: str) -> None:
    frames, completion = recording(name)
    fake_openai.scripts = [Script(frames=frames, completion=completion) for _ in range(2)]


def without_ids(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if k not in GATEWAY_OWNED}


async def sdk_stream(sdk: AsyncOpenAI, model: str, asked: dict[str, Any]) -> list[Any]:
    stream = await sdk.chat.completions.create(
        model=model, messages=HI, stream=True, stream_options={"include_usage": True}, **asked
    )
    return [chunk async for chunk in stream]


def accumulated(chunks: list[Any]) -> dict[str, Any]:
    """The SDK's own accumulation of a stream (what ``client.chat.completions.stream`` gives)."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return without_ids(state.current_completion_snapshot.model_dump())


async def raw_frames(http, url: str, headers: dict[str, str], body: dict[str, Any]) -> list[Any]:
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        raw = (await resp.read()).replace(b"\r\n", b"\n")
    frames = []
    for block in raw.split(b"\n\n"):
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if data:
            frames.append("[DONE]" if data == [b"[DONE]"] else json.loads(b"\n".join(data)))
    return frames


def normalized(frames: list[Any]) -> dict[str, Any]:
    """Frames as comparable facts: each choice's steps in order (consecutive plain text merged,
    steps that say nothing dropped, ``role`` dropped: always the assistant), the usage, the
    fingerprints and tiers seen, and how the stream ended."""
    steps: dict[int, list[dict[str, Any]]] = defaultdict(list)
    usage, meta, ending = [], set(), []
    for frame in frames:
        if frame == "[DONE]" or "error" in frame:
            ending.append("[DONE]" if frame == "[DONE]" else "error")
            continue
        frame = {k: v for k, v in frame.items() if k not in (*GATEWAY_OWNED, "obfuscation")}
        assert frame.pop("object") == "chat.completion.chunk"
        if frame.get("usage"):
            usage.append(frame["usage"])
        frame.pop("usage", None)
        seen = (frame.pop("system_fingerprint", None), frame.pop("service_tier", None))
        choices = frame.pop("choices")
        assert frame == {}, f"unexpected top-level fields: {frame}"
        if choices:
            meta.add(seen)
        for choice in choices:
            delta = {k: v for k, v in choice["delta"].items() if v is not None and k != "role"}
            step = {
                "delta": delta,
                "logprobs": choice["logprobs"],
                "finish": choice["finish_reason"],
            }
            plain = set(delta) <= {"content"} and step["logprobs"] is None and not step["finish"]
            run = steps[choice["index"]]
            if plain and not delta.get("content"):
                continue
            if plain and run and run[-1].get("plain"):
                run[-1]["delta"]["content"] += delta["content"]
                continue
            run.append({**step, "plain": plain})
    meta.discard((None, None))  # the gateway's role frame: sent before the upstream's first
    return {"steps": dict(steps), "usage": usage, "meta": meta, "ending": ending}


@pytest.mark.parametrize("name", list(RECORDINGS))
async def test_the_sdk_gets_what_the_upstream_streamed(name, oai, direct, fake_openai):
    replay(fake_openai, name)
    asked = ASKED[name]
    upstream = await sdk_stream(direct, "gpt-4o-mini", asked)
    through = await sdk_stream(oai, "gpt-test", asked)
    assert accumulated(through) == accumulated(upstream)
    sent = fake_openai.requests[1]
    for key, value in asked.items():  # sent on as given
        assert sent[key] == value
    assert [c.model for c in through] == ["gpt-test"] * len(through)
    assert len({c.id for c in through}) == 1


@pytest.mark.parametrize("name", list(RECORDINGS))
async def test_the_raw_frames_are_the_upstreams(
    name, stream_client, auth, fake_openai, aiohttp_client
):
    replay(fake_openai, name)
    body = {
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
        **ASKED[name],
    }
    http = stream_client.session
    upstream = await raw_frames(
        http,
        fake_openai.url + "/chat/completions",
        {"Authorization": "Bearer sk-upstream-secret"},
        {**body, "model": "gpt-4o-mini"},
    )
    through = await raw_frames(
        http,
        str(stream_client.make_url("/v1/chat/completions")),
        auth(),
        {**body, "model": "gpt-test"},
    )
    assert normalized(through) == normalized(upstream)
    assert normalized(through)["meta"] == {(FP, "default")}
    # A stream always ends with choice 0's finish reason, then the usage, then [DONE].
    last_choice = next(f for f in reversed(through[:-1]) if f["choices"])
    assert last_choice["choices"][0]["finish_reason"] is not None
    assert through[-2]["usage"] and through[-1] == "[DONE]"


@pytest.mark.parametrize("name", list(RECORDINGS))
async def test_the_non_streamed_answer_is_the_upstreams(name, oai, direct, fake_openai):
    replay(fake_openai, name)
    asked = ASKED[name]
    upstream = await direct.chat.completions.create(model="gpt-4o-mini", messages=HI, **asked)
    through = await oai.chat.completions.create(model="gpt-test", messages=HI, **asked)
    got, want = without_ids(through.model_dump()), without_ids(upstream.model_dump())
    assert json.dumps(got, indent=1, sort_keys=True) == json.dumps(want, indent=1, sort_keys=True)
    assert through.model == "gpt-test" and through.id.startswith("chatcmpl-")


async def test_the_record_keeps_tool_calls_reasoning_and_the_detailed_usage(
    oai, fake_openai, stream_client
):
    store = stream_client.app[STORE]
    for name in ("tool_calls", "reasoning", "refusal"):
        replay(fake_openai, name)
        completion = await oai.chat.completions.create(model="gpt-test", messages=HI, **ASKED[name])
        record = await store.messages.find_one({"_id": completion.id.removeprefix("chatcmpl-")})
        assert record["status"] == "complete"
        if name == "tool_calls":
            assert [c["function"]["arguments"] for c in record["tool_calls"]] == [
                '{"city": "Paris"}',
                '{"tz": "CET"}',
            ]
            assert record["finish_reason"] == "tool_calls"
            assert record["tokens"] == {
                "prompt": 82,
                "completion": 51,
                "total": 133,
                "cached": 64,
                "details": {k: v for k, v in TOOLS_USAGE.items() if k.endswith("_details")},
                "source": "upstream",
            }
        if name == "reasoning":
            assert record["reasoning"] == "The user wants a number; 6 times 7 is 42."
            assert record["content"] == "It is 42."
            assert record["tokens"]["reasoning"] == 28
        if name == "refusal":
            assert record["refusal"] == "I'm sorry, I can't help with that."


async def test_an_error_mid_stream_reaches_the_client_in_band(oai, fake_openai, stream_client):
    fake_openai.default = Script(frames=MID_ERROR)
    stream = await oai.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    texts: list[str] = []

    async def read() -> None:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError) as info:
        await read()
    assert "".join(texts) == "Partial "
    assert "error" in str(info.value).lower()
    record = await stream_client.app[STORE].messages.find_one({"content": "Partial "})
    assert record["status"] == "failed"


# --------------------------------------------------------------------------- tool loops
ASK = {"role": "user", "content": "What's the weather and the time in Paris?"}
RESULTS = [
    {"role": "tool", "tool_call_id": "call_W1", "content": '{"sky": "sunny", "c": 21}'},
    {"role": "tool", "tool_call_id": "call_T2", "content": "14:05"},
]


async def tool_loop(oai, fake_openai, headers: dict[str, str] | None = None) -> list[Any]:
    """call -> tool results -> answer, as an SDK program runs it (streamed, then not)."""
    frames, _ = recording("tool_calls")
    fake_openai.scripts = [Script(frames=frames), Script(chunks=["Sunny, 21 °C; it is 14:05."])]
    stream = await oai.chat.completions.create(
        model="gpt-test", messages=[ASK], tools=TOOLS, stream=True, extra_headers=headers
    )
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    async for chunk in stream:
        state.handle_chunk(chunk)
    called = state.get_final_completion().choices[0]
    assert called.finish_reason == "tool_calls"
    assert [c.function.name for c in called.message.tool_calls] == ["get_weather", "get_time"]
    assistant = called.message.model_dump(include={"role", "content", "tool_calls"})
    assistant["tool_calls"] = [
        {
            "id": c.id,
            "type": "function",
            "function": c.function.model_dump(include={"name", "arguments"}),
        }
        for c in called.message.tool_calls
    ]
    answer = await oai.chat.completions.create(
        model="gpt-test", messages=[ASK, assistant, *RESULTS], tools=TOOLS, extra_headers=headers
    )
    assert answer.choices[0].message.content == "Sunny, 21 °C; it is 14:05."
    assert answer.choices[0].finish_reason == "stop"
    return [assistant, fake_openai.requests[-1]]


async def test_a_tool_loop_on_a_stateless_request(oai, fake_openai):
    assistant, sent = await tool_loop(oai, fake_openai)
    assert sent["messages"] == [ASK, {**assistant, "content": None}, *RESULTS]
    assert sent["tools"] == TOOLS


async def test_a_tool_loop_on_a_stored_chat_keeps_calls_and_results_in_history(
    oai, fake_openai, stream_client, auth
):
    h = auth()
    resp = await stream_client.post("/api/chat", json=None, headers=h)
    chat_id = (await resp.json())["chat_id"]
    assistant, sent = await tool_loop(oai, fake_openai, {"X-Chat-Id": chat_id})
    calls = assistant["tool_calls"]
    # The second turn's context is the chat's history: the question, the calls, the results.
    assert sent["messages"][1:] == [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": calls},
        *RESULTS,
    ]
    assert sent["messages"][0]["role"] == "system"
    resp = await stream_client.get(f"/api/chat/{chat_id}", headers=h)
    stored = (await resp.json())["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"] == calls and stored[1]["finish_reason"] == "tool_calls"
    assert stored[2]["results"] == [
        {"tool_call_id": r["tool_call_id"], "content": r["content"]} for r in RESULTS
    ]
    assert stored[3]["content"] == "Sunny, 21 °C; it is 14:05."
    # and a third turn on the chat still sends the whole loop as its history
    fake_openai.scripts = [Script(chunks=["You're welcome."])]
    await oai.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "Thanks!"}],
        extra_headers={"X-Chat-Id": chat_id},
    )
    roles = [m["role"] for m in fake_openai.requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "user"]


async def test_custom_tools_and_allowed_tools_reach_the_upstream_as_written(oai, fake_openai):
    """OpenAI's custom tools (free-form input), a history with a custom tool call and its
    result, and an ``allowed_tools`` tool choice are OpenAI's own request: sent on as written,
    not refused."""
    custom = {"type": "custom", "custom": {"name": "run_sql", "description": "Runs SQL"}}
    call = {"id": "call_C1", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1"}}
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "custom", "custom": {"name": "run_sql"}}],
        },
    }
    messages: list[Any] = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_C1", "content": "1"},
    ]
    await oai.chat.completions.create(
        model="gpt-test", messages=messages, tools=[custom, *TOOLS], tool_choice=allowed
    )
    named = {"type": "custom", "custom": {"name": "run_sql"}}
    await oai.chat.completions.create(
        model="gpt-test", messages=[ASK], tools=[custom], tool_choice=named
    )
    first, second = fake_openai.requests
    assert first["messages"] == messages and first["tools"] == [custom, *TOOLS]
    assert first["tool_choice"] == allowed and second["tool_choice"] == named


# --------------------------------------------------------------------------- refusals
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"tools": TOOLS}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "messages[0].content[0]"),
    ],
)
async def test_what_a_provider_cannot_honour_is_refused_by_name(oai, stream_client, asked, param):
    """The demo model is text only: anything more is a 400 naming the parameter and the model,
    before anything is reserved; nothing is dropped silently."""
    body = {"messages": HI, **asked}
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="demo", messages=body.pop("messages"), extra_body=body
        )
    err = info.value
    assert err.code == "unsupported_parameter" and err.param == param
    assert "'demo'" in err.message
    usage = await stream_client.app[STORE].usage.find_one({"user_id": "alice"})
    assert usage is None or usage["reserved"] == 0


async def test_values_that_ask_for_nothing_are_accepted_by_any_provider(oai):
    completion = await oai.chat.completions.create(
        model="demo", messages=HI, n=1, logprobs=False, seed=3, user="u-1", metadata={"k": "v"}
    )
    assert completion.choices[0].message.content


@pytest.mark.parametrize("name", ["tool_calls", "reasoning", "refusal"])
async def test_a_replayed_send_answers_the_same_completion_from_the_record(name, oai, fake_openai):
    """An Idempotency-Key retry after the turn ended is answered from the stored record (no
    upstream call): the same completion, tool calls, reasoning, refusal and usage included."""
    replay(fake_openai, name)
    key = {"Idempotency-Key": f"fidelity-{name}"}
    first = await oai.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, extra_headers=key, **ASKED[name]
    )
    again = await oai.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, extra_headers=key, **ASKED[name]
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(fake_openai.requests) == 1
    assert again.parse().model_dump() == first.parse().model_dump()


# ------------------------------------------------------------------- billed without usage
GENERATED = {  # what each recording's model wrote, every choice and every part of it
    "tool_calls": ["get_weather", '{"city": "Paris"}', "get_time", '{"tz": "CET"}'],
    "reasoning": ["The user wants a number; 6 times 7 is 42.", "It is 42."],
    "refusal": ["I'm sorry, I can't help with that."],
    "n2": ["Red apple.", "Blue sky."],
}


@pytest.mark.parametrize("name", sorted(GENERATED))
async def test_an_answer_the_upstream_reports_no_usage_for_is_billed_for_all_it_wrote(
    stream_client, fake_openai, auth, name
):
    """No usage (an upstream that does not send it, a stream cut before it): the completion
    is the local count of everything the model generated, not of choice 0's text alone:
    tool calls, reasoning, a refusal and the other choices of ``n`` are output too."""
    from service.tokens import TokenCounter

    frames, _ = recording(name)
    fake_openai.scripts = [Script(frames=[f for f in frames if not f.get("usage")])]
    body = {"model": "gpt-test", "messages": HI, "stream": True, **ASKED[name]}
    r = await stream_client.post("/v1/chat/completions", json=body, headers=auth())
    assert r.status == 200, await r.text()
    await r.read()
    db = stream_client.app[STORE].db
    record = await db.messages.find_one({"role": "assistant"})
    counter = TokenCounter()
    assert record["tokens"]["source"] == "tokenizer"
    assert record["tokens"]["completion"] == sum(counter.count(t) for t in GENERATED[name])
    usage = await db.usage.find_one({"user_id": "alice"})
    assert usage["used"] == record["tokens"]["total"]


async def test_a_custom_tool_call_without_usage_is_billed_for_its_input(
    stream_client, fake_openai, auth
):
    """OpenAI's custom tools stream a free-form ``input``, not ``arguments``: billed too when
    the upstream reports no usage (it was not counted: only functions' arguments were)."""
    from service.tokens import TokenCounter

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}

    call = {"index": 0, "id": "call_1", "type": "custom", "custom": {"name": "run", "input": ""}}
    code = "print(sum(range(10)))\n" * 20
    frames = [
        chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "custom": {"input": code}}]}),
        chunk({}, "tool_calls"),
    ]
    fake_openai.scripts = [Script(frames=frames)]
    tools = [{"type": "custom", "custom": {"name": "run"}}]
    body = {"model": "gpt-test", "messages": HI, "stream": True, "tools": tools}
    r = await stream_client.post("/v1/chat/completions", json=body, headers=auth())
    assert r.status == 200, await r.text()
    await r.read()
    record = await stream_client.app[STORE].db.messages.find_one({"role": "assistant"})
    counter = TokenCounter()
    assert record["tokens"]["completion"] == counter.count("run") + counter.count(code)

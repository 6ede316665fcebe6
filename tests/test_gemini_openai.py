"""Gemini models behind the OpenAI route, translated: the official ``openai`` SDK over real
sockets, the app, SecantusDB, and a fake Gemini API speaking Google's wire format. What Gemini
can do arrives translated (tools, tool choice, response format, images, thinking, log
probabilities); what it cannot is 400 ``unsupported_parameter`` before anything is asked of it."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from service.app import create_app
from service.keys import STORE
from service.store import utcnow
from service.stream.producer import period_of
from tests.fake_gemini import FakeGemini, Script, count_request, count_words, model
from tests.faults import settled

STREAM = "streamGenerateContent"
SIGNATURE = "c2lnbmF0dXJlLW9mLXRoZS1jYWxs"
MODELS = [
    {
        "name": name,
        "provider": "gemini",
        "upstream_id": upstream,
        "context_window": 32000,
        "max_output_tokens": 256,
        "encoding": None,
    }
    for name, upstream in (
        ("gemini-test", "gemini-2.5-flash"),
        ("gemini-three", "gemini-3-flash-preview"),
    )
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
QUESTION = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Paris?"},
]
HI = [{"role": "user", "content": "Hi"}]
PIXEL = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture
async def fake_gemini():
    fake = FakeGemini()
    fake.models = [
        model("gemini-2.5-flash", "generateContent", "countTokens"),
        model("gemini-3-flash-preview", "generateContent", "countTokens"),
    ]
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def client(aiohttp_client, make_settings, fake_gemini):
    settings = make_settings(
        models=json.dumps(MODELS),
        default_model="gemini-test",
        gemini_base_url=fake_gemini.url,
        gemini_api_key="AIza-upstream-secret-key",
        upstream_retry_base_s=0.01,
        upstream_retry_max_s=0.05,
        upstream_idle_timeout_s=5.0,
        watch_interval_s=0.1,
    )
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def sdk(client, token_for):
    sdk = AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=token_for("alice"), max_retries=0
    )
    yield sdk
    await sdk.close()


def asked_nothing(fake: FakeGemini) -> bool:
    """Neither a generation nor a token count (the model list is read to resolve the model)."""
    return all(r.method == "GET" for r in fake.requests)


def bodies(fake: FakeGemini) -> list[dict[str, Any]]:
    return [r.body for r in fake.calls(STREAM)]


async def assistant_records(client) -> list[dict[str, Any]]:
    store = client.app[STORE]
    return await store.messages.find({"role": "assistant"}).sort("created_at", 1).to_list(None)


def call_part(args: dict[str, Any], signature: str | None = SIGNATURE, name="get_weather"):
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    if signature:
        part["thoughtSignature"] = signature
    return part


# --------------------------------------------------------------------------- the tool loop
async def _ask(sdk: AsyncOpenAI, stream: bool, messages: list[Any], **kw: Any):
    """One completion through the SDK: (the assistant message to send back, finish reason,
    text). Streamed, the message is put together from the deltas as a client writes it by hand:
    the standard fields only."""
    if not stream:
        completion = await sdk.chat.completions.create(
            model="gemini-three", messages=messages, **kw
        )
        choice = completion.choices[0]
        return choice.message, choice.finish_reason, choice.message.content
    chunks = [
        c
        async for c in await sdk.chat.completions.create(
            model="gemini-three", messages=messages, stream=True, **kw
        )
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or ():
            call = calls.setdefault(d.index, {"type": "function", "function": {"arguments": ""}})
            call["id"] = d.id or call.get("id")
            call["function"]["name"] = d.function.name or call["function"].get("name")
            call["function"]["arguments"] += d.function.arguments or ""
    message = {"role": "assistant", "content": text or None, "tool_calls": list(calls.values())}
    return message, chunks[-1].choices[0].finish_reason, text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_two_step_tool_loop_through_the_sdk(client, sdk, fake_gemini, stream):
    """call -> the SDK sees tool_calls with finish_reason tool_calls -> the client sends the
    tool's result -> the answer. Gemini got functionDeclarations and a toolConfig, then the
    call back as a functionCall part (signed: the SDK's own message object keeps the call's
    thought signature; a message put together by hand gets Google's marker for unsigned
    calls) and the result as a functionResponse. The fake refuses unsigned calls, as Gemini 3
    does."""
    fake_gemini.require_signatures = True
    fake_gemini.scripts = [
        Script(parts=[[{"text": "Let me check."}], [call_part({"city": "Paris"})]], usage=(40, 9)),
        Script(chunks=["It is ", "18 °C."], usage=(70, 6)),
    ]
    message, finish, text = await _ask(sdk, stream, QUESTION, tools=[WEATHER], tool_choice="auto")
    assert finish == "tool_calls" and text == "Let me check."
    calls = message["tool_calls"] if stream else [c.model_dump() for c in message.tool_calls]
    [call] = calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    if not stream:  # the signature rides along, as on Google's own OpenAI endpoint
        assert call["extra_content"] == {"google": {"thought_signature": SIGNATURE}}

    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 18}'}
    _, finish, text = await _ask(sdk, stream, [*QUESTION, message, result], tools=[WEATHER])
    assert finish == "stop" and text == "It is 18 °C."

    first, second = bodies(fake_gemini)
    declaration = {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parametersJsonSchema": WEATHER["function"]["parameters"],
    }
    assert first["tools"] == [{"functionDeclarations": [declaration]}]
    assert first["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert first["systemInstruction"] == {"parts": [{"text": "Use the tools."}]}
    assert second["tools"] == first["tools"] and "toolConfig" not in second
    signature = "skip_thought_signature_validator" if stream else SIGNATURE
    assert second["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {
            "role": "model",
            "parts": [{"text": "Let me check."}, call_part({"city": "Paris"}, signature)],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}}],
        },
    ]
    # The records keep the call (the producer stores it from the frames) and the answer.
    asked, answered = await assistant_records(client)
    assert asked["finish_reason"] == "tool_calls" and asked["content"] == "Let me check."
    assert [c["id"] for c in asked["tool_calls"]] == [call["id"]]
    assert asked["tool_calls"][0]["function"]["name"] == "get_weather"
    assert answered["content"] == "It is 18 °C." and "tool_calls" not in answered
    assert asked["tokens"]["total"] == 49 and answered["tokens"]["total"] == 76


async def test_parallel_calls_and_their_results(client, sdk, fake_gemini):
    """Two functionCall parts are two tool calls (index 0 and 1, ids of their own); their two
    results go back as one user content, in order; a result that is not a JSON object is
    Gemini's documented {"output": ...}."""
    fake_gemini.scripts = [
        Script(parts=[[call_part({"city": "Paris"}), call_part({}, None, "get_time")]]),
        Script(chunks=["Done."]),
    ]
    completion = await sdk.chat.completions.create(
        model="gemini-test", messages=QUESTION, tools=[WEATHER, CLOCK], tool_choice="required"
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    one, two = message.tool_calls
    assert (one.function.name, two.function.name) == ("get_weather", "get_time")
    assert one.id != two.id and two.function.arguments == "{}"
    results = [
        {"role": "tool", "tool_call_id": two.id, "content": [{"type": "text", "text": "12:00"}]},
        {"role": "tool", "tool_call_id": one.id, "content": '{"temp_c": 18}'},
    ]
    done = await sdk.chat.completions.create(
        model="gemini-test", messages=[*QUESTION, message, *results], tools=[WEATHER, CLOCK]
    )
    assert done.choices[0].message.content == "Done."
    first, second = bodies(fake_gemini)
    assert first["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert first["tools"][0]["functionDeclarations"][1] == {"name": "get_time"}
    assert second["contents"][1:] == [
        {"role": "model", "parts": [call_part({"city": "Paris"}), call_part({}, None, "get_time")]},
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_time", "response": {"output": "12:00"}}},
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "strict", "config"),
    [
        ("none", False, {"mode": "NONE"}),
        ("auto", True, {"mode": "VALIDATED"}),
        (None, True, {"mode": "VALIDATED"}),
        (None, False, None),
        (
            {"type": "function", "function": {"name": "get_time"}},
            False,
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
        ),
    ],
)
async def test_tool_choice_becomes_function_calling_config(
    sdk, fake_gemini, choice, strict, config
):
    """A strict function asks for schema adherence: VALIDATED where the model may also answer."""
    weather = {**WEATHER, "function": {**WEATHER["function"], "strict": strict}}
    extra = {} if choice is None else {"tool_choice": choice}
    await sdk.chat.completions.create(
        model="gemini-test", messages=HI, tools=[weather, CLOCK], **extra
    )
    (body,) = bodies(fake_gemini)
    assert body.get("toolConfig") == (config and {"functionCallingConfig": config})


# --------------------------------------------------------------------------- format, images
async def test_response_format_is_translated(sdk, fake_gemini):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    fake_gemini.scripts = [Script(chunks=['{"a": 1}']), Script(chunks=['{"answer": 42}'])]
    await sdk.chat.completions.create(
        model="gemini-test", messages=HI, response_format={"type": "json_object"}
    )
    completion = await sdk.chat.completions.create(
        model="gemini-test",
        messages=HI,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )
    assert json.loads(completion.choices[0].message.content) == {"answer": 42}
    plain, structured = (b["generationConfig"] for b in bodies(fake_gemini))
    assert plain == {"maxOutputTokens": 256, "responseMimeType": "application/json"}
    assert structured == {
        "maxOutputTokens": 256,
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }
    # countTokens was asked for the schema too (the request as a whole).
    counts = fake_gemini.calls("countTokens")
    assert "contents" in counts[0].body
    assert counts[1].body["generateContentRequest"]["generationConfig"] == structured


async def test_an_image_data_url_is_inline_data(client, sdk, fake_gemini):
    """A base64 data URL becomes inlineData; its detail the request's mediaResolution; the
    image counts as Gemini counts it (countTokens)."""
    url = f"data:image/png;base64,{PIXEL}"
    await sdk.chat.completions.create(
        model="gemini-test",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                ],
            }
        ],
    )
    (body,) = bodies(fake_gemini)
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": PIXEL}},
            ],
        }
    ]
    assert body["generationConfig"]["mediaResolution"] == "MEDIA_RESOLUTION_LOW"
    (record,) = await assistant_records(client)
    assert record["prompt_tokens"] == count_words(body["contents"]) == 3 + 258


# --------------------------------------------------------------------------- refusals
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def _image(detail: str) -> dict[str, Any]:
    url = f"data:image/png;base64,{PIXEL}"
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


@pytest.mark.parametrize(
    ("model_name", "extra", "param"),
    [
        ("gemini-test", {"logit_bias": {"50256": -100}}, "logit_bias"),
        ("gemini-test", {"n": 2}, "n"),
        ("gemini-test", {"parallel_tool_calls": False, "tools": [WEATHER]}, "parallel_tool_calls"),
        ("gemini-test", {"service_tier": "flex"}, "service_tier"),
        ("gemini-test", {"frobnicate": True}, "frobnicate"),
        ("gemini-test", {"reasoning_effort": "xhigh"}, "reasoning_effort"),
        ("gemini-three", {"reasoning_effort": "none"}, "reasoning_effort"),
        (
            "gemini-test",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, IMAGE]}]},
            "messages[0].content[1]",
        ),
        (
            "gemini-test",
            {"messages": [{"role": "user", "content": [_image("low"), _image("high")]}]},
            "messages[0].content[1]",
        ),
        (
            "gemini-test",
            {"messages": [{"role": "user", "content": "x", "name": "alice"}]},
            "messages[0].name",
        ),
        (
            "gemini-test",
            {"messages": [{"role": "system", "content": [_image("auto")]}, *HI]},
            "messages[0].content[0]",
        ),
        (
            "gemini-test",
            {"messages": [*HI, {"role": "assistant", "content": "a", "refusal": "no"}, *HI]},
            "messages[1].refusal",
        ),
        (
            "gemini-test",
            {"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}]},
            "messages[0].reasoning_content",
        ),
        (
            "gemini-test",
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "call_1"}]},
            "messages[0].tool_call_id",
        ),
        (
            "gemini-test",
            {"tools": [{"type": "custom", "custom": {"name": "run_sql"}}]},
            "tools[0]",
        ),
        (
            "gemini-test",
            {"tools": [CLOCK], "tool_choice": {"type": "custom", "custom": {"name": "run_sql"}}},
            "tool_choice",
        ),
    ],
)
async def test_what_gemini_cannot_honour_is_unsupported_parameter(
    sdk, fake_gemini, model_name, extra, param
):
    """Nothing is dropped: 400 ``unsupported_parameter`` naming the parameter and the model,
    and Gemini is asked nothing (not even countTokens)."""
    body = {"messages": HI, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(
            model=model_name, messages=body.pop("messages"), extra_body=body
        )
    err = info.value
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert err.code == "unsupported_parameter" and err.param == param
    assert f"'{param}'" in err.message and f"'{model_name}'" in err.message
    assert asked_nothing(fake_gemini)


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (
            [
                *HI,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{city: Paris"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18"},
            ],
            {},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            [*HI, {"role": "tool", "tool_call_id": "call_unknown", "content": "18"}],
            {},
            "messages[1].tool_call_id",
        ),
        (
            HI,
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        (HI, {"tool_choice": "required"}, "tool_choice"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
    ],
)
async def test_what_cannot_be_translated_because_it_is_wrong_is_invalid_value(
    sdk, fake_gemini, messages, extra, param
):
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="gemini-test", messages=messages, extra_body=extra)
    assert info.value.code == "invalid_value" and info.value.param == param
    assert asked_nothing(fake_gemini)


# --------------------------------------------------------------------------- thinking
THINKING = Script(
    parts=[
        [{"text": "The user wants ", "thought": True}],
        [{"text": "a greeting.", "thought": True}],
        [{"text": "Hello"}],
        [{"text": "!"}],
    ],
    usage=(12, 2),
    thoughts=30,
    cached=8,
)
THOUGHT_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 32,
    "total_tokens": 44,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 30},
}


async def test_thinking_streams_as_reasoning_content(client, sdk, fake_gemini):
    fake_gemini.default = THINKING
    stream = await sdk.chat.completions.create(
        model="gemini-test",
        messages=HI,
        reasoning_effort="medium",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    assert [r for r in reasoning if r] == ["The user wants ", "a greeting."]
    assert "".join(d.content or "" for d in deltas) == "Hello!"
    assert chunks[-1].usage.model_dump(exclude_none=True) == THOUGHT_USAGE
    (body,) = bodies(fake_gemini)
    assert body["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 8192,
        "includeThoughts": True,
    }
    (record,) = await assistant_records(client)
    assert record["reasoning"] == "The user wants a greeting." and record["content"] == "Hello!"
    assert record["tokens"] == {
        "prompt": 12,
        "completion": 32,
        "total": 44,
        "source": "upstream",
        "cached": 8,
        "reasoning": 30,
        "details": {  # the usage details as the client got them
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 30},
        },
    }
    await settled(client.app[STORE].db)  # the replica's lease on the month given back
    usage = await client.app[STORE].usage.find_one(
        {"user_id": "alice", "period": period_of(utcnow())}
    )
    assert usage["used"] == 44 and usage["reserved"] == 0


async def test_thinking_on_the_message_when_not_streamed(sdk, fake_gemini):
    """Gemini 3 takes a thinking level; the SDK shows the reasoning as an extra field."""
    fake_gemini.default = THINKING
    completion = await sdk.chat.completions.create(
        model="gemini-three", messages=HI, reasoning_effort="low"
    )
    message = completion.choices[0].message
    assert message.content == "Hello!"
    assert message.reasoning_content == "The user wants a greeting."
    assert message.model_extra["reasoning_content"] == "The user wants a greeting."
    assert completion.usage.completion_tokens_details.reasoning_tokens == 30
    assert completion.usage.prompt_tokens_details.cached_tokens == 8
    (body,) = bodies(fake_gemini)
    assert body["generationConfig"]["thinkingConfig"] == {
        "thinkingLevel": "LOW",
        "includeThoughts": True,
    }


async def test_reasoning_passed_back_is_accepted_and_not_sent(sdk, fake_gemini):
    """An assistant message as the SDK returned it (its reasoning_content included) goes back
    as the model's text: Gemini takes no thoughts as input."""
    messages = [
        *HI,
        {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
        {"role": "user", "content": "Again"},
    ]
    await sdk.chat.completions.create(
        model="gemini-test", messages=messages, reasoning_effort="none"
    )
    (body,) = bodies(fake_gemini)
    assert body["contents"][1] == {"role": "model", "parts": [{"text": "Hello!"}]}
    assert body["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 0,
        "includeThoughts": False,
    }


# --------------------------------------------------------------------------- the rest
async def test_sampling_options_logprobs_and_labels(sdk, fake_gemini, logs):
    """seed and penalties go to generationConfig; logprobs come back in OpenAI's shape; user
    and metadata are labels: logged, never sent."""
    step = {
        "chosenCandidates": [
            {"token": "Hel", "tokenId": 1, "logProbability": -0.25},
            {"token": "lo", "tokenId": 2, "logProbability": -0.5},
        ],
        "topCandidates": [
            {"candidates": [{"token": "Hel", "logProbability": -0.25}]},
            {"candidates": [{"token": "lo", "logProbability": -0.5}]},
        ],
    }
    fake_gemini.default = Script(chunks=["Hello", "!"], logprobs={0: step})
    completion = await sdk.chat.completions.create(
        model="gemini-test",
        messages=HI,
        seed=7,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        logprobs=True,
        top_logprobs=1,
        user="end-user-7",
        metadata={"team": "blue"},
    )
    choice = completion.choices[0]
    assert choice.message.content == "Hello!"
    assert [(t.token, t.logprob, t.bytes) for t in choice.logprobs.content] == [
        ("Hel", -0.25, [72, 101, 108]),
        ("lo", -0.5, [108, 111]),
    ]
    assert [t.top_logprobs[0].token for t in choice.logprobs.content] == ["Hel", "lo"]
    (body,) = bodies(fake_gemini)
    assert body["generationConfig"] == {
        "maxOutputTokens": 256,
        "seed": 7,
        "frequencyPenalty": 0.5,
        "presencePenalty": -0.5,
        "responseLogprobs": True,
        "logprobs": 1,
    }
    assert "end-user-7" not in json.dumps(body) and "blue" not in json.dumps(body)
    (line,) = [e for e in logs if e["event"] == "upstream.labels"]
    assert line["labels"] == {"user": "end-user-7", "metadata": {"team": "blue"}}
    assert line["provider"] == "gemini" and line["request_id"]


async def test_count_tokens_gets_the_whole_request_with_tools(client, sdk, fake_gemini):
    """With tools the prompt is counted as a whole generateContentRequest (tools included),
    the system instruction on its own; the reservation is sized with it."""
    await sdk.chat.completions.create(model="gemini-test", messages=QUESTION, tools=[WEATHER])
    whole, system = fake_gemini.calls("countTokens")
    request = whole.body["generateContentRequest"]
    assert request["model"] == "models/gemini-2.5-flash"
    assert request["tools"] == bodies(fake_gemini)[0]["tools"]
    assert "systemInstruction" not in request
    assert system.body == {"contents": [{"role": "user", "parts": [{"text": "Use the tools."}]}]}
    (record,) = await assistant_records(client)
    assert record["prompt_tokens"] == count_request(whole.body) + 3

"""The OpenAI-compatible front door, driven by the official ``openai`` SDK over real sockets,
against the fake upstream (OpenAI's real streaming format) and SecantusDB."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from service.app import create_app
from service.keys import STORE
from service.store import utcnow
from service.stream.producer import period_of
from service.tokens import TokenCounter
from tests.fake_openai import Script
from tests.faults import settled

HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture
async def sdk_for(token_for):
    """An SDK client for the test server: only the base URL and the key change."""
    made: list[AsyncOpenAI] = []

    def factory(client, user: str = "alice", api_key: str | None = None) -> AsyncOpenAI:
        sdk = AsyncOpenAI(
            base_url=str(client.make_url("/v1")),
            api_key=api_key or token_for(user),
            max_retries=0,  # a retry would hide which error came first
        )
        made.append(sdk)
        return sdk

    yield factory
    for sdk in made:
        await sdk.close()


@pytest.fixture
def oai(stream_client, sdk_for):
    return sdk_for(stream_client)


async def usage_doc(client, user="alice"):
    return await client.app[STORE].usage.find_one({"user_id": user, "period": period_of(utcnow())})


async def until(predicate, within_s=5.0):
    deadline = time.monotonic() + within_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)  # polling with a deadline, not synchronisation
    return result


def ended(logs, **match):
    return [
        e
        for e in logs
        if e["event"] == "stream.ended" and all(e.get(k) == v for k, v in match.items())
    ]


async def raw_frames(resp) -> list[bytes]:
    """The response body split into SSE blocks, exactly as sent (comments dropped)."""
    body = (await resp.read()).replace(b"\r\n", b"\n")
    return [b for b in body.split(b"\n\n") if b and not b.startswith(b":")]


# --------------------------------------------------------------------------- streaming
async def test_stream_frames_match_the_upstream(stream_client, fake_openai, auth, logs):
    """Frame by frame: OpenAI's chunk format, the upstream's text, finish reason and usage."""
    script = Script(chunks=["The ", "answer ", "is ", "42."], usage=(30, 5), finish_reason="length")
    fake_openai.default = script
    resp = await stream_client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-test",
            "messages": HI,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=auth(),
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Request-ID"]
    frames = await raw_frames(resp)
    assert frames[-1] == b"data: [DONE]"
    assert all(f.startswith(b"data: ") for f in frames)
    chunks = [json.loads(f[len(b"data: ") :]) for f in frames[:-1]]
    role, *deltas, finish, usage = chunks
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "gpt-test"
        assert isinstance(c["created"], int) and abs(c["created"] - time.time()) < 60
        assert "usage" in c  # null on every chunk but the last, as OpenAI does with include_usage
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert all(set(d["choices"][0]["delta"]) == {"content"} for d in deltas)  # as they came
    assert all(d["choices"][0]["finish_reason"] is None and d["usage"] is None for d in deltas)
    assert "".join(d["choices"][0]["delta"]["content"] for d in deltas) == "".join(script.chunks)
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
    # What we forwarded: the request's messages as they were, the upstream's model id.
    sent = fake_openai.requests[0]
    assert sent["model"] == "gpt-4o-mini" and sent["messages"] == HI
    line = ended(logs)[0]
    assert line["transport"] == "openai" and line["outcome"] == "completed"
    assert line["tokens"]["total"] == 35 and line["user_id"] == "alice"


async def test_sdk_streaming_with_include_usage(stream_client, oai, fake_openai, logs):
    fake_openai.default = Script(chunks=["Hello", ", ", "world", "!"], usage=(21, 4))
    stream = await oai.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "system", "content": "Be brief."}, *HI],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 21 and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == 25
    assert fake_openai.requests[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    await settled(stream_client.app[STORE].db)  # the replica's lease on the month given back
    usage = await usage_doc(stream_client)
    assert usage["used"] == 25 and usage["reserved"] == 0
    for name in ("stream.started", "stream.first_token", "stream.ended"):
        line = next(e for e in logs if e["event"] == name)
        assert line["transport"] == "openai" and line["chat_id"] is None
        assert line["model"] == "gpt-test" and line["user_id"] == "alice"


async def test_sdk_streaming_without_include_usage_has_no_usage_chunk(oai, fake_openai):
    stream = await oai.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world!"


async def test_closing_the_stream_early_cancels_upstream_and_bills_the_partial(
    stream_client, oai, fake_openai, logs
):
    fake_openai.default = Script(chunks=["a ", "b ", "c ", "d"], gate_after=2)
    stream = await oai.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    texts = []
    async for chunk in stream:
        texts.append(chunk.choices[0].delta.content or "")
        if "".join(texts) == "a b ":
            break
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
    closed_at = time.monotonic()
    await stream.close()
    await asyncio.wait_for(fake_openai.disconnected.wait(), 2.0)  # the upstream request closed
    assert fake_openai.disconnected_at - closed_at < 2.0
    assert not fake_openai.finished.is_set()
    await until(lambda: ended(logs, outcome="cancelled"))
    line = ended(logs, outcome="cancelled")[0]
    assert line["reason"] == "client_disconnect" and line["transport"] == "openai"
    store = stream_client.app[STORE]
    assistant = await store.messages.find_one({"user_id": "alice", "role": "assistant"})
    assert assistant["status"] == "cancelled" and assistant["content"] == "a b "
    assert assistant["transport"] == "openai" and assistant["chat_id"] is None
    assert assistant["tokens"]["completion"] == TokenCounter().count("a b ")
    assert assistant["tokens"]["prompt"] > 0
    await settled(store.db)  # the replica's lease on the month given back
    usage = await usage_doc(stream_client)
    assert usage["used"] == assistant["tokens"]["total"] and usage["reserved"] == 0


async def test_a_live_stream_keeps_neither_the_request_body_nor_the_prompt(
    stream_client, oai, fake_openai
):
    """A replica holds thousands of streams: once the upstream has the prompt, the turn (and the
    request it streams to) must not keep the request's body, its parsed messages or the prompt
    for the length of the answer."""
    from aiohttp import web

    from service.stream.producer import Turn

    fake_openai.default = Script(chunks=["a ", "b"], gate_after=1)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 5000}]
    stream = await oai.chat.completions.create(model="gpt-test", messages=prompt, stream=True)
    try:
        await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
        assert fake_openai.requests[-1]["messages"][-1]["content"] == "x" * 5000  # it was sent
        gc.collect()
        turns = [o for o in gc.get_objects() if type(o) is Turn and o.final is None]
        assert len(turns) == 1
        assert turns[0].messages == [] and turns[0].inp.messages is None
        requests = [
            o
            for o in gc.get_objects()
            if type(o) is web.Request and o.app is stream_client.app  # not the upstream's
        ]
        assert requests and all(getattr(r, "_read_bytes", None) is None for r in requests)
    finally:
        fake_openai.gate.set()
        await stream.close()


async def test_upstream_failure_mid_stream_raises_in_the_sdk(oai, fake_openai):
    fake_openai.default = Script(chunks=["cut", " more"], reset_after=1)
    stream = await oai.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    got: list[str] = []

    async def read_all():
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as info:
        await read_all()
    assert "".join(got) == "cut"
    assert info.value.type == "server_error" and info.value.code.startswith("upstream_")


# --------------------------------------------------------------------------- non-streaming
async def test_sdk_non_streaming_completion(stream_client, oai, fake_openai, logs):
    fake_openai.default = Script(chunks=["The ", "answer."], usage=(12, 3))
    completion = await oai.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "developer", "content": "Answer plainly."},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": [{"type": "text", "text": "q2"}]},
        ],
        temperature=0.5,
        top_p=0.9,
        stop="END",
        max_completion_tokens=50,
        user="end-user-7",
        extra_body={"frobnicate": True, "metadata": {"k": "v"}},  # the upstream's to judge
    )
    assert completion.object == "chat.completion" and completion.model == "gpt-test"
    assert completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == "The answer."
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == 12 and completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 15
    sent = fake_openai.requests[0]
    assert sent["messages"] == [  # as the client sent them, never rewritten
        {"role": "developer", "content": "Answer plainly."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
    ]
    assert sent["temperature"] == 0.5 and sent["top_p"] == 0.9 and sent["stop"] == ["END"]
    assert sent["max_completion_tokens"] == 50 and "max_tokens" not in sent
    assert sent["user"] == "end-user-7" and sent["metadata"] == {"k": "v"}
    assert sent["frobnicate"] is True
    assert (await usage_doc(stream_client))["used"] == 15
    assert ended(logs, transport="openai", outcome="completed")


async def test_demo_model_non_streaming(oai):
    completion = await oai.chat.completions.create(model="demo", messages=HI)
    assert completion.model == "demo" and completion.choices[0].message.content
    assert completion.usage.total_tokens > 0


# --------------------------------------------------------------------------- stored chat
async def test_x_chat_id_persists_the_turn_like_the_sse_route(
    stream_client, oai, fake_openai, auth, logs
):
    client, h = stream_client, auth()
    resp = await client.post("/api/chat", json=None, headers=h)
    chat_id = (await resp.json())["chat_id"]
    fake_openai.scripts = [Script(chunks=["first answer"]), Script(chunks=["second"])]
    one = await oai.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "q1"}],
        extra_headers={"X-Chat-Id": chat_id},
    )
    assert one.choices[0].message.content == "first answer"
    stream = await oai.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "ignored"}, {"role": "user", "content": "q2"}],
        stream=True,
        extra_headers={"X-Chat-Id": chat_id},
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "second"
    # The chat's history (with the server's system prompt) is the context, not the request's.
    sent = fake_openai.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in sent[1:]] == ["q1", "first answer", "q2"]
    body = await (await client.get(f"/api/chat/{chat_id}", headers=h)).json()
    assert [(m["role"], m["content"], m["status"]) for m in body["messages"]] == [
        ("user", "q1", "complete"),
        ("assistant", "first answer", "complete"),
        ("user", "q2", "complete"),
        ("assistant", "second", "complete"),
    ]
    records = await client.app[STORE].messages.find({"chat_id": chat_id}).to_list(None)
    assert {r["transport"] for r in records if r["role"] == "assistant"} == {"openai"}
    assert all(line["chat_id"] == chat_id for line in ended(logs, transport="openai"))


async def test_x_chat_id_errors(oai):
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(
            model="gpt-test",
            messages=HI,
            extra_headers={"X-Chat-Id": "6f1c0a36-8c46-4f0e-9d50-6d3f4c1c2b11"},
        )
    assert info.value.code == "chat_not_found" and info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="gpt-test", messages=HI, extra_headers={"X-Chat-Id": "nope"}
        )
    assert info.value.code == "invalid_id"


# --------------------------------------------------------------------------- errors
async def test_bad_key_is_an_authentication_error(stream_client, sdk_for):
    sdk = sdk_for(stream_client, api_key="not-a-jwt")
    with pytest.raises(openai.AuthenticationError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    err = info.value
    assert err.status_code == 401
    assert err.type == "authentication_error" and err.code == "invalid_api_key"
    assert err.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert err.response.headers["X-Request-ID"]


async def test_budget_exceeded_is_insufficient_quota(
    aiohttp_client, stream_settings, sdk_for, logs
):
    client = await aiohttp_client(create_app(stream_settings(default_token_limit=10)))
    sdk = sdk_for(client)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    err = info.value
    assert err.status_code == 429
    assert err.type == "insufficient_quota" and err.code == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    # The refusal's line says the status the client got (the page's would be 403)
    (refused,) = [e for e in logs if e["event"] == "stream.refused"]
    assert (refused["code"], refused["status"], refused["transport"]) == (
        "budget_exceeded",
        429,
        "openai",
    )


async def test_rate_limit_is_rate_limit_exceeded_with_retry_after(
    aiohttp_client, stream_settings, sdk_for
):
    """Programs are held to V1_REQUESTS_PER_MINUTE (tests/test_limits.py has the rest)."""
    client = await aiohttp_client(create_app(stream_settings(v1_requests_per_minute=1)))
    sdk = sdk_for(client)
    await sdk.chat.completions.create(model="gpt-test", messages=HI)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    assert 55 <= int(err.response.headers["Retry-After"]) <= 60


async def test_unknown_model_is_not_found(oai, fake_openai):
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="gpt-nope", messages=HI)
    assert info.value.code == "model_not_found" and info.value.type == "invalid_request_error"
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [*HI, {"role": "assistant", "content": "x"}]}, "messages[1].role", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", None),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0]", None),  # as OpenAI
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", None),
        ({"messages": [{"role": "system"}, *HI]}, "messages[0]", None),
        ({"n": 9}, "n", "invalid_value"),
        ({"tools": {"type": "function"}}, "tools", "invalid_type"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            None,
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", None),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
        ({"top_logprobs": 3}, "top_logprobs", None),
        ({"logit_bias": {"50256": 101}}, "logit_bias", None),
        ({"tool_choice": "sometimes"}, "tool_choice", None),
        ({"seed": "1"}, "seed", "invalid_type"),
    ],
)
async def test_invalid_request_is_bad_request(oai, fake_openai, extra, param, code):
    body = {"messages": HI, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="gpt-test",
            messages=body.pop("messages"),
            extra_body=body,
        )
    err = info.value
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert err.param == param and "Value error" not in err.message  # a validator's own words
    if code:
        assert err.code == code
    assert fake_openai.requests == []


@pytest.mark.parametrize("stream", [{}, {"stream": False}])
async def test_stream_options_without_stream_is_bad_request_as_at_openai(
    stream_client, oai, fake_openai, stream
):
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="gpt-test", messages=HI, stream_options={"include_usage": True}, **stream
        )
    err = info.value
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert err.param == "stream_options"
    assert err.body["message"] == (
        "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    )
    assert fake_openai.requests == [] and await usage_doc(stream_client) is None
    # null is no stream_options: the completion is answered
    completion = await oai.chat.completions.create(
        model="gpt-test", messages=HI, extra_body={"stream_options": None}, **stream
    )
    assert completion.choices[0].message.content == "Hello, world!"


async def test_missing_model_is_missing_required_parameter(stream_client, auth):
    resp = await stream_client.post("/v1/chat/completions", json={"messages": HI}, headers=auth())
    assert resp.status == 400
    assert (await resp.json())["error"] == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }


async def test_transport_errors_take_openai_shape_on_v1_only(aiohttp_client, stream_settings, auth):
    client = await aiohttp_client(create_app(stream_settings(max_body_bytes=1024)))
    h = auth()

    async def error_of(resp, status):
        assert resp.status == status
        assert resp.headers["X-Request-ID"]
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]

    err = await error_of(await client.get("/v1/nowhere", headers=h), 404)
    assert err["type"] == "invalid_request_error" and err["code"] == "unknown_url"
    assert "GET /v1/nowhere" in err["message"]
    err = await error_of(await client.get("/v1/chat/completions", headers=h), 405)
    assert err["type"] == "invalid_request_error" and err["code"] == "method_not_allowed"
    err = await error_of(await client.post("/v1/chat/completions", data=b"{nope", headers=h), 400)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    big = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 4096}]}
    err = await error_of(await client.post("/v1/chat/completions", json=big, headers=h), 413)
    assert err["type"] == "invalid_request_error" and err["code"] == "payload_too_large"
    resp = await client.get("/v1/models")
    err = await error_of(resp, 401)
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # /api keeps the service's own shape.
    resp = await client.get("/api/chats")
    assert resp.status == 401
    assert set((await resp.json())["error"]) <= {"code", "message", "details"}


# --------------------------------------------------------------------------- models
async def test_models_list_and_retrieve(oai):
    page = await oai.models.list()
    assert [m.id for m in page.data] == ["gpt-test", "demo"]
    assert all(m.object == "model" and isinstance(m.created, int) for m in page.data)
    assert {m.owned_by for m in page.data} == {"openai", "demo"}
    model = await oai.models.retrieve("demo")
    assert model.id == "demo"
    with pytest.raises(openai.NotFoundError) as info:
        await oai.models.retrieve("gpt-nope")
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("max_tokens", [1, 7, 20, 33])
async def test_demo_model_length_stop_bills_what_was_asked_for(oai, max_tokens):
    """A length stop bills ``max_tokens`` exactly, as a real model's does, and the text it sent
    counts no more than that."""
    from service.tokens import TokenCounter

    completion = await oai.chat.completions.create(model="demo", messages=HI, max_tokens=max_tokens)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == max_tokens
    text = completion.choices[0].message.content
    assert 0 < TokenCounter().count(text) <= max_tokens


async def test_a_stream_is_answered_before_its_first_token(oai, fake_openai):
    """The headers go as soon as the turn is admitted (the role frame waits for the first step,
    to take its shape): an SDK's create() returns while the model is still silent."""
    fake_openai.default = Script(chunks=["late"], gate_after=0)
    stream = await asyncio.wait_for(
        oai.chat.completions.create(model="gpt-test", messages=HI, stream=True), 10
    )
    assert stream.response.status_code == 200
    assert fake_openai.reached_gate.is_set() and not fake_openai.finished.is_set()
    fake_openai.gate.set()
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "late"


async def upstream_refusal(
    client,
    fake_openai,
    token_for,
    status: int,
    message: str,
    kind: str = "invalid_request",
    **extra: Any,
) -> openai.APIStatusError:
    """What the SDK, with its default retries, raises when the upstream answers ``status`` with
    ``message`` (of error type ``kind``) to every try."""
    param = extra.pop("param", None)
    body = {"error": {"message": message, "type": kind, "code": kind, "param": param}}
    fake_openai.scripts = [Script(status=status, error_body=body) for _ in range(3)]
    sdk = AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=token_for("alice"))
    try:
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(model="gpt-test", messages=HI, **extra)
    finally:
        await sdk.close()
    return info.value


async def test_a_request_the_upstream_rejects_is_a_400_with_its_words_and_not_retried(
    stream_client, fake_openai, token_for
):
    """A field passed through as written that the upstream rejects: the SDK (with its default
    retries) raises BadRequestError once, told the upstream's own words, the operator's key
    masked. Before, a 502 in our words only, which the SDK sent twice more."""
    rejected = "Unrecognized request argument supplied: bogus_param (key sk-upstream-secret)"
    err = await upstream_refusal(
        stream_client,
        fake_openai,
        token_for,
        400,
        rejected,
        param="bogus_param",
        extra_body={"bogus_param": 1},
    )
    assert err.param == "bogus_param"  # the field it named, as OpenAI names it
    assert isinstance(err, openai.BadRequestError)
    assert err.status_code == 400 and err.code == "upstream_bad_request"
    assert "bogus_param" in err.message and "sk-upstream-secret" not in err.message
    assert len(fake_openai.requests) == 1


async def test_the_gateways_quota_used_up_is_a_502_in_our_words_retried_by_nobody(
    stream_client, fake_openai, token_for
):
    """OpenAI's 429 ``insufficient_quota`` (the operator's account out of credit) is no rate
    limit: before, the service asked the upstream three times and the SDK three more, and the
    client heard "rate limiting". Now one request, a 502 ``upstream_billing`` in our words."""
    quota = "You exceeded your current quota, please check your plan and billing details."
    err = await upstream_refusal(
        stream_client, fake_openai, token_for, 429, quota, kind="insufficient_quota"
    )
    assert isinstance(err, openai.InternalServerError)
    assert (err.status_code, err.code) == (502, "upstream_billing")
    assert "quota, please" not in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert len(fake_openai.requests) == 1


async def test_an_error_body_of_another_shape_is_still_the_upstreams_refusal(
    stream_client, fake_openai, token_for
):
    """An upstream (a proxy in front of the vendor, say) whose error's ``type`` and ``code``
    are an object and a list: before, reading it raised inside the turn, which was taken for
    the loop's shutdown: the client heard 503 ``shutting_down`` and the record stayed
    ``streaming``, its grant held, for the replica's life."""
    from service.keys import REGISTRY, STORE
    from tests.faults import settled

    body = {"error": {"message": "no such field", "type": {"kind": "x"}, "code": ["a"]}}
    fake_openai.scripts = [Script(status=400, error_body=body)]
    sdk = AsyncOpenAI(base_url=str(stream_client.make_url("/v1")), api_key=token_for("alice"))
    try:
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(model="gpt-test", messages=HI)
    finally:
        await sdk.close()
    assert info.value.code == "upstream_bad_request" and "no such field" in info.value.message
    app = stream_client.app
    await settled(app[STORE].db, registry=app[REGISTRY])


async def test_a_model_the_upstream_does_not_know_is_a_502_in_our_words_not_retried(
    stream_client, fake_openai, token_for
):
    """The upstream's 404 (a catalogue entry naming a model it does not have): the operator's to
    fix, so the client hears neither the vendor's words (the upstream's model id) nor "your
    request is bad"; a 502 the SDK, told ``x-should-retry: false``, sends once."""
    missing = "The model `internal-deployment-7` does not exist or you do not have access to it."
    err = await upstream_refusal(stream_client, fake_openai, token_for, 404, missing)
    assert isinstance(err, openai.InternalServerError)
    assert err.status_code == 502 and "internal-deployment-7" not in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert len(fake_openai.requests) == 1

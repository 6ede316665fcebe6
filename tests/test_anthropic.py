"""The Anthropic provider on its own: recorded Messages API streams replayed byte for byte by a
fake Anthropic API on a real socket (tests/fake_anthropic.py), read into the turn's chunks;
the request translation; errors, retries, count_tokens and the model list."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from service.errors import UPSTREAM_STATUS, BadRequest, UpstreamError
from service.providers.anthropic import AnthropicProvider
from service.providers.anthropic_request import NativeFields, build_body, unsupported
from service.providers.base import Chunk, CompletionRequest, RetryPolicy, Usage
from service.stream.assembly import Assembly
from tests import anthropic_recordings as rec
from tests.fake_anthropic import FakeAnthropic, Script

KEY = "sk-ant-api03-upstream-secret-key-0123456789abcdef"
HI = [{"role": "user", "content": "Hi there"}]
MODEL = "claude-sonnet-4-5"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a place",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "strict": True}},
]


@pytest.fixture
async def fake_anthropic():
    fake = FakeAnthropic()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as session:
        yield session


def make_provider(session, url: str, key: str | None = KEY) -> AnthropicProvider:
    return AnthropicProvider(
        session,
        base_url=url,
        api_key=key,
        retry=RetryPolicy(max_attempts=3, base_s=0.01, max_s=0.5),
        timeout=aiohttp.ClientTimeout(total=5),
    )


@pytest.fixture
def provider(session, fake_anthropic) -> AnthropicProvider:
    return make_provider(session, fake_anthropic.url)


def request(messages=None, max_tokens: int = 256, **options: Any) -> CompletionRequest:
    return CompletionRequest(
        model=MODEL, messages=messages or HI, max_tokens=max_tokens, options=options
    )


async def run(provider: AnthropicProvider, req: CompletionRequest | None = None) -> list[Chunk]:
    stream = await provider.open(req or request())
    return [chunk async for chunk in stream]


async def replay(provider, fake, recording, req=None, **kw) -> list[Chunk]:
    fake.default = Script(recording=recording, **kw)
    return await run(provider, req)


async def drain(stream, into: list[Chunk]) -> None:
    async for chunk in stream:
        into.append(chunk)


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def assembled(chunks: list[Chunk]) -> dict[str, Any]:
    assembly = Assembly()
    for chunk in chunks:
        if chunk.frame is not None:
            assembly.frame(chunk.frame)
    return assembly.extras()


# --------------------------------------------------------------------------- streams
async def test_text_is_read_from_the_recording_with_the_exact_bill(provider, fake_anthropic):
    """Plain text deltas become plain text chunks (no frame built); message_start's input
    usage and message_delta's cumulative output give the bill, with the stop reason."""
    chunks = await replay(provider, fake_anthropic, rec.TEXT)
    assert b"".join(fake_anthropic.written) == rec.body(rec.TEXT)  # replayed byte for byte
    assert text_of(chunks) == rec.TEXT_ANSWER
    assert all(c.frame is None for c in chunks)
    last = chunks[-1]
    assert last.finish_reason == "stop" and [c.finish_reason for c in chunks[:-1]] == [None] * (
        len(chunks) - 1
    )
    assert last.usage == Usage(
        21,
        12,
        0,
        0,
        {
            "prompt_tokens_details": {"cached_tokens": 0},
            "anthropic": {
                "input_tokens": 21,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 12,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                "service_tier": "standard",
            },
        },
    )


async def test_the_request_carries_the_key_the_version_and_max_tokens(provider, fake_anthropic):
    await replay(provider, fake_anthropic, rec.TEXT)
    (call,) = fake_anthropic.calls("messages")
    assert call.headers["x-api-key"] == KEY and call.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in call.headers and not call.query
    assert call.headers["accept"] == "text/event-stream"
    assert call.body == {"model": MODEL, "max_tokens": 256, "messages": HI, "stream": True}


async def test_a_base_url_with_v1_reaches_the_same_endpoints(session, fake_anthropic):
    provider = make_provider(session, fake_anthropic.url + "/v1/")
    chunks = await replay(provider, fake_anthropic, rec.TEXT)
    assert text_of(chunks) == rec.TEXT_ANSWER
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages"]


async def test_the_chunks_one_network_read_brought_are_marked_more(provider, fake_anthropic):
    """The whole recording in one write: one read, so one publish (``more`` on all but the
    last chunk); events that carry nothing for the turn (ping, block stops, message_stop)
    yield no chunk, message_start only its prompt's usage. The first text is read whole; the
    two after it have its shape (their padding apart) and are one chunk of both texts
    (``Chunk.frames``)."""
    chunks = await replay(provider, fake_anthropic, rec.TEXT, per_write=len(rec.TEXT))
    assert len(fake_anthropic.written) == 1
    assert [c.more for c in chunks] == [True, True, True, False]
    assert chunks[0].text == "" and chunks[0].usage is not None and chunks[0].usage.partial
    assert [(c.text, c.frames) for c in chunks[1:3]] == [
        ("Hello", 1),
        ("! How can I help you today?", 2),
    ]


async def test_thinking_is_reasoning_and_the_signed_block_comes_whole(provider, fake_anthropic):
    """Each thinking delta is reasoning_content; the signature_delta gives the whole block as
    Anthropic wants it back (its text again, its signature), as ``thinking_blocks``."""
    chunks = await replay(provider, fake_anthropic, rec.THINKING)
    reasoning = [c for c in chunks if c.frame is not None]
    step = {"index": 0, "logprobs": None, "finish_reason": None}
    assert [c.frame for c in reasoning] == [
        *(
            {"choices": [{**step, "delta": {"reasoning_content": t}}]}
            for t in ("The user asks for 6 times 7.", " That is 42; a short", " answer will do.")
        ),
        {
            "choices": [
                {
                    **step,
                    "delta": {
                        "thinking_blocks": [
                            {
                                "index": 0,
                                "type": "thinking",
                                "thinking": rec.THINKING_TEXT,
                                "signature": rec.SIGNATURE,
                            }
                        ]
                    },
                }
            ]
        },
    ]
    assert all(c.text == "" for c in reasoning)
    assert assembled(chunks) == {"reasoning": rec.THINKING_TEXT}  # what a record keeps
    assert text_of(chunks) == rec.THINKING_ANSWER
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (46, 88)
    assert usage.reasoning_tokens == 71
    assert usage.details is not None
    assert usage.details["completion_tokens_details"] == {"reasoning_tokens": 71}


async def test_a_redacted_thinking_block_comes_whole_after_the_signed_one(provider, fake_anthropic):
    chunks = await replay(provider, fake_anthropic, rec.REDACTED)
    blocks = [
        entry
        for c in chunks
        if c.frame is not None
        for entry in c.frame["choices"][0]["delta"].get("thinking_blocks", ())
    ]
    assert blocks == [
        {
            "index": 0,
            "type": "thinking",
            "thinking": rec.REDACTED_THINKING,
            "signature": rec.SIGNATURE,
        },
        {"index": 1, "type": "redacted_thinking", "data": rec.REDACTED_DATA},
    ]
    assert text_of(chunks) == rec.REDACTED_ANSWER


async def test_an_unsigned_thinking_block_gives_no_block(provider, fake_anthropic):
    recording = [r for r in rec.THINKING if b"signature_delta" not in r]
    chunks = await replay(provider, fake_anthropic, recording)
    assert "thinking_blocks" not in repr(chunks)
    assert assembled(chunks) == {"reasoning": rec.THINKING_TEXT}


async def test_tool_use_split_across_input_json_deltas_is_openai_tool_calls(
    provider, fake_anthropic
):
    """Each tool_use block is a tool call (index from 0 over the answer's calls, its id and
    name first, then the input's pieces as arguments), as the SDKs accumulate them."""
    chunks = await replay(provider, fake_anthropic, rec.TOOL_USE)
    assert text_of(chunks) == rec.TOOL_TEXT
    assert assembled(chunks) == {"tool_calls": rec.TOOL_CALLS}
    first = next(c.frame for c in chunks if c.frame is not None)
    assert first["choices"][0]["delta"]["tool_calls"] == [
        {
            "index": 0,
            "id": "toolu_01Weather4Kp8Xz",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    assert chunks[-1].finish_reason == "tool_calls"


async def test_a_tool_call_without_streamed_input_has_empty_object_arguments(
    provider, fake_anthropic
):
    recording = [
        rec.start("msg_01NoInput", rec.MODEL, rec.usage(50, 1)),
        rec.block_start(0, {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}),
        rec.delta(0, "input_json_delta", "partial_json", ""),
        rec.block_stop(0),
        rec.message_delta("tool_use", rec.usage(50, 9)),
        rec.STOP,
    ]
    chunks = await replay(provider, fake_anthropic, recording)
    calls = assembled(chunks)["tool_calls"]
    assert calls == [
        {"id": "toolu_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    ]


async def test_cache_tokens_count_in_the_prompt_and_cache_reads_are_the_cached_ones(
    provider, fake_anthropic
):
    chunks = await replay(provider, fake_anthropic, rec.CACHED)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == 14 + 256 + 1792 and usage.completion_tokens == 9
    assert usage.cached_tokens == 1792 and usage.reasoning_tokens == 0
    assert usage.details is not None
    assert usage.details["prompt_tokens_details"] == {"cached_tokens": 1792}
    assert usage.details["anthropic"]["cache_creation_input_tokens"] == 256
    assert usage.details["anthropic"]["cache_read_input_tokens"] == 1792


@pytest.mark.parametrize(
    ("recording", "finish", "text"),
    [
        (rec.REFUSAL, "content_filter", "I can't"),
        (rec.MAX_TOKENS, "length", "Once upon a time"),
    ],
)
async def test_refusal_and_max_tokens_are_finish_reasons(
    provider, fake_anthropic, recording, finish, text
):
    chunks = await replay(provider, fake_anthropic, recording)
    assert text_of(chunks) == text and chunks[-1].finish_reason == finish


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("stop_sequence", "stop"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", "pause_turn"),
        ("a_reason_added_later", "other"),
    ],
)
async def test_other_stop_reasons(provider, fake_anthropic, reason, finish):
    recording = [*rec.TEXT[:-2], rec.message_delta(reason, rec.usage(21, 12)), rec.STOP]
    chunks = await replay(provider, fake_anthropic, recording)
    assert chunks[-1].finish_reason == finish


async def test_an_error_event_mid_stream_fails_after_the_partial_text(
    provider, fake_anthropic, logs
):
    fake_anthropic.default = Script(recording=rec.MID_ERROR)
    stream = await provider.open(request())
    seen: list[Chunk] = []
    with pytest.raises(UpstreamError) as info:
        await drain(stream, seen)
    assert text_of(seen) == rec.MID_ERROR_TEXT
    assert info.value.code == "upstream_unavailable"
    assert "overloaded_error" in info.value.message and "Overloaded" not in info.value.message
    (body,) = [e for e in logs if e["event"] == "upstream.error_body"]
    assert body["provider"] == "anthropic" and "Overloaded" in body["body"]


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("rate_limit_error", "upstream_rate_limited"),
        ("api_error", "upstream_unavailable"),
        ("invalid_request_error", "upstream_bad_request"),
        ("something_new", "upstream_bad_response"),
    ],
)
async def test_error_event_types_map_to_our_codes(provider, fake_anthropic, kind, code):
    error = rec.event(
        "error", json.dumps({"type": "error", "error": {"type": kind, "message": "x"}})
    )
    with pytest.raises(UpstreamError) as info:
        await replay(provider, fake_anthropic, [*rec.TEXT[:4], error])
    assert info.value.code == code


async def test_a_stream_cut_before_the_stop_reason_is_a_bad_response(provider, fake_anthropic):
    with pytest.raises(UpstreamError) as info:
        await replay(provider, fake_anthropic, rec.TEXT[:5])
    assert info.value.code == "upstream_bad_response"


async def test_a_close_after_the_stop_reason_without_message_stop_is_complete(
    provider, fake_anthropic
):
    chunks = await replay(provider, fake_anthropic, rec.TEXT[:-1])
    assert text_of(chunks) == rec.TEXT_ANSWER and chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        "[1]",
        '{"type":"content_block_delta","index":0,"delta":"x"}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}',
        '{"type":"message_delta","delta":{"stop_reason":7},"usage":{"output_tokens":1}}',
    ],
)
async def test_a_malformed_event_is_a_bad_response(provider, fake_anthropic, data):
    with pytest.raises(UpstreamError) as info:
        await replay(
            provider, fake_anthropic, [*rec.TEXT[:4], rec.event("content_block_delta", data)]
        )
    assert info.value.code == "upstream_bad_response"


async def test_unknown_events_and_blocks_are_skipped(provider, fake_anthropic):
    recording = [
        *rec.TEXT[:4],
        rec.event("brand_new_event", '{"type":"brand_new_event","x":1}'),
        rec.delta(0, "citations_delta", "citation", "{}"),
        rec.block_start(
            1, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
        ),
        rec.block_stop(1),
        *rec.TEXT[4:],
    ]
    chunks = await replay(provider, fake_anthropic, recording)
    assert text_of(chunks) == rec.TEXT_ANSWER and chunks[-1].finish_reason == "stop"
    assert all(c.frame is None for c in chunks)


async def test_usage_without_input_tokens_is_left_to_the_local_count(provider, fake_anthropic):
    recording = [
        rec.event("message_start", '{"type":"message_start","message":{"id":"m","usage":{}}}'),
        *rec.TEXT[1:-2],
        rec.event(
            "message_delta",
            '{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}',
        ),
        rec.STOP,
    ]
    chunks = await replay(provider, fake_anthropic, recording)
    assert chunks[-1].usage is None and chunks[-1].finish_reason == "stop"


async def test_closing_the_stream_closes_the_upstream_connection(provider, fake_anthropic):
    fake_anthropic.default = Script(recording=rec.TEXT, gate_after=4)
    stream = await provider.open(request())
    started = await anext(stream)  # message_start: the prompt's usage
    assert started.usage is not None and started.usage.partial
    first = await anext(stream)
    assert first.text == "Hello"
    await asyncio.wait_for(fake_anthropic.reached_gate.wait(), 5)
    await stream.aclose()
    await asyncio.wait_for(fake_anthropic.disconnected.wait(), 5)
    assert not fake_anthropic.finished.is_set()


# --------------------------------------------------------------------------- HTTP errors
async def test_an_overloaded_529_before_the_first_token_is_retried_after_retry_after(
    provider, fake_anthropic, logs
):
    fake_anthropic.fail_first(1, status=529, retry_after="0.05")
    chunks = await replay(provider, fake_anthropic, rec.TEXT)
    assert text_of(chunks) == rec.TEXT_ANSWER
    assert len(fake_anthropic.calls("messages")) == 2
    (retry,) = [e for e in logs if e["event"] == "upstream.retry"]
    assert retry["provider"] == "anthropic" and retry["code"] == "upstream_unavailable"
    assert retry["delay_s"] == 0.05  # Anthropic's retry-after, not our jittered backoff


@pytest.mark.parametrize(
    ("status", "code", "attempts"),
    [
        (400, "upstream_bad_request", 1),
        (401, "upstream_auth", 1),
        (402, "upstream_billing", 1),
        (403, "upstream_auth", 1),
        (404, "upstream_bad_request", 1),
        (413, "upstream_bad_request", 1),
        (429, "upstream_rate_limited", 3),
        (500, "upstream_unavailable", 3),
        (529, "upstream_unavailable", 3),
    ],
)
async def test_http_errors_map_to_our_codes_and_the_body_is_logged_without_the_key(
    provider, fake_anthropic, logs, status, code, attempts
):
    fake_anthropic.scripts = [Script(status=status) for _ in range(3)]
    with pytest.raises(UpstreamError) as info:
        await run(provider)
    assert info.value.code == code and f"(HTTP {status})" in info.value.message
    # A request the vendor rejected is the client's to fix: told the vendor's words; the
    # vendor's other failures are the gateway's own, in our words only.
    told = code == "upstream_bad_request" and status == 400  # invalid: the client's to fix
    assert ("scripted failure" in info.value.message) == told, info.value.message
    assert info.value.status == (400 if told else UPSTREAM_STATUS[code])
    assert len(fake_anthropic.calls("messages")) == attempts
    bodies = [e for e in logs if e["event"] == "upstream.error_body"]
    assert bodies and "scripted failure" in bodies[0]["body"]
    assert KEY not in repr(logs)


async def test_a_credit_balance_too_low_is_the_operators_billing_not_the_clients_request(
    provider, fake_anthropic
):
    """Anthropic says the gateway's account is out of credit as a 400 ``invalid_request_error``
    (anthropic-sdk-typescript#618): a 502 ``upstream_billing`` in our words, not retried, not
    the 400 with the vendor's words a request it calls invalid gets."""
    low = (
        "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits."
    )
    fake_anthropic.scripts = [Script(status=400, message=low) for _ in range(3)]
    with pytest.raises(UpstreamError) as info:
        await run(provider)
    err = info.value
    assert (err.code, err.status) == ("upstream_billing", 502)
    assert "credit balance" not in err.message and err.headers["x-should-retry"] == "false"
    assert len(fake_anthropic.calls("messages")) == 1

    # A 400 that only echoes the words (a client's field) is the client's, as any other
    echoed = "stop_sequences: 'Your credit balance is too low' is not a valid sequence"
    fake_anthropic.scripts = [Script(status=400, message=echoed)]
    with pytest.raises(UpstreamError) as info:
        await run(provider)
    assert (info.value.code, info.value.status) == ("upstream_bad_request", 400)


async def test_without_a_key_anthropic_answers_401_and_the_turn_is_an_auth_error(
    session, fake_anthropic
):
    provider = make_provider(session, fake_anthropic.url, key=None)
    with pytest.raises(UpstreamError) as info:
        await run(provider)
    assert info.value.code == "upstream_auth"
    assert "x-api-key" not in fake_anthropic.requests[0].headers


# --------------------------------------------------------------------------- translation
async def test_an_openai_request_becomes_an_anthropic_body(provider, fake_anthropic):
    """system/developer -> system; user parts -> text and image blocks; an assistant's tool
    calls -> tool_use (arguments parsed); consecutive tool messages -> one user message of
    tool_result blocks; the options mapped; stop -> stop_sequences; max_tokens always."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "A greeting before the user spoke."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture, and the weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.com/a.jpg", "detail": "low"},
                },
            ],
        },
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "assistant", "content": None, "tool_calls": rec.TOOL_CALLS},
        {"role": "tool", "tool_call_id": "toolu_01Weather4Kp8Xz", "content": "Sunny, 21 °C"},
        {
            "role": "tool",
            "tool_call_id": "toolu_01Time9Qm3Vw",
            "content": [{"type": "text", "text": "14:05"}],
        },
        {"role": "user", "content": ""},
        {"role": "user", "content": "Thanks!"},
    ]
    req = CompletionRequest(
        model=MODEL,
        messages=messages,
        max_tokens=300,
        temperature=0.5,
        top_p=0.9,
        stop=["END"],
        options={
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "user": "user-7",
            "metadata": {"purpose": "test"},
            "service_tier": "default",
            "max_completion_tokens": 999,
            "n": 1,
            "logprobs": False,
            "frequency_penalty": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
            },
        },
    )
    assert unsupported(req) is None
    await replay(provider, fake_anthropic, rec.TEXT, req=req)
    (call,) = fake_anthropic.calls("messages")
    assert call.body == {
        "model": MODEL,
        "max_tokens": 300,
        "stream": True,
        "system": [
            {"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Answer in French."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture, and the weather?"},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
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
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01Time9Qm3Vw",
                        "content": [{"type": "text", "text": "14:05"}],
                    },
                    {"type": "text", "text": "Thanks!"},
                ],
            },
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather of a place",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            {
                "name": "get_time",
                "input_schema": {"type": "object", "properties": {}},
                "strict": True,
            },
        ],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "user-7"},
        "service_tier": "standard_only",
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
    }


def test_anthropic_native_fields_are_sent_as_they_are():
    """What the /v1/messages front door passes under Anthropic's names."""
    req = request(
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 2000},
        top_k=None,
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "u-42"},
        service_tier="auto",
        user="ignored-when-metadata-names-one",
    )
    assert unsupported(req) is None
    body = build_body(req)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert body["stop_sequences"] == ["\n\nHuman:"] and body["metadata"] == {"user_id": "u-42"}
    assert body["service_tier"] == "auto" and "top_k" not in body
    assert build_body(request(top_k=5))["top_k"] == 5
    assert build_body(request(thinking={"type": "disabled"}))["thinking"] == {"type": "disabled"}


@pytest.mark.parametrize(
    ("effort", "max_tokens", "thinking"),
    [
        ("minimal", 4096, {"type": "enabled", "budget_tokens": 1024}),
        ("low", 4096, {"type": "enabled", "budget_tokens": 2048}),
        ("medium", 16000, {"type": "enabled", "budget_tokens": 8192}),
        ("high", 32000, {"type": "enabled", "budget_tokens": 16384}),
        ("xhigh", 64000, {"type": "enabled", "budget_tokens": 32768}),
        ("high", 4096, {"type": "enabled", "budget_tokens": 2048}),  # half the answer's limit
        ("low", 1800, {"type": "enabled", "budget_tokens": 1024}),  # at least the minimum
        ("low", 1024, None),  # no room to think
        ("none", 4096, None),
    ],
)
def test_reasoning_effort_is_a_thinking_budget_below_max_tokens(effort, max_tokens, thinking):
    body = build_body(request(max_tokens=max_tokens, reasoning_effort=effort))
    assert body.get("thinking") == thinking and body["max_tokens"] == max_tokens


LOOP = [
    *HI,
    {"role": "assistant", "content": None, "tool_calls": rec.TOOL_CALLS[:1]},
    {"role": "tool", "tool_call_id": "toolu_01Weather4Kp8Xz", "content": "Sunny"},
]
SIGNED = {"type": "thinking", "thinking": "Call get_weather.", "signature": rec.SIGNATURE}
REDACTED = {"type": "redacted_thinking", "data": rec.REDACTED_DATA}


def test_a_tool_loops_next_step_thinks_with_the_signed_blocks_sent_back():
    """Anthropic wants the assistant message that called the tools to open with its signed
    thinking blocks: sent back (``thinking_blocks``), they lead it as written and the step
    keeps thinking; an ``index`` an OpenAI SDK's accumulation left on them is not sent."""
    called = {**LOOP[1], "thinking_blocks": [{"index": 0, **SIGNED}, {"index": 1, **REDACTED}]}
    req = request([LOOP[0], called, LOOP[2]], max_tokens=4096, reasoning_effort="low")
    assert unsupported(req) is None
    body = build_body(req)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["messages"][1]["content"] == [
        SIGNED,
        REDACTED,
        {
            "type": "tool_use",
            "id": "toolu_01Weather4Kp8Xz",
            "name": "get_weather",
            "input": {"city": "Paris"},
        },
    ]


def test_a_tool_loops_next_step_without_the_blocks_runs_without_thinking():
    """An OpenAI-shaped client that kept only the text and the calls has no signed block to
    send back: that step does not think (and may force a tool)."""
    req = request(
        LOOP, max_tokens=4096, reasoning_effort="low", tool_choice="required", tools=TOOLS
    )
    assert unsupported(req) is None
    assert "thinking" not in build_body(req)
    after = [*LOOP, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And?"}]
    assert build_body(request(after, max_tokens=4096, reasoning_effort="low"))["thinking"]


def test_anthropics_own_fields_are_sent_as_written():
    """cache_control on a part, a tool call, a tool and a message; a tool result's is_error;
    a prefill; the front door's fields it does not know (``NativeFields``), never over what
    the translation writes itself."""
    cache = {"type": "ephemeral"}
    long_cache = {"type": "ephemeral", "ttl": "1h"}
    call = {**rec.TOOL_CALLS[0], "cache_control": cache}
    messages = [
        {"role": "system", "content": "Be brief.", "cache_control": long_cache},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather?", "cache_control": cache},
                {**IMAGE, "cache_control": cache},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": "no such city",
            "is_error": True,
            "cache_control": cache,
        },
        {"role": "assistant", "content": "The weather service"},
    ]
    native = NativeFields(
        {"context_management": {"edits": []}, "max_tokens": 1, "model": "x", "stream": False}
    )
    req = request(
        messages,
        tools=[{**TOOLS[0], "cache_control": cache}],
        top_k=40,
        anthropic_fields=native,
    )
    assert unsupported(req) is None
    body = build_body(req)
    assert body["system"] == [{"type": "text", "text": "Be brief.", "cache_control": long_cache}]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather?", "cache_control": cache},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                    "cache_control": cache,
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                    "cache_control": cache,
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call["id"],
                    "content": "no such city",
                    "is_error": True,
                    "cache_control": cache,
                }
            ],
        },
        {"role": "assistant", "content": "The weather service"},  # the prefill, last
    ]
    assert body["tools"][0]["cache_control"] == cache
    assert body["top_k"] == 40 and body["context_management"] == {"edits": []}
    assert (body["model"], body["max_tokens"], body["stream"]) == (MODEL, 256, True)


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("messages", "options", "param"),
    [
        (None, {"n": 2}, "n"),
        (None, {"logprobs": True}, "logprobs"),
        (None, {"top_logprobs": 2}, "top_logprobs"),
        (None, {"logit_bias": {"50256": -100}}, "logit_bias"),
        (None, {"seed": 7}, "seed"),
        (None, {"frequency_penalty": 0.5}, "frequency_penalty"),
        (None, {"presence_penalty": 1}, "presence_penalty"),
        (None, {"response_format": {"type": "json_object"}}, "response_format"),
        (None, {"service_tier": "flex"}, "service_tier"),
        (None, {"reasoning_effort": "extreme"}, "reasoning_effort"),
        (None, {"thinking": {"type": "enabled", "budget_tokens": 10}}, "thinking"),
        (None, {"thinking": {"type": "enabled", "budget_tokens": 2048}, "top_k": 5}, "top_k"),
        (None, {"reasoning_effort": "low", "tool_choice": "required"}, "tool_choice"),
        (None, {"store": True}, "store"),
        (None, {"frobnicate": 1}, "frobnicate"),
        # only the /v1/messages front door passes fields on unchecked (a NativeFields)
        (None, {"anthropic_fields": {"frobnicate": 1}}, "anthropic_fields"),
        (
            [{"role": "user", "content": "x", "thinking_blocks": [SIGNED]}],
            {},
            "messages[0].thinking_blocks",
        ),
        (
            [*HI, {"role": "assistant", "content": "y", "thinking_blocks": [{"type": "thinking"}]}],
            {},
            "messages[1].thinking_blocks",
        ),
        ([{"role": "user", "content": "x", "is_error": True}], {}, "messages[0].is_error"),
        (
            [{"role": "user", "content": "x", "cache_control": "ephemeral"}],
            {},
            "messages[0].cache_control",
        ),
        (
            [{"role": "user", "content": "x", "tool_calls": rec.TOOL_CALLS}],
            {},
            "messages[0].tool_calls",
        ),
        ([{"role": "user", "content": "x", "name": "alice"}], {}, "messages[0].name"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], {}, "messages[0].content[0]"),
        ([{"role": "system", "content": [IMAGE]}, *HI], {}, "messages[0].content[0]"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="},
                        }
                    ],
                }
            ],
            {},
            "messages[0].content[0]",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}
                    ],
                }
            ],
            {},
            "messages[0].content[0]",
        ),
    ],
)
def test_what_anthropic_cannot_honour_is_named(messages, options, param):
    assert unsupported(request(messages, **options)) == param


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"a string"'])
def test_tool_call_arguments_that_are_not_a_json_object_are_invalid(arguments):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [call]}]
    messages.append({"role": "tool", "tool_call_id": "c1", "content": "ok"})
    with pytest.raises(BadRequest) as info:
        unsupported(request(messages))
    assert info.value.code == "invalid_value"
    assert info.value.details == {"param": "messages[1].tool_calls[0].function.arguments"}


@pytest.mark.parametrize(
    ("temperature", "top_p", "effort", "param"),
    [
        (1.5, None, None, "temperature"),
        (0.7, None, "low", "temperature"),
        (None, 0.5, "low", "top_p"),
    ],
)
async def test_sampling_anthropic_cannot_take_is_refused_before_any_call(
    provider, fake_anthropic, temperature, top_p, effort, param
):
    options = {"reasoning_effort": effort} if effort else {}
    req = CompletionRequest(
        model=MODEL,
        messages=HI,
        max_tokens=4096,
        temperature=temperature,
        top_p=top_p,
        options=options,
    )
    with pytest.raises(BadRequest) as info:
        await provider.open(req)
    assert info.value.code == "unsupported_parameter" and info.value.details["param"] == param
    assert not fake_anthropic.requests


# --------------------------------------------------------------------------- count_tokens
async def test_count_prompt_counts_messages_and_tools_and_caches_the_system_prompt(
    provider, fake_anthropic
):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *HI]
    first = await provider.count_prompt(request(messages, tools=TOOLS))
    calls = fake_anthropic.calls("count_tokens")
    assert [("system" in c.body, c.body["messages"]) for c in calls] == [
        (False, HI),
        (True, [{"role": "user", "content": "."}]),
        (False, [{"role": "user", "content": "."}]),
    ]
    assert calls[0].body["tools"][0]["name"] == "get_weather"  # tools are part of the prompt
    assert all(c.headers["x-api-key"] == KEY for c in calls)
    system_words = 5  # "You are a helpful assistant."
    tool_words = 1 + 5 + 1  # the fake's tokenizer: the names and the description
    assert first == 2 + tool_words + system_words  # the placeholder's own count taken off
    second = await provider.count_prompt(
        request([messages[0], {"role": "user", "content": "a b c"}])
    )
    assert len(fake_anthropic.calls("count_tokens")) == 4  # the system prompt's count cached
    assert second == 3 + system_words


async def test_count_prompt_counts_with_the_thinking_the_turn_sends(provider, fake_anthropic):
    """A tool loop's next step with its signed block thinks: counted as Anthropic will read it."""
    called = {**LOOP[1], "thinking_blocks": [SIGNED]}
    await provider.count_prompt(
        request([LOOP[0], called, LOOP[2]], max_tokens=4096, reasoning_effort="low")
    )
    (call,) = fake_anthropic.calls("count_tokens")
    assert call.body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert call.body["messages"][1]["content"][0] == SIGNED
    await provider.count_prompt(request(LOOP, max_tokens=4096, reasoning_effort="low"))
    assert "thinking" not in fake_anthropic.calls("count_tokens")[-1].body


async def test_count_prompt_failure_is_an_upstream_error(provider, fake_anthropic):
    fake_anthropic.count_status = 529
    with pytest.raises(UpstreamError) as info:
        await provider.count_prompt(request())
    assert info.value.code == "upstream_unavailable"


# --------------------------------------------------------------------------- model list
async def test_the_model_list_follows_pages_and_names_the_aliases(provider, fake_anthropic):
    ids = await provider.list_models()
    assert ids is not None
    assert {"claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "claude-3-5-haiku-latest"} <= ids
    assert "claude-3-haiku-20240307" in ids
    pages = fake_anthropic.calls("models")
    assert len(pages) == 3  # five models, two per page
    assert pages[0].query == {"limit": "1000"}
    assert [p.query.get("after_id") for p in pages[1:]] == [
        "claude-haiku-4-5-20251001",
        "claude-3-5-haiku-20241022",
    ]
    assert all(p.headers["x-api-key"] == KEY for p in pages)
    assert all(p.headers["anthropic-version"] == "2023-06-01" for p in pages)


@pytest.mark.parametrize(
    ("status", "code"), [(401, "upstream_auth"), (529, "upstream_unavailable")]
)
async def test_model_list_errors_are_upstream_errors(provider, fake_anthropic, status, code):
    fake_anthropic.models_status = status
    with pytest.raises(UpstreamError) as info:
        await provider.list_models()
    assert info.value.code == code


@pytest.mark.parametrize(
    ("options", "fields"),
    [
        (
            {"tools": TOOLS[:1], "parallel_tool_calls": False},
            {"type": "auto", "disable_parallel_tool_use": True},
        ),
        (
            {"tools": TOOLS[:1], "tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        (
            {"tools": TOOLS[:1], "tool_choice": "none", "parallel_tool_calls": False},
            {"type": "none"},
        ),
        ({"tools": TOOLS[:1], "tool_choice": "auto"}, {"type": "auto"}),
        ({"parallel_tool_calls": False}, None),  # no tools: nothing to call one at a time
    ],
)
def test_tool_choice_and_parallel_tool_calls(options, fields):
    assert build_body(request(**options)).get("tool_choice") == fields

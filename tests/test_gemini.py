"""The native Gemini provider, end to end: the real app over real HTTP, SecantusDB, and a fake
Gemini API on a real socket speaking Google's wire format (CRLF SSE, usageMetadata,
promptFeedback, countTokens, paged models.list, Google's error bodies)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from service.app import create_app
from service.errors import UpstreamError
from service.keys import SETTINGS, STORE
from service.models import load_catalogue
from service.providers.base import RetryPolicy
from service.providers.gemini import GeminiProvider
from service.providers.registry import build_providers
from service.settings import SettingsError
from service.store import utcnow
from service.stream.producer import period_of
from service.tokens import TokenCounter, estimate_tokens
from tests.fake_gemini import FakeGemini, Script, count_words
from tests.faults import settled
from tests.sse_client import collect, events, read_until, text_of

KEY = "AIza-upstream-secret-key"
SAFETY = [
    {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "threshold": "BLOCK_MEDIUM_AND_ABOVE"},
]
MODELS = [
    {
        "name": "gemini-test",
        "provider": "gemini",
        "upstream_id": "gemini-2.0-flash",
        "context_window": 32000,
        "max_output_tokens": 256,
        "encoding": None,
    },
    {"name": "demo", "provider": "demo", "context_window": 8000, "max_output_tokens": 512},
]
STREAM = "streamGenerateContent"


@pytest.fixture
async def fake_gemini():
    fake = FakeGemini()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def gemini_settings(make_settings, fake_gemini):
    def factory(**overrides: Any):
        values: dict[str, Any] = {
            "models": json.dumps(MODELS),
            "default_model": "gemini-test",
            "gemini_base_url": fake_gemini.url,
            "gemini_api_key": KEY,
            "gemini_safety_settings": json.dumps(SAFETY),
            "upstream_retry_base_s": 0.01,
            "upstream_retry_max_s": 0.05,
            "upstream_idle_timeout_s": 5.0,
            "watch_interval_s": 0.1,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


@pytest.fixture
async def client(aiohttp_client, gemini_settings):
    return await aiohttp_client(create_app(gemini_settings()))


@pytest.fixture
async def provider(fake_gemini):
    async with aiohttp.ClientSession() as session:
        yield GeminiProvider(
            session,
            base_url=fake_gemini.url,
            api_key=KEY,
            safety_settings=None,
            retry=RetryPolicy(max_attempts=1),
            timeout=aiohttp.ClientTimeout(total=5),
        )


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


def ended(logs, **match):
    lines = [e for e in logs if e["event"] == "stream.ended"]
    return [e for e in lines if all(e.get(k) == v for k, v in match.items())]


async def until(predicate, within_s=5.0):
    deadline = time.monotonic() + within_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)  # polling with a deadline, not synchronisation
    return result


def system_words(client) -> int:
    return count_words([{"parts": [{"text": client.app[SETTINGS].system_prompt}]}])


def user(*texts: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": t} for t in texts]}


def model(*texts: str) -> dict[str, Any]:
    return {"role": "model", "parts": [{"text": t} for t in texts]}


# --------------------------------------------------------------------------- full turn
async def test_full_turn_streams_text_and_bills_usage_metadata(client, fake_gemini, auth, logs):
    """Deltas arrive while Gemini is still sending; thought parts are reasoning, not text; the
    record's tokens are usageMetadata's (thinking counted as completion); the key only in the
    header."""
    fake_gemini.default = Script(
        chunks=["The ", "answer ", "is ", "42."],
        thought_parts=["Let me think about this."],
        usage=(30, 5),
        thoughts=2,
        gate_after=2,
    )
    h = auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h, "What is the answer?")
    assert resp.status == 200
    seen: list[dict] = []
    async for ev in events(resp):
        if "event" not in ev:
            continue
        seen.append(ev)
        if text_of(seen) == "The answer ":
            assert not fake_gemini.finished.is_set()  # still held at the gate
            fake_gemini.gate.set()
    names = [e["event"] for e in seen]
    assert names[0] == "started" and names[-1] == "done"
    assert names[1:-1] == ["reasoning"] + ["delta"] * (len(names) - 3)
    assert seen[1]["data"] == {"text": "Let me think about this."}
    assert text_of(seen) == "The answer is 42."
    done = seen[-1]["data"]
    assert done["status"] == "complete" and done["finish_reason"] == "stop"
    tokens = {"prompt": 30, "completion": 7, "total": 37, "source": "upstream", "reasoning": 2}
    assert done["tokens"] == tokens

    user_msg, assistant = await records(client, chat_id)
    assert user_msg["content"] == "What is the answer?"
    assert assistant["status"] == "complete" and assistant["content"] == "The answer is 42."
    assert assistant["reasoning"] == "Let me think about this."
    details = {"completion_tokens_details": {"reasoning_tokens": 2}}  # as a /v1 client gets it
    assert assistant["tokens"] == {**tokens, "details": details}
    # No local tokenizer: the reservation was sized with countTokens (contents + system text).
    assert assistant["prompt_tokens"] == count_words([user("What is the answer?")]) + system_words(
        client
    )
    usage = await usage_doc(client)
    assert usage["used"] == 37 and usage["reserved"] == 0

    (call,) = fake_gemini.calls(STREAM)
    assert call.path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    assert call.query == {"alt": "sse"}  # the key is never in the URL
    assert call.headers["x-goog-api-key"] == KEY and "authorization" not in call.headers
    assert all(r.headers["x-goog-api-key"] == KEY for r in fake_gemini.calls("countTokens"))
    assert all("key" not in r.query for r in fake_gemini.requests)
    assert KEY not in repr(logs)
    assert ended(logs, outcome="completed", token_source="upstream")


async def test_prompt_count_comes_from_count_tokens_when_usage_is_absent(client, fake_gemini, auth):
    fake_gemini.default = Script(chunks=["Counted ", "by ", "estimate."], usage=None)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "count my words please"))
    done = evs[-1]["data"]
    assert done["status"] == "complete"
    expected_prompt = count_words([user("count my words please")]) + system_words(client)
    assert done["tokens"] == {
        "prompt": expected_prompt,
        "completion": estimate_tokens("Counted by estimate."),
        "total": expected_prompt + estimate_tokens("Counted by estimate."),
        "source": "estimate",
    }
    assert (await usage_doc(client))["used"] == done["tokens_used"]


async def test_count_tokens_failure_falls_back_to_the_estimate(client, fake_gemini, auth, logs):
    """countTokens down is an UpstreamError the producer absorbs: the turn still runs."""
    fake_gemini.count_status = 503
    fake_gemini.default = Script(usage=None)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "still answered"))
    assert evs[-1]["event"] == "done" and text_of(evs) == "Hello, world!"
    failed = [e for e in logs if e["event"] == "stream.count_tokens_failed"]
    assert failed and failed[0]["code"] == "upstream_unavailable"
    prompt = [{"role": "system", "content": client.app[SETTINGS].system_prompt}]
    prompt.append({"role": "user", "content": "still answered"})
    assert evs[-1]["data"]["tokens"]["prompt"] == TokenCounter(None).count_messages(prompt)


async def test_system_instruction_is_counted_once_and_cached(client, fake_gemini, auth):
    fake_gemini.default = Script(usage=None)
    h = auth()
    chat_id = await new_chat(client, h)
    first = await collect(await send(client, chat_id, h, "one two three"))
    calls_after_first = len(fake_gemini.calls("countTokens"))
    second = await collect(await send(client, chat_id, h, "four five"))
    counts = fake_gemini.calls("countTokens")
    system = system_words(client)

    def has_system(rec) -> bool:
        return any(c["parts"][0]["text"].startswith("You are") for c in rec.body["contents"])

    assert calls_after_first == 2 and len(counts) == 3
    assert [has_system(r) for r in counts] == [False, True, False]
    # Both turns still include the system text's count.
    assert first[-1]["data"]["tokens"]["prompt"] == 3 + system
    history = count_words([user("one two three"), model("Hello, world!"), user("four five")])
    assert second[-1]["data"]["tokens"]["prompt"] == history + system


# --------------------------------------------------------------------------- request body
async def test_request_body_maps_roles_merges_turns_and_sends_config(client, fake_gemini, auth):
    """A failed first answer leaves two user messages in a row: one content with two parts.
    assistant -> model, the system prompt -> systemInstruction, max tokens and safety sent."""
    fake_gemini.scripts = [Script(status=400), Script(chunks=["second ", "answer"])]
    h = auth()
    chat_id = await new_chat(client, h)
    refused = await send(client, chat_id, h, "first question")
    assert refused.status == 400
    await collect(await send(client, chat_id, h, "second question"))
    await collect(await send(client, chat_id, h, "third question"))

    bodies = [r.body for r in fake_gemini.calls(STREAM)]
    assert bodies[1]["contents"] == [user("first question", "second question")]
    body = bodies[2]
    assert body["contents"] == [
        user("first question", "second question"),
        model("second answer"),
        user("third question"),
    ]
    assert body["systemInstruction"] == {"parts": [{"text": client.app[SETTINGS].system_prompt}]}
    assert body["generationConfig"] == {"maxOutputTokens": 256}
    assert body["safetySettings"] == SAFETY
    assert set(body) == {"contents", "systemInstruction", "generationConfig", "safetySettings"}


# --------------------------------------------------------------------------- safety
async def test_blocked_prompt_fails_with_content_filtered_and_bills_only_the_prompt(
    client, fake_gemini, auth, logs
):
    fake_gemini.default = Script(block_reason="PROHIBITED_CONTENT", usage=(9, 0))
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "something forbidden"))
    assert [e["event"] for e in evs] == ["started", "error"]
    err = evs[-1]["data"]
    assert err["code"] == "upstream_content_filtered" and err["status"] == "failed"
    assert "PROHIBITED_CONTENT" in err["message"]
    assert err["tokens"] == {"prompt": 9, "completion": 0, "total": 9, "source": "upstream"}
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == ""
    assert assistant["error"]["code"] == "upstream_content_filtered"
    usage = await usage_doc(client)
    assert usage["used"] == 9 and usage["reserved"] == 0 and usage["open"] == []
    assert ended(logs, outcome="failed", error_code="upstream_content_filtered")


async def test_safety_finish_mid_answer_keeps_the_partial_as_content_filter(
    client, fake_gemini, auth
):
    fake_gemini.default = Script(
        chunks=["Sure, ", "here ", "is ", "how"],
        finish_after=2,
        finish_reason="SAFETY",
        usage=(12, 3),
    )
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "Sure, here "
    done = evs[-1]
    assert done["event"] == "done" and done["data"]["status"] == "complete"
    assert done["data"]["finish_reason"] == "content_filter"
    assert done["data"]["tokens"] == {
        "prompt": 12,
        "completion": 3,
        "total": 15,
        "source": "upstream",
    }
    _, assistant = await records(client, chat_id)
    assert assistant["content"] == "Sure, here " and assistant["finish_reason"] == "content_filter"
    assert (await usage_doc(client))["used"] == 15


# --------------------------------------------------------------------------- faults
async def test_429_before_the_first_token_is_retried_honouring_retry_info(
    client, fake_gemini, auth, logs
):
    fake_gemini.fail_first(1, status=429, retry_delay="0.03s")
    h = auth()
    evs = await collect(await send(client, await new_chat(client, h), h))
    assert evs[-1]["event"] == "done" and text_of(evs) == "Hello, world!"
    assert len(fake_gemini.calls(STREAM)) == 2
    retry = [e for e in logs if e["event"] == "upstream.retry"]
    assert len(retry) == 1 and retry[0]["provider"] == "gemini"
    assert retry[0]["code"] == "upstream_rate_limited"
    assert retry[0]["delay_s"] == 0.03  # Gemini's RetryInfo, not our jittered backoff


@pytest.mark.parametrize(
    ("status", "reason", "code", "http", "attempts"),
    [
        (400, None, "upstream_bad_request", 400, 1),
        (400, "API_KEY_INVALID", "upstream_auth", 502, 1),
        (403, None, "upstream_auth", 502, 1),
        (404, None, "upstream_bad_request", 502, 1),
        (429, None, "upstream_rate_limited", 503, 3),
        (500, None, "upstream_unavailable", 503, 3),
        (503, None, "upstream_unavailable", 503, 3),
    ],
)
async def test_google_errors_map_to_our_codes(
    client, fake_gemini, auth, logs, status, reason, code, http, attempts
):
    """Our code and our words for the client, and Google's message when it called the request
    invalid (the client's to fix; a model it does not know is the operator's: a 502 in our
    words); its whole body in the log."""
    fake_gemini.default = Script(status=status, error_reason=reason)
    h = auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h)
    assert resp.status == http
    error = (await resp.json())["error"]
    assert error["code"] == code and f"(HTTP {status})" in error["message"]
    told = code == "upstream_bad_request" and status == 400  # invalid: the client's to fix
    assert ("scripted failure" in error["message"]) == told, error["message"]
    bodies = [e for e in logs if e["event"] == "upstream.error_body"]
    assert bodies and f"scripted failure {status}" in bodies[0]["body"]
    assert len(fake_gemini.calls(STREAM)) == attempts  # UPSTREAM_MAX_ATTEMPTS when retryable
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["tokens"]["total"] == 0
    assert (await usage_doc(client))["used"] == 0


async def test_reset_mid_stream_keeps_the_partial_and_fails(client, fake_gemini, auth, logs):
    """Running usage on the frames before the cut is not the bill: the partial is estimated."""
    fake_gemini.default = Script(chunks=["Partial ", "answer ", "never ", "ends"], reset_after=2)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "tell me"))
    assert text_of(evs) == "Partial answer "
    err = evs[-1]
    assert err["event"] == "error" and err["data"]["status"] == "failed"
    assert err["data"]["code"] == "upstream_unavailable"
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == "Partial answer "
    prompt = count_words([user("tell me")]) + system_words(client)
    assert assistant["tokens"] == {
        "prompt": prompt,
        "completion": estimate_tokens("Partial answer "),
        "total": prompt + estimate_tokens("Partial answer "),
        "source": "estimate",
    }
    usage = await usage_doc(client)
    assert usage["used"] == assistant["tokens"]["total"] and usage["reserved"] == 0
    assert ended(logs, outcome="failed", reason="upstream_error")


async def test_stream_closed_before_any_finish_reason_is_cut(client, fake_gemini, auth):
    fake_gemini.default = Script(send_finish=False)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "Hello, world!"
    assert evs[-1]["event"] == "error" and evs[-1]["data"]["code"] == "upstream_bad_response"
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == "Hello, world!"


# --------------------------------------------------------------------------- cancellation
async def test_with_on_disconnect_cancel_a_disconnect_closes_the_gemini_stream_promptly(
    aiohttp_client, gemini_settings, fake_gemini, auth, logs
):
    client = await aiohttp_client(create_app(gemini_settings(on_disconnect="cancel")))
    fake_gemini.default = Script(chunks=["a ", "b ", "c ", "d"], gate_after=2)
    h = auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h)
    await read_until(resp, "a b ")
    await asyncio.wait_for(fake_gemini.reached_gate.wait(), 5)
    closed_at = time.monotonic()
    resp.close()  # the browser tab goes away
    await asyncio.wait_for(fake_gemini.disconnected.wait(), 1.0)
    assert fake_gemini.disconnected_at - closed_at < 1.0
    assert not fake_gemini.finished.is_set()
    await until(lambda: ended(logs, outcome="cancelled"))
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "cancelled" and assistant["content"] == "a b "
    assert assistant["reason"] == "client_disconnect"
    usage = await usage_doc(client)
    assert usage["used"] == assistant["tokens"]["total"] > 0 and usage["reserved"] == 0


# --------------------------------------------------------------------------- OpenAI route
async def test_openai_route_streams_a_gemini_model(
    aiohttp_client, gemini_settings, fake_gemini, token_for
):
    """The SDK's request becomes Gemini's: system/developer -> systemInstruction, a leading
    assistant turn dropped, sampling -> generationConfig; MAX_TOKENS comes back as length."""
    app = create_app(gemini_settings(gemini_safety_settings=None))
    client = await aiohttp_client(app)
    fake_gemini.default = Script(
        chunks=["Bonjour", " !"], usage=(17, 2), finish_reason="MAX_TOKENS"
    )
    sdk = AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=token_for("alice"), max_retries=0
    )
    try:
        stream = await sdk.chat.completions.create(
            model="gemini-test",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "assistant", "content": "Earlier answer."},
                {"role": "user", "content": "Say hello"},
                {"role": "developer", "content": "In French."},
                {"role": "user", "content": "Please."},
            ],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=50,
            temperature=0.2,
            top_p=0.9,
            stop=["END"],
        )
        chunks = [c async for c in stream]
    finally:
        await sdk.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Bonjour !"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == 17 and chunks[-1].usage.completion_tokens == 2

    (call,) = fake_gemini.calls(STREAM)
    assert call.body == {
        "contents": [user("Say hello", "Please.")],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "In French."}]},
        "generationConfig": {
            "maxOutputTokens": 50,
            "temperature": 0.2,
            "topP": 0.9,
            "stopSequences": ["END"],
        },
    }
    await settled(client.app[STORE].db)  # the replica's lease on the month given back
    usage = await usage_doc(client)
    assert usage["used"] == 19 and usage["reserved"] == 0


# --------------------------------------------------------------------------- provider
async def test_list_models_follows_pages_and_keeps_generating_models(provider, fake_gemini):
    ids = await provider.list_models()
    assert ids == {"gemini-2.0-flash", "gemini-2.5-pro", "gemini-stream-only"}
    pages = fake_gemini.calls("list")
    assert len(pages) == 3  # five models, two per page
    assert pages[0].query == {"pageSize": "1000"}
    assert [p.query.get("pageToken") for p in pages[1:]] == ["2", "4"]
    assert all(p.headers["x-goog-api-key"] == KEY and "key" not in p.query for p in pages)


@pytest.mark.parametrize(
    ("status", "code"), [(403, "upstream_auth"), (500, "upstream_unavailable")]
)
async def test_list_models_errors_are_upstream_errors(provider, fake_gemini, status, code):
    fake_gemini.models_status = status
    with pytest.raises(UpstreamError) as info:
        await provider.list_models()
    assert info.value.code == code


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        '{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}',
        '["BLOCK_NONE"]',
        '[{"category": "HARM_CATEGORY_HARASSMENT"}]',
        '[{"category": "HARM_CATEGORY_HARASSMENT", "threshold": ""}]',
        '[{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE", "x": 1}]',
    ],
)
async def test_invalid_safety_settings_stop_start_up_naming_the_variable(gemini_settings, value):
    settings = gemini_settings(gemini_safety_settings=value)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(SettingsError, match="GEMINI_SAFETY_SETTINGS"):
            build_providers(settings, session, load_catalogue(settings))


async def test_valid_safety_settings_build_the_gemini_provider(gemini_settings):
    settings = gemini_settings()
    async with aiohttp.ClientSession() as session:
        providers = build_providers(settings, session, load_catalogue(settings))
    assert isinstance(providers["gemini"], GeminiProvider)


@pytest.mark.parametrize(
    "frame",
    [
        b"[1]",
        b'{"candidates": "x"}',
        b'{"candidates": [7]}',
        b'{"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": 3}]}',
        b'{"usageMetadata": {"promptTokenCount": "many"}}',
        b'{"error": {"message": "AIzaSyEchoedKeyEchoedKeyEchoedKey0"}}',
    ],
)
async def test_a_malformed_frame_ends_the_turn_cleanly(client, fake_gemini, auth, frame):
    """Every frame ends in text, a clean ``upstream_bad_response`` (partial text kept and
    billed), or is ignored: never an exception out of the turn."""
    fake_gemini.default = Script(chunks=["one ", "two ", "three"], raw_after={2: [frame]})
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert evs[-1]["event"] == "error" and evs[-1]["data"]["code"] == "upstream_bad_response"
    assert text_of(evs) == "one two " and "AIza" not in repr(evs)
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == "one two "
    assert assistant["tokens"]["completion"] > 0
    assert (await usage_doc(client))["reserved"] == 0


@pytest.mark.parametrize(
    "frame",
    [b"{}", b'{"candidates": []}', b'{"candidates": [{"content": "x"}]}', b'{"usageMetadata": 5}'],
)
async def test_frames_with_nothing_usable_are_ignored(client, fake_gemini, auth, frame):
    fake_gemini.default = Script(chunks=["one ", "two ", "three"], raw_after={2: [frame]})
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert evs[-1]["event"] == "done" and text_of(evs) == "one two three"

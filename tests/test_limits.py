"""Limits that fit programs (issue 18).

The chat page keeps its one-message-per-interval rule (``MESSAGE_RATE_LIMIT_MS``); programs on
``/v1`` and WebSocket clients are held to requests per minute (``V1_REQUESTS_PER_MINUTE``) and
turns at once (``MAX_CONCURRENT_TURNS_PER_USER``) instead, all in the one conditional update of
the user's usage document, and every ``/v1`` answer or limit refusal carries OpenAI's
``x-ratelimit-*`` headers. Driven by the official ``openai`` SDK over real sockets, against the
fake upstream (held at a gate, so the turns are truly concurrent) and SecantusDB.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from service.app import create_app
from service.keys import STORE
from service.limits import duration, period_end
from service.store import open_turns as held_turns
from service.store import utcnow
from service.stream.producer import period_of
from service.tokens import TokenCounter
from tests.fake_openai import Script
from tests.processes import session

HI = [{"role": "user", "content": "Hi there"}]
HELD = Script(chunks=["x ", "y"], gate_after=1)  # each turn waits at the fake's gate


# --------------------------------------------------------------------------- helpers
@pytest.fixture
async def sdk_for(token_for):
    """SDK clients for the test server (only the base URL and the key change)."""
    made: list[AsyncOpenAI] = []

    def factory(client, *, max_retries: int = 0, **kw: Any) -> AsyncOpenAI:
        sdk = AsyncOpenAI(
            base_url=str(client.make_url("/v1")),
            api_key=token_for("alice"),
            max_retries=max_retries,
            **kw,
        )
        made.append(sdk)
        return sdk

    yield factory
    for sdk in made:
        await sdk.close()


async def usage_doc(client, user: str = "alice") -> dict[str, Any]:
    store = client.app[STORE]
    return await store.usage.find_one({"user_id": user, "period": period_of(utcnow())}) or {}


async def until(probe, within_s: float = 5.0) -> None:
    """Poll an async ``probe`` until it is true, with a deadline."""
    deadline = time.monotonic() + within_s
    while not await probe():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


async def open_turns(client, count: int) -> None:
    """The user's month holds ``count`` turns (a turn's own entry, or a replica's lease's)."""

    async def probe() -> bool:
        return held_turns(await usage_doc(client)) == count

    await until(probe)


async def streaming_turns(client, count: int) -> None:
    async def probe() -> bool:
        store = client.app[STORE]
        return await store.messages.count_documents({"status": "streaming"}) == count

    await until(probe)


def parse_duration(text: str) -> timedelta:
    """OpenAI's (Go's) duration format, as a client would read it."""
    if text.endswith("ms"):
        return timedelta(milliseconds=int(text[:-2]))
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d+)?)s", text)
    assert found, f"not a duration: {text!r}"
    hours, minutes, seconds = found.groups()
    return timedelta(hours=int(hours or 0), minutes=int(minutes or 0), seconds=float(seconds))


def limit_headers(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def assert_tokens(headers, doc: dict[str, Any], running: int = 0, limit: int = 100_000) -> None:
    """The tokens headers say the month's budget: the limit less what is used and what the
    ``running`` turns were granted (what a replica's lease holds beyond them is the user's)."""
    assert headers["x-ratelimit-limit-tokens"] == str(limit)
    remaining = limit - doc.get("used", 0) - running
    assert headers["x-ratelimit-remaining-tokens"] == str(remaining)
    now = datetime.now(UTC)
    reset = parse_duration(headers["x-ratelimit-reset-tokens"])
    assert abs(now + reset - period_end(now)) < timedelta(seconds=30)


async def chat(client, auth) -> str:
    resp = await client.post("/api/chat", json={}, headers=auth())
    assert resp.status == 201
    return str((await resp.json())["chat_id"])


async def page_send(client, auth, chat_id: str) -> tuple[int, Any]:
    """A chat page's send: its status, and the error body of a refusal (a 200 is read out)."""
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=auth())
    if resp.status == 200:
        await resp.read()
        return 200, None
    return resp.status, await resp.json()


# --------------------------------------------------------------------------- the format
@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.017, "17ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.95, "59.95s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (412 * 3600 + 187.25, "412h3m7.25s"),
    ],
)
def test_durations_take_openais_format(seconds, text):
    assert duration(timedelta(seconds=seconds)) == text
    assert parse_duration(text) == timedelta(seconds=seconds)


# --------------------------------------------------------------------------- concurrency
async def test_twenty_concurrent_sdk_streams_succeed_and_the_21st_waits_for_a_free_turn(
    stream_client, fake_openai, sdk_for
):
    """With the defaults (600 requests a minute, 20 turns at once): 20 SDK streams of one user
    run at once; the 21st is 429 with Retry-After and the x-ratelimit headers; the SDK's own
    retry gets through once one of the 20 has ended."""
    fake_openai.default = HELD
    sdk = sdk_for(stream_client)
    streams = await asyncio.gather(
        *(
            sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)
            for _ in range(20)
        )
    )
    await open_turns(stream_client, 20)  # all twenty admitted and running at the same time
    doc = await usage_doc(stream_client)
    heads = [limit_headers(s.response.headers) for s in streams]
    assert {h["x-ratelimit-limit-requests"] for h in heads} == {"600"}
    # Each answer says what was left right after its own request (the bucket of 600 refills
    # one request every 100 ms, so exact figures are the two-a-minute test's). A request is
    # judged at the moment it began: one that began before another but reached MongoDB after it
    # sees the bucket as it will be then, a request or so lower than 600 - 20.
    for h in heads:
        assert 570 <= int(h["x-ratelimit-remaining-requests"]) <= 599
        reset = parse_duration(h["x-ratelimit-reset-requests"])
        assert timedelta(0) < reset <= timedelta(seconds=2)  # 100 ms per request taken
    tokens_left = sorted(int(h["x-ratelimit-remaining-tokens"]) for h in heads)
    # Remaining: the month less the running turns' grants (what the replica's lease holds
    # beyond them is still the user's to spend).
    grants = [m["reservation"] async for m in stream_client.app[STORE].messages.find()]
    assert len(grants) == 20 and doc["reserved"] >= sum(grants)
    assert tokens_left[0] == 100_000 - sum(grants) and len(set(tokens_left)) == 20

    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    assert "20 running, at most 20" in err.message
    refused = err.response.headers
    assert refused["Retry-After"] == "1" and refused["retry-after-ms"] == "1000"
    assert refused["x-ratelimit-limit-requests"] == "600"
    assert 570 <= int(refused["x-ratelimit-remaining-requests"]) <= 599
    assert_tokens(refused, await usage_doc(stream_client), sum(grants))

    # The SDK's own retry: it waits the Retry-After and tries again. The hook (which the SDK
    # awaits before it retries) ends one of the twenty when the first answer is the 429.
    statuses: list[int] = []

    async def on_response(response) -> None:
        statuses.append(response.status_code)
        if response.status_code == 429:
            await streams[0].close()  # a stateless turn stops when its client goes
            await streaming_turns(stream_client, 19)

    http = openai.DefaultAsyncHttpx2Client(event_hooks={"response": [on_response]})
    retrying = sdk_for(stream_client, max_retries=2, http_client=http)
    try:
        stream = await retrying.chat.completions.create(model="gpt-test", messages=HI, stream=True)
        assert statuses == [429, 200]
        assert 570 <= int(stream.response.headers["x-ratelimit-remaining-requests"]) <= 599
        fake_openai.gate.set()
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "x y"
    finally:
        fake_openai.gate.set()
        await http.aclose()
    for s in streams[1:]:
        assert "".join([c.choices[0].delta.content or "" async for c in s]) == "x y"


async def test_the_page_and_programs_keep_their_own_rules(
    aiohttp_client, stream_settings, fake_openai, sdk_for, auth
):
    """MESSAGE_RATE_LIMIT_MS holds the chat page (SSE) only, and the program rules (requests
    per minute, turns at once) hold /v1 only: neither moves or reads the other's."""
    client = await aiohttp_client(
        create_app(
            stream_settings(
                message_rate_limit_ms=60_000,
                v1_requests_per_minute=2,
                max_concurrent_turns_per_user=1,
            )
        )
    )
    sdk = sdk_for(client)
    fake_openai.scripts = [HELD]  # the first turn (a program's) waits; the others do not
    held = await sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    chat_id = await chat(client, auth)

    # A program's turn is running, so programs are at their one turn at once: the page is not.
    assert (await page_send(client, auth, chat_id))[0] == 200
    status, body = await page_send(client, auth, chat_id)  # the page's own rule holds it
    assert status == 429 and body["error"]["details"]["rule"] == "message_rate"
    assert body["error"]["details"]["retry_after_ms"] > 55_000
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    assert "at once" in info.value.message
    assert info.value.response.headers["Retry-After"] == "1"

    fake_openai.gate.set()
    assert "".join([c.choices[0].delta.content or "" async for c in held]) == "x y"
    await open_turns(client, 0)
    # The page sent a message a moment ago and may not send for a minute: programs may, and
    # the page's message took nothing of theirs (their second request takes the last one).
    answer = await sdk.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"  # 2 a minute, both taken
    assert answer.parse().choices[0].message.content == "Hello, world!"
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    assert "at most 2 a minute" in info.value.message
    # Nor did the programs' requests move the page's interval.
    doc = await usage_doc(client)
    assert doc["next_at"] > datetime.now(UTC) + timedelta(seconds=55)


# --------------------------------------------------------------------------- requests
async def test_requests_per_minute_refuses_with_a_truthful_retry_after(
    aiohttp_client, stream_settings, sdk_for
):
    """Two a minute: a bucket of two that gains one every 30 s. The third request at once is
    429 with remaining-requests 0 and the exact wait; a request that waited it (the stored
    bucket moved back by the wait) is admitted, one that waited less is not."""
    client = await aiohttp_client(create_app(stream_settings(v1_requests_per_minute=2)))
    sdk = sdk_for(client)
    first = await sdk.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    second = await sdk.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    assert [r.headers["x-ratelimit-limit-requests"] for r in (first, second)] == ["2", "2"]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second)] == ["1", "0"]
    # Until the bucket is full again: one interval after the first, two after the second.
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    reset = parse_duration(second.headers["x-ratelimit-reset-requests"])
    assert timedelta(seconds=55) < reset <= timedelta(seconds=60)
    # The tokens left count the request's own reservation (its prompt and the longest answer
    # it may get), as OpenAI counts max_tokens; the first was billed 25 before the second.
    grant = TokenCounter().count_messages(HI) + 256
    assert first.headers["x-ratelimit-remaining-tokens"] == str(100_000 - grant)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 25 - grant)

    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    refused = info.value.response.headers
    assert info.value.code == "rate_limit_exceeded"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    wait_ms = int(refused["retry-after-ms"])
    assert 25_000 < wait_ms <= 30_000  # until the first request's interval has passed
    assert int(refused["Retry-After"]) == -(-wait_ms // 1000)
    assert_tokens(refused, await usage_doc(client))

    async def wait(ms: int) -> None:  # as if ``ms`` had passed: the bucket's date moves back
        await client.app[STORE].usage.update_one(
            {"user_id": "alice"}, [{"$set": {"requests_due": {"$add": ["$requests_due", -ms]}}}]
        )

    await wait(wait_ms - 5000)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    assert 0 < int(info.value.response.headers["retry-after-ms"]) <= 5000
    await wait(int(info.value.response.headers["retry-after-ms"]))
    answer = await sdk.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"


async def test_when_two_rules_refuse_the_longer_wait_is_named(
    aiohttp_client, stream_settings, fake_openai, sdk_for
):
    """One turn at once and one request a minute, one turn running: both refuse the next; its
    Retry-After is the minute's (1 s, the turns' hint, would only be refused again)."""
    client = await aiohttp_client(
        create_app(stream_settings(v1_requests_per_minute=1, max_concurrent_turns_per_user=1))
    )
    sdk = sdk_for(client)
    fake_openai.default = HELD
    held = await sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)
    assert "at most 1 a minute" in info.value.message
    assert int(info.value.response.headers["Retry-After"]) > 55
    fake_openai.gate.set()
    assert "".join([c.choices[0].delta.content or "" async for c in held]) == "x y"


async def test_a_replayed_send_gets_the_headers_and_is_not_counted(
    stream_client, sdk_for, fake_openai
):
    """A retry with the same Idempotency-Key reserves nothing: its headers are the usage as it
    is (one read), and it takes no request from the bucket."""
    sdk = sdk_for(stream_client)
    key = {"Idempotency-Key": "k-1"}
    first = await sdk.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, extra_headers=key
    )
    await open_turns(stream_client, 0)  # settled
    again = await sdk.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, extra_headers=key
    )
    assert again.headers["Idempotent-Replayed"] == "true" and len(fake_openai.requests) == 1
    assert first.headers["x-ratelimit-remaining-requests"] == "599"
    assert again.headers["x-ratelimit-remaining-requests"] in ("599", "600")  # refilling
    assert_tokens(again.headers, await usage_doc(stream_client))


async def test_budget_refusal_carries_the_headers(aiohttp_client, stream_settings, sdk_for):
    client = await aiohttp_client(create_app(stream_settings(default_token_limit=10)))
    with pytest.raises(openai.RateLimitError) as info:
        await sdk_for(client).chat.completions.create(model="gpt-test", messages=HI)
    headers = info.value.response.headers
    assert info.value.code == "insufficient_quota"
    assert headers["x-ratelimit-limit-tokens"] == "10"
    assert headers["x-ratelimit-remaining-tokens"] == "10"  # left, but not enough for a turn
    assert headers["x-ratelimit-remaining-requests"] == "600"  # a refused request is not counted


async def test_models_carry_no_rate_limit_headers(stream_client, auth):
    """/v1/models is served without MongoDB and is not counted: no x-ratelimit headers."""
    resp = await stream_client.get("/v1/models", headers=auth())
    assert resp.status == 200 and limit_headers(resp.headers) == {}


# --------------------------------------------------------------------------- WebSocket
async def recv(ws) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def test_websocket_clients_follow_the_program_rules(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A WebSocket client is a program: held to turns at once, not to the page's interval."""
    client = await aiohttp_client(
        create_app(stream_settings(message_rate_limit_ms=60_000, max_concurrent_turns_per_user=1))
    )
    chats = [await chat(client, auth) for _ in range(3)]
    fake_openai.scripts = [HELD]
    ws = await client.ws_connect("/api/ws", headers=auth())
    assert (await recv(ws))["type"] == "ready"

    def send(turn_id: str, chat_id: str) -> dict[str, Any]:
        return {"type": "send", "id": turn_id, "chat_id": chat_id, "message": "Hi"}

    await ws.send_json(send("t1", chats[0]))
    assert (await recv(ws))["type"] == "started"
    await ws.send_json(send("t2", chats[1]))  # t1 still runs: one turn at once
    frame = await recv(ws)
    while frame.get("id") != "t2":  # t1's frames interleave
        frame = await recv(ws)
    assert (frame["type"], frame["code"], frame["status"]) == ("error", "rate_limited", 429)
    assert frame["details"]["rule"] == "concurrent_turns" and frame["retry_after_ms"] == 1000

    fake_openai.gate.set()
    while (frame := await recv(ws))["type"] != "done":
        pass
    await open_turns(client, 0)
    await ws.send_json(send("t3", chats[2]))  # at once: the page's one-a-minute is not its rule
    assert (await recv(ws))["type"] == "started"
    await ws.close()


# --------------------------------------------------------------------------- replicas
async def test_turns_at_once_hold_across_replicas(services, fake_openai, token_for, db):
    """Three turns at once, six asked at the same instant over two processes: exactly three
    run; the others are 429 with Retry-After and the headers."""
    a, b = await services.start("a", "b", max_concurrent_turns_per_user=3)
    fake_openai.default = HELD
    body = {"model": "gpt-test", "messages": HI, "stream": True}
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        responses = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=body) for http in [on_a, on_b] * 3)
        )
        try:
            admitted = [r for r in responses if r.status == 200]
            refused = [r for r in responses if r.status != 200]
            assert len(admitted) == 3 and {r.status for r in refused} == {429}
            usage = await db.usage.find_one({"user_id": "alice"})
            assert held_turns(usage) == 3
            for r in refused:
                err = (await r.json())["error"]
                assert err["code"] == "rate_limit_exceeded" and "at most 3" in err["message"]
                assert r.headers["Retry-After"] == "1"
                assert r.headers["x-ratelimit-limit-requests"] == "600"
                assert r.headers["x-ratelimit-remaining-tokens"]
            fake_openai.gate.set()
            for r in admitted:
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
        finally:
            fake_openai.gate.set()
            for r in responses:
                r.release()

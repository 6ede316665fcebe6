"""Send once: a retried send with the same Idempotency-Key never starts a second generation.

Against the real app on a socket, SecantusDB and the fake upstream (which counts the requests
it gets): concurrent identical sends on the SSE route and on /v1 share one turn; a retry after
the end replays the stored answer without an upstream call or a second bill; another payload
is 422; a refused first attempt releases the key; an expired key starts a new turn; malformed
keys are 400; another user's key is another key; the official SDK's own retries after a
timeout attach to the first generation.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import openai
import orjson
import pytest

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import STORE
from service.store import utcnow
from tests.fake_openai import Script
from tests.sse_client import collect, text_of

CHUNKS = ["Só ", "uma ", "vez, ", "😀 ", "日本 ", "ok."]
USAGE = (17, 9)
KEY = {"Idempotency-Key": "send-once-1"}


def script(**kw: Any) -> Script:
    return Script(chunks=list(CHUNKS), usage=USAGE, **kw)


async def new_chat(client, h) -> str:
    resp = await client.post("/api/chat", json={}, headers=h)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def used(client, user: str = "alice") -> int:
    doc = await client.app[STORE].usage.find_one({"user_id": user})
    return doc["used"] if doc else 0


async def assistants(client, user: str = "alice") -> list[dict[str, Any]]:
    cursor = client.app[STORE].messages.find({"user_id": user, "role": "assistant"})
    return [d async for d in cursor]


def fails_once(store: Any, method: str) -> None:
    """``store``'s ``method`` answers its next call as an outage would, then is itself again."""
    real = getattr(store, method)

    async def unavailable(*_args: Any, **_kwargs: Any) -> None:
        setattr(store, method, real)
        raise StoreUnavailable("the database is unavailable; try again shortly")

    setattr(store, method, unavailable)


async def send(client, chat_id: str, h, message: str = "hi", **extra) -> tuple[Any, list]:
    resp = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": message, **extra}, headers=h
    )
    return resp, (await collect(resp) if resp.status == 200 else [])


async def test_concurrent_sends_with_one_key_share_one_turn(stream_client, fake_openai, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script(gate_after=2)  # held mid-answer until all 20 are in
    sends = [asyncio.ensure_future(send(client, chat_id, {**h, **KEY})) for _ in range(20)]
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 10)
    fake_openai.gate.set()
    results = await asyncio.gather(*sends)
    whole = "".join(CHUNKS)
    assert [resp.status for resp, _ in results] == [200] * 20
    assert {text_of(evs) for _, evs in results} == {whole}  # every client the whole text
    assert {evs[-1]["data"]["message_id"] for _, evs in results} == {
        results[0][1][0]["data"]["message_id"]
    }
    replayed = [r.headers.get("Idempotent-Replayed") for r, _ in results]
    assert replayed.count("true") == 19 and replayed.count(None) == 1
    assert len(fake_openai.requests) == 1  # one generation
    answers = await assistants(client)
    assert len(answers) == 1 and answers[0]["content"] == whole
    assert await used(client) == sum(USAGE)  # billed once


async def test_a_retry_after_the_end_replays_without_a_second_call(
    stream_client, fake_openai, auth, logs
):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script()
    first, first_events = await send(client, chat_id, {**h, **KEY})
    assert first.status == 200 and "Idempotent-Replayed" not in first.headers
    billed = await used(client)
    again, again_events = await send(client, chat_id, {**h, **KEY})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert text_of(again_events).encode() == text_of(first_events).encode()
    assert again_events[-1]["event"] == "done"
    assert again_events[-1]["data"]["tokens"] == first_events[-1]["data"]["tokens"]
    assert len(fake_openai.requests) == 1 and await used(client) == billed
    assert len(await assistants(client)) == 1
    replayed = [e for e in logs if e["event"] == "stream.replayed"]
    assert [(e["source"], e["message_id"]) for e in replayed] == [
        ("stored", first_events[0]["data"]["message_id"])
    ]
    # Its chat deleted, the retry is told so, as every route tells a deleted chat.
    assert (await client.delete(f"/api/chat/{chat_id}", headers=h)).status == 200
    gone = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers={**h, **KEY}
    )
    assert gone.status == 404 and (await gone.json())["error"]["code"] == "chat_not_found"


async def test_another_payload_malformed_keys_and_another_users_key(
    stream_client, fake_openai, auth
):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script()
    assert (await send(client, chat_id, {**h, **KEY}, "first"))[0].status == 200
    reused, _ = await send(client, chat_id, {**h, **KEY}, "something else")
    assert reused.status == 422
    assert (await reused.json())["error"]["code"] == "idempotency_key_reused"
    for bad in ("", "x" * 256, "tab\there", "é"):
        resp, _ = await send(client, chat_id, {**h, "Idempotency-Key": bad})
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "invalid_idempotency_key"
    bob = auth("bob")
    bobs_chat = await new_chat(client, bob)
    resp, evs = await send(client, bobs_chat, {**bob, **KEY}, "first")
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers
    assert text_of(evs) == "".join(CHUNKS)
    assert len(fake_openai.requests) == 2  # alice's and bob's: two keys


async def test_a_refused_first_attempt_releases_the_key(stream_client, fake_openai, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.scripts.append(Script(status=400, error_body={"error": {"message": "no"}}))
    refused, _ = await send(client, chat_id, {**h, **KEY})
    assert refused.status >= 400
    fake_openai.default = script()
    retried, evs = await send(client, chat_id, {**h, **KEY})
    assert retried.status == 200 and "Idempotent-Replayed" not in retried.headers
    assert text_of(evs) == "".join(CHUNKS)
    unknown, _ = await send(client, chat_id, {**h, "Idempotency-Key": "k2"}, model="nope")
    assert unknown.status == 404
    again, _ = await send(client, chat_id, {**h, "Idempotency-Key": "k2"}, model="nope")
    assert again.status == 404  # evaluated afresh, not a replay
    assert (await again.json())["error"]["code"] == "model_not_found"


async def test_a_send_whose_records_could_not_be_written_releases_its_key(
    stream_client, fake_openai, auth
):
    """The upstream answered but MongoDB did not write the records: the request is 503, and
    the key is released (not admitted to a turn nobody can find): its retry is a new turn."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    store = client.app[STORE]
    fails_once(store, "insert_messages")
    fake_openai.default = script()
    refused, _ = await send(client, chat_id, {**h, **KEY})
    assert refused.status == 503
    retried, evs = await send(client, chat_id, {**h, **KEY})
    assert retried.status == 200 and "Idempotent-Replayed" not in retried.headers
    assert text_of(evs) == "".join(CHUNKS)
    assert len(fake_openai.requests) == 2 and len(await assistants(client)) == 1


async def test_an_expired_key_starts_a_new_turn(stream_client, fake_openai, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script()
    assert (await send(client, chat_id, {**h, **KEY}))[0].status == 200
    keys = client.app[STORE].db["idempotency_keys"]
    indexes = {i["name"]: i async for i in await keys.list_indexes()}
    assert indexes["key_ttl"]["expireAfterSeconds"] == 86_400
    assert indexes["user_key"]["unique"]
    # What MongoDB's TTL monitor would remove a day later; older claims count as gone anyway.
    await keys.update_many({}, {"$set": {"created_at": utcnow() - timedelta(days=2)}})
    resp, _ = await send(client, chat_id, {**h, **KEY})
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers
    assert len(fake_openai.requests) == 2 and len(await assistants(client)) == 2


async def test_a_claim_abandoned_while_starting_frees_its_key(stream_client, fake_openai, auth):
    """A claim whose request died before its turn could settle it (the process was killed)
    stays ``starting``; a minute on, a send with that key starts afresh instead of a 409."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script()
    await (
        client.app[STORE]
        .db["idempotency_keys"]
        .insert_one(
            {
                "_id": "dead-claim",
                "user_id": "alice",
                "key": KEY["Idempotency-Key"],
                "fingerprint": "whatever it was",
                "chat_id": chat_id,
                "state": "starting",
                "created_at": utcnow() - timedelta(minutes=2),
            }
        )
    )
    resp, evs = await send(client, chat_id, {**h, **KEY})
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers
    assert text_of(evs) == "".join(CHUNKS) and len(fake_openai.requests) == 1


async def test_a_claim_left_starting_by_a_turn_that_ran_is_followed_not_claimed_anew(
    stream_client, fake_openai, auth, logs
):
    """The turn streamed and ended, but MongoDB was away when it would mark its claim
    ``admitted`` (or its process was killed just then): the claim stays ``starting``. A minute
    on, a retry with that key finds the claim's message and replays it; a second generation,
    billed again, is what the key exists to prevent."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    store = client.app[STORE]
    fails_once(store, "admit_claim")  # the claim is never marked admitted
    fake_openai.default = script()
    first, first_events = await send(client, chat_id, {**h, **KEY})
    assert first.status == 200 and first_events[-1]["event"] == "done"
    claims = store.db["idempotency_keys"]
    assert (await claims.find_one({}))["state"] == "starting"
    billed = await used(client)
    await claims.update_many({}, {"$set": {"created_at": utcnow() - timedelta(minutes=2)}})
    again, again_events = await send(client, chat_id, {**h, **KEY})
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert text_of(again_events) == text_of(first_events) == "".join(CHUNKS)
    assert again_events[-1]["data"]["message_id"] == first_events[-1]["data"]["message_id"]
    assert len(fake_openai.requests) == 1 and len(await assistants(client)) == 1
    assert await used(client) == billed
    assert (await claims.find_one({}))["state"] == "admitted"  # later retries follow at once
    assert [e["source"] for e in logs if e["event"] == "stream.replayed"] == ["stored"]


async def test_a_claim_left_starting_by_a_turn_that_answered_nothing_is_claimed_anew(
    stream_client, fake_openai, auth, monkeypatch
):
    """The process died after the records' insert, before the upstream answered: the reaper
    ends the record ``interrupted``, empty, its prompt billed. A retry a minute on is a new
    generation (the client got nothing): before, it followed the dead turn, an ``interrupted``
    error with no text, for the key's whole life. A record still ``streaming`` is waited for."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    store = client.app[STORE]
    fails_once(store, "admit_claim")  # the claim is never marked admitted
    fake_openai.default = script()
    _, first_events = await send(client, chat_id, {**h, **KEY})
    mid = first_events[-1]["data"]["message_id"]
    claims = store.db["idempotency_keys"]
    await claims.update_many({}, {"$set": {"created_at": utcnow() - timedelta(minutes=2)}})

    # Still streaming on a replica whose heartbeat stopped (not reaped yet): the retry waits.
    dead = {"status": "streaming", "replica": "a-replica-long-gone"}
    await store.messages.update_one({"_id": mid}, {"$set": dead})
    monkeypatch.setattr("service.stream.idempotency.WAIT_S", 0.3)  # its 409 sooner
    resp = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers={**h, **KEY}
    )
    assert resp.status == 409 and len(fake_openai.requests) == 1

    # As the reaper leaves a turn killed before its upstream answered.
    died = {
        "status": "interrupted",
        "content": "",
        "reason": "interrupted",
        "finish_reason": "interrupted",
        "error": {"code": "interrupted", "message": "the server stopped while answering"},
        "tokens": {"prompt": 20, "completion": 0, "total": 20, "source": "tokenizer"},
    }
    await store.messages.update_one({"_id": mid}, {"$set": died})
    again, again_events = await send(client, chat_id, {**h, **KEY})
    assert again.status == 200 and "Idempotent-Replayed" not in again.headers
    assert text_of(again_events) == "".join(CHUNKS) and len(fake_openai.requests) == 2
    assert again_events[-1]["data"]["message_id"] != mid


async def test_a_claim_left_starting_by_a_turn_still_streaming_here_is_followed(
    stream_client, fake_openai, auth
):
    """The claim was never marked (MongoDB away at that moment) and the turn still streams,
    on a live replica, a minute on: a retry follows it as it goes (it waited, 409 after 409,
    for the whole turn)."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    store = client.app[STORE]
    fails_once(store, "admit_claim")  # the claim is never marked admitted
    fake_openai.default = script(gate_after=2)
    first = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers={**h, **KEY}
    )
    assert first.status == 200
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
    claims = store.db["idempotency_keys"]
    await claims.update_many({}, {"$set": {"created_at": utcnow() - timedelta(minutes=2)}})
    again = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers={**h, **KEY}
    )
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    fake_openai.gate.set()
    assert text_of(await collect(again)) == text_of(await collect(first)) == "".join(CHUNKS)
    assert len(fake_openai.requests) == 1


# --------------------------------------------------------------------------- /v1
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def test_v1_concurrent_requests_with_one_key_get_one_completion(
    stream_client, fake_openai, auth
):
    client, h = stream_client, {**auth(), "Idempotency-Key": "v1-once"}
    fake_openai.default = script(gate_after=2)
    posts = [
        asyncio.ensure_future(client.post("/v1/chat/completions", json=BODY, headers=h))
        for _ in range(20)
    ]
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 10)
    fake_openai.gate.set()
    responses = await asyncio.gather(*posts)
    bodies = [await r.read() for r in responses]
    assert [r.status for r in responses] == [200] * 20
    assert len(set(bodies)) == 1  # byte-identical completion objects (id, created, usage)
    assert [r.headers.get("Idempotent-Replayed") for r in responses].count("true") == 19
    assert len(fake_openai.requests) == 1 and await used(client) == sum(USAGE)
    later = await client.post("/v1/chat/completions", json=BODY, headers=h)
    assert await later.read() == bodies[0] and later.headers["Idempotent-Replayed"] == "true"
    stream = await client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=h)
    assert stream.status == 422  # another payload (streamed, not one object)
    assert (await stream.json())["error"]["code"] == "idempotency_key_reused"
    assert len(fake_openai.requests) == 1


async def test_the_sdks_retries_after_a_timeout_attach_to_the_first_generation(
    aiohttp_client, stream_settings, fake_openai, token_for, logs
):
    """The official SDK times out after its request reached the upstream and retries with the
    same key (``max_retries``): the keyed turn went on without the first attempt, and the retry
    follows it. One generation, billed once."""
    client = await aiohttp_client(create_app(stream_settings()))
    fake_openai.default = script(gate_after=1)
    sdk = openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=token_for("alice"), max_retries=3
    )

    def attempts_ended() -> int:
        return sum(
            1 for e in logs if e["event"] == "http.request" and e["path"] == "/v1/chat/completions"
        )

    async def release_after_a_retry() -> None:
        await asyncio.wait_for(fake_openai.reached_gate.wait(), 10)
        for _ in range(500):  # the first attempt timed out and is gone; the SDK retries
            if attempts_ended() >= 1:
                break
            await asyncio.sleep(0.02)
        fake_openai.gate.set()

    releasing = asyncio.ensure_future(release_after_a_retry())
    try:
        completion = await sdk.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"Idempotency-Key": "sdk-retry-1"},
            timeout=0.5,
        )
    finally:
        await releasing
        await sdk.close()
    assert attempts_ended() >= 2  # the timed-out attempt, then the one that got the answer
    assert completion.choices[0].message.content == "".join(CHUNKS)
    assert len(fake_openai.requests) == 1  # one generation, whatever the SDK retried
    assert await used(client) == sum(USAGE)


@pytest.mark.parametrize("value", ["", "k" * 256])
async def test_v1_malformed_key_is_400_in_openais_shape(stream_client, auth, value):
    resp = await stream_client.post(
        "/v1/chat/completions", json=BODY, headers={**auth(), "Idempotency-Key": value}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_idempotency_key" and "type" in error


# --------------------------------------------------------------------------- WebSocket
async def test_websocket_send_with_a_key_follows_the_first(stream_client, fake_openai, auth):
    from tests.test_ws import connect, recv, until_terminal
    from tests.test_ws import send as frame

    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script()
    ws = await connect(client, h)
    await ws.send_json(frame("a", chat_id, "hi", key="ws-once"))
    first = await until_terminal(ws, {"a"})
    await ws.send_json(frame("b", chat_id, "hi", key="ws-once"))
    again = await until_terminal(ws, {"b"})
    started = next(f for f in again if f["type"] == "started")
    assert started["replayed"] is True and "replayed" not in first[0]
    texts = [
        "".join(f["text"] for f in frames if f["type"] == "delta") for frames in (first, again)
    ]
    assert texts == ["".join(CHUNKS)] * 2 and again[-1]["type"] == "done"
    # The same key over SSE, same chat and text: the same send, so the same answer again.
    resp, evs = await send(client, chat_id, {**h, "Idempotency-Key": "ws-once"})
    assert resp.headers["Idempotent-Replayed"] == "true" and text_of(evs) == texts[0]
    assert len(fake_openai.requests) == 1
    for bad in ("k" * 256, 5, ""):
        await ws.send_json(frame("c", chat_id, "hi", key=bad))
        err = await recv(ws)
        assert err["code"] == "invalid_frame" and err["details"]["field"] == "key", bad
    await ws.close()


# --------------------------------------------------------------------------- two replicas
async def test_twenty_sends_with_one_key_over_two_replicas_make_one_generation(
    services, fake_openai, token_for, db
):
    """Two service processes on one database, 10 identical sends to each, with one key, on the
    SSE route and then (another key) on /v1: one upstream request each time, one answer, billed
    once, and every client the whole, identical text."""
    from tests.processes import new_chat, session

    a, b = await services.start("a", "b")
    fake_openai.default = script(delay_s=0.05)  # the answer runs while the others arrive
    whole = "".join(CHUNKS)
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        chat = await new_chat(on_a)

        async def sse(http) -> tuple[str | None, str]:
            resp = await http.post(
                f"/api/chat/{chat}/message",
                json={"message": "hi"},
                headers={"Idempotency-Key": "two-replicas"},
            )
            assert resp.status == 200, await resp.text()
            evs = await collect(resp)
            assert evs[-1]["event"] == "done"
            return resp.headers.get("Idempotent-Replayed"), text_of(evs)

        results = await asyncio.gather(*(sse(h) for h in [on_a, on_b] * 10))
        assert {text for _, text in results} == {whole}
        assert [r for r, _ in results].count("true") == 19
        assert len(fake_openai.requests) == 1
        answers = [d async for d in db.messages.find({"role": "assistant"})]
        assert len(answers) == 1 and answers[0]["content"] == whole
        usage = await db.usage.find_one({"user_id": "alice"})
        assert usage["used"] == sum(USAGE)

        async def v1(http) -> bytes:
            resp = await http.post(
                "/v1/chat/completions", json=BODY, headers={"Idempotency-Key": "two-v1"}
            )
            assert resp.status == 200, await resp.text()
            return await resp.read()

        bodies = await asyncio.gather(*(v1(h) for h in [on_a, on_b] * 10))
        assert len(set(bodies)) == 1
        assert orjson.loads(bodies[0])["choices"][0]["message"]["content"] == whole
        assert len(fake_openai.requests) == 2
        usage = await db.usage.find_one({"user_id": "alice"})
        assert usage["used"] == 2 * sum(USAGE)

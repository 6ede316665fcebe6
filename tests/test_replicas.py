"""Replicas agree (issue #8): two real service processes on their own ports share one database.

Every per-user rule lives in MongoDB as one conditional operation, never in a process's memory,
so it must hold whichever replica a request lands on: the rate limit, the token budget under
concurrent turns split across both, the chat cap under concurrent creates. A cancel reaches the
replica that runs the stream, and a stream left behind by a killed replica is settled and
reported ``interrupted`` (with its last checkpoint) by the other one; a replica cut off from
MongoDB long enough to be taken for dead tells its client what the other one kept.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp

from service.settings import Settings
from service.stream.producer import MIN_COMPLETION_TOKENS
from service.tokens import TokenCounter
from tests.conftest import TEST_MODELS
from tests.fake_openai import Script
from tests.processes import (
    ServiceProcess,
    eventually,
    new_chat,
    open_sse,
    session,
    start_behind_proxy,
    wait_until,
)


async def send(http: aiohttp.ClientSession, chat_id: str) -> tuple[int, Any]:
    """One turn: its status and, for a refusal, the JSON error (a 200 is read to its end)."""
    async with http.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}) as resp:
        if resp.status == 200:
            return 200, await resp.read()
        return resp.status, (await resp.json(), dict(resp.headers))


# ---------------------------------------------------------------------------- shared rules
async def test_rate_limit_holds_across_replicas(services, token_for):
    a, b = await services.start("a", "b", message_rate_limit_ms=60_000)
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        chat = await new_chat(on_a)
        assert (await send(on_a, chat))[0] == 200
        status, (body, headers) = await send(on_b, chat)  # at once, on the other replica
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert 55 <= int(headers["Retry-After"]) <= 60
        assert 0 < body["error"]["details"]["retry_after_ms"] <= 60_000

    # Two turns at the same instant, one per replica: exactly one gets through.
    async with session(a, token_for("bob")) as on_a, session(b, token_for("bob")) as on_b:
        chats = [await new_chat(on_a), await new_chat(on_b)]
        results = await asyncio.gather(send(on_a, chats[0]), send(on_b, chats[1]))
    assert sorted(status for status, _ in results) == [200, 429]


async def test_budget_holds_under_concurrent_turns_on_both(services, fake_openai, token_for, db):
    """Reservations are taken atomically in the shared usage document: while every accepted turn
    is held by the upstream, what is reserved never exceeds the limit, whichever replica took
    the turn; afterwards the usage equals the stored turns exactly."""
    spec = next(m for m in TEST_MODELS if m["name"] == "gpt-test")
    prompt = TokenCounter().count_messages(
        [{"role": "system", "content": Settings().system_prompt}, {"role": "user", "content": "Hi"}]
    )
    want = prompt + spec["max_output_tokens"]
    limit = 3 * want + prompt + 100  # three full grants, then one clamped to prompt + 100
    a, b = await services.start("a", "b", default_token_limit=limit)
    fake_openai.default = Script(chunks=["x ", "y"], gate_after=1, usage=None)
    turns = 12
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        replicas = [on_a, on_b] * (turns // 2)
        chats = await asyncio.gather(*(new_chat(http) for http in replicas))
        responses = await asyncio.gather(
            *(
                http.post(f"/api/chat/{chat}/message", json={"message": "Hi"})
                for http, chat in zip(replicas, chats, strict=True)
            )
        )
        try:
            accepted = [r for r in responses if r.status == 200]
            refused = [r for r in responses if r.status != 200]
            # Every turn is decided; the accepted ones are all still held by the upstream.
            assert len(accepted) == 4 and len(refused) == turns - 4
            held = await db.usage.find_one({"user_id": "alice"})
            assert held["used"] == 0 and held["reserved"] == limit
            grants = sorted(e["grant"] for e in held["open"])
            assert grants == [prompt + 100, want, want, want]
            for resp in refused:  # nothing used yet: the rest is held by the running turns
                error = (await resp.json())["error"]
                assert resp.status == 429 and error["code"] == "budget_held"
                assert error["details"]["remaining"] < prompt + MIN_COMPLETION_TOKENS
                assert error["details"]["reserved"] == limit and resp.headers["Retry-After"]
        finally:
            fake_openai.gate.set()
            bodies = await asyncio.gather(*(r.read() for r in responses))
            for r in responses:
                r.release()
    assert all(
        b"event: done" in body for body, r in zip(bodies, responses, strict=True) if r.status == 200
    )

    usage = await db.usage.find_one({"user_id": "alice"})
    totals = [m["tokens"]["total"] async for m in db.messages.find({"role": "assistant"})]
    assert len(totals) == 4 and usage["used"] == sum(totals) and usage["reserved"] == 0
    # README/architecture: concurrent turns never overspend by more than one reservation.
    assert usage["used"] <= limit + max(grants)
    for svc in (a, b):  # the turns really were split across both replicas
        await wait_until(lambda svc=svc: len(turn_lines(svc)) == turns // 2, 5, "access lines")
        assert {line["status"] for line in turn_lines(svc)} <= {200, 429}


def turn_lines(svc: ServiceProcess) -> list[dict[str, Any]]:
    return [
        e
        for e in svc.events("http.request", method="POST")
        if str(e.get("path", "")).endswith("/message")
    ]


async def test_chat_cap_holds_across_replicas(services, token_for, db):
    cap = 3
    a, b = await services.start("a", "b", max_chats_per_user=cap)
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:

        async def create(http: aiohttp.ClientSession) -> tuple[int, Any]:
            async with http.post("/api/chat", json={}) as resp:
                return resp.status, await resp.json()

        results = await asyncio.gather(*(create(h) for h in [on_a, on_b] * 5))
        statuses = sorted(status for status, _ in results)
        assert statuses == [201] * cap + [409] * (10 - cap)
        assert {body["error"]["code"] for status, body in results if status == 409} == {
            "chat_limit_reached"
        }
        async with on_b.get("/api/chat") as resp:
            assert len((await resp.json())["chats"]) == cap
        assert (await db.chat_counts.find_one({"_id": "alice"}))["active"] == cap

        # A delete on one replica frees a place for a create on the other.
        first = next(body["chat_id"] for status, body in results if status == 201)
        async with on_a.delete(f"/api/chat/{first}") as resp:
            assert resp.status == 200
        assert (await create(on_b))[0] == 201
        assert (await create(on_a))[0] == 409


# ---------------------------------------------------------------------------- streams
async def test_cancel_sent_to_b_stops_a_stream_running_on_a(services, fake_openai, token_for, db):
    a, b = await services.start("a", "b")
    fake_openai.default = Script(chunks=["one ", "two ", "three"], gate_after=1)
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        chat = await new_chat(on_a)
        turn = await open_sse(on_a, chat)
        await turn.wait_text("one ")
        url = f"/api/chat/{chat}/messages/{turn.message_id}/cancel"
        async with on_b.post(url) as resp:
            assert resp.status == 202 and (await resp.json())["status"] == "cancelling"
        done = await turn.finished(5)
    assert done is not None and done["event"] == "done", turn.events
    assert done["data"]["status"] == "cancelled" and done["data"]["reason"] == "user_cancel"
    await asyncio.wait_for(fake_openai.disconnected.wait(), 5)  # A closed its upstream request
    assert not fake_openai.finished.is_set()

    record = await db.messages.find_one({"_id": turn.message_id})
    assert record["status"] == "cancelled" and record["reason"] == "user_cancel"
    assert record["content"] == "one " and record["tokens"]["total"] > 0
    assert a.events("stream.ended", message_id=turn.message_id, reason="user_cancel")
    assert not b.events("stream.ended")  # B only flagged it; A ran and finalized it


async def test_stream_of_a_killed_replica_is_reported_interrupted_through_b(
    services, fake_openai, token_for, db
):
    a, b = await services.start("a", "b", checkpoint_interval_s=0.1, stale_stream_s=1.5)
    # Spaced chunks, so each one after the first is checkpointed; held before the last.
    fake_openai.default = Script(
        chunks=["alpha ", "beta ", "gamma ", "delta"], gate_after=3, delay_s=0.2
    )
    checkpoint = "alpha beta gamma "
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        chat = await new_chat(on_b)
        turn = await open_sse(on_a, chat)
        await turn.wait_text(checkpoint)
        doc: dict[str, Any] = {}

        async def checkpointed() -> bool:
            doc.update(await db.messages.find_one({"_id": turn.message_id}))
            return doc["content"] == checkpoint

        await eventually(checkpointed, 5, "the checkpoint")
        assert doc["status"] == "streaming"

        a.send(signal.SIGKILL)
        assert await a.wait_exit(5) == -signal.SIGKILL
        assert await turn.finished(5) is None and turn.error is not None  # no terminal event

        seen: dict[str, Any] = {}

        async def reported_interrupted() -> bool:
            async with on_b.get(f"/api/chat/{chat}") as resp:
                seen.update((await resp.json())["messages"][-1])
            return seen["status"] == "interrupted"

        await eventually(reported_interrupted, 10, "interrupted through B")
        async with on_b.get("/api/usage") as resp:
            usage = await resp.json()
    prompt = doc["prompt_tokens"]
    completion = TokenCounter().count(checkpoint)
    assert seen["message_id"] == turn.message_id and seen["content"] == checkpoint
    assert seen["error"]["code"] == "interrupted" and seen["finish_reason"] == "interrupted"
    assert seen["tokens"] == {
        "prompt": prompt,
        "completion": completion,
        "total": prompt + completion,
        "source": "tokenizer",
    }
    assert usage["used"] == prompt + completion and usage["reserved"] == 0
    assert await db.messages.count_documents({"status": "streaming"}) == 0
    await wait_until(
        lambda: b.events("stream.ended", message_id=turn.message_id, outcome="interrupted"),
        5,
        "B's interrupted log line",
    )


async def test_a_replica_cut_off_from_mongodb_tells_its_client_what_the_reaper_kept(
    services, fake_openai, token_for, db, mongo_server
):
    """A loses MongoDB (B does not) for longer than STALE_STREAM_S while its upstream goes on:
    B's reaper takes A for dead and settles A's turn as its checkpoint held (``interrupted``).
    When A's final write comes back to a record already ended, the record (and the bill that
    came with it) is the answer: A's client gets its end at the stored length, with
    ``unsaved`` (what it was sent past it), not a ``done`` that no record or bill agrees with;
    and A's log says so."""
    a, proxy = await start_behind_proxy(services, mongo_server.port, "a")
    try:
        (b,) = await services.start("b")
        fake_openai.default = Script(chunks=["one ", "two ", "three ", "four"], gate_after=2)
        async with session(a, token_for("alice")) as on_a:
            chat = await new_chat(on_a)
            turn = await open_sse(on_a, chat)
            await turn.wait_text("one two ")

            async def record(status: str, content: str) -> bool:
                doc = await db.messages.find_one({"_id": turn.message_id})
                return bool(doc) and (doc["status"], doc["content"]) == (status, content)

            await eventually(lambda: record("streaming", "one two "), 5, "the checkpoint")
            proxy.cut()
            await eventually(lambda: record("interrupted", "one two "), 15, "B's reaper")
            proxy.restore()
            fake_openai.gate.set()
            end = await turn.finished(15)
        assert turn.text == "one two three four"  # sent before A's final write came back
        assert end is not None and end["event"] == "error", end
        assert end["data"]["status"] == "interrupted" and end["data"]["code"] == "interrupted"
        assert int(end["id"]) == len("one two ")
        assert end["data"]["unsaved"] == [len("one two "), len("one two three four")]
        stored = await db.messages.find_one({"_id": turn.message_id})
        assert end["data"]["tokens"] == stored["tokens"]
        usage = await db.usage.find_one({"user_id": "alice"})
        assert usage["used"] == stored["tokens"]["total"] and usage["reserved"] == 0
        assert a.events("stream.ended_elsewhere", message_id=turn.message_id, stored="interrupted")
        assert b.events("stream.ended", message_id=turn.message_id, outcome="interrupted")
        assert not a.events("stream.ended", message_id=turn.message_id)  # one end, B's
    finally:
        await proxy.close()

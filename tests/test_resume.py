"""A turn outlives its connection, and any client can pick it up again from an offset.

Against the real app on a socket, SecantusDB and the fake upstream: disconnects at random
points of SSE and WebSocket turns (each turn completes in the background, exactly as an
uninterrupted one, and a resume from the last offset seen gives exactly the rest, multi-byte
characters included); resume from memory and from the record; the chat's running turn; 404 for
another user's ids; cancel of a detached turn from another app instance; the metrics; and
stalled SSE clients (dropped as ``slow_client``, never as a reset; what they hold is bounded).
Resume from another replica (real processes) is in tests/test_resume_replicas.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import orjson

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import REGISTRY, STORE
from service.metrics import DETACHED, FOLLOWERS, RESUMES
from tests.fake_openai import Script
from tests.faults import active_streams, post_request, settled, stalled_client
from tests.sse_client import events, text_of

# Multi-byte characters on purpose: offsets count characters (code points), not bytes.
CHUNKS = ["héllo ", "wörld, ", "ça ", "va? ", "😀 ", "日本語 ", "ok ", "→ done", "!"] * 3
USAGE = (23, 27)


def script(**kw: Any) -> Script:
    return Script(chunks=list(CHUNKS), usage=USAGE, **kw)


async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", json={}, headers=headers)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def record(client, message_id: str) -> dict[str, Any]:
    return await client.app[STORE].messages.find_one({"_id": message_id})


async def until(predicate, limit_s: float = 10.0) -> None:
    end = time.monotonic() + limit_s
    while not await predicate():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def read_until(resp, chars: int) -> tuple[list[dict], bool]:
    """SSE events until at least ``chars`` characters arrived (or the end); whether it ended."""
    seen: list[dict] = []
    async for ev in events(resp):
        if "event" in ev:
            seen.append(ev)
            if ev["event"] in ("done", "error"):
                return seen, True
            if len(text_of(seen)) >= chars:
                break
    return seen, False


def last_offset(seen: list[dict]) -> int:
    return int(seen[-1]["id"])


async def resume_sse(client, h, chat_id, message_id, after: int) -> list[dict]:
    url = f"/api/chat/{chat_id}/messages/{message_id}/stream"
    resp = await client.get(url, headers={**h, "Last-Event-ID": str(after)})
    assert resp.status == 200, await resp.text()
    return [e async for e in events(resp) if "event" in e]


# --------------------------------------------------------------------------- random disconnects
async def test_disconnects_at_random_points_lose_nothing(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """100 turns (half SSE, half WebSocket), each client gone at a random point: every turn
    completes in the background with the text and the bill of an uninterrupted run, and a
    resume from the offset the client last saw yields exactly the missing text."""
    client = await aiohttp_client(
        create_app(stream_settings(default_token_limit=10**7, max_chats_per_user=1000))
    )
    h = auth()
    fake_openai.default = script(delay_s=0.002)
    chat_id = await new_chat(client, h)
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
    reference = [e async for e in events(resp) if "event" in e]
    whole = "".join(CHUNKS)
    assert text_of(reference) == whole and reference[-1]["data"]["tokens"]["total"] == sum(USAGE)

    rng = random.Random(20261130)
    cuts = [rng.randint(0, len(whole)) for _ in range(100)]

    async def sse_turn(cut: int) -> None:
        chat = await new_chat(client, h)
        resp = await client.post(f"/api/chat/{chat}/message", json={"message": "x"}, headers=h)
        seen, _ = await read_until(resp, cut)
        resp.close()  # gone, at a random point
        message_id, offset = seen[0]["data"]["message_id"], last_offset(seen)
        assert text_of(seen) == whole[:offset]
        rest = await resume_sse(client, h, chat, message_id, offset)
        assert rest[0]["event"] == "started" and int(rest[0]["id"]) == offset
        assert text_of(seen) + text_of(rest) == whole
        assert rest[-1]["event"] == "done" and int(rest[-1]["id"]) == len(whole)
        await check_record(message_id)

    async def ws_turn(cut: int) -> None:
        chat = await new_chat(client, h)
        ws = await client.ws_connect("/api/ws", headers=h)
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_json({"type": "send", "id": "t", "chat_id": chat, "message": "x"})
        frames: list[dict] = []
        while not frames or (
            frames[-1]["type"] not in ("done", "error")
            and sum(len(f.get("text", "")) for f in frames) < cut
        ):
            frames.append(await ws.receive_json(timeout=10))
        await ws.close()
        message_id, offset = frames[0]["message_id"], frames[-1]["offset"]
        got = "".join(f.get("text", "") for f in frames if f["type"] == "delta")
        assert got == whole[:offset]
        ws = await client.ws_connect("/api/ws", headers=h)
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_json({"type": "resume", "id": "r", "message_id": message_id, "after": offset})
        rest = [await ws.receive_json(timeout=10)]
        while rest[-1]["type"] not in ("done", "error"):
            rest.append(await ws.receive_json(timeout=10))
        await ws.close()
        assert rest[0]["type"] == "started" and rest[0]["offset"] == offset
        assert got + "".join(f.get("text", "") for f in rest) == whole
        assert rest[-1]["type"] == "done" and rest[-1]["offset"] == len(whole)
        await check_record(message_id)

    async def check_record(message_id: str) -> None:
        async def final() -> bool:
            doc = await record(client, message_id)
            return doc["status"] != "streaming"

        await until(final)
        doc = await record(client, message_id)
        assert doc["status"] == "complete" and doc["content"] == whole
        assert doc["tokens"] == {
            "prompt": USAGE[0],
            "completion": USAGE[1],
            "total": sum(USAGE),
            "source": "upstream",
        }

    for start in range(0, 100, 10):  # ten at a time
        batch = cuts[start : start + 10]
        await asyncio.gather(
            *(sse_turn(c) if i % 2 == 0 else ws_turn(c) for i, c in enumerate(batch, start))
        )
    await settled(client.app[STORE].db, registry=client.app[REGISTRY])
    usage = await client.app[STORE].usage.find_one({"user_id": "alice"})
    assert usage["used"] == 101 * sum(USAGE)  # every turn billed exactly once, exactly


# --------------------------------------------------------------------------- the routes
async def test_resume_from_memory_and_from_the_record(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = script(gate_after=4)
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
    head = "".join(CHUNKS[:4])
    seen, _ = await read_until(resp, len(head))
    resp.close()
    message_id = seen[0]["data"]["message_id"]
    resumes = {s: RESUMES.labels(s)._value.get() for s in ("memory", "replica", "stored")}

    # Past what this replica, which runs the turn, has produced: not an offset it gave.
    ahead = await client.get(
        f"/api/chat/{chat_id}/messages/{message_id}/stream?after={len(head) + 1}", headers=h
    )
    assert ahead.status == 400 and (await ahead.json())["error"]["code"] == "invalid_offset"
    # The chat's running turn, from an offset given as ?after= (it wins over Last-Event-ID).
    running = await client.get(
        f"/api/chat/{chat_id}/stream?after=6", headers={**h, "Last-Event-ID": "0"}
    )
    assert running.status == 200 and running.headers["Content-Type"] == "text/event-stream"
    first, _ = await read_until(running, len(head) - 6)
    assert first[0]["event"] == "started" and first[0]["data"]["message_id"] == message_id
    assert int(first[0]["id"]) == 6 and text_of(first) == head[6:]
    fake_openai.gate.set()
    rest = [e async for e in events(running) if "event" in e]
    assert text_of(first) + text_of(rest) == "".join(CHUNKS)[6:]
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["status"] == "complete"
    assert RESUMES.labels("memory")._value.get() == resumes["memory"] + 1

    async def final() -> bool:
        return (await record(client, message_id))["status"] == "complete"

    await until(final)
    # Ended: the rest and the end at once, from the record.
    stored = await resume_sse(client, h, chat_id, message_id, 10)
    assert [e["event"] for e in stored] == ["started", "delta", "done"]
    assert text_of(stored) == "".join(CHUNKS)[10:]
    done = stored[-1]["data"]
    assert done["tokens"]["total"] == sum(USAGE) and done["status"] == "complete"
    assert done["budget"]["limit"] > done["budget"]["remaining"] > 0
    assert RESUMES.labels("stored")._value.get() == resumes["stored"] + 1
    at_end = await resume_sse(client, h, chat_id, message_id, len("".join(CHUNKS)))
    assert [e["event"] for e in at_end] == ["started", "done"]
    body = await (await client.get(f"/api/chat/{chat_id}", headers=h)).json()
    assert body["messages"][-1]["reason"] == "finished"
    # Nothing runs now: 204 (the AI SDK's resume convention).
    none = await client.get(f"/api/chat/{chat_id}/stream", headers=h)
    assert none.status == 204


async def test_resume_refusals(aiohttp_client, stream_settings, fake_openai, auth):
    """Another user's ids are 404, as unknown ones; a bad or too large offset is 400."""
    client = await aiohttp_client(create_app(stream_settings()))
    alice, bob = auth("alice"), auth("bob")
    chat_id = await new_chat(client, alice)
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=alice)
    seen = [e async for e in events(resp) if "event" in e]
    message_id = seen[0]["data"]["message_id"]
    bob_chat = await new_chat(client, bob)
    for url in (
        f"/api/chat/{chat_id}/messages/{message_id}/stream",
        f"/api/chat/{bob_chat}/messages/{message_id}/stream",
        f"/api/chat/{chat_id}/stream",
        f"/api/chat/{chat_id}/messages/{uuid.uuid4()}/stream",
    ):
        resp = await client.get(url, headers=bob)
        assert resp.status == 404, url
        assert (await resp.json())["error"]["code"] in ("message_not_found", "chat_not_found")
    for after in ("-1", "x", "1.5", "99999999999", "9" * 5000, "\uff11"):  # a full-width one
        resp = await client.get(
            f"/api/chat/{chat_id}/messages/{message_id}/stream?after={after}", headers=alice
        )
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["code"] == "invalid_offset"
        past = after.startswith("999")  # a number only too large: said so, not "not a number"
        assert ("past any answer's end" in error["message"]) is past, after
    resp = await client.get(
        f"/api/chat/{chat_id}/messages/{message_id}/stream?after=9999", headers=alice
    )
    assert resp.status == 400 and (await resp.json())["error"]["details"]["length"] == 13
    # The user message is not an answer to follow; a deleted chat's answers are gone.
    user_msg = await client.app[STORE].messages.find_one({"chat_id": chat_id, "role": "user"})
    resp = await client.get(f"/api/chat/{chat_id}/messages/{user_msg['_id']}/stream", headers=alice)
    assert resp.status == 404
    assert (await client.delete(f"/api/chat/{chat_id}", headers=alice)).status == 200
    resp = await client.get(f"/api/chat/{chat_id}/messages/{message_id}/stream", headers=alice)
    assert resp.status == 404
    ws = await client.ws_connect("/api/ws", headers=bob)
    await ws.receive_json()
    await ws.send_json({"type": "resume", "id": "r", "message_id": message_id})
    frame = await ws.receive_json(timeout=5)
    assert frame["type"] == "error" and frame["status"] == 404
    await ws.send_json({"type": "resume", "id": "r", "message_id": message_id, "after": -1})
    frame = await ws.receive_json(timeout=5)
    assert frame["code"] == "invalid_frame" and frame["details"]["field"] == "after"
    await ws.close()


async def test_cancel_from_another_instance_stops_a_detached_turn(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """Its client gone, the turn runs on A; a cancel sent to B (the same database) stops it."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth()
    chat_id = await new_chat(a, h)
    fake_openai.default = script(gate_after=3)
    resp = await a.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
    seen, _ = await read_until(resp, len("".join(CHUNKS[:3])))
    message_id = seen[0]["data"]["message_id"]
    resp.close()

    async def detached() -> bool:
        return any(e["event"] == "stream.detached" for e in logs)

    await until(detached)
    cancel = await b.post(f"/api/chat/{chat_id}/messages/{message_id}/cancel", headers=h)
    assert cancel.status == 202
    await asyncio.wait_for(fake_openai.disconnected.wait(), 5)  # A closed the upstream request

    async def cancelled() -> bool:
        return (await record(a, message_id))["status"] == "cancelled"

    await until(cancelled)
    doc = await record(a, message_id)
    assert doc["reason"] == "user_cancel" and doc["content"] == "".join(CHUNKS[:3])
    await settled(a.app[STORE].db, registry=a.app[REGISTRY])


async def test_a_failed_round_of_the_mirrors_poll_does_not_stall_their_followers(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """A turn another (live) replica runs is followed through this replica's poll of its
    record; one round of that poll failing with something other than an outage (a bug, a
    record it cannot read) is logged, and the next round carries the follower to the end.
    Before, the poll's task ended and every follower here hung until a new one came."""
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    chat_id, message_id, ended = await _running_elsewhere(client, h, fake_openai)
    store = client.app[STORE]
    answer = "".join(CHUNKS)
    real = store.read_turns

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        store.read_turns = real
        raise RuntimeError("a record this replica cannot read")

    store.read_turns = broken
    follow = await client.get(
        f"/api/chat/{chat_id}/messages/{message_id}/stream?after=0", headers=h
    )
    assert follow.status == 200
    seen, _ = await read_until(follow, 5)
    assert text_of(seen) == answer[:5]

    async def failed_once() -> bool:
        return store.read_turns is real

    await until(failed_once)
    back = {k: ended[k] for k in ("status", "replica", "content")}
    await store.messages.update_one({"_id": message_id}, {"$set": back})
    rest = await asyncio.wait_for(_rest(follow), 10)
    assert text_of(seen) + text_of(rest) == answer and rest[-1]["event"] == "done"
    assert [e["error"] for e in logs if e["event"] == "stream.follow_failed"] == [
        "RuntimeError: a record this replica cannot read"
    ]


async def _running_elsewhere(client, h, fake_openai) -> tuple[str, str, dict]:
    """A chat turn answered here, then its record set back as if a live replica elsewhere ran
    it, five characters in: (chat_id, message_id, the ended record to put back)."""
    chat_id = await new_chat(client, h)
    fake_openai.default = script()
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
    message_id = (await _rest(resp))[0]["data"]["message_id"]
    store = client.app[STORE]

    async def final() -> bool:
        return (await record(client, message_id))["status"] == "complete"

    await until(final)
    await store.heartbeat("elsewhere")
    ended = await record(client, message_id)
    running = {"status": "streaming", "replica": "elsewhere", "content": "".join(CHUNKS)[:5]}
    await store.messages.update_one({"_id": message_id}, {"$set": running})
    return chat_id, message_id, ended


async def _rest(resp) -> list[dict]:
    return [e async for e in events(resp) if "event" in e]


async def test_metrics_count_detached_turns_resumes_and_followers(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    detached = DETACHED.labels("sse")._value.get()
    followers = FOLLOWERS.labels("sse")._value.get()
    chat_id = await new_chat(client, h)
    fake_openai.default = script(gate_after=2)
    first = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
    seen, _ = await read_until(first, len("".join(CHUNKS[:2])))
    message_id = seen[0]["data"]["message_id"]
    url = f"/api/chat/{chat_id}/messages/{message_id}/stream"
    second = await client.get(url, headers=h)
    await read_until(second, len("".join(CHUNKS[:2])))
    assert FOLLOWERS.labels("sse")._value.get() == followers + 2  # two tabs
    first.close()
    second.close()

    async def gone() -> bool:
        return FOLLOWERS.labels("sse")._value.get() == followers

    await until(gone)
    assert DETACHED.labels("sse")._value.get() == detached + 1  # once, when the last one left
    body = await (await client.get("/metrics")).text()
    assert 'gateway_resumes_total{source="memory"}' in body
    assert 'gateway_turns_detached_total{transport="sse"}' in body
    assert 'gateway_followers{transport="sse"}' in body
    fake_openai.gate.set()
    await settled(client.app[STORE].db, registry=client.app[REGISTRY])


# --------------------------------------------------------------------------- stalled SSE clients
async def _stall(client, h, n: int) -> list:
    host, port = client.server.host, client.server.port
    socks = []
    for _ in range(n):
        chat_id = await new_chat(client, h)
        request = post_request(
            f"/api/chat/{chat_id}/message",
            orjson.dumps({"message": "a long answer please"}),
            {**h, "Content-Type": "application/json"},
        )
        socks.append(await asyncio.to_thread(stalled_client, host, port, request))
    return socks


async def test_stalled_sse_clients_are_slow_clients_and_hold_little(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Clients that stop reading are dropped as ``slow_client`` (the kernel's timeout is set
    later than the watcher's, so it never wins the race as a reset); while stalled, what the
    server buffers for each is bounded by the transport's buffer plus one event, whatever the
    answer's size."""
    settings = stream_settings(
        stream_send_timeout_s=0.3,
        on_disconnect="cancel",
        default_token_limit=10**9,
        checkpoint_interval_s=600,  # megabytes of text a second would only load the database
    )
    client = await aiohttp_client(create_app(settings))
    registry = client.app[REGISTRY]
    # ~7.8 MB of answer each (4 bytes a character) before the gate: past any kernel buffer
    # (the send buffer grows to 4 MiB here, whatever the peer's window).
    fake_openai.default = Script(chunks=["😀" * 2000] * 990, usage=(10, 600), gate_after=980)
    gauge = active_streams()
    socks = await _stall(client, auth(), 4)
    most = 0
    try:
        end = time.monotonic() + 30
        messages = client.app[STORE].messages
        while await messages.count_documents({"status": "streaming"}) or (
            await messages.count_documents({"role": "assistant"}) < 4
        ):
            for follower in registry.followers:
                if follower.abort is not None:
                    most = max(most, follower.abort.get_write_buffer_size())
            assert time.monotonic() < end, "the stalled turns did not end"
            await asyncio.sleep(0.01)
        docs = await client.app[STORE].messages.find({"role": "assistant"}).to_list(None)
        assert len(docs) == 4
        assert {(d["status"], d["reason"]) for d in docs} == {("cancelled", "slow_client")}
        await settled(client.app[STORE].db, registry=registry, gauge_before=gauge)
    finally:
        for sock in socks:
            sock.close()
    assert 0 < most <= 256 * 1024, most  # what waits for the client, of 7.8 MB each


async def test_stalled_sse_clients_do_not_stop_their_turns(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings(stream_send_timeout_s=0.3)))
    fake_openai.default = Script(chunks=["x" * 4000] * 100, usage=(10, 400), delay_s=0.002)
    socks = await _stall(client, auth(), 5)
    try:
        await settled(client.app[STORE].db, registry=client.app[REGISTRY])
        docs = await client.app[STORE].messages.find({"role": "assistant"}).to_list(None)
        assert {d["status"] for d in docs} == {"complete"}
        assert all(len(d["content"]) == 400_000 for d in docs)
    finally:
        for sock in socks:
            sock.close()


async def test_a_resume_after_one_whose_mark_failed_still_gets_the_rest(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The first resume of a turn another (live) replica runs makes its mirror here, then its
    mark (``follow_turns``) fails: 503. The next resume of that turn finds the mirror and
    follows it to the end. Before, the poll started only after a mark that answered, so that
    resume got the record's text and then nothing (found by review)."""
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    chat_id, message_id, ended = await _running_elsewhere(client, h, fake_openai)
    store = client.app[STORE]
    answer = "".join(CHUNKS)
    real = store.follow_turns

    async def unavailable(*_args: Any, **_kwargs: Any) -> None:
        store.follow_turns = real
        raise StoreUnavailable("the database is unavailable; try again shortly")

    store.follow_turns = unavailable
    url = f"/api/chat/{chat_id}/messages/{message_id}/stream?after=0"
    assert (await client.get(url, headers=h)).status == 503
    follow = await client.get(url, headers=h)
    assert follow.status == 200
    seen, _ = await read_until(follow, 5)
    assert text_of(seen) == answer[:5]
    back = {k: ended[k] for k in ("status", "replica", "content")}
    await store.messages.update_one({"_id": message_id}, {"$set": back})
    rest = await asyncio.wait_for(_rest(follow), 10)
    assert text_of(seen) + text_of(rest) == answer and rest[-1]["event"] == "done"


async def test_a_mirror_made_while_the_poll_runs_is_not_dropped_before_its_follower_comes(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The poll already runs for one turn followed here when a second turn's first resume makes
    its mirror and waits for its mark: a round of the poll in that wait saw a mirror nobody
    followed yet and dropped it, and that resume then got the record's text and nothing more
    (found by review)."""
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    first = await _running_elsewhere(client, h, fake_openai)
    second = await _running_elsewhere(client, h, fake_openai)
    store = client.app[STORE]
    answer = "".join(CHUNKS)

    def url(chat_id: str, message_id: str) -> str:
        return f"/api/chat/{chat_id}/messages/{message_id}/stream?after=0"

    followed = await client.get(url(*first[:2]), headers=h)  # the poll runs for it
    assert text_of((await read_until(followed, 5))[0]) == answer[:5]
    real = store.follow_turns

    async def slow(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.5)  # rounds of the poll go by (FOLLOW_INTERVAL_S 0.1)
        await real(*args, **kwargs)

    store.follow_turns = slow
    follow = await client.get(url(*second[:2]), headers=h)
    store.follow_turns = real
    assert follow.status == 200
    seen, _ = await read_until(follow, 5)
    for _chat_id, message_id, ended in (first, second):
        back = {k: ended[k] for k in ("status", "replica", "content")}
        await store.messages.update_one({"_id": message_id}, {"$set": back})
    rest = await asyncio.wait_for(_rest(follow), 10)
    assert text_of(seen) + text_of(rest) == answer and rest[-1]["event"] == "done"
    await asyncio.wait_for(_rest(followed), 10)

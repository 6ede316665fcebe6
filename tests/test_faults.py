"""Faults that must never cost a turn its final record: stalled clients, malformed upstream
frames, a database that goes away at the end of a turn. After each: no record left
``streaming``, ``reserved`` back to 0, the live-stream gauge back to 0, and no task exception
nobody retrieved (tests/faults.py)."""

from __future__ import annotations

import asyncio

import orjson

from service.app import create_app
from service.keys import REGISTRY, STORE
from tests.fake_openai import Script
from tests.faults import (
    active_streams,
    post_request,
    settled,
    stalled_client,
    unretrieved_task_exceptions,
)


async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", json={}, headers=headers)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def test_clients_that_stop_reading_never_cost_a_final_record(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """20 SSE clients stop reading while a fast upstream sends large answers: every turn still
    ends with its final record and its reservation settled, and nothing leaks."""
    with unretrieved_task_exceptions() as unretrieved:
        gauge = active_streams()
        client = await aiohttp_client(create_app(stream_settings(stream_send_timeout_s=0.3)))
        fake_openai.default = Script(chunks=["x" * 4000] * 150, usage=(10, 600), delay_s=0.002)
        h = auth()
        host, port = client.server.host, client.server.port
        socks = []
        for _ in range(20):
            chat_id = await new_chat(client, h)
            body = orjson.dumps({"message": "a long answer please"})
            request = post_request(
                f"/api/chat/{chat_id}/message", body, {**h, "Content-Type": "application/json"}
            )
            socks.append(await asyncio.to_thread(stalled_client, host, port, request))
        try:
            await settled(client.app[STORE].db, registry=client.app[REGISTRY], gauge_before=gauge)
        finally:
            for sock in socks:
                sock.close()
    assert unretrieved == []


# --------------------------------------------------------------------------- malformed frames
BAD_FRAMES = [
    b"[1, 2]",
    b'"a string"',
    b"42",
    b"null",
    b'{"choices": "nope"}',
    b'{"choices": [5]}',
    b'{"choices": [{"index": 0, "delta": "text"}]}',
    b'{"choices": [{"index": 0, "delta": {"content": 42}}]}',
    b'{"choices": [{"index": 0, "delta": {"content": {"a": 1}}}]}',
    b'{"choices": [{"index": 0, "delta": {"content": ["a"]}}]}',
    b'{"choices": [{"index": 0, "delta": {}, "finish_reason": 7}]}',
    b'{"error": "boom sk-upstream-echo"}',
    b'{"error": {"message": "your key sk-upstream-echo is invalid"}}',
]
IGNORED_FRAMES = [
    b"{}",
    b'{"choices": []}',
    b'{"choices": [{"index": 0, "delta": null}]}',
    b'{"choices": [{"index": 0, "delta": {"content": null}}]}',
    b'{"usage": "lots"}',
    b'{"choices": [], "usage": [1]}',
    b'{"choices": [], "usage": {"prompt_tokens": "x", "completion_tokens": 3}}',
    b'{"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": 3}}',
]


async def _turn_with_frame(client, fake_openai, h, frame: bytes) -> tuple[list[dict], dict]:
    from tests.sse_client import collect

    fake_openai.scripts.append(Script(chunks=["one ", "two ", "three"], raw_after={2: [frame]}))
    chat_id = await new_chat(client, h)
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h)
    assert resp.status == 200
    seen = await collect(resp)
    record = await client.app[STORE].messages.find_one({"chat_id": chat_id, "role": "assistant"})
    return seen, record


async def test_a_malformed_upstream_frame_ends_the_turn_cleanly(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Each kind of malformed frame: a clean ``upstream_bad_response`` terminal event, the
    partial text saved and billed, the upstream's words never relayed; and the replica's
    checkpoints keep working afterwards (a bad delta once poisoned every later round)."""
    from tests.sse_client import text_of

    with unretrieved_task_exceptions() as unretrieved:
        gauge = active_streams()
        client = await aiohttp_client(create_app(stream_settings(checkpoint_interval_s=0.05)))
        h = auth()
        for frame in BAD_FRAMES:
            seen, record = await _turn_with_frame(client, fake_openai, h, frame)
            assert [e["event"] for e in seen][-1] == "error", frame
            end = seen[-1]["data"]
            assert end["code"] == "upstream_bad_response", (frame, end)
            assert "sk-upstream-echo" not in repr(seen), frame
            assert text_of(seen) == "one two ", frame
            assert record["status"] == "failed" and record["content"] == "one two ", frame
            assert record["tokens"]["completion"] > 0 and end["tokens_used"] > 0, frame
        await settled(client.app[STORE].db, registry=client.app[REGISTRY], gauge_before=gauge)

        # A turn after all that is still checkpointed while it streams.
        fake_openai.default = Script(chunks=["saved ", "later"], gate_after=1)
        chat_id = await new_chat(client, h)
        resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
        await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
        messages = client.app[STORE].messages
        for _ in range(250):
            doc = await messages.find_one({"chat_id": chat_id, "role": "assistant"})
            if doc and doc["content"] == "saved ":
                break
            await asyncio.sleep(0.02)
        assert doc["content"] == "saved "
        fake_openai.gate.set()
        await resp.read()
    assert unretrieved == []


async def test_frames_that_carry_nothing_usable_are_ignored(
    aiohttp_client, stream_settings, fake_openai, auth
):
    from tests.sse_client import text_of

    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    for frame in IGNORED_FRAMES:
        seen, record = await _turn_with_frame(client, fake_openai, h, frame)
        assert seen[-1]["event"] == "done", (frame, seen[-1])
        assert text_of(seen) == "one two three" == record["content"], frame
        assert record["status"] == "complete", frame
        assert record["tokens"]["source"] == "upstream", frame  # the real usage frame still counts


async def test_a_malformed_frame_on_v1_is_a_clean_error(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    fake_openai.scripts.append(Script(chunks=["a", "b"], raw_after={1: [b'{"choices": "x"}']}))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]},
        headers=h,
    )
    body = await resp.json()
    assert resp.status == 502 and body["error"]["code"] == "upstream_bad_response"
    await settled(client.app[STORE].db, registry=client.app[REGISTRY])


# --------------------------------------------------------------------------- upstream's words
async def test_an_upstream_error_body_reaches_the_log_redacted_never_the_client(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """An upstream that echoes its key: the client gets our code and words; the log gets the
    body, bounded, with the key masked."""
    client = await aiohttp_client(create_app(stream_settings()))
    h = auth()
    echo = {"error": {"message": "Incorrect API key provided: sk-upstream-secret. " + "x" * 900}}
    fake_openai.scripts.append(Script(status=401, error_body=echo))
    chat_id = await new_chat(client, h)
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h)
    body = await resp.json()
    assert resp.status == 502 and body["error"]["code"] == "upstream_auth"
    assert "sk-upstream" not in repr(body) and "Incorrect" not in repr(body)
    fake_openai.scripts.append(Script(status=401, error_body=echo))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]},
        headers=h,
    )
    assert "sk-upstream" not in await resp.text()
    logged = [e for e in logs if e["event"] == "upstream.error_body"]
    assert len(logged) == 2 and all("Incorrect API key" in e["body"] for e in logged)
    assert "sk-upstream-secret" not in repr(logs)
    assert all(len(e["body"]) <= 501 for e in logged)


# --------------------------------------------------------------------------- a write refused
def _frame(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-test", "choices": [choice]}


async def test_a_final_write_mongodb_refuses_ends_the_turn_and_its_record(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """A record MongoDB will not take (past its 16 MB: an upstream's reasoning of 17 MB, which
    the answer's character bound does not count) is no outage: before, its group of final
    writes failed with no one to tell, and the turn never ended (its client waiting, its
    record ``streaming`` for the replica's life). Now the client gets its end, and the record
    is written again without its reasoning (the largest of what it may go without, alone: its
    tool calls are kept, which the chat's next turn sends back): it ends as the client was
    told and billed (one ``stream.ended``, the month's ``used`` its tokens), logged as
    refused, the log line free of the record's text."""
    with unretrieved_task_exceptions() as unretrieved:
        gauge = active_streams()
        settings = stream_settings(checkpoint_interval_s=0.05, reaper_interval_s=0.1)
        client = await aiohttp_client(create_app(settings))
        thought = "t" * 100_000
        frames = [_frame({"role": "assistant", "content": ""})]
        frames += [_frame({"reasoning_content": thought}) for _ in range(170)]
        call = {"index": 0, "id": "call_1", "type": "function"}
        call["function"] = {"name": "lookup", "arguments": '{"q": "x"}'}
        frames += [_frame({"content": "the answer"}), _frame({"tool_calls": [call]})]
        frames += [_frame({}, "stop")]
        fake_openai.default = Script(frames=frames)
        h = auth()
        chat_id = await new_chat(client, h)
        resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "x"}, headers=h)
        body = await asyncio.wait_for(resp.text(), 30)
        assert "the answer" in body and "event: done" in body
        done = orjson.loads(body.split("event: done\ndata: ", 1)[1].split("\n", 1)[0])
        assert done["budget"]["limit"] > 0  # the usage the final write left, as always
        await settled(client.app[STORE].db, registry=client.app[REGISTRY], gauge_before=gauge)
        store = client.app[STORE]
        record = await store.messages.find_one({"role": "assistant"})
        assert record["status"] == "complete" and record["content"] == "the answer"
        assert "reasoning" not in record and record["tool_calls"][0]["id"] == "call_1"
        usage = await store.usage.find_one({"user_id": "alice"})
        assert usage["used"] == record["tokens"]["total"] > 1_000_000  # the reasoning billed
        (refused,) = [e for e in logs if e["event"] == "stream.finalize_refused"]
        assert refused["dropped"] == "reasoning" and "ttt" not in refused["error"]
        assert [e["event"] for e in logs].count("stream.ended") == 1
    assert unretrieved == []

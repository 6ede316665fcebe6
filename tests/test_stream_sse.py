"""The stream core over SSE: one turn from rules to final record, against a fake upstream that
speaks OpenAI's real streaming format, SecantusDB and real sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import REGISTRY, STORE
from service.store import utcnow
from service.stream.producer import period_of
from service.tokens import TokenCounter
from tests.fake_openai import Script
from tests.faults import settled
from tests.processes import eventually
from tests.sse_client import collect, events, read_until, text_of


async def new_chat(client, headers, **body) -> str:
    resp = await client.post("/api/chat", json=body or None, headers=headers)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def send(client, chat_id, headers, message="Hi there", **extra):
    return await client.post(
        f"/api/chat/{chat_id}/message", json={"message": message, **extra}, headers=headers
    )


async def records(client, chat_id):
    store = client.app[STORE]
    return await store.messages.find({"chat_id": chat_id}).sort("seq", 1).to_list(None)


async def usage_doc(client, user="alice"):
    return await client.app[STORE].usage.find_one({"user_id": user, "period": period_of(utcnow())})


def ended(logs, **match):
    lines = [e for e in logs if e["event"] == "stream.ended"]
    return [e for e in lines if all(e.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------- full turn
async def test_full_turn_streams_incrementally_and_records_everything(
    stream_client, fake_openai, auth, logs
):
    """Deltas reach the client before the upstream finishes; records and usage are exact."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = Script(
        chunks=["The ", "answer ", "is ", "42."], usage=(30, 5), gate_after=2
    )
    resp = await send(client, chat_id, h, "What is the answer?")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache, no-transform"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Request-ID"]
    seen: list[dict] = []
    async for ev in events(resp):
        if "event" not in ev:
            continue
        seen.append(ev)
        if text_of(seen) == "The answer ":
            assert not fake_openai.finished.is_set()  # the upstream is still held at its gate
            fake_openai.gate.set()
    names = [e["event"] for e in seen]
    assert names[0] == "started" and names[-1] == "done" and set(names[1:-1]) == {"delta"}
    # ids are offsets: characters of the answer up to the end of each event's text
    assert int(seen[0]["id"]) == 0 and int(seen[-1]["id"]) == len("The answer is 42.")
    for i, ev in enumerate(seen[1:-1], 1):
        assert int(ev["id"]) == len(text_of(seen[: i + 1]))
    assert text_of(seen) == "The answer is 42."
    done = seen[-1]["data"]
    message_id = seen[0]["data"]["message_id"]
    assert done["message_id"] == message_id and done["status"] == "complete"
    assert done["tokens_used"] == 35 and done["tokens"]["source"] == "upstream"
    assert done["finish_reason"] == "stop"
    assert done["budget"]["remaining"] == done["budget"]["limit"] - 35

    user_msg, assistant = await records(client, chat_id)
    assert user_msg["role"] == "user" and user_msg["content"] == "What is the answer?"
    assert assistant["_id"] == message_id and assistant["status"] == "complete"
    assert assistant["content"] == "The answer is 42."
    assert assistant["tokens"] == {"prompt": 30, "completion": 5, "total": 35, "source": "upstream"}
    assert assistant["model"] == "gpt-test" and assistant["finish_reason"] == "stop"
    usage = await usage_doc(client)
    assert usage["used"] == 35 and usage["reserved"] == 0 and usage["open"] == []

    # The upstream got the key (server-side only), the upstream model id and include_usage.
    assert fake_openai.headers[0]["Authorization"] == "Bearer sk-upstream-secret"
    body = fake_openai.requests[0]
    assert body["model"] == "gpt-4o-mini" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "What is the answer?"}

    for name in ("stream.started", "stream.first_token", "stream.ended"):
        line = next(e for e in logs if e["event"] == name)
        assert line["message_id"] == message_id and line["chat_id"] == chat_id
        assert line["user_id"] == "alice" and line["transport"] == "sse"
        assert line["model"] == "gpt-test" and line["request_id"] == resp.headers["X-Request-ID"]
    assert next(e for e in logs if e["event"] == "stream.first_token")["ttft_ms"] >= 0
    end = ended(logs)[0]
    assert end["outcome"] == "completed" and end["reason"] == "finished"
    assert end["tokens"]["total"] == 35 and end["token_source"] == "upstream" and end["chunks"] == 4
    text = repr(logs)
    assert "What is the answer?" not in text and "sk-upstream-secret" not in text


async def test_history_shows_messages_in_order(stream_client, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    for text in ("one", "two"):
        await collect(await send(client, chat_id, h, text))
    body = await (await client.get(f"/api/chat/{chat_id}", headers=h)).json()
    assert [(m["role"], m["status"]) for m in body["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ] * 2
    assert [m["seq"] for m in body["messages"]] == [0, 1, 2, 3]
    assert body["messages"][1]["tokens"]["source"] == "upstream"


async def test_context_is_last_n_messages_with_partials_marked(stream_client, fake_openai, auth):
    """The prompt carries the system prompt, the last CONTEXT_MESSAGES messages, the new one."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["first answer"]),
        Script(chunks=["cut", " more"], reset_after=1),
    ]
    await collect(await send(client, chat_id, h, "q1"))
    await collect(await send(client, chat_id, h, "q2"))
    await collect(await send(client, chat_id, h, "q3"))
    sent = fake_openai.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sent[2]["content"] == "first answer"
    assert sent[4]["content"].startswith("cut") and "cut off" in sent[4]["content"]
    assert sent[-1]["content"] == "q3"


async def test_context_limit_and_window_trimming(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings(context_messages=2)))
    h = auth()
    chat_id = await new_chat(client, h)
    for text in ("a", "b", "c"):
        await collect(await send(client, chat_id, h, text))
    sent = fake_openai.requests[-1]["messages"]
    assert [m["content"] for m in sent[1:]] == ["b", "Hello, world!", "c"]


# --------------------------------------------------------------------------- faults
async def test_an_upstream_s_cookie_is_not_sent_on_another_user_s_call(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The upstream session keeps no cookies: what a vendor (or its CDN) set in answer to one
    user's call never goes out with the next, another user's. (By a host name: a cookie jar
    ignores the cookies of an IP address.)"""
    url = fake_openai.url.replace("127.0.0.1", "localhost")
    client = await aiohttp_client(create_app(stream_settings(openai_base_url=url)))
    fake_openai.default = Script(set_cookie="__cf_bm=alice-session; Path=/; HttpOnly")
    for user in ("alice", "bob"):
        h = auth(user)
        chat_id = await new_chat(client, h)
        assert (await collect(await send(client, chat_id, h)))[-1]["event"] == "done"
    assert len(fake_openai.headers) == 2
    assert all("Cookie" not in headers for headers in fake_openai.headers)


async def test_upstream_429_then_success_is_retried(stream_client, fake_openai, auth, logs):
    fake_openai.scripts = [Script(status=429, retry_after="0"), Script()]
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert evs[-1]["event"] == "done" and text_of(evs) == "Hello, world!"
    assert len(fake_openai.requests) == 2
    assert any(
        e["event"] == "upstream.retry" and e["code"] == "upstream_rate_limited" for e in logs
    )


async def test_upstream_500_before_first_token_is_a_json_error(
    stream_client, fake_openai, auth, logs
):
    """Every attempt fails before a token: 503 JSON error, turn recorded failed, nothing billed."""
    fake_openai.default = Script(status=500)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert len(fake_openai.requests) == 3  # UPSTREAM_MAX_ATTEMPTS
    user_msg, assistant = await records(client, chat_id)
    assert user_msg["status"] == "complete"
    assert assistant["status"] == "failed" and assistant["error"]["code"] == "upstream_unavailable"
    assert assistant["tokens"]["total"] == 0
    usage = await usage_doc(client)
    assert usage["used"] == 0 and usage["reserved"] == 0
    assert ended(logs, outcome="failed", reason="upstream_error")


@pytest.mark.parametrize(
    ("status", "code", "http"),
    [
        (401, "upstream_auth", 502),
        (400, "upstream_bad_request", 400),
        (429, "upstream_rate_limited", 503),
    ],
)
async def test_upstream_errors_map_to_our_codes(
    stream_client, fake_openai, auth, status, code, http
):
    fake_openai.default = Script(status=status, retry_after="0")
    client, h = stream_client, auth()
    resp = await send(client, await new_chat(client, h), h)
    assert resp.status == http
    assert (await resp.json())["error"]["code"] == code
    assert len(fake_openai.requests) == (3 if status == 429 else 1)


async def test_connection_reset_mid_stream_keeps_partial(stream_client, fake_openai, auth, logs):
    fake_openai.default = Script(chunks=["Partial ", "answer ", "never ", "ends"], reset_after=2)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "Partial answer "
    err = evs[-1]
    assert err["event"] == "error" and err["data"]["status"] == "failed"
    assert err["data"]["code"] == "upstream_unavailable"
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == "Partial answer "
    assert assistant["tokens"]["source"] == "tokenizer"
    assert assistant["tokens"]["completion"] == TokenCounter().count("Partial answer ")
    usage = await usage_doc(client)
    assert usage["used"] == assistant["tokens"]["total"] > 0 and usage["reserved"] == 0
    assert ended(logs, outcome="failed", reason="upstream_error")


async def test_stall_past_idle_timeout_fails_with_timeout(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    client = await aiohttp_client(create_app(stream_settings(upstream_idle_timeout_s=0.3)))
    fake_openai.default = Script(chunks=["slow ", "start"], stall_after=1)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "slow "
    assert evs[-1]["event"] == "error" and evs[-1]["data"]["code"] == "upstream_timeout"
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == "slow "
    assert ended(logs, outcome="failed", reason="timeout")


async def test_silence_before_the_first_token_is_bounded_by_its_own_deadline_only(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A model may think in silence (role chunk, then nothing) longer than the idle timeout:
    until the first token only UPSTREAM_FIRST_TOKEN_TIMEOUT_S applies."""
    settings = stream_settings(upstream_first_token_timeout_s=10, upstream_idle_timeout_s=0.2)
    client = await aiohttp_client(create_app(settings))
    fake_openai.default = Script(chunks=["thought ", "through"], delay_s=0.6)
    h = auth()
    evs = await collect(await send(client, await new_chat(client, h), h))
    assert evs[-1]["event"] == "error"  # the 0.6-s gap after the first token is too long ...
    assert evs[-1]["data"]["code"] == "upstream_timeout"
    assert text_of(evs) == "thought "  # ... the 0.6 s before it was not


async def test_first_token_deadline(aiohttp_client, stream_settings, fake_openai, auth, logs):
    """A model that keeps the connection alive but never produces a token is stopped."""
    settings = stream_settings(upstream_first_token_timeout_s=0.3, upstream_idle_timeout_s=30)
    client = await aiohttp_client(create_app(settings))
    fake_openai.default = Script(stall_after=0)
    h = auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert [e["event"] for e in evs] == ["started", "error"]
    assert evs[-1]["data"]["code"] == "upstream_timeout" and evs[-1]["data"]["reason"] == "timeout"
    assert ended(logs, outcome="failed", reason="timeout")


async def test_malformed_frame_fails_cleanly(stream_client, fake_openai, auth):
    fake_openai.default = Script(chunks=["ok ", "then"], malformed_after=1)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "ok "
    assert evs[-1]["event"] == "error" and evs[-1]["data"]["code"] == "upstream_bad_response"
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "failed" and assistant["content"] == "ok "


async def test_stream_closed_without_done_and_without_finish_is_an_error(
    stream_client, fake_openai, auth
):
    fake_openai.default = Script(send_done=False, send_finish=False, usage=None)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h))
    assert text_of(evs) == "Hello, world!"
    assert evs[-1]["event"] == "error" and evs[-1]["data"]["code"] == "upstream_bad_response"


async def test_stream_closed_without_done_after_finish_is_complete(
    stream_client, fake_openai, auth
):
    fake_openai.default = Script(send_done=False)
    client, h = stream_client, auth()
    evs = await collect(await send(client, await new_chat(client, h), h))
    assert evs[-1]["event"] == "done" and evs[-1]["data"]["status"] == "complete"


async def test_no_usage_reported_uses_the_local_tokenizer(stream_client, fake_openai, auth):
    from service.tokens import TokenCounter

    fake_openai.default = Script(chunks=["Tokenize ", "this ", "text, please."], usage=None)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, "count me"))
    done = evs[-1]["data"]
    assert done["tokens"]["source"] == "tokenizer"
    assert done["tokens"]["completion"] == TokenCounter().count("Tokenize this text, please.")
    assert done["tokens"]["prompt"] > TokenCounter().count("count me")  # + system prompt, framing
    assert (await usage_doc(client))["used"] == done["tokens_used"]


async def test_crlf_framed_upstream_is_parsed(stream_client, fake_openai, auth):
    fake_openai.default = Script(crlf=True)
    client, h = stream_client, auth()
    evs = await collect(await send(client, await new_chat(client, h), h))
    assert text_of(evs) == "Hello, world!" and evs[-1]["event"] == "done"


async def test_heartbeats_keep_a_quiet_stream_open_and_stop_with_it(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """While the model is quiet the client gets ``: ping`` comments (one ticker for all
    streams); they are not events, and the answer goes on unchanged once the model resumes."""
    client = await aiohttp_client(create_app(stream_settings(sse_heartbeat_s=0.05)))
    registry = client.app[REGISTRY]
    fake_openai.default = Script(chunks=["before ", "after"], gate_after=1)
    h = auth()
    resp = await send(client, await new_chat(client, h), h)
    seen: list[dict] = []
    async for ev in events(resp):
        seen.append(ev)
        if sum(e.get("comment") == "ping" for e in seen) == 3:
            break
    assert len(registry.followers) == 1
    fake_openai.gate.set()
    seen += [ev async for ev in events(resp)]
    named = [e for e in seen if "event" in e]
    assert [e["event"] for e in named] == ["started", "delta", "delta", "done"]
    assert text_of(named) == "before after"
    assert all(e.get("comment") == "ping" for e in seen if "event" not in e)
    assert not registry.followers  # the ended stream is no longer pinged


# --------------------------------------------------------------------------- cancellation
async def test_with_on_disconnect_cancel_a_disconnect_cancels_the_upstream_within_a_second(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """``ON_DISCONNECT=cancel`` keeps the behaviour of a turn that lives with its connection."""
    client = await aiohttp_client(create_app(stream_settings(on_disconnect="cancel")))
    fake_openai.default = Script(chunks=["a ", "b ", "c ", "d"], gate_after=2)
    h = auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h)
    await read_until(resp, "a b ")
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
    closed_at = time.monotonic()
    resp.close()  # the browser tab goes away
    await asyncio.wait_for(fake_openai.disconnected.wait(), 1.0)
    assert fake_openai.disconnected_at - closed_at < 1.0
    await _until(lambda: ended(logs, outcome="cancelled"))
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "cancelled" and assistant["content"] == "a b "
    assert assistant["reason"] == "client_disconnect"
    assert assistant["tokens"]["completion"] == TokenCounter().count("a b ")
    assert assistant["tokens"]["prompt"] > 0
    usage = await usage_doc(client)
    assert usage["used"] == assistant["tokens"]["total"] and usage["reserved"] == 0
    assert ended(logs, outcome="cancelled", reason="client_disconnect")


async def test_a_disconnect_detaches_the_turn_which_completes_and_is_billed_exactly(
    stream_client, fake_openai, auth, logs
):
    """By default a client that goes away does not stop its turn: it reads the upstream to its
    end and is billed with the upstream's exact usage; its text is all saved."""
    fake_openai.default = Script(chunks=["a ", "b ", "c ", "d"], gate_after=2, usage=(17, 4))
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h)
    await read_until(resp, "a b ")
    resp.close()
    await _until(lambda: any(e["event"] == "stream.detached" for e in logs))
    assert not fake_openai.disconnected.is_set()  # the upstream is still being read
    fake_openai.gate.set()
    await _until(lambda: ended(logs, outcome="completed"))
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "complete" and assistant["content"] == "a b c d"
    assert assistant["tokens"] == {"prompt": 17, "completion": 4, "total": 21, "source": "upstream"}
    usage = await usage_doc(client)
    assert usage["used"] == 21 and usage["reserved"] == 0
    detached = next(e for e in logs if e["event"] == "stream.detached")
    assert detached["reason"] == "client_disconnect" and detached["offset"] == 4


def access_lines(logs, path):
    return [e for e in logs if e["event"] == "http.request" and e["path"] == path]


async def test_a_stream_s_access_line_is_written_when_it_closes(
    stream_client, fake_openai, auth, logs
):
    """The handler hands aiohttp the streaming response at once (no frame of it or of the
    middleware stays for the stream's length), yet the access line still tells how the request
    ended: written once, when the stream closes, after the turn's end, with its id and user."""
    fake_openai.default = Script(chunks=["a ", "b ", "c"], gate_after=2)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    path = f"/api/chat/{chat_id}/message"
    resp = await send(client, chat_id, h)
    seen: list[dict] = []
    async for ev in events(resp):
        seen += [ev]
        if text_of(seen) == "a b " and not fake_openai.gate.is_set():
            assert access_lines(logs, path) == []  # still streaming
            fake_openai.gate.set()
    assert seen[-1]["event"] == "done" and text_of(seen) == "a b c"
    await _until(lambda: access_lines(logs, path))
    [line] = access_lines(logs, path)
    assert line["status"] == 200 and line["user_id"] == "alice"
    assert line["request_id"] == resp.headers["X-Request-ID"]
    assert logs.index(ended(logs, outcome="completed")[0]) < logs.index(line)


async def test_a_client_that_leaves_mid_stream_is_logged_499_while_its_turn_goes_on(
    stream_client, fake_openai, auth, logs
):
    fake_openai.default = Script(chunks=["a ", "b ", "c"], gate_after=2)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    path = f"/api/chat/{chat_id}/message"
    resp = await send(client, chat_id, h)
    await read_until(resp, "a b ")
    resp.close()
    await _until(lambda: access_lines(logs, path))
    [line] = access_lines(logs, path)
    assert line["status"] == 499 and not ended(logs)  # the turn is still running
    fake_openai.gate.set()
    await _until(lambda: ended(logs, outcome="completed"))
    assert len(access_lines(logs, path)) == 1


async def test_explicit_cancel_stops_stream_and_saves_partial(
    stream_client, fake_openai, auth, logs
):
    fake_openai.default = Script(chunks=["keep ", "this ", "not this"], gate_after=2)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, h)
    seen = []
    async for ev in events(resp):
        if "event" not in ev:
            continue
        seen.append(ev)
        if ev["event"] == "delta" and text_of(seen) == "keep this ":
            message_id = seen[0]["data"]["message_id"]
            cancel = await client.post(
                f"/api/chat/{chat_id}/messages/{message_id}/cancel", headers=h
            )
            assert cancel.status == 202
    assert seen[-1]["event"] == "done"
    assert seen[-1]["data"]["status"] == "cancelled" and seen[-1]["data"]["reason"] == "user_cancel"
    assert text_of(seen) == "keep this "
    await asyncio.wait_for(fake_openai.disconnected.wait(), 1.0)  # upstream request closed
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "cancelled" and assistant["content"] == "keep this "
    assert assistant["tokens"]["total"] > 0
    assert ended(logs, outcome="cancelled", reason="user_cancel")
    again = await client.post(f"/api/chat/{chat_id}/messages/{message_id}/cancel", headers=h)
    assert again.status == 409 and (await again.json())["error"]["code"] == "not_streaming"


async def test_cancel_seen_through_mongodb_when_stream_runs_elsewhere(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """Two app instances on one database: a cancel sent to B stops the stream running on A."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    fake_openai.default = Script(chunks=["x ", "y ", "z"], gate_after=1)
    h = auth()
    chat_id = await new_chat(a, h)

    async def cancel(message_id: str) -> None:
        sent = await b.post(f"/api/chat/{chat_id}/messages/{message_id}/cancel", headers=h)
        assert sent.status == 202

    seen = await stop_at_first_delta(await send(a, chat_id, h), cancel)
    assert seen[-1]["data"]["status"] == "cancelled" and seen[-1]["data"]["reason"] == "user_cancel"


async def stop_at_first_delta(resp, stop) -> list[dict]:
    """The stream's events to its end, ``stop(message_id)`` awaited at its first delta."""
    seen: list[dict] = []
    async for ev in events(resp):
        if "event" not in ev:
            continue
        seen.append(ev)
        if ev["event"] == "delta" and sum(e["event"] == "delta" for e in seen) == 1:
            await stop(seen[0]["data"]["message_id"])
    return seen


@pytest.mark.parametrize("where", ["here", "another instance"])
async def test_deleting_a_chat_stops_its_running_answer(
    aiohttp_client, stream_settings, fake_openai, auth, logs, db, where
):
    """A deleted chat's answer can be read by no one: it stops as a cancel stops it (on the
    instance that runs it, through MongoDB when the delete is sent to another), its upstream
    request closed and what was generated billed; it does not run on to its end."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = a if where == "here" else await aiohttp_client(create_app(settings))
    fake_openai.default = Script(chunks=["kept ", "not ", "this"], gate_after=1)
    h = auth()
    chat_id = await new_chat(a, h)

    async def delete(message_id: str) -> None:
        assert (await b.delete(f"/api/chat/{chat_id}", headers=h)).status == 200

    seen = await stop_at_first_delta(await send(a, chat_id, h), delete)
    assert seen[-1]["event"] == "done", seen
    assert seen[-1]["data"]["status"] == "cancelled" and seen[-1]["data"]["reason"] == "user_cancel"
    assert text_of(seen) == "kept "
    await asyncio.wait_for(fake_openai.disconnected.wait(), 5)
    assistant = await db.messages.find_one({"chat_id": chat_id, "role": "assistant"})
    assert assistant["status"] == "cancelled" and assistant["content"] == "kept "
    assert assistant["tokens"]["total"] > 0
    assert ended(logs, outcome="cancelled", reason="user_cancel")
    # A deleted chat is 404 everywhere: its answer's cancel route too, on either instance.
    for client in (a, b):
        url = f"/api/chat/{chat_id}/messages/{assistant['_id']}/cancel"
        gone = await client.post(url, headers=h)
        assert gone.status == 404 and (await gone.json())["error"]["code"] == "message_not_found"


async def test_a_turn_whose_records_come_after_its_chats_delete_is_stopped(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The race a delete's flag misses: the turn was authorized before the delete (sent to
    another replica), but its records are written after the delete flagged the chat's
    records. Its replica looks at the chat of every turn written since its last round, and
    stops it (``user_cancel``) instead of letting it run to its end in a deleted chat."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth()
    chat_id = await new_chat(a, h)
    # The turn is authorized once its insert is asked for: held until the delete is done.
    inserting, deleted = hold_inserts(a.app[STORE])
    fake_openai.default = Script(chunks=["one ", "two"], gate_after=1)
    try:
        sending = asyncio.ensure_future(send(a, chat_id, h))
        await asyncio.wait_for(inserting.wait(), 5)
        assert (await b.delete(f"/api/chat/{chat_id}", headers=h)).status == 200
        deleted.set()
        resp = await sending
        assert resp.status == 200
        # Without the watcher's look at its chat, it would run on until the gate opens.
        seen = await asyncio.wait_for(_collect_events(resp), 5)
    finally:
        deleted.set()
        fake_openai.gate.set()
    assert seen[-1]["event"] == "done", seen
    assert seen[-1]["data"]["status"] == "cancelled" and seen[-1]["data"]["reason"] == "user_cancel"
    _, assistant = await records(a, chat_id)
    assert assistant["status"] == "cancelled" and assistant["reason"] == "user_cancel"


def hold_inserts(store) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the records' inserts: the first event is set when one is asked for, and they are
    written once the second is set."""
    asked, release = asyncio.Event(), asyncio.Event()
    insert = store.insert_messages

    async def held(groups):
        asked.set()
        await release.wait()
        return await insert(groups)

    store.insert_messages = held
    return asked, release


async def _collect_events(resp) -> list[dict]:
    return [ev async for ev in events(resp) if "event" in ev]


async def test_started_comes_once_the_records_exist_so_any_replica_can_cancel_it(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The records' insert runs beside the upstream's opening, and the request waits for both:
    while MongoDB has not written the records, no ``started`` event (no message id) reaches
    the client, however soon the upstream answered; once it has, a cancel sent at once to
    another replica finds the record and stops the turn."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth()
    chat_id = await new_chat(a, h)
    _, written = hold_inserts(a.app[STORE])
    fake_openai.default = Script(chunks=["one ", "two"], gate_after=1)
    try:
        sending = asyncio.ensure_future(send(a, chat_id, h))
        await fake_openai.reached_gate.wait()  # the upstream has answered
        [live] = a.app[REGISTRY].streams.values()
        await _until(lambda: not live.reading)  # ... and the turn has its answer's stream
        done, _ = await asyncio.wait({sending}, timeout=0.5)
        assert not done  # the request waits for the records
        written.set()
        stream = events(await sending)
        started = await anext(stream)
        assert started["event"] == "started"
        message_id = started["data"]["message_id"]
        url = f"/api/chat/{chat_id}/messages/{message_id}/cancel"
        cancel = await b.post(url, headers=h)  # the other replica, at once
        assert cancel.status == 202 and (await cancel.json())["status"] == "cancelling"
        rest = [ev async for ev in stream if "event" in ev]
    finally:
        written.set()
        fake_openai.gate.set()
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["reason"] == "user_cancel"
    _, assistant = await records(a, chat_id)
    assert assistant["status"] == "cancelled" and assistant["reason"] == "user_cancel"


async def test_records_mongodb_cannot_write_are_the_request_s_503_and_bill_nothing(
    stream_client, fake_openai, auth
):
    """The upstream answered but the records' insert failed: the request is refused (503, one
    JSON error, no ``started``), and the turn, whose upstream is closed, takes nothing."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    store = client.app[STORE]

    async def unavailable(groups):
        raise StoreUnavailable("the database is unavailable; try again shortly")

    store.insert_messages = unavailable
    fake_openai.default = Script(chunks=["never ", "shown"], usage=(21, 2))
    resp = await send(client, chat_id, h)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "database_unavailable"
    await _until(lambda: not client.app[REGISTRY].streams)  # the turn has ended
    await settled(store.db)
    usage = await usage_doc(client)
    assert usage["used"] == 0 and usage["reserved"] == 0 and not usage.get("open")


async def test_cancel_errors(stream_client, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    import uuid

    resp = await client.post(f"/api/chat/{chat_id}/messages/{uuid.uuid4()}/cancel", headers=h)
    assert resp.status == 404
    resp = await client.post(f"/api/chat/{chat_id}/messages/nope/cancel", headers=h)
    assert resp.status == 400


# --------------------------------------------------------------------------- rules
async def test_budget_holds_under_30_concurrent_turns(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Budget fits 5 turns: 30 concurrent turns never push usage above limit + one reservation."""
    from service.tokens import TokenCounter

    settings = stream_settings(default_token_limit=5 * 400)
    client = await aiohttp_client(create_app(settings))
    fake_openai.default = Script(usage=None, chunks=["word "] * 50)  # tokenizer-billed, ~50 tokens
    h = auth("spender")
    chats = [await new_chat(client, h) for _ in range(30)]

    async def turn(chat_id):
        resp = await send(client, chat_id, h)
        if resp.status != 200:
            return resp.status, await resp.json()
        return 200, await collect(resp)

    results = await asyncio.gather(*(turn(c) for c in chats))
    # Refused while others still held the rest (429 budget_held), or once it was spent (403).
    refusals = {403: "budget_exceeded", 429: "budget_held"}
    assert {s for s, _ in results} <= {200, *refusals}, [r for s, r in results if s != 200]
    ok = [r for s, r in results if s == 200]
    refused = [(s, r) for s, r in results if s != 200]
    assert ok and refused and len(ok) + len(refused) == 30
    assert all(r["error"]["code"] == refusals[s] for s, r in refused)
    usage = await client.app[STORE].usage.find_one({"user_id": "spender"})
    one_reservation = 256 + TokenCounter().count_messages(
        [
            {"role": "system", "content": settings.system_prompt},
            {"role": "user", "content": "Hi there"},
        ]
    )
    assert usage["used"] <= settings.default_token_limit + one_reservation
    assert usage["reserved"] == 0
    billed = sum(r[-1]["data"]["tokens_used"] for r in ok)
    assert billed == usage["used"]
    # Drain what is left, then a turn is refused with the remaining amount shown.
    resp = await send(client, chats[0], h)
    while resp.status == 200:
        await collect(resp)
        resp = await send(client, chats[0], h)
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["code"] == "budget_exceeded"
    assert body["error"]["details"]["remaining"] == max(
        0,
        settings.default_token_limit
        - usage_now(await client.app[STORE].usage.find_one({"user_id": "spender"})),
    )
    usage_resp = await (await client.get("/api/usage", headers=h)).json()
    assert usage_resp["remaining"] == body["error"]["details"]["remaining"]


def usage_now(doc):
    return doc["used"] + doc["reserved"]


async def test_completion_is_clamped_to_remaining_budget(
    aiohttp_client, stream_settings, fake_openai, auth
):
    settings = stream_settings(default_token_limit=120)
    client = await aiohttp_client(create_app(settings))
    h = auth()
    await collect(await send(client, await new_chat(client, h), h))
    prompt = 0
    from service.tokens import TokenCounter

    prompt = TokenCounter().count_messages(
        [
            {"role": "system", "content": settings.system_prompt},
            {"role": "user", "content": "Hi there"},
        ]
    )
    assert fake_openai.requests[0]["max_tokens"] == 120 - prompt < 256


async def test_rate_limit_returns_429_with_retry_after(aiohttp_client, stream_settings, auth):
    client = await aiohttp_client(create_app(stream_settings(message_rate_limit_ms=60_000)))
    h = auth()
    chat_id = await new_chat(client, h)
    await collect(await send(client, chat_id, h))
    resp = await send(client, chat_id, h)
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert (await resp.json())["error"]["code"] == "rate_limited"
    other = auth("bob")  # per user
    assert (await send(client, await new_chat(client, other), other)).status == 200


@pytest.mark.parametrize("message", ["", "   \n ", "x" * 5001])
async def test_message_validation(stream_client, auth, message):
    client, h = stream_client, auth()
    resp = await send(client, await new_chat(client, h), h, message)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_message"


async def test_message_body_errors(stream_client, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    for body in ({}, {"message": 5}, {"message": "hi", "extra": 1}):
        resp = await client.post(f"/api/chat/{chat_id}/message", json=body, headers=h)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "validation_error"


async def test_unknown_chat_other_users_chat_and_unknown_model(stream_client, auth):
    import uuid

    client, h = stream_client, auth()
    assert (await send(client, str(uuid.uuid4()), h)).status == 404
    chat_id = await new_chat(client, h)
    resp = await send(client, chat_id, auth("mallory"))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "chat_not_found"
    resp = await send(client, chat_id, h, model="no-such-model")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


async def test_demo_model_streams_offline(stream_client, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h, model="demo")
    evs = await collect(await send(client, chat_id, h, "Tell me about gateways"))
    deltas = [e for e in evs if e["event"] == "delta"]
    assert len(deltas) > 10
    assert text_of(evs).startswith("(demo model)")
    assert evs[-1]["data"]["tokens"]["source"] == "upstream"
    assert evs[-1]["data"]["tokens"]["completion"] > 10


async def test_heartbeat_comments_while_waiting(aiohttp_client, stream_settings, fake_openai, auth):
    client = await aiohttp_client(create_app(stream_settings(sse_heartbeat_s=0.1)))
    fake_openai.default = Script(gate_after=0)
    h = auth()
    resp = await send(client, await new_chat(client, h), h)
    async for ev in events(resp):
        if ev.get("comment") == "ping":
            fake_openai.gate.set()
        if ev.get("event") == "done":
            break
    assert fake_openai.gate.is_set()


async def _until(predicate, limit_s=5.0):
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_reasoning_is_its_own_event_and_kept_on_the_record(stream_client, fake_openai, auth):
    """A model's reasoning deltas (recorded frames) reach the chat route as ``event: reasoning``
    (before the answer's text, ids the offset before it), and the record keeps it apart."""
    from tests.openai_recordings import recording

    frames, _ = recording("reasoning")
    fake_openai.default = Script(frames=frames)
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    seen = await collect(await send(client, chat_id, h, "What is 6 times 7?"))
    named = [e for e in seen if "event" in e]
    names = [e["event"] for e in named]
    assert names[0] == "started" and names[-1] == "done"
    reasoning = [e for e in named if e["event"] == "reasoning"]
    assert "".join(e["data"]["text"] for e in reasoning) == (
        "The user wants a number; 6 times 7 is 42."
    )
    assert all(int(e["id"]) == 0 for e in reasoning)  # no answer text before it
    assert names.index("delta") > names.index("reasoning")
    assert text_of(named) == "It is 42."
    _, answer = await records(client, chat_id)
    assert answer["content"] == "It is 42."
    assert answer["reasoning"] == "The user wants a number; 6 times 7 is 42."
    assert answer["tokens"]["reasoning"] == 28


async def test_a_refused_send_leaves_the_chat_where_it_was_in_the_list(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The chat's authorization moves it to the top of the list as the send begins; a send
    refused after that (here by the page's message gap) wrote no record, so the chat goes
    back to its last record's time (its creation's when it has none)."""
    client = await aiohttp_client(create_app(stream_settings(message_rate_limit_ms=60_000)))
    db, h = client.app[STORE].db, auth()
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2))
    first, second = await new_chat(client, h), await new_chat(client, h)

    async def listed() -> list[str]:
        return [
            c["chat_id"] for c in (await (await client.get("/api/chat", headers=h)).json())["chats"]
        ]

    async def settle(chat_id: str, at) -> None:
        async def back() -> bool:
            return (await db.chats.find_one({"_id": chat_id}))["updated_at"] == at

        await eventually(back, deadline_s=5, what="the chat back at its time")

    await collect(await send(client, second, h))  # the second chat has an answer now
    assert await listed() == [second, first]
    created = (await db.chats.find_one({"_id": first}))["created_at"]
    refused = await send(client, first, h)  # within the message gap
    assert refused.status == 429
    await settle(first, created)
    assert await listed() == [second, first]

    await db.usage.update_many({}, {"$unset": {"next_at": ""}})  # the gap over
    await collect(await send(client, first, h))
    assert await listed() == [first, second]
    last = await db.messages.find_one({"chat_id": second}, sort=[("seq", -1)])
    refused = await send(client, second, h)
    assert refused.status == 429
    await settle(second, last["created_at"])
    assert await listed() == [first, second]

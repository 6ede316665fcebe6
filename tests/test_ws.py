"""The WebSocket transport (protocol v2): many turns over one socket, against the same producer,
fake upstream, SecantusDB and real sockets; with aiohttp's client and the ``websockets`` package."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_lib_connect

from service.app import create_app
from service.keys import STORE
from service.store import utcnow
from tests import raw_http
from tests.fake_openai import Script
from tests.sse_client import collect, text_of


# --------------------------------------------------------------------------- helpers
async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", headers=headers)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def records(client, chat_id):
    return await client.app[STORE].messages.find({"chat_id": chat_id}).sort("seq", 1).to_list(None)


def ended(logs, **match):
    lines = [e for e in logs if e["event"] == "stream.ended"]
    return [e for e in lines if all(e.get(k) == v for k, v in match.items())]


async def until(predicate, limit_s=5.0):
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def recv(ws, limit_s=5.0) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), limit_s)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def connect(client, headers, **kw):
    ws = await client.ws_connect("/api/ws", headers=headers, **kw)
    ready = await recv(ws)
    assert ready["type"] == "ready" and ready["v"] == 2
    return ws


async def until_terminal(ws, ids: set[str]) -> list[dict[str, Any]]:
    """Read frames until every id in ``ids`` has its done/error frame."""
    frames, open_ = [], set(ids)
    while open_:
        frame = await recv(ws)
        frames.append(frame)
        if frame["type"] in ("done", "error") and frame.get("id") in open_:
            open_.discard(frame["id"])
    return frames


def of(frames, turn_id):
    return [f for f in frames if f.get("id") == turn_id]


def text(frames, turn_id):
    return "".join(f["text"] for f in of(frames, turn_id) if f["type"] == "delta")


def send(turn_id, chat_id, message="Hi there", **extra):
    return {"type": "send", "id": turn_id, "chat_id": chat_id, "message": message, **extra}


# --------------------------------------------------------------------------- one turn
async def test_one_turn_aiohttp_client(stream_client, fake_openai, auth, logs):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = Script(chunks=["The ", "answer ", "is ", "42."], usage=(30, 5))
    ws = await connect(client, h)
    await ws.send_json(send("t1", chat_id, "What is the answer?"))
    frames = await until_terminal(ws, {"t1"})
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "started" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    started, done = frames[0], frames[-1]
    assert started["chat_id"] == chat_id and started["model"] == "gpt-test"
    assert started["offset"] == 0 and done["offset"] == len("The answer is 42.")
    deltas = [f for f in frames if f["type"] == "delta"]
    assert (
        [f["offset"] for f in deltas]
        == [  # the characters up to the end of each text
            len("".join(d["text"] for d in deltas[: i + 1])) for i in range(len(deltas))
        ]
    )
    assert text(frames, "t1") == "The answer is 42."
    assert done["message_id"] == started["message_id"] and done["status"] == "complete"
    assert done["tokens_used"] == 35 and done["finish_reason"] == "stop"
    assert done["budget"]["remaining"] == done["budget"]["limit"] - 35
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}
    await ws.close()

    user_msg, assistant = await records(client, chat_id)
    assert user_msg["content"] == "What is the answer?"
    assert assistant["_id"] == started["message_id"] and assistant["status"] == "complete"
    assert assistant["content"] == "The answer is 42." and assistant["transport"] == "ws"
    for name in ("stream.started", "stream.first_token", "stream.ended"):
        line = next(e for e in logs if e["event"] == name)
        assert line["transport"] == "ws" and line["user_id"] == "alice"
        assert line["message_id"] == started["message_id"] and line["request_id"]
    assert ended(logs, transport="ws", outcome="completed", reason="finished")
    await until(lambda: any(e["event"] == "ws.closed" for e in logs))
    await until(
        lambda: any(e["event"] == "http.request" for e in logs if e.get("path") == "/api/ws")
    )
    (access,) = [e for e in logs if e["event"] == "http.request" and e.get("path") == "/api/ws"]
    assert access["status"] == 101  # the exchange's status, though the client closed


async def test_one_turn_websockets_package(stream_client, fake_openai, auth, token_for):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    uri = f"ws://127.0.0.1:{client.server.port}/api/ws"
    headers = {"Authorization": f"Bearer {token_for('alice')}"}
    async with ws_lib_connect(uri, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps(send("a", chat_id)))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert frames[0]["type"] == "started" and frames[-1]["type"] == "done"
    assert text(frames, "a") == "Hello, world!" and frames[-1]["status"] == "complete"
    _, assistant = await records(client, chat_id)
    assert assistant["content"] == "Hello, world!" and assistant["transport"] == "ws"


# --------------------------------------------------------------------------- multiplexing
async def test_three_concurrent_turns_interleave_and_one_is_cancelled(
    stream_client, fake_openai, auth, logs
):
    client, h = stream_client, auth()
    chats = [await new_chat(client, h) for _ in range(3)]
    fake_openai.default = Script(chunks=["one ", "two ", "three"], gate_after=1)
    ws = await connect(client, h)
    for turn_id, chat_id in zip("abc", chats, strict=True):
        await ws.send_json(send(turn_id, chat_id))
    frames = []
    # Every turn streams its first delta while the upstream holds all three at the gate.
    while {f["id"] for f in frames if f["type"] == "delta"} != {"a", "b", "c"}:
        frames.append(await recv(ws))
    await ws.send_json({"type": "cancel", "id": "b"})
    while not of(frames, "b") or of(frames, "b")[-1]["type"] != "done":
        frames.append(await recv(ws))
    assert of(frames, "b")[-1]["status"] == "cancelled"
    assert of(frames, "b")[-1]["reason"] == "user_cancel"
    await asyncio.wait_for(fake_openai.disconnected.wait(), 1.0)  # b's upstream was closed
    fake_openai.gate.set()
    frames += await until_terminal(ws, {"a", "c"})
    await ws.close()

    for turn_id in "ac":
        mine = of(frames, turn_id)
        assert mine[0]["type"] == "started" and mine[-1]["type"] == "done"
        assert mine[-1]["status"] == "complete" and text(frames, turn_id) == "one two three"
    # Turns interleave: every turn's first delta came before any turn's later text.
    deltas = [(f["id"], f["offset"]) for f in frames if f["type"] == "delta"]
    first_later = min(i for i, (_, offset) in enumerate(deltas) if offset > len("one "))
    assert {d[0] for d in deltas[:first_later]} == {"a", "b", "c"}
    _, b_record = await records(client, chats[1])
    assert b_record["status"] == "cancelled" and b_record["reason"] == "user_cancel"
    assert b_record["content"] == "one " and b_record["tokens"]["total"] > 0
    for chat_id in (chats[0], chats[2]):
        assert (await records(client, chat_id))[1]["status"] == "complete"
    assert ended(logs, transport="ws", outcome="cancelled", reason="user_cancel")
    assert len(ended(logs, transport="ws", outcome="completed")) == 2


async def test_with_on_disconnect_cancel_a_closed_socket_cancels_its_turn(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    client = await aiohttp_client(create_app(stream_settings(on_disconnect="cancel")))
    h = auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = Script(chunks=["a ", "b ", "c ", "d"], gate_after=2)
    ws = await connect(client, h)
    await ws.send_json(send("x", chat_id))
    frames = []
    while text(frames, "x") != "a b ":
        frames.append(await recv(ws))
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
    await ws.close()
    await asyncio.wait_for(fake_openai.disconnected.wait(), 1.0)
    await until(lambda: ended(logs, outcome="cancelled"))
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "cancelled" and assistant["content"] == "a b "
    assert assistant["reason"] == "client_disconnect" and assistant["tokens"]["total"] > 0
    assert ended(logs, transport="ws", outcome="cancelled", reason="client_disconnect")


async def test_a_closed_socket_leaves_its_turn_running_and_resumable(
    stream_client, fake_openai, auth, logs
):
    """By default a socket that closes only stops following: the turn completes; a new socket
    resumes it (``resume`` from the offset it had) and gets exactly the rest, then the end."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = Script(chunks=["a ", "b ", "c ", "d"], gate_after=2, usage=(9, 4))
    ws = await connect(client, h)
    await ws.send_json(send("x", chat_id))
    frames = []
    while text(frames, "x") != "a b ":
        frames.append(await recv(ws))
    message_id, offset = frames[0]["message_id"], frames[-1]["offset"]
    await ws.close()
    await until(lambda: any(e["event"] == "stream.detached" for e in logs))
    assert not fake_openai.disconnected.is_set()

    ws = await connect(client, h)
    await ws.send_json({"type": "resume", "id": "y", "message_id": message_id, "after": offset})
    first = await recv(ws)
    assert first["type"] == "started" and first["offset"] == offset == 4
    fake_openai.gate.set()
    rest = [first, *await until_terminal(ws, {"y"})]
    await ws.close()
    assert text(rest, "y") == "c d" and rest[-1]["type"] == "done"
    assert rest[-1]["status"] == "complete" and rest[-1]["offset"] == len("a b c d")
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "complete" and assistant["content"] == "a b c d"
    assert assistant["tokens"]["source"] == "upstream" and assistant["tokens"]["total"] == 13


# --------------------------------------------------------------------------- authentication
async def test_ticket_auth_valid_reused_and_expired(stream_client, auth, token_for):
    client, h = stream_client, auth()
    resp = await client.post("/api/ws/ticket", headers=h)
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["expires_in"] == 60 and len(body["ticket"]) >= 32
    ws = await connect(client, {}, params={"ticket": body["ticket"]})
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}
    await ws.close()
    stored = await client.app[STORE].db["ws_tickets"].find_one({})
    assert stored is None  # consumed; only ever stored as a hash

    with pytest.raises(aiohttp.WSServerHandshakeError) as reused:
        await client.ws_connect("/api/ws", params={"ticket": body["ticket"]})
    assert reused.value.status == 401

    ticket = (await (await client.post("/api/ws/ticket", headers=h)).json())["ticket"]
    assert ticket not in json.dumps(
        await client.app[STORE].db["ws_tickets"].find_one({}), default=str
    )
    await (
        client.app[STORE]
        .db["ws_tickets"]
        .update_many({}, {"$set": {"expires_at": utcnow() - timedelta(seconds=1)}})
    )
    uri = f"ws://127.0.0.1:{client.server.port}/api/ws?ticket={ticket}"
    with pytest.raises(websockets.InvalidStatus) as expired:
        async with ws_lib_connect(uri):
            pass
    assert expired.value.response.status_code == 401

    for headers in ({}, {"Authorization": "Bearer nope"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
            await client.ws_connect("/api/ws", headers=headers)
        assert missing.value.status == 401
    assert (await client.post("/api/ws/ticket")).status == 401


async def test_ticket_index_is_a_ttl_index(stream_client, auth):
    client = stream_client
    await client.post("/api/ws/ticket", headers=auth())
    info = await client.app[STORE].db["ws_tickets"].index_information()
    assert info["ticket_ttl"]["expireAfterSeconds"] == 0


async def test_expired_token_closes_the_socket_with_4001(
    aiohttp_client, stream_settings, token_for, logs
):
    client = await aiohttp_client(create_app(stream_settings(jwt_leeway_s=0)))
    headers = {"Authorization": f"Bearer {token_for('alice', ttl_s=1)}"}
    ws = await connect(client, headers)
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == 4001 and "expired" in msg.extra
    await ws.close()
    await until(
        lambda: any(e["event"] == "http.request" for e in logs if e.get("path") == "/api/ws")
    )
    (access,) = [e for e in logs if e["event"] == "http.request" and e.get("path") == "/api/ws"]
    (closed,) = [e for e in logs if e["event"] == "ws.closed"]
    assert access["status"] == 101 and type(closed["code"]) is int and closed["code"] == 4001


async def test_a_token_within_its_leeway_keeps_its_socket_until_the_leeway_ends(
    aiohttp_client, stream_settings, token_for, fake_openai
):
    """A token past its ``exp`` but within JWT_LEEWAY_S is accepted over HTTP: its socket is
    served too (a turn runs), opened with the token or with a ticket asked with it (the page's
    way), not refused or opened and closed at once (a reconnecting client would loop), and
    closed with 4001 when HTTP would refuse the token."""
    client = await aiohttp_client(create_app(stream_settings(jwt_leeway_s=4)))
    token = token_for("alice", ttl_s=-1)  # expired a second ago: three seconds of leeway left
    fake_openai.default = Script(chunks=["a ", "b"], usage=(5, 2))
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/chat", headers=headers)).status == 200
    resp = await client.post("/api/ws/ticket", headers=headers)
    assert resp.status == 200, await resp.text()
    ticket = (await resp.json())["ticket"]
    chat_id = await new_chat(client, headers)
    sockets = [await connect(client, headers), await connect(client, {}, params={"ticket": ticket})]
    for n, ws in enumerate(sockets):
        await ws.send_json(send(f"t{n}", chat_id))
        frames = await until_terminal(ws, {f"t{n}"})
        assert frames[-1]["type"] == "done"
    for ws in sockets:
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001 and "expired" in msg.extra
    assert (await client.get("/api/chat", headers=headers)).status == 401


async def test_origin_is_checked_before_the_upgrade(aiohttp_client, stream_settings, auth):
    client = await aiohttp_client(
        create_app(stream_settings(ws_allowed_origins="https://chat.example.com"))
    )
    h = auth()
    with pytest.raises(aiohttp.WSServerHandshakeError) as rejected:
        await client.ws_connect("/api/ws", headers={**h, "Origin": "https://evil.example"})
    assert rejected.value.status == 403
    uri = f"ws://127.0.0.1:{client.server.port}/api/ws"
    with pytest.raises(websockets.InvalidStatus) as rejected_lib:
        async with ws_lib_connect(uri, origin="null", additional_headers=h):
            pass
    assert rejected_lib.value.response.status_code == 403
    for origin in ("https://chat.example.com", f"http://127.0.0.1:{client.server.port}"):
        ws = await connect(client, {**h, "Origin": origin})
        await ws.close()
    ws = await connect(client, h)  # programs send no Origin
    await ws.close()


async def test_an_origin_that_is_not_utf8_is_403_not_500(stream_client):
    """The rejected Origin is logged: bytes that are not UTF-8 made the JSON renderer raise."""
    client = stream_client
    request = raw_http.build(
        "GET",
        "/api/ws",
        [(b"Origin", b"https://\xff\xfe.example"), (b"Authorization", b"Bearer x")],
    )
    resp = await raw_http.send(client.server.host, client.server.port, request)
    assert resp.status == 403 and resp.json()["error"]["code"] == "origin_not_allowed"


async def error_of(resp) -> str:
    return (await resp.json())["error"]["code"]


async def test_checks_run_origin_then_credentials_then_upgrade(
    aiohttp_client, stream_settings, auth
):
    """docs/websocket.md's order: 403 Origin, 401 credentials, 400 not an upgrade."""
    client = await aiohttp_client(
        create_app(stream_settings(ws_allowed_origins="https://chat.example.com"))
    )
    h = auth()
    evil = {"Origin": "https://evil.example"}
    resp = await client.get("/api/ws", headers=evil)
    assert resp.status == 403 and await error_of(resp) == "origin_not_allowed"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        resp = await client.get("/api/ws", headers=headers)
        assert resp.status == 401 and await error_of(resp) == "unauthorized", headers
        assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
    resp = await client.get("/api/ws", params={"ticket": ""})
    assert resp.status == 401
    resp = await client.get("/api/ws", headers=h)
    assert resp.status == 400 and await error_of(resp) == "websocket_required"


async def test_a_ticket_on_a_request_that_is_no_upgrade_is_not_used_up(stream_client, auth):
    """Checking a ticket consumes it, so it is checked only on an upgrade: a plain GET with one
    is 400 websocket_required, and the ticket still opens a socket afterwards."""
    client = stream_client
    ticket = (await (await client.post("/api/ws/ticket", headers=auth())).json())["ticket"]
    for params in ({"ticket": ticket}, {"ticket": "not-a-ticket"}):
        resp = await client.get("/api/ws", params=params)
        assert resp.status == 400 and await error_of(resp) == "websocket_required"
    ws = await connect(client, {}, params={"ticket": ticket})
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
        await client.ws_connect("/api/ws", params={"ticket": "not-a-ticket"})
    assert unknown.value.status == 401


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("frame", "turn_id", "field"),
    [
        ("{not json", None, None),
        ("[1, 2]", None, None),
        ('{"id": "t"}', "t", "type"),
        ('{"type": "launch", "id": "t"}', "t", "type"),
        ('{"type": "send", "chat_id": "C", "message": "hi"}', None, "id"),
        ('{"type": "send", "id": "t", "chat_id": "not-a-uuid", "message": "hi"}', "t", "chat_id"),
        ('{"type": "send", "id": "t", "chat_id": "C", "message": 5}', "t", "message"),
        ('{"type": "send", "id": "t", "chat_id": "C", "message": "hi", "model": 3}', "t", "model"),
        ('{"type": "send", "id": "t", "chat_id": "C", "message": "hi", "x": 1}', "t", "x"),
        ('{"type": "regenerate", "id": "t", "chat_id": "C"}', "t", "message_id"),
        ('{"type": "regenerate", "id": "t", "chat_id": "C", "message_id": "x"}', "t", "message_id"),
        (
            '{"type": "regenerate", "id": "t", "chat_id": "C", "message_id": "C", "message": "hi"}',
            "t",
            "message",
        ),
        ('{"type": "edit", "id": "t", "chat_id": "C", "message_id": "C"}', "t", "message"),
        ('{"type": "cancel"}', None, "id"),
        ('{"type": "cancel", "id": 7}', None, "id"),
    ],
)
async def test_invalid_frames_get_an_error_frame_and_the_socket_stays(
    stream_client, auth, frame, turn_id, field
):
    client, h = stream_client, auth()
    ws = await connect(client, h)
    await ws.send_str(frame.replace('"C"', json.dumps(str(uuid.uuid4()))))
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "invalid_frame" and err["message"]
    assert (err["id"], err["status"]) == (turn_id, 400)
    assert err.get("details", {}).get("field") == field
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}
    await ws.close()


async def test_binary_frame_closes_1003_and_oversize_1009(aiohttp_client, stream_settings, auth):
    client = await aiohttp_client(create_app(stream_settings(ws_max_msg_bytes=1024)))
    ws = await connect(client, auth())
    await ws.send_bytes(b"\x00\x01")
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1003

    uri = f"ws://127.0.0.1:{client.server.port}/api/ws"
    async with ws_lib_connect(uri, additional_headers=auth()) as lib:
        await lib.recv()
        await lib.send(json.dumps({"type": "ping", "pad": "x" * 2000}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(lib.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_text_frame_that_is_not_utf8_closes_1007(stream_client, auth):
    ws = await connect(stream_client, auth())
    await ws.send_frame(b"\xff\xfe", aiohttp.WSMsgType.TEXT)
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1007


async def test_refusals_duplicates_and_turn_cap_are_error_frames(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    client = await aiohttp_client(
        create_app(stream_settings(ws_max_turns_per_connection=1, v1_requests_per_minute=1))
    )
    h = auth()
    chat_id, other = await new_chat(client, h), await new_chat(client, h)
    fake_openai.default = Script(chunks=["x ", "y"], gate_after=1)
    ws = await connect(client, h)

    await ws.send_json(send("bad", chat_id, "   "))
    err = await recv(ws)
    assert (err["id"], err["code"], err["status"]) == ("bad", "invalid_message", 400)
    await ws.send_json(send("gone", str(uuid.uuid4())))
    err = await recv(ws)
    assert (err["id"], err["code"], err["status"]) == ("gone", "chat_not_found", 404)

    await ws.send_json(send("t1", chat_id))
    frames = [await recv(ws), await recv(ws)]
    assert [f["type"] for f in frames] == ["started", "delta"]
    await ws.send_json(send("t1", other))
    err = await recv(ws)
    assert (err["id"], err["code"], err["status"]) == ("t1", "duplicate_id", 409)
    await ws.send_json(send("t2", other))
    err = await recv(ws)
    assert (err["id"], err["code"], err["status"]) == ("t2", "too_many_turns", 429)
    assert err["details"] == {"max_turns": 1}
    fake_openai.gate.set()
    frames += await until_terminal(ws, {"t1"})
    assert frames[-1]["type"] == "done" and frames[-1]["status"] == "complete"

    await ws.send_json(send("t3", other))  # a program's rule: requests per minute
    err = await recv(ws)
    assert (err["id"], err["code"], err["status"]) == ("t3", "rate_limited", 429)
    assert err["details"]["rule"] == "requests_per_minute"
    assert err["retry_after_ms"] > 55_000
    await ws.close()
    refusals = [e for e in logs if e["event"] == "stream.refused"]
    assert refusals[-1]["rule"] == "requests_per_minute" and refusals[-1]["status"] == 429


async def test_budget_exceeded_is_an_error_frame(aiohttp_client, stream_settings, auth, logs):
    """Refused before it started: an error frame, and one ``stream.refused`` line saying why
    (the turn has no ``stream.started`` or ``stream.ended``; before, nothing was logged)."""
    client = await aiohttp_client(create_app(stream_settings(default_token_limit=10)))
    h = auth()
    chat_id = await new_chat(client, h)
    ws = await connect(client, h)
    await ws.send_json(send("t", chat_id))
    err = await recv(ws)
    assert (err["id"], err["code"], err["status"]) == ("t", "budget_exceeded", 403)
    await ws.close()
    (refused,) = [e for e in logs if e["event"] == "stream.refused"]
    assert (refused["code"], refused["status"], refused["transport"]) == (
        "budget_exceeded",
        403,
        "ws",
    )
    assert refused["chat_id"] == chat_id and refused["user_id"] == "alice"
    assert refused["level"] == "info"
    assert not [e for e in logs if e["event"] in ("stream.started", "stream.ended")]


async def test_upstream_failure_before_first_token_is_an_error_frame(
    stream_client, fake_openai, auth
):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [Script(status=500) for _ in range(3)]
    ws = await connect(client, h)
    await ws.send_json(send("t", chat_id))
    err = await recv(ws)
    assert err["type"] == "error" and err["id"] == "t" and err["code"].startswith("upstream_")
    assert err["status"] >= 500
    await ws.close()


# --------------------------------------------------------------------------- slow reader
async def _stop_reading(client, h, logs):
    chat_id = await new_chat(client, h)
    ws = await connect(client, h)
    await ws.send_json(send("big", chat_id))
    # Stop reading: kernel buffers, then the writer, then the send queue fill up.
    await until(lambda: any(e["event"] == "ws.slow_client" for e in logs), limit_s=30)
    while True:  # reading again shows what was sent before the close frame: 1013
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1013
    assert "slow_client" in msg.extra
    return chat_id


async def test_reader_that_stops_reading_is_closed_and_its_turn_finishes(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """1013 for the socket; the turn goes on detached to its end."""
    client = await aiohttp_client(create_app(stream_settings(ws_send_queue=8)))
    fake_openai.default = Script(chunks=["z" * 8192] * 200, usage=(5, 1000), gate_after=199)
    chat_id = await _stop_reading(client, auth(), logs)
    await until(lambda: any(e["event"] == "stream.detached" for e in logs))
    fake_openai.gate.set()  # the socket is gone; the turn still has its last chunk to read
    await until(lambda: ended(logs, transport="ws", outcome="completed"), limit_s=30)
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "complete" and len(assistant["content"]) == 8192 * 200
    detached = next(e for e in logs if e["event"] == "stream.detached")
    assert detached["reason"] == "slow_client"


async def test_with_on_disconnect_cancel_a_reader_that_stops_is_cancelled_as_slow_client(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    client = await aiohttp_client(
        create_app(stream_settings(ws_send_queue=8, on_disconnect="cancel"))
    )
    fake_openai.default = Script(chunks=["z" * 8192] * 200, usage=None, gate_after=199)
    chat_id = await _stop_reading(client, auth(), logs)
    await until(lambda: ended(logs, reason="slow_client"), limit_s=30)
    _, assistant = await records(client, chat_id)
    assert assistant["status"] == "cancelled" and assistant["reason"] == "slow_client"
    assert assistant["tokens"]["completion"] > 0
    assert ended(logs, transport="ws", outcome="cancelled", reason="slow_client")


async def test_a_client_that_reads_every_frame_is_not_slow_however_fast_it_sends(
    stream_client, auth, logs
):
    """Frames that each get a reply (pings; invalid frames, answered ``invalid_frame``), sent in
    a burst many times the send queue (WS_SEND_QUEUE, 256) while a reader takes every frame:
    every one is answered and the socket stays open (the handler handled every frame already
    received before the writer ran, and took the full queue for a slow client: 1013)."""
    ws = await connect(stream_client, auth())
    rounds = 2000
    got: dict[str, int] = {"pong": 0, "error": 0}

    async def read_everything() -> None:
        while got["pong"] < rounds or got["error"] < rounds:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg, got)
            frame = json.loads(msg.data)
            assert frame["type"] == "pong" or frame["code"] == "invalid_frame", frame
            got[frame["type"]] += 1

    reader = asyncio.create_task(read_everything())
    for _ in range(rounds):
        await ws.send_str('{"type": "ping"}')
        await ws.send_str('{"type": "nope"}')
    await asyncio.wait_for(reader, 30)
    assert got == {"pong": rounds, "error": rounds}
    assert not [e for e in logs if e["event"] == "ws.slow_client"]
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}
    await ws.close()


async def test_a_client_that_sends_but_does_not_read_is_still_slow(
    aiohttp_client, stream_settings, auth, logs
):
    """The handler's wait for the writer is bounded: replies that the socket does not take for
    STREAM_SEND_TIMEOUT_S close it as a slow client (1013), as a turn's frames filling the
    queue do (tests above)."""
    settings = stream_settings(stream_send_timeout_s=1.0, ws_max_msg_bytes=65536)
    ws = await connect(await aiohttp_client(create_app(settings)), auth())
    # An unknown field is named twice in its error frame: ~100 KB back for each frame sent.
    flood = json.dumps({"type": "ping", "x" * 50_000: 0})

    async def send_without_reading() -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await ws.send_str(flood)

    sending = asyncio.create_task(send_without_reading())
    await until(lambda: any(e["event"] == "ws.slow_client" for e in logs), limit_s=30)
    # Reading again lets the close go out. The client was still sending: the server closes
    # with its frames unread, which resets the connection, so the client may see the reset
    # instead of the close frame; what the server sent is in its log.
    while (msg := await asyncio.wait_for(ws.receive(), 10)).type is aiohttp.WSMsgType.TEXT:
        assert json.loads(msg.data)["code"] == "invalid_frame"
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await asyncio.wait_for(sending, 10)
    await until(lambda: any(e["event"] == "ws.closed" for e in logs))
    closed = next(e for e in logs if e["event"] == "ws.closed")
    assert (closed["code"], closed["reason"]) == (1013, "slow_client")


# --------------------------------------------------------------------------- parity and shutdown
VOLATILE = {"_id", "chat_id", "created_at", "alive_at", "checkpoint_at", "completed_at"}


async def test_regenerate_and_edit_over_the_socket_as_over_sse(stream_client, fake_openai, auth):
    """``regenerate`` and ``edit`` frames are the SSE routes' turns: the same versions in the
    history, the same refusals (as error frames), and one idempotency key across both."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["first"], usage=(10, 1)),
        Script(chunks=["second"], usage=(11, 1)),
        Script(chunks=["third"], usage=(12, 1)),
    ]
    ws = await connect(client, h)
    await ws.send_json(send("a", chat_id, "Question"))
    first = await until_terminal(ws, {"a"})
    answer = first[0]["message_id"]
    await ws.send_json(
        {"type": "regenerate", "id": "b", "chat_id": chat_id, "message_id": answer, "key": "k-1"}
    )
    second = await until_terminal(ws, {"b"})
    assert second[0]["type"] == "started" and text(second, "b") == "second"
    assert second[-1]["type"] == "done" and second[-1]["status"] == "complete"
    # The same key over SSE follows that regenerate (nothing new is generated or billed).
    resp = await client.post(
        f"/api/chat/{chat_id}/messages/{answer}/regenerate",
        headers={**h, "Idempotency-Key": "k-1"},
    )
    assert resp.status == 200 and resp.headers.get("Idempotent-Replayed") == "true"
    assert text_of(await collect(resp)) == "second"
    docs = await records(client, chat_id)
    question = docs[0]["_id"]
    assert [d.get("replaces") for d in docs if d["role"] == "assistant"] == [None, answer]
    # Refused as over SSE: a regenerate of a question is 409 wrong_role.
    await ws.send_json(
        {"type": "regenerate", "id": "c", "chat_id": chat_id, "message_id": question}
    )
    [refused] = await until_terminal(ws, {"c"})
    assert (refused["type"], refused["code"], refused["status"]) == ("error", "wrong_role", 409)
    await ws.send_json(
        {"type": "edit", "id": "d", "chat_id": chat_id, "message_id": question, "message": "New"}
    )
    edited = await until_terminal(ws, {"d"})
    assert text(edited, "d") == "third"
    await ws.close()
    resp = await client.get(f"/api/chat/{chat_id}", headers=h)
    shown = [(m["role"], m["content"]) for m in (await resp.json())["messages"]]
    assert shown == [("user", "New"), ("assistant", "third")]
    assert len(fake_openai.requests) == 3


async def test_ws_and_sse_leave_identical_records(stream_client, fake_openai, auth):
    client, h = stream_client, auth()
    fake_openai.default = Script(chunks=["Same ", "answer."], usage=(12, 3))
    sse_chat, ws_chat = await new_chat(client, h), await new_chat(client, h)
    resp = await client.post(
        f"/api/chat/{sse_chat}/message", json={"message": "Same question"}, headers=h
    )
    sse_events = await collect(resp)
    assert text_of(sse_events) == "Same answer."
    ws = await connect(client, h)
    await ws.send_json(send("t", ws_chat, "Same question"))
    frames = await until_terminal(ws, {"t"})
    await ws.close()
    assert sse_events[-1]["data"]["tokens"] == frames[-1]["tokens"]

    def strip(docs, transport):
        assert docs[1]["transport"] == transport
        # A program's turn (WebSocket) names the replica's lease it was admitted from.
        return [
            {k: v for k, v in d.items() if k not in VOLATILE | {"transport", "lease"}} for d in docs
        ]

    assert strip(await records(client, ws_chat), "ws") == strip(
        await records(client, sse_chat), "sse"
    )


async def test_shutdown_closes_sockets_with_going_away(stream_client, auth):
    client = stream_client
    ws = await connect(client, auth())
    await client.app.shutdown()
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001

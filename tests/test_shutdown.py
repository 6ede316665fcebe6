"""Graceful shutdown of a real service process (issue #8).

On SIGTERM (or SIGINT) the process keeps listening while it drains: /readyz answers 503
``shutting_down`` at once, new turns are refused (503 over HTTP, an error frame over WebSocket),
streams in flight continue for up to DRAIN_TIMEOUT_S and are then ended with a ``shutdown``
event, their partial text saved and billed; WebSockets are closed with 1001 and the process
exits 0. A second signal stops the streams at once. MongoDB is read directly afterwards: no
record is left ``streaming`` and the usage document matches the stored messages exactly.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import aiohttp

from tests.fake_openai import Script
from tests.processes import (
    SseTurn,
    eventually,
    new_chat,
    open_sse,
    open_ws,
    session,
)

EXIT_MARGIN_S = 4.0  # finalization, closing sockets and MongoDB, interpreter exit
SHORT = ["short ", "and ", "sweet."]  # held at the gate after two chunks, released mid-drain
LONG = ["long ", "answer ", "never ", "ends"]  # stalls after two chunks: outlives the drain
SHORT_USAGE = (29, 3)


def short_script() -> Script:
    return Script(chunks=list(SHORT), gate_after=2, usage=SHORT_USAGE)


def long_script() -> Script:
    return Script(chunks=list(LONG), stall_after=2)


async def sse_turn(http, fake_openai, chat_id: str, script: Script, held_at: int = 2) -> SseTurn:
    """Start a turn with its own script (one at a time, so each request takes its script) and
    wait until it is held by the upstream."""
    fake_openai.scripts.append(script)
    turn = await open_sse(http, chat_id)
    await turn.wait_text("".join(script.chunks[:held_at]))
    return turn


async def wait_not_ready(http: aiohttp.ClientSession) -> dict[str, Any]:
    """Poll /readyz until it answers 503; the process is still listening while it drains."""
    seen: dict[str, Any] = {}

    async def not_ready() -> bool:
        async with http.get("/readyz") as resp:
            seen.update(status=resp.status, body=await resp.json())
            return resp.status == 503

    await eventually(not_ready, 5, "/readyz 503")
    return seen["body"]


async def assert_refused_over_http(http: aiohttp.ClientSession, chat_id: str) -> None:
    async with http.post(f"/api/chat/{chat_id}/message", json={"message": "late"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "shutting_down"


async def assert_all_final(db, user: str) -> list[dict[str, Any]]:
    """No record left streaming; usage equals the sum of the stored turns, nothing reserved."""
    assert await db.messages.count_documents({"status": "streaming"}) == 0
    assistants = await db.messages.find({"role": "assistant"}).to_list(None)
    assert assistants
    assert {m["status"] for m in assistants} <= {"complete", "cancelled"}
    usage = await db.usage.find_one({"user_id": user})
    assert usage["used"] == sum(m["tokens"]["total"] for m in assistants)
    assert usage["reserved"] == 0 and usage["open"] == []
    return assistants


def check_short(record: dict[str, Any]) -> None:
    assert record["status"] == "complete" and record["content"] == "".join(SHORT)
    assert record["tokens"]["total"] == sum(SHORT_USAGE)


def check_long(record: dict[str, Any], partial: str) -> None:
    assert record["status"] == "cancelled" and record["reason"] == "shutdown"
    assert record["error"]["code"] == "shutting_down"
    assert record["content"] == partial == "".join(LONG[:2])
    assert record["tokens"]["completion"] > 0 and record["tokens"]["source"] == "tokenizer"


def check_sse_shutdown(turn: SseTurn) -> None:
    end = turn.terminal
    assert end is not None and end["event"] == "error", turn.events
    assert end["data"]["reason"] == "shutdown" and end["data"]["code"] == "shutting_down"
    assert end["data"]["status"] == "cancelled" and end["data"]["tokens_used"] > 0


async def test_sigterm_drains_live_sse_and_websocket_streams(services, fake_openai, token_for, db):
    drain_s = 2.5
    [svc] = await services.start("a", drain_timeout_s=drain_s)
    async with session(svc, token_for("alice")) as http:
        chats = [await new_chat(http) for _ in range(6)]
        short_a = await sse_turn(http, fake_openai, chats[0], short_script())
        short_b = await sse_turn(http, fake_openai, chats[1], short_script())
        long_sse = await sse_turn(http, fake_openai, chats[2], long_script())
        ws = await open_ws(http)
        fake_openai.scripts.append(short_script())
        await ws.send("ws-short", chats[3])
        await ws.wait_text("ws-short", "".join(SHORT[:2]))
        fake_openai.scripts.append(long_script())
        await ws.send("ws-long", chats[4])
        await ws.wait_text("ws-long", "".join(LONG[:2]))

        sent = svc.send(signal.SIGTERM)
        body = await wait_not_ready(http)
        assert body["error"]["code"] == "shutting_down"
        await assert_refused_over_http(http, chats[5])
        await ws.send("ws-late", chats[5], "late")
        refused = await ws.wait_terminal("ws-late")
        assert refused["type"] == "error" and refused["code"] == "shutting_down"
        assert refused["status"] == 503

        # The short streams finish whole while the process drains ...
        fake_openai.gate.set()
        for turn in (short_a, short_b):
            done = await turn.finished()
            assert done is not None and done["event"] == "done", turn.events
            assert done["data"]["status"] == "complete" and turn.text == "".join(SHORT)
        ws_done = await ws.wait_terminal("ws-short")
        assert ws_done["type"] == "done" and ws.text("ws-short") == "".join(SHORT)
        assert long_sse.terminal is None and ws.terminal("ws-long") is None  # still streaming

        # ... the long ones are stopped at DRAIN_TIMEOUT_S with a shutdown event.
        await long_sse.finished(drain_s + EXIT_MARGIN_S)
        stopped_after = time.monotonic() - sent
        check_sse_shutdown(long_sse)
        assert long_sse.text == "".join(LONG[:2])
        ws_end = await ws.wait_terminal("ws-long", drain_s + EXIT_MARGIN_S)
        assert ws_end["type"] == "error" and ws_end["reason"] == "shutdown"
        assert ws_end["code"] == "shutting_down" and ws.text("ws-long") == "".join(LONG[:2])
        assert await ws.closed() == aiohttp.WSCloseCode.GOING_AWAY
        assert fake_openai.disconnected.is_set()  # the stalled upstream requests were closed

        assert await svc.wait_exit(drain_s + EXIT_MARGIN_S) == 0
        exited_after = time.monotonic() - sent
    assert drain_s - 0.5 <= stopped_after < exited_after < drain_s + EXIT_MARGIN_S

    records = {m["_id"]: m for m in await assert_all_final(db, "alice")}
    assert len(records) == 5  # the refused turns left nothing behind
    for turn in (short_a, short_b):
        check_short(records[turn.message_id])
    check_long(records[long_sse.message_id], long_sse.text)
    check_short(records[ws.of("ws-short")[0]["message_id"]])
    check_long(records[ws.of("ws-long")[0]["message_id"]], ws.text("ws-long"))

    draining = svc.events("service.draining")
    assert [(e["cause"], e["live_streams"]) for e in draining] == [("SIGTERM", 5)]
    stopping = svc.events("service.stopping_streams")
    assert [(e["cause"], e["live_streams"]) for e in stopping] == [("drain_timeout", 2)]
    assert len(svc.events("stream.ended", outcome="completed")) == 3
    assert len(svc.events("stream.ended", outcome="cancelled", reason="shutdown")) == 2
    assert svc.events("ws.closed", reason="shutdown", code=1001)
    assert svc.events("service.stopped", signals=["SIGTERM"])


async def test_sigint_drains_the_same_way(services, fake_openai, token_for, db):
    """Ctrl-C locally (``make run`` forwards it as SIGINT) is the same graceful stop."""
    drain_s = 1.5
    [svc] = await services.start("a", drain_timeout_s=drain_s)
    async with session(svc, token_for("alice")) as http:
        short = await sse_turn(http, fake_openai, await new_chat(http), short_script())
        long = await sse_turn(http, fake_openai, await new_chat(http), long_script())
        sent = svc.send(signal.SIGINT)
        assert (await wait_not_ready(http))["error"]["code"] == "shutting_down"
        fake_openai.gate.set()
        done = await short.finished()
        assert done is not None and done["event"] == "done" and short.text == "".join(SHORT)
        await long.finished(drain_s + EXIT_MARGIN_S)
        check_sse_shutdown(long)
        assert await svc.wait_exit(drain_s + EXIT_MARGIN_S) == 0
    assert time.monotonic() - sent < drain_s + EXIT_MARGIN_S
    records = {m["_id"]: m for m in await assert_all_final(db, "alice")}
    check_short(records[short.message_id])
    check_long(records[long.message_id], long.text)
    assert svc.events("service.draining", cause="SIGINT")


async def test_second_signal_stops_live_streams_at_once(services, fake_openai, token_for, db):
    """An operator who does not want to wait the drain out sends the signal again."""
    drain_s = 60.0
    [svc] = await services.start("a", drain_timeout_s=drain_s)
    async with session(svc, token_for("alice")) as http:
        long = await sse_turn(http, fake_openai, await new_chat(http), long_script())
        ws = await open_ws(http)
        sent = svc.send(signal.SIGTERM)
        await wait_not_ready(http)
        svc.send(signal.SIGINT)
        await long.finished(EXIT_MARGIN_S)
        check_sse_shutdown(long)
        assert await ws.closed() == aiohttp.WSCloseCode.GOING_AWAY
        assert await svc.wait_exit(EXIT_MARGIN_S) == 0
    assert time.monotonic() - sent < EXIT_MARGIN_S  # far below DRAIN_TIMEOUT_S
    records = {m["_id"]: m for m in await assert_all_final(db, "alice")}
    check_long(records[long.message_id], long.text)
    assert svc.events("service.drain_cut_short", signal="SIGINT")
    assert svc.events("service.stopping_streams", cause="second_signal", live_streams=1)

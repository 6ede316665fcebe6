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

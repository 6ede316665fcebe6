"""The group commit of final writes: turns that end together are settled and written in a few
commands, not two each, and every one is billed exactly once."""

from __future__ import annotations

import asyncio

from service.app import create_app
from service.keys import STORE
from tests.fake_openai import Script
from tests.faults import calls, settled

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


async def test_turns_ending_together_share_their_final_writes(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings()))
    db = client.app[STORE].db
    fake_openai.default = Script(chunks=["x ", "y"], gate_after=1, usage=(10, 2))
    turns = 12
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=BODY, headers=auth()) for _ in range(turns))
    )
    assert [r.status for r in responses] == [200] * turns
    before = calls("finish_many")
    fake_openai.gate.set()  # every turn ends at once
    bodies = await asyncio.gather(*(r.read() for r in responses))
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    groups = calls("finish_many") - before
    assert 1 <= groups < turns / 2  # a few groups, not one write per turn
    await settled(db)
    records = await db.messages.find({"role": "assistant"}).to_list(None)
    assert [r["status"] for r in records] == ["complete"] * turns
    usage = await db.usage.find_one({"user_id": "alice"})
    assert usage["used"] == turns * 12  # each billed once
    assert sorted(usage["settled"]) == sorted(r["_id"] for r in records)

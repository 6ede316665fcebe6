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


async def test_the_rollup_is_written_by_the_replica_s_round_and_at_shutdown(
    aiohttp_client, stream_settings, fake_openai, auth, db
):
    """A turn's final write does not write the analytics' rollup: the replica adds its turns'
    increments up and writes them with its checkpoint round (here: never during the test), and
    at shutdown; then the rollup counts every turn once."""
    client = await aiohttp_client(create_app(stream_settings(checkpoint_interval_s=3600)))
    fake_openai.default = Script(chunks=["x"], usage=(10, 2))
    before = calls("roll_up")
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    await settled(db)
    assert calls("roll_up") == before  # no command per turn, nor per group
    assert await db.usage_rollup.count_documents({}) == 0
    await client.close()  # shutdown: what the replica held is written
    totals = await db.usage_rollup.find_one({"user_id": None})
    assert sum(line["turns"] for line in totals["lines"].values()) == 3
    mine = await db.usage_rollup.find_one({"user_id": "alice"})
    assert sum(line["prompt"] for line in mine["lines"].values()) == 30

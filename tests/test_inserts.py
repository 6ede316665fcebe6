"""The group commit of new turns' records: the turns that start while an insert runs share the
next one; a record MongoDB refuses fails its own turn only."""

from __future__ import annotations

import asyncio

from service.app import create_app
from service.errors import ServiceError
from service.keys import REGISTRY, STORE
from service.store import Store
from service.stream.groups import RecordInserts
from tests.fake_openai import Script
from tests.faults import calls, settled
from tests.processes import wait_until

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


async def test_turns_starting_while_an_insert_runs_share_the_next_one(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    client = await aiohttp_client(create_app(stream_settings()))
    store, registry = client.app[STORE], client.app[REGISTRY]
    insert, go = store.insert_messages, asyncio.Event()

    async def slow(groups):  # MongoDB slow to answer: the turns starting meanwhile queue up
        await go.wait()
        return await insert(groups)

    monkeypatch.setattr(store, "insert_messages", slow)
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2))
    turns = 12
    before = calls("insert_messages")
    posts = [
        asyncio.ensure_future(client.post("/v1/chat/completions", json=BODY, headers=auth()))
        for _ in range(turns)
    ]
    await wait_until(lambda: len(registry.streams) == turns)  # all admitted, none written
    go.set()
    responses = await asyncio.gather(*posts)
    bodies = await asyncio.gather(*(r.read() for r in responses))
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    # two inserts were running (the first turns'), the other ten turns went in one more
    assert calls("insert_messages") - before <= 3
    await settled(store.db)
    records = await store.db.messages.find({"role": "assistant"}).to_list(None)
    assert [r["status"] for r in records] == ["complete"] * turns
    assert [r["content"] for r in records] == ["x y"] * turns


async def test_a_refused_record_fails_its_own_turn_only(db, logs):
    """Three turns in one insert; one's record is refused (its id is taken): that turn fails,
    the other two are written."""
    store = Store(db)
    await store.messages.insert_one({"_id": "taken", "chat_id": None, "seq": None})
    before = calls("insert_messages")
    inserts = RecordInserts(store, lambda task: None)
    docs = [[{"_id": mid, "chat_id": None, "seq": None}] for mid in ("a", "taken", "b")]
    outcomes = await asyncio.gather(*(inserts.insert(d) for d in docs), return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ServiceError) and outcomes[1].status == 500
    assert calls("insert_messages") - before == 1  # one command for the three
    assert {d["_id"] for d in await store.messages.find({}).to_list(None)} == {"a", "b", "taken"}
    refused = [line for line in logs if line["event"] == "stream.records_refused"]
    assert [line["message_id"] for line in refused] == ["taken"]


async def test_records_that_cannot_be_sent_fail_their_own_turn_only(db, logs):
    """A turn's records the driver cannot send at all (here: a value BSON cannot encode) fail
    the whole command; the group is written again turn by turn, so only that turn fails."""
    store = Store(db)
    inserts = RecordInserts(store, lambda task: None)
    docs = [
        [{"_id": "a", "chat_id": None, "seq": None}],
        [{"_id": "bad", "chat_id": None, "seq": None, "content": object()}],
        [{"_id": "b", "chat_id": None, "seq": None}],
    ]
    outcomes = await asyncio.gather(*(inserts.insert(d) for d in docs), return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ServiceError) and outcomes[1].status == 500
    assert {d["_id"] for d in await store.messages.find({}).to_list(None)} == {"a", "b"}
    refused = [line for line in logs if line["event"] == "stream.records_refused"]
    assert [line["message_id"] for line in refused] == ["bad"]

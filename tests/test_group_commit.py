"""The group commit of final writes: turns that end together are settled and written in a few
commands, not two each, and every one is billed exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo import monitoring

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import STORE
from service.store import REPLICA_WORK, Rollup, utcnow
from service.stream.finals import RollupBuffer
from tests.fake_openai import Script
from tests.faults import answers_lost, calls, rolled_up, settled
from tests.sse_client import collect

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


class Commands(monitoring.CommandListener):
    """Every command a client sends to MongoDB for a turn (not the replica's own), by
    database, as ``name:collection``."""

    def __init__(self) -> None:
        self.by_db: dict[str, list[str]] = {}  # only the databases a test asked for

    def watch(self, db: str) -> list[str]:
        return self.by_db.setdefault(db, [])

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        sent = self.by_db.get(event.database_name)
        target = event.command.get(event.command_name)
        if sent is None or event.command.get("comment") == REPLICA_WORK:  # the watcher's
            return
        if isinstance(target, str):  # a collection's command, not the driver's housekeeping
            sent.append(f"{event.command_name}:{target}")

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


COMMANDS = Commands()
monitoring.register(COMMANDS)  # clients created from now on report to it (each test: its db)


async def test_a_turn_ending_alone_is_settled_and_written_in_two_commands(
    aiohttp_client, stream_settings, fake_openai, auth, db_name
):
    """At low load a group of final writes is one turn: its settlement is one update, which
    returns the usage it leaves, so no read follows (settle, finish: two commands, not three);
    the final event's budget is that usage."""
    client = await aiohttp_client(create_app(stream_settings()))
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2))
    headers = auth()
    resp = await client.post("/api/chat", headers=headers)
    chat_id = (await resp.json())["chat_id"]
    sent = COMMANDS.watch(db_name)
    before = len(sent)
    resp = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=headers
    )
    done: dict[str, Any] = next(e for e in await collect(resp) if e["event"] == "done")["data"]
    turn = sent[before:]
    final = turn[len(turn) - turn[::-1].index("insert:messages") :]  # after the records' insert
    assert final == ["findAndModify:usage", "update:messages"]  # settle (the usage), finish
    usage = await client.app[STORE].usage.find_one({"user_id": "alice"})
    assert usage["used"] == 12 and usage["reserved"] == 0
    assert done["budget"]["remaining"] == done["budget"]["limit"] - 12


async def test_a_rollup_round_whose_answer_was_lost_is_not_counted_twice(
    aiohttp_client, stream_settings, monkeypatch
):
    """A round of the rollup's increments that MongoDB applied but whose answer was lost is
    kept and sent again at the next round: the analytics count its turns once (each document
    holds the round's mark and skips it), and what ended meanwhile goes in the round after."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    rollups = RollupBuffer(replica="r1")

    def line(cost: int) -> Rollup:
        day = utcnow().date().isoformat()
        return Rollup(day, "alice", "demo", None, "completed", 10, 5, 0, 0, cost)

    rollups.add([line(1000)])
    real = store.roll_up
    lost = []

    async def answer_lost(*args: Any, **kwargs: Any) -> None:
        await real(*args, **kwargs)
        if not lost:
            lost.append(args)
            raise StoreUnavailable("the database is unavailable; try again shortly")

    monkeypatch.setattr(store, "roll_up", answer_lost)
    with pytest.raises(StoreUnavailable):
        await rollups.flush(store)
    rollups.add([line(7)])  # a turn ended meanwhile
    assert len(rollups) == 2
    assert await rollups.flush(store) == 1  # the round in doubt, as it was
    assert await rollups.flush(store) == 1  # then the next
    assert len(rollups) == 0
    for user in ("alice", None):
        doc = await store.rollup.find_one({"user_id": user})
        (counters,) = doc["lines"].values()
        assert (counters["turns"], counters["cost"]) == (2, 1007)


async def test_a_final_write_retried_after_its_answer_was_lost_keeps_its_rollup_line(
    aiohttp_client, stream_settings, fake_openai, auth, db, monkeypatch
):
    """A turn's final write that MongoDB applied (the record ended) but whose answer was lost
    waits in the pending queue; its retry finds the record ended by that very write and counts
    the turn in the rollup, which no one else would (the reaper rolls up only what it ends)."""
    client = await aiohttp_client(create_app(stream_settings(checkpoint_interval_s=0.1)))
    store = client.app[STORE]
    fake_openai.default = Script(chunks=["x"], usage=(10, 2))
    finish_many = answers_lost(monkeypatch, store, "finish_many")
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    monkeypatch.setattr(store, "finish_many", finish_many)
    await settled(db)
    await rolled_up(db, deadline_s=5)
    record = await db.messages.find_one({"role": "assistant"})
    assert record["status"] == "complete"
    assert (await db.usage.find_one({"user_id": "alice"}))["used"] == 12  # billed once


async def test_a_rollup_document_mongodb_refuses_does_not_hold_up_the_others(
    aiohttp_client, stream_settings, logs
):
    """A rollup document MongoDB refuses for itself (here one whose ``lines`` is not an object:
    the same round again would be refused again) is logged and left out; the round's other
    documents are counted, and the round is not sent again for ever, holding up the next."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    day = utcnow().date().isoformat()
    await store.rollup.insert_one({"month": day[:7], "user_id": None, "lines": "not an object"})
    rollups = RollupBuffer(replica="r1")
    rollups.add([Rollup(day, "alice", "demo", None, "completed", 10, 5, 0, 0, 3)])
    assert await rollups.flush(store) == 1 and len(rollups) == 0
    (counters,) = (await store.rollup.find_one({"user_id": "alice"}))["lines"].values()
    assert counters["turns"] == 1
    (refused,) = [e for e in logs if e["event"] == "stream.rollup_refused"]
    assert (refused["month"], refused["user_id"]) == (day[:7], None)


async def test_a_round_landing_after_a_later_one_is_counted_once(client):
    """A replica's rounds are marked in each document (``applied.<replica>``): a copy of round
    1 that MongoDB applies after round 2 (the watcher cancelled at shutdown while the driver's
    thread still ran round 1's bulk, the shutdown's flush sending round 1 again, then round 2)
    is not counted again (found by review)."""
    store = client.app[STORE]
    day = utcnow().date().isoformat()

    def line(cost: int) -> Rollup:
        return Rollup(day, "alice", "demo", None, "completed", 10, 5, 0, 0, cost)

    await store.roll_up([line(1)], mark=("r1", 1))
    await store.roll_up([line(10)], mark=("r1", 2))
    await store.roll_up([line(1)], mark=("r1", 1))  # the late copy of round 1
    doc = await store.rollup.find_one({"user_id": "alice"})
    assert sum(c["turns"] for c in doc["lines"].values()) == 2


async def test_a_round_a_primary_stepping_down_refused_is_sent_again_not_dropped(client):
    """A document's write error of the moment (a primary stepping down mid-bulk) keeps the
    round, sent again as it was and counted once; only a document MongoDB refuses for itself
    is left out (found by review: every error but a duplicate key dropped its increments)."""
    from pymongo.errors import BulkWriteError

    store = client.app[STORE]
    day = utcnow().date().isoformat()
    rollups = RollupBuffer(replica="r1")
    rollups.add([Rollup(day, "alice", "demo", None, "completed", 10, 5, 0, 0, 7)])
    collection = store.rollup
    real = collection.bulk_write

    async def stepped_down(requests, **kwargs):
        collection.bulk_write = real
        await real(requests[1:], **kwargs)  # the others applied; the first refused
        error = {"index": 0, "code": 189, "errmsg": "primary stepped down"}
        raise BulkWriteError({"writeErrors": [error], "nInserted": 0})

    collection.bulk_write = stepped_down
    with pytest.raises(BulkWriteError):
        await rollups.flush(store)
    assert await rollups.flush(store) == 1  # the same round again
    docs = await store.rollup.find({}).to_list(None)
    assert len(docs) == 2  # the user's month and the month's totals, each counted once
    assert all(sum(c["turns"] for c in d["lines"].values()) == 1 for d in docs)

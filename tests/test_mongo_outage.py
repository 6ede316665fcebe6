"""An unreachable MongoDB makes requests fail fast with 503, never hang, and /readyz reports it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from pymongo import monitoring

from service.app import create_app
from service.keys import STORE
from tests.mongo_server import MongoServer
from tests.processes import eventually


@pytest.fixture
def own_mongo():
    """A server of the test's own, to stop, kill and restart: no acknowledged write is lost
    (as on a real replica set), whatever way it goes down."""
    server = MongoServer(durable=True)
    server.start()
    yield server
    server.close()


def outage_settings(make_settings: Any, own_mongo: Any, fake_openai: Any, **extra: Any) -> Any:
    """A replica of the test's own MongoDB, streaming from the fake upstream, whose watcher,
    reaper and MongoDB deadline are quick: the outages below end in seconds."""
    from tests.conftest import TEST_MODELS

    return make_settings(
        mongodb_uri=own_mongo.uri,
        mongodb_timeout_ms=800,
        models=json.dumps(TEST_MODELS),
        default_model="gpt-test",
        openai_base_url=fake_openai.url,
        watch_interval_s=0.1,
        stale_stream_s=1.0,
        reaper_interval_s=0.2,
        **extra,
    )


async def test_stopped_mongodb_gives_fast_503_and_recovers(
    aiohttp_client, make_settings, auth, own_mongo, logs
):
    settings = make_settings(mongodb_uri=own_mongo.uri, mongodb_timeout_ms=1000)
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/api/chat", headers=auth())).status == 201

    own_mongo.stop()

    started = time.monotonic()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "database_unavailable"
    assert time.monotonic() - started < 3.0
    ready = [e for e in logs if e["event"] == "http.request" and e["path"] == "/readyz"]
    assert ready[-1]["status"] == 503 and ready[-1]["error_code"] == "database_unavailable"

    started = time.monotonic()
    resp = await client.get("/api/chat", headers=auth())
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["code"] == "database_unavailable"
    assert time.monotonic() - started < 3.0  # the configured 1 s selection timeout, not 30 s

    own_mongo.start()
    deadline = time.monotonic() + 15
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "did not recover after MongoDB came back"
    listed = await (await client.get("/api/chat", headers=auth())).json()
    assert len(listed["chats"]) == 1  # data survived the restart


async def test_starts_while_mongodb_is_down(aiohttp_client, make_settings, auth, own_mongo):
    """A pod whose database is down starts, reports not-ready, and serves once it is back."""
    own_mongo.stop()
    settings = make_settings(mongodb_uri=own_mongo.uri, mongodb_timeout_ms=500)
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    own_mongo.start()
    deadline = time.monotonic() + 15
    while (await client.post("/api/chat", headers=auth())).status != 201:
        assert time.monotonic() < deadline
    store = client.app[STORE]
    names = {i["name"] async for i in await store.usage.list_indexes()}
    assert "user_period" in names  # the unique index the budget relies on exists after recovery


async def test_down_at_start_readyz_and_every_call_keep_their_bound(
    aiohttp_client, make_settings, auth
):
    """MongoDB unreachable at start-up (a closed port): the indexes still to make do not add
    their own wait to a call's. /readyz answers 503 within its second and a store call raises
    ``StoreUnavailable`` within MONGODB_TIMEOUT_MS, each time (the indexes are tried again off
    the call's path)."""
    from service.api.health import READY_TIMEOUT_S
    from service.errors import StoreUnavailable
    from tests.mongo_server import free_port

    timeout_s = 1.0
    uri = f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0"
    settings = make_settings(mongodb_uri=uri, mongodb_timeout_ms=int(timeout_s * 1000))
    client = await aiohttp_client(create_app(settings))
    store = client.app[STORE]
    slack = 0.7  # a busy machine; making the indexes first took a whole timeout more
    for _ in range(2):
        started = time.monotonic()
        resp = await client.get("/readyz")
        took = time.monotonic() - started
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "database_unavailable"
        assert took < READY_TIMEOUT_S + slack, f"/readyz: {took:.2f} s"

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get_chat("alice", "c1")
        took = time.monotonic() - started
        assert took < timeout_s + slack, f"a store call: {took:.2f} s against {timeout_s} s"

        started = time.monotonic()
        resp = await client.get("/api/chat", headers=auth())
        took = time.monotonic() - started
        assert resp.status == 503
        assert took < timeout_s + slack, f"a request: {took:.2f} s against {timeout_s} s"
    assert not store.indexes_ready


async def test_a_turn_that_ends_while_mongodb_is_down_is_finalized_when_it_is_back(
    aiohttp_client, make_settings, auth, own_mongo, fake_openai, logs
):
    """The client is told ``done``; MongoDB is away at that moment; the replica keeps the final
    write and retries it once MongoDB answers again: the record ends ``complete`` with the
    upstream's exact usage (not ``interrupted`` by the reaper), the reservation is released."""

    from service.keys import REGISTRY
    from tests.fake_openai import Script
    from tests.faults import active_streams, settled, unretrieved_task_exceptions
    from tests.sse_client import events, text_of

    settings = outage_settings(make_settings, own_mongo, fake_openai)
    with unretrieved_task_exceptions() as unretrieved:
        gauge = active_streams()
        client = await aiohttp_client(create_app(settings))
        h = auth()
        chat_id = (await (await client.post("/api/chat", headers=h)).json())["chat_id"]
        fake_openai.default = Script(chunks=["all ", "of ", "it"], usage=(12, 3), gate_after=1)
        resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h)
        seen = []
        async for event in events(resp):
            seen += [event] if "event" in event else []
            if event.get("event") == "delta":  # the records exist: kill MongoDB now
                own_mongo.kill()
                fake_openai.gate.set()
        assert seen[-1]["event"] == "done", seen[-1]
        assert seen[-1]["data"]["status"] == "complete"
        assert text_of(seen) == "all of it"
        assert client.app[REGISTRY].pending  # the final write waits for MongoDB
        deferred = [e for e in logs if e["event"] == "stream.finalize_deferred"]
        assert deferred and deferred[0]["error"]  # the driver's own words, not only a code

        own_mongo.start()  # same port, same data
        await settled(client.app[STORE].db, registry=client.app[REGISTRY], gauge_before=gauge)
        record = await client.app[STORE].messages.find_one(
            {"chat_id": chat_id, "role": "assistant"}
        )
        assert record["status"] == "complete" and record["content"] == "all of it"
        assert record["tokens"] == {
            "prompt": 12,
            "completion": 3,
            "total": 15,
            "source": "upstream",
        }
        usage = await client.app[STORE].usage.find_one({"user_id": "alice"})
        assert usage["used"] == 15 and usage["reserved"] == 0
        assert not client.app[REGISTRY].pending
        assert any(e["event"] == "stream.finalize_retried" for e in logs)
    assert unretrieved == []


async def test_the_timeout_bounds_a_whole_operation_retries_included(
    aiohttp_client, make_settings, auth, own_mongo
):
    """MONGODB_TIMEOUT_MS bounds the whole operation (server selection, the socket read, the
    retry of a retryable write), so a turn asked for while the database hangs (restarting,
    not answering on its open connections) answers 503 in about that time, not 3-6x it."""
    settings = make_settings(mongodb_uri=own_mongo.uri, mongodb_timeout_ms=1000)
    client = await aiohttp_client(create_app(settings))
    h = auth()
    chat_id = (await (await client.post("/api/chat", headers=h)).json())["chat_id"]
    own_mongo.hang()  # connections open, no answers
    try:
        for path, body in ((f"/api/chat/{chat_id}/message", {"message": "Hi"}), ("/api/chat", {})):
            started = time.monotonic()
            resp = await client.post(path, json=body, headers=h)
            took = time.monotonic() - started
            assert resp.status == 503, await resp.text()
            assert (await resp.json())["error"]["code"] == "database_unavailable"
            assert took < 1.6, f"{path}: {took:.2f} s against a 1 s MONGODB_TIMEOUT_MS"
    finally:
        own_mongo.unhang()


class FindChats(monitoring.CommandListener):
    """How many ``find`` commands on ``chats`` were sent (started on a connection)."""

    def __init__(self, db_name: str) -> None:
        self.db_name = db_name
        self.sent = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if (event.database_name, event.command_name) == (self.db_name, "find"):
            self.sent += event.command.get("find") == "chats"

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_calls_waiting_for_a_pooled_connection_answer_503_at_their_own_timeout(
    aiohttp_client, make_settings, auth, own_mongo, db_name
):
    """A hung server holds the pool's one connection up to the timeout: the calls queued behind
    it fail at MONGODB_TIMEOUT_MS from when each was made, not one timeout after another, and
    none of their commands is sent once the server answers again."""
    sent = FindChats(db_name)
    monitoring.register(sent)  # global: the app's client is made after this
    settings = make_settings(
        mongodb_uri=own_mongo.uri,
        mongodb_max_pool_size=1,
        mongodb_timeout_ms=1000,
    )
    client = await aiohttp_client(create_app(settings))
    h = auth()
    assert (await client.get("/api/chat", headers=h)).status == 200
    own_mongo.hang()  # connections open, no answers
    try:

        async def listed() -> tuple[int, float]:
            started = time.monotonic()
            resp = await client.get("/api/chat", headers=h)
            assert (await resp.json())["error"]["code"] == "database_unavailable"
            return resp.status, time.monotonic() - started

        answers = await asyncio.wait_for(asyncio.gather(*(listed() for _ in range(4))), 10)
        assert [status for status, _ in answers] == [503] * 4
        assert max(took for _, took in answers) < 1.6, answers  # four in a row would take 4 s
    finally:
        own_mongo.unhang()

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(ready, what="the server answering again")
    before = sent.sent
    assert (await client.get("/api/chat", headers=h)).status == 200
    # The pool's one connection serves in order: a queued command, had it stayed queued, would
    # have been sent before this one.
    assert sent.sent == before + 1


async def test_the_log_says_why_mongodb_is_unreachable_and_when_it_is_back(
    aiohttp_client, make_settings, own_mongo, logs
):
    """Start-up's warning and every failed round of the watcher carry the driver's own error
    (which host, what failed), not only a code; one line says when MongoDB answers again."""
    from service.keys import REGISTRY
    from tests.processes import eventually

    own_mongo.stop()
    host = own_mongo.uri.split("//", 1)[1].split("/", 1)[0]
    settings = make_settings(mongodb_uri=own_mongo.uri, mongodb_timeout_ms=500)
    client = await aiohttp_client(create_app(settings))
    (startup,) = [e for e in logs if e["event"] == "mongodb.unavailable_at_startup"]
    assert startup["error"].startswith("ServerSelectionTimeoutError: "), startup
    assert host in startup["error"] and len(startup["error"]) <= 301

    async def watch_failed() -> bool:
        return any(e["event"] == "stream.watch_failed" for e in logs)

    await eventually(watch_failed, what="a failed round of the watcher")
    failed = next(e for e in logs if e["event"] == "stream.watch_failed")
    assert failed["code"] == "database_unavailable", failed
    assert failed["error"].startswith(("ServerSelectionTimeoutError: ", "TimeoutError")), failed
    assert not any(e["event"] == "mongodb.available_again" for e in logs)

    own_mongo.start()

    async def back() -> bool:
        return any(e["event"] == "mongodb.available_again" for e in logs)

    await eventually(back, deadline_s=15, what="the line saying MongoDB is back")
    assert not client.app[REGISTRY].store_failing
    assert [e["event"] for e in logs].count("mongodb.available_again") == 1


async def test_a_final_write_given_up_is_settled_by_its_own_live_replica(
    aiohttp_client, make_settings, auth, own_mongo, fake_openai, logs
):
    """Past its bound, the queue of final writes waiting for MongoDB gives the oldest up "to
    the reaper" (``stream.finalize_given_up``). Its replica is alive, so no other replica
    takes its turns for dead: its own reaper settles such a record (``interrupted``, its
    checkpoint), or it stayed ``streaming`` and its reservation held for the replica's life.
    Programs' turns (a lease's) have no other way out; a page turn's reservation only after
    UPSTREAM_TOTAL_TIMEOUT_S."""

    from service.keys import REGISTRY
    from tests.fake_openai import Script
    from tests.faults import settled

    settings = outage_settings(make_settings, own_mongo, fake_openai, checkpoint_interval_s=0.1)
    client = await aiohttp_client(create_app(settings))
    registry = client.app[REGISTRY]
    registry.pending.limit = 0  # what 10,000 writes waiting would do to the oldest: given up
    h = auth()
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    fake_openai.default = Script(chunks=["all ", "of ", "it"], usage=(12, 3), gate_after=2)
    resp = await client.post("/v1/chat/completions", json=body, headers=h)
    assert resp.status == 200
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
    messages = client.app[STORE].messages

    async def checkpointed() -> bool:
        doc = await messages.find_one({"role": "assistant"})
        return doc is not None and doc["content"] == "all of "

    await eventually(checkpointed, 5, "the checkpoint")
    own_mongo.kill()
    fake_openai.gate.set()
    assert "[DONE]" in await resp.text()  # the client was told its end
    assert any(e["event"] == "stream.finalize_given_up" for e in logs)
    own_mongo.start()  # same port, same data
    await settled(client.app[STORE].db, registry=registry)
    record = await messages.find_one({"role": "assistant"})
    assert record["status"] == "interrupted" and record["content"] == "all of "
    usage = await client.app[STORE].usage.find_one({"user_id": "alice"})
    assert usage["used"] == record["tokens"]["total"] > 0 and usage["reserved"] == 0

    async def logged() -> bool:  # said once its rollup is written, after the record
        return any(e["event"] == "stream.ended" and e.get("outcome") == "interrupted" for e in logs)

    await eventually(logged, 5, "the interrupted turn's stream.ended")

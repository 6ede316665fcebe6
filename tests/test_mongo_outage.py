"""An unreachable MongoDB makes requests fail fast with 503, never hang, and /readyz reports it."""

from __future__ import annotations

import time

import pytest

from service.app import create_app
from service.keys import STORE
from tests.mongo_server import MongoServer


@pytest.fixture
def own_mongo():
    server = MongoServer()
    server.start()
    yield server
    server.close()


async def test_stopped_mongodb_gives_fast_503_and_recovers(
    aiohttp_client, make_settings, auth, own_mongo
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
    names = {i["name"] async for i in store.usage.list_indexes()}
    assert "user_period" in names  # the unique index the budget relies on exists after recovery

"""Shared fixtures: a real SecantusDB process, a fresh database per test, the app on a socket."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from service.app import create_app
from service.auth import mint_token
from service.logs import configure_logging, merge_request
from service.settings import Settings, load_settings
from tests.mongo_server import MongoServer

TEST_SECRET = "test-secret-" + "x" * 60


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging("json", "info", cache=False)


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[MongoServer]:
    server = MongoServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def _dropper(mongo_server: MongoServer) -> Iterator[Any]:
    """One client for the session's drops (a client of its own per test took ~10 ms more)."""
    import pymongo

    with pymongo.MongoClient(mongo_server.uri, serverSelectionTimeoutMS=10_000) as client:
        yield client


@pytest.fixture
def db_name(_dropper: Any) -> Iterator[str]:
    """A database of this test's own, dropped afterwards: the session's one SecantusDB keeps
    every database in memory, and the big answers some tests store would otherwise slow it
    down for every test after them."""
    name = "t_" + uuid.uuid4().hex[:16]
    yield name
    _dropper.drop_database(name)


@pytest.fixture
def make_settings(mongo_server: MongoServer, db_name: str, tmp_path: Any):
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "mongodb_uri": mongo_server.uri,
            "mongodb_db": db_name,
            "jwt_secret": TEST_SECRET,
            "data_dir": tmp_path / "data",
            "mongodb_timeout_ms": 1500,
            "message_rate_limit_ms": 0,
            "lease_idle_s": 0.1,  # leases go back at once: tests see the month as settled
            "lease_keep_s": 0.1,
        }
        values.update(overrides)
        return load_settings(**values)

    return factory


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def token_for(settings: Settings):
    def factory(user: str, **kw: Any) -> str:
        return mint_token(settings, user, **kw)

    return factory


@pytest.fixture
def auth(token_for):
    def factory(user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(user)}"}

    return factory


@pytest.fixture
async def client(aiohttp_client, settings: Settings):
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event of the test, with its bound context (request id, stream ids...)."""
    capture = structlog.testing.LogCapture()
    saved = structlog.get_config()
    structlog.configure(
        processors=[
            merge_request,
            structlog.processors.add_log_level,
            capture,
        ]
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


@pytest.fixture
async def fake_openai():
    from tests.fake_openai import FakeOpenAI

    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()


TEST_MODELS = [
    {
        "name": "gpt-test",
        "provider": "openai",
        "upstream_id": "gpt-4o-mini",
        "context_window": 16000,
        "max_output_tokens": 256,
    },
    {"name": "demo", "provider": "demo", "context_window": 8000, "max_output_tokens": 512},
]


@pytest.fixture
def stream_settings(make_settings, fake_openai):
    """Settings for stream tests: the fake upstream as the default model, short timeouts."""
    import json

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "models": json.dumps(TEST_MODELS),
            "default_model": "gpt-test",
            "openai_base_url": fake_openai.url,
            "openai_api_key": "sk-upstream-secret",
            "upstream_retry_base_s": 0.01,
            "upstream_retry_max_s": 0.05,
            "upstream_idle_timeout_s": 5.0,
            "watch_interval_s": 0.1,
            "demo_token_delay_ms": 1,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


@pytest.fixture
async def stream_client(aiohttp_client, stream_settings):
    return await aiohttp_client(create_app(stream_settings()))


# ---------------------------------------------------------------- real service processes
@pytest.fixture
async def services(mongo_server, db_name, fake_openai, tmp_path):
    """Start ``python -m service serve`` processes on this test's database (tests/processes.py)."""
    from tests.processes import ServiceProcesses

    procs = ServiceProcesses(
        mongodb_uri=mongo_server.uri,
        mongodb_db=db_name,
        upstream_url=fake_openai.url,
        workdir=tmp_path,
    )
    yield procs
    procs.close()


@pytest.fixture
async def db(mongo_server, db_name):
    """This test's database, read directly (what the service processes wrote)."""
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_server.uri)
    yield client[db_name]
    await client.close()

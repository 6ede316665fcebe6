"""Shared fixtures: a real SecantusDB process, a fresh database per test, the app on a socket."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from service.app import create_app
from service.auth import mint_token
from service.logs import configure_logging
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


@pytest.fixture
def db_name() -> str:
    return "t_" + uuid.uuid4().hex[:16]


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
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            capture,
        ]
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)

"""The page's browser tests' fixtures: one Chromium for the whole session, the app on a real port.

Starting Playwright's driver and Chromium took ~0.6 s a test, so one Chromium serves every test
and each test gets contexts of its own, closed after it (no cookie, storage or page is shared).
Playwright's objects belong to the event loop that made them: these tests and every async fixture
they use run in the session's loop (``pytest_collection_modifyitems`` and ``loop_scope`` below),
which is why the shared async fixtures they use are redefined here with that loop.

Needs Python Playwright (no browser download: Debian's ``chromium`` package is used). Without
them the tests skip locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from pytest_asyncio import is_async_test

from service.app import create_app
from tests.browser.test_page_browser import HEAD, TAIL
from tests.fake_openai import FakeOpenAI, Script
from tests.tcp_proxy import TcpProxy

HERE = Path(__file__).parent

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SESSION = "session"  # the event loop these tests and their async fixtures run in


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    in_session_loop = pytest.mark.asyncio(loop_scope=SESSION)
    for item in items:
        if item.path.parent == HERE and is_async_test(item):
            item.add_marker(in_session_loop, append=False)  # before auto mode's own marker


def _missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Python playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    return None


class _Chromium:
    """The session's Chromium, launched again if it went away (a crash stops one test, not
    every test after it)."""

    def __init__(self, playwright: Any) -> None:
        self.playwright = playwright
        self.browser: Any = None

    async def get(self) -> Any:
        if self.browser is None or not self.browser.is_connected():
            self.browser = await self.playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
        return self.browser


@pytest_asyncio.fixture(scope="session", loop_scope=SESSION)
async def _chromium() -> AsyncIterator[_Chromium]:
    reason = _missing_browser()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = _Chromium(pw)
        try:
            yield chromium
        finally:
            if chromium.browser is not None:
                await chromium.browser.close()


@pytest_asyncio.fixture(loop_scope=SESSION)
async def browser(_chromium: _Chromium) -> AsyncIterator[Any]:
    """The session's Chromium; the contexts (pages) a test opened are closed after it."""
    chromium = await _chromium.get()
    yield chromium
    for context in chromium.contexts:
        await context.close()


@pytest_asyncio.fixture(loop_scope=SESSION)
async def aiohttp_client() -> AsyncIterator[Any]:
    """pytest-aiohttp's ``aiohttp_client`` (apps only), in the session's loop."""
    clients: list[TestClient[Any, Any]] = []

    async def go(app: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield go
    while clients:
        await clients.pop().close()


@pytest_asyncio.fixture(loop_scope=SESSION)
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()


@pytest_asyncio.fixture(loop_scope=SESSION)
async def db(mongo_server: Any, db_name: str) -> AsyncIterator[Any]:
    """This test's database, read directly (what the app wrote)."""
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_server.uri)
    yield client[db_name]
    await client.close()


@pytest.fixture
def serve(aiohttp_client, stream_settings):
    """The app on a real socket, with the dev token endpoint and the demo model."""

    async def factory(**overrides):
        values = {"dev_token_endpoint": True, "default_model": "demo", "demo_token_delay_ms": 15}
        values.update(overrides)
        return await aiohttp_client(create_app(stream_settings(**values)))

    return factory


@pytest.fixture
def serve_gated(serve, fake_openai):
    """The app with the fake upstream as its model, its answer held after HEAD until
    ``fake_openai.gate`` is set; checkpoints every 0.1 s so a reload finds HEAD saved."""

    async def factory(**overrides):
        fake_openai.default = Script(chunks=HEAD + TAIL, gate_after=len(HEAD), usage=(21, 12))
        values = {
            "default_model": "gpt-test",
            "checkpoint_interval_s": 0.1,
            "upstream_idle_timeout_s": 30.0,
        }
        values.update(overrides)
        return await serve(**values)

    return factory


@pytest_asyncio.fixture(loop_scope=SESSION)
async def network(serve_gated):
    """The gated app behind a TCP relay whose connections can be cut (``TcpProxy``)."""
    proxies = []

    async def factory(**overrides):
        client = await serve_gated(**overrides)
        proxy = TcpProxy("127.0.0.1", client.server.port)
        await proxy.start()
        proxies.append(proxy)
        return client, proxy

    yield factory
    for proxy in proxies:
        await proxy.close()

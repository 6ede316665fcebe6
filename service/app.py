"""The app factory: ``create_app(settings)`` only builds; ``serve`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from pymongo.errors import PyMongoError

from service import metrics
from service.api import chats, health, messages, openai_compat, page, ws
from service.auth import Authenticator
from service.keys import (
    AUTH,
    CATALOGUE,
    MODEL_LISTS,
    PRODUCER,
    REGISTRY,
    SETTINGS,
    STORE,
    UPSTREAM,
    WATCHER,
)
from service.middleware import add_request_id_header, authenticate, request_context
from service.model_lists import ModelLists
from service.models import load_catalogue
from service.providers.registry import Counters, build_providers, upstream_timeout
from service.settings import Settings
from service.store import Store, make_client
from service.stream.producer import TurnProducer
from service.stream.registry import StreamRegistry
from service.stream.watcher import watch
from service.tokens import load_encoding

log = structlog.get_logger("service.app")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = make_client(settings)
    store = Store(client[settings.mongodb_db])
    try:
        await store.ensure_indexes()
    except PyMongoError:
        # Start anyway: /readyz reports the outage and requests fail fast with 503 until it is back.
        log.warning("mongodb.unavailable_at_startup", db=settings.mongodb_db)
    app[STORE] = store
    yield
    client.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session for every upstream call, sized for the pod's stream capacity."""
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=settings.upstream_pool_size, limit_per_host=0)
    session = aiohttp.ClientSession(
        connector=connector, timeout=upstream_timeout(settings), read_bufsize=1 << 18
    )
    app[UPSTREAM] = session
    yield
    await session.close()


async def _streams_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    catalogue = app[CATALOGUE]
    for encoding in {m.encoding for m in catalogue.all() if m.encoding}:
        await asyncio.to_thread(load_encoding, encoding)  # ~0.5 s once; keep it off the loop
    registry = StreamRegistry()
    app[REGISTRY] = registry
    providers = build_providers(settings, app[UPSTREAM], catalogue)
    model_lists = ModelLists(providers, catalogue.all(), ttl_s=settings.model_list_ttl_s)
    model_lists.start()
    app[MODEL_LISTS] = model_lists
    app[PRODUCER] = TurnProducer(
        settings=settings,
        store=app[STORE],
        catalogue=catalogue,
        model_lists=model_lists,
        providers=providers,
        counter_for=Counters(),
        registry=registry,
    )
    watcher = asyncio.create_task(watch(app[STORE], registry, settings), name="stream-watcher")
    app[WATCHER] = watcher
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await model_lists.close()
    registry.cancel_all("shutdown")
    await registry.wait_idle(timeout_s=10)


async def _drain(app: web.Application) -> None:
    """on_shutdown: refuse new turns, let streams finish up to DRAIN_TIMEOUT_S, then stop them."""
    registry = app[REGISTRY]
    registry.draining = True
    settings = app[SETTINGS]
    if registry.streams:
        log.info(
            "service.draining",
            live_streams=len(registry.streams),
            timeout_s=settings.drain_timeout_s,
        )
    if not await registry.wait_idle(settings.drain_timeout_s):
        registry.cancel_all("shutdown")
        await registry.wait_idle(timeout_s=10)


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    app[AUTH] = await Authenticator.create(app[SETTINGS])
    yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_context, authenticate],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CATALOGUE] = load_catalogue(settings)
    app.cleanup_ctx.extend([_auth_ctx, _store_ctx, _upstream_ctx, _streams_ctx])
    app.on_response_prepare.append(add_request_id_header)
    app.on_shutdown.append(_drain)
    health.setup(app)
    chats.setup(app)
    messages.setup(app)
    openai_compat.setup(app)
    ws.setup(app)
    page.setup(app)
    metrics.setup(app)
    return app


def run(settings: Settings) -> None:
    app = create_app(settings)
    log.info(
        "service.starting",
        url=f"http://{settings.host}:{settings.port}",
        environment=settings.environment,
        mongodb_db=settings.mongodb_db,
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        shutdown_timeout=settings.drain_timeout_s + 5,
    )

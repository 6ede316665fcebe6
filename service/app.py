"""The app factory: ``create_app(settings)`` only builds; ``serve`` runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from pymongo.errors import PyMongoError

from service.api import chats, health
from service.auth import Authenticator
from service.keys import AUTH, SETTINGS, STORE
from service.middleware import add_request_id_header, authenticate, request_context
from service.settings import Settings
from service.store import Store, make_client

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


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    app[AUTH] = await Authenticator.create(app[SETTINGS])
    yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_context, authenticate],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.extend([_auth_ctx, _store_ctx])
    app.on_response_prepare.append(add_request_id_header)
    health.setup(app)
    chats.setup(app)
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

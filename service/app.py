"""The app factory: ``create_app(settings)`` only builds; ``serve`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from pymongo.errors import PyMongoError

from service import metrics
from service.api import (
    admin,
    admin_keys,
    anthropic_compat,
    branches,
    chats,
    feedback,
    health,
    keys,
    messages,
    models,
    openai_compat,
    page,
    search,
    ws,
)
from service.apikeys import ApiKeys
from service.auth import Authenticator
from service.errors import ServiceError
from service.http import BODY_TIMEOUT_S
from service.keys import (
    ADMISSIONS,
    API_KEYS,
    AUTH,
    CATALOGUE,
    HEARTBEATS,
    MODEL_LISTS,
    PRODUCER,
    REGISTRY,
    RESUMES,
    SETTINGS,
    STORE,
    UPSTREAM,
    WATCHER,
)
from service.listen import listen_error
from service.logs import error_text
from service.middleware import SERVER_NAME, add_request_id_header, request_context
from service.model_lists import ModelLists
from service.models import load_catalogue
from service.providers.registry import Counters, build_providers, upstream_timeout
from service.settings import Settings
from service.store import Store, make_client
from service.stream.idempotency import Admissions
from service.stream.leases import Leases
from service.stream.mirror import Resumes
from service.stream.producer import TurnProducer
from service.stream.registry import StreamRegistry
from service.stream.watcher import watch
from service.tokens import load_encoding
from service.transports.sse import Heartbeats

# Every response's Server header (aiohttp's default names Python's and aiohttp's versions): the
# answers aiohttp writes itself, to a request its parser refused (a bad request line, a header
# too long, broken chunking), run no app code and no on_response_prepare, and aiohttp has no
# hook for it but this module global. Set once, here, for every response of the process
# (tests/test_wire.py checks that aiohttp still reads it; aiohttp's client keeps its own copy
# for User-Agent, untouched).
aiohttp.web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]  # not exported

log = structlog.get_logger("service.app")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.mongodb_threads is not None:
        log.warning(
            "settings.retired",
            name="MONGODB_THREADS",
            reason="the MongoDB driver runs on the event loop: there are no threads to size",
        )
    client = make_client(settings)
    store = Store(client[settings.mongodb_db], idempotency_ttl_s=settings.idempotency_ttl_s)
    try:
        await store.ensure_indexes()
    except PyMongoError as exc:
        # Start anyway: /readyz reports the outage and requests fail fast with 503 until it is back.
        log.warning("mongodb.unavailable_at_startup", db=settings.mongodb_db, error=error_text(exc))
    app[STORE] = store
    yield
    await store.close()
    await client.close()


async def _api_keys_ctx(app: web.Application) -> AsyncIterator[None]:
    """API keys need the store; the Authenticator (built first) resolves them through it."""
    api_keys = app[API_KEYS] = ApiKeys(app[STORE], cache_s=app[SETTINGS].api_key_cache_s)
    app[AUTH].api_keys = api_keys
    yield
    await api_keys.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session for every upstream call, sized for the pod's stream capacity.
    It keeps no cookies: one user's call must not carry what an upstream (or its CDN) set on
    another's."""
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=settings.upstream_pool_size, limit_per_host=0)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=upstream_timeout(settings),
        read_bufsize=1 << 18,
        cookie_jar=aiohttp.DummyCookieJar(),
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
    # Unreachable at start-up is an outage like any other: no turn is judged dead until every
    # replica could write its heartbeat again, and its end is logged (``mongodb.available_again``).
    registry.store_failing = not app[STORE].indexes_ready
    registry.leases = Leases(
        app[STORE],
        registry.replica_id,
        idle_s=settings.lease_idle_s,
        keep_s=settings.lease_keep_s,
        track=registry.track,
    )
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
        leases=registry.leases,
    )
    watcher = asyncio.create_task(watch(app[STORE], registry, settings), name="stream-watcher")
    app[WATCHER] = watcher
    heartbeats = app[HEARTBEATS] = Heartbeats(registry, settings.sse_heartbeat_s)
    heartbeats.start()
    resumes = app[RESUMES] = Resumes(app[STORE], registry, settings)
    app[ADMISSIONS] = Admissions(app[PRODUCER], resumes, app[STORE])
    yield
    await resumes.close()
    await heartbeats.close()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await model_lists.close()
    registry.cancel_all("shutdown")
    await registry.wait_idle(timeout_s=10)
    if registry.pending:  # a last try at final writes MongoDB could not take
        await registry.pending.retry(app[STORE], registry.rollups)
        if registry.pending:
            log.error("service.final_writes_lost", pending=len(registry.pending))
    with contextlib.suppress(ServiceError):  # the rollup's last increments (logged if lost)
        await registry.rollups.flush(app[STORE], everything=True)
    if registry.rollups:
        log.error("service.rollup_lost", turns=len(registry.rollups))
    await registry.leases.release_idle(0.0, everything=True)  # the reaper's otherwise


FINALIZE_TIMEOUT_S = 10.0  # how long stopped streams get to save and bill their partial text
DRAIN_POLL_S = 0.05  # how often the drain looks whether the live streams have ended


def _begin_draining(app: web.Application, cause: str) -> None:
    """From this instant /readyz answers 503 and the producer refuses new turns; logged once."""
    registry = app[REGISTRY]
    if registry.draining:
        return
    registry.draining = True
    log.info(
        "service.draining",
        cause=cause,
        live_streams=len(registry.streams),
        timeout_s=app[SETTINGS].drain_timeout_s,
    )


async def drain(app: web.Application, hurry: asyncio.Event | None = None) -> None:
    """Refuse new turns, let live streams finish for up to DRAIN_TIMEOUT_S, then stop the rest
    (reason ``shutdown``: a terminal event, partial text saved and billed) and wait for every
    finalization, so MongoDB is never closed under a turn that still has to settle.

    The one drain for both ways a server stops: ``serve`` calls it on SIGTERM/SIGINT while the
    listener is still open; on_shutdown calls it for servers ``serve`` did not start (the tests'
    in-process servers), and after ``serve`` it finds nothing live and returns at once. ``hurry``
    (a second signal) ends the wait for live streams early.
    """
    _begin_draining(app, "shutdown")
    registry = app[REGISTRY]
    hurry = hurry or asyncio.Event()
    loop = asyncio.get_running_loop()
    end = loop.time() + app[SETTINGS].drain_timeout_s
    # Polls the stream table, waking at once on ``hurry`` (a second signal).
    while registry.streams and not hurry.is_set() and (left := end - loop.time()) > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), min(DRAIN_POLL_S, left))
    if registry.streams:
        log.info(
            "service.stopping_streams",
            live_streams=len(registry.streams),
            cause="second_signal" if hurry.is_set() else "drain_timeout",
        )
        registry.cancel_all("shutdown")
    await registry.wait_idle(FINALIZE_TIMEOUT_S)


async def _drain(app: web.Application) -> None:
    """on_shutdown: ``drain`` for servers not run by ``serve`` (a no-op after ``serve``'s)."""
    await drain(app)


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    auth = app[AUTH] = await Authenticator.create(app[SETTINGS])
    yield
    await auth.close()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_context],
        client_max_size=settings.max_body_bytes,
        # Bodies are decoded by service.http.read_body, the one place that knows which codings
        # we take and how large a body may grow (see BODY_CODINGS there).
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[BODY_TIMEOUT_S] = settings.request_body_timeout_s
    app[CATALOGUE] = load_catalogue(settings)
    app.cleanup_ctx.extend([_auth_ctx, _store_ctx, _api_keys_ctx, _upstream_ctx, _streams_ctx])
    app.on_response_prepare.append(add_request_id_header)
    app.on_shutdown.append(_drain)
    health.setup(app)
    chats.setup(app)
    feedback.setup(app)
    search.setup(app)
    keys.setup(app)
    messages.setup(app)
    branches.setup(app)
    openai_compat.setup(app)
    models.setup(app)
    anthropic_compat.setup(app)
    ws.setup(app)
    page.setup(app)
    admin.setup(app)
    admin_keys.setup(app)
    metrics.setup(app)
    return app


async def _listen(runner: web.AppRunner, settings: Settings) -> int:
    """Listen on HOST:PORT; the port it got (the system's choice for PORT=0)."""
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:  # taken since the CLI's check_listen_address: the same one line
        raise listen_error(exc, settings.host, settings.port) from None
    return next((int(address[1]) for address in runner.addresses), settings.port)


# The cyclic collector's youngest generation is collected once this many more container
# objects were allocated than freed, not Python's 700. A turn's objects are freed by their last
# reference (no turn leaves a cycle), yet the count drifts up by about a hundred a turn (a free
# that finds it at 0 is not counted), so at 700 the collector ran every few turns, each run
# walking the live turns' young objects and promoting them, for nothing: 90-100 us of a page
# turn's CPU at C=50; at 10,000, about 1 us (docs/performance.md, finding 35). What it can
# delay is cyclic garbage only (an error's traceback), at most this many objects.
YOUNG_COLLECTION_EVERY = 10_000


def settle_collector() -> None:
    """Once the service listens: what start-up made (modules, models, the app) lives as long as
    the process, so it leaves the collector's way (a full collection walks only what turns
    allocated since, docs/performance.md, finding 27); the youngest generation is collected
    every ``YOUNG_COLLECTION_EVERY`` allocations."""
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])


def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, drain, and return (the process then exits 0)."""
    asyncio.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Run the app with our own signal handlers instead of ``web.run_app``'s.

    ``run_app`` stops listening first and drains afterwards (in on_shutdown), so /readyz could
    never say 503 and clients on keep-alive connections got connection errors. Here the first
    signal flips the registry to draining at once (/readyz 503 ``shutting_down``, new turns
    refused) while the listener stays open; live streams get up to DRAIN_TIMEOUT_S, then are
    stopped as ``shutdown``; only then does ``runner.cleanup()`` close the listener and run
    on_shutdown (WebSockets closed with 1001 by the WebSocket module) and the cleanup contexts.
    A second signal cuts the wait for live streams short.
    """
    app = create_app(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    hurry = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if not stopping.is_set():
            stopping.set()
            if REGISTRY in app:  # started: refuse new turns from this instant
                _begin_draining(app, sig.name)
        elif not hurry.is_set():
            hurry.set()
            log.info("service.drain_cut_short", signal=sig.name)

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:  # before start-up, so a signal during it still means a clean stop
        loop.add_signal_handler(sig, on_signal, sig)
    log.info(
        "service.starting",
        url=f"http://{settings.host}:{settings.port}",
        environment=settings.environment,
        mongodb_db=settings.mongodb_db,
    )
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.drain_timeout_s + 5,
        keepalive_timeout=settings.keepalive_timeout_s,
    )
    try:
        await runner.setup()
        try:
            port = await _listen(runner, settings)
            log.info("service.listening", url=f"http://{settings.host}:{port}")
            settle_collector()
            await stopping.wait()
            _begin_draining(app, received[0])
            await drain(app, hurry)
        finally:
            await runner.cleanup()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("service.stopped", signals=received)

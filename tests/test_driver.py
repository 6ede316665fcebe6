"""The MongoDB driver runs on the event loop (PyMongo's asyncio API: no thread pool a command
waits for, docs/performance.md, finding 38); a retired setting for that pool is said, not
silently ignored. And the process's other setting made at start-up: the cyclic collector's."""

from __future__ import annotations

import asyncio
import threading

import pytest
from pymongo import monitoring

from service.app import create_app
from service.keys import STORE


class ThreadNames(monitoring.CommandListener):
    """The thread each of one database's commands started on."""

    def __init__(self, db_name: str) -> None:
        self.db_name = db_name
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name == self.db_name:
            self.names.append(threading.current_thread().name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_the_service_s_commands_run_on_the_event_loop_s_thread(
    aiohttp_client, make_settings, db_name
):
    threads = ThreadNames(db_name)
    monitoring.register(threads)  # global: the app's client is made after this
    client = await aiohttp_client(create_app(make_settings()))
    store = client.app[STORE]
    await asyncio.gather(*(store.chats.find_one({"_id": f"c{i}"}) for i in range(60)))
    assert len(threads.names) >= 60
    assert set(threads.names) == {threading.current_thread().name}  # the loop's, no pool's
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mongodb")]


async def test_the_retired_driver_threads_setting_is_logged_not_silently_ignored(
    aiohttp_client, make_settings, logs, monkeypatch
):
    monkeypatch.setenv("MONGODB_THREADS", "16")
    await aiohttp_client(create_app(make_settings()))
    retired = [e for e in logs if e["event"] == "settings.retired"]
    assert [e["name"] for e in retired] == ["MONGODB_THREADS"]
    assert retired[0]["log_level"] == "warning"


def test_the_collector_is_settled_once_the_service_listens():
    """``serve`` freezes what start-up made and collects the youngest generation every
    ``YOUNG_COLLECTION_EVERY`` allocations, not Python's 700 (docs/performance.md, finding 35);
    the older generations keep Python's thresholds."""
    import gc

    from service.app import YOUNG_COLLECTION_EVERY, settle_collector

    before = gc.get_threshold()
    try:
        settle_collector()
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def _lock_left_taken(cond_wait) -> bool:
    """A command waits on a condition of the driver (server selection's) and times out while
    another task holds the lock (closing a hung server's connections); the command's caller is
    cancelled (its deadline, its client gone) in the loop iteration that lock is released in.
    Is the lock then held with no task inside it?"""
    from pymongo.lock import _async_create_condition, _async_create_lock

    lock = _async_create_lock()
    condition = _async_create_condition(lock)
    timed_out = asyncio.Event()

    async def command() -> None:
        async with lock:
            await cond_wait(condition, 0.01)

    async def holder() -> None:
        await lock.acquire()
        await asyncio.sleep(0.05)  # the command's wait times out meanwhile; it waits to retake
        timed_out.set()
        waiting.cancel()
        lock.release()

    waiting = asyncio.create_task(command())
    held = asyncio.create_task(holder())
    await asyncio.gather(waiting, held, return_exceptions=True)
    assert timed_out.is_set()
    try:
        async with asyncio.timeout(1):
            await lock.acquire()
    except TimeoutError:
        return True
    lock.release()
    return False


async def test_a_command_cancelled_while_the_driver_retakes_its_lock_leaves_it_free():
    """PyMongo's condition waits run in the caller's task (``store._cond_wait``); on Python
    3.11 its own, ``asyncio.wait_for``, left the topology's lock taken for good in this race
    (every later command of the client then waited on it: docs/performance.md, finding 39)."""
    import inspect
    import sys

    import pymongo.asynchronous.pool as pool
    import pymongo.asynchronous.topology as topology
    from pymongo.lock import _async_cond_wait as drivers_own

    for module in (pool, topology):  # what the driver calls is what the service put there
        assert "await _async_cond_wait(" in inspect.getsource(module)
        if sys.version_info < (3, 12):
            assert module._async_cond_wait.__module__ == "service.store"
    assert not await _lock_left_taken(topology._async_cond_wait)
    if sys.version_info < (3, 12):
        assert await _lock_left_taken(drivers_own)  # the race is real with the driver's own


class _Cancels(monitoring.CommandListener, monitoring.ConnectionPoolListener):
    """Cancels ``caller`` as one command of ``name`` on ``collection`` starts (its bytes about
    to go out); counts the pool's connections closed."""

    def __init__(self, name: str, collection: str) -> None:
        self.name, self.collection = name, collection
        self.caller: asyncio.Task[object] | None = None
        self.closed: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        ours = event.command_name == self.name and event.command.get(self.name) == self.collection
        if ours and self.caller is not None:
            self.caller.cancel()

    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        self.closed.append(event.reason)

    def succeeded(self, event: object) -> None: ...
    def failed(self, event: object) -> None: ...
    def pool_created(self, event: object) -> None: ...
    def pool_ready(self, event: object) -> None: ...
    def pool_cleared(self, event: object) -> None: ...
    def pool_closed(self, event: object) -> None: ...
    def connection_created(self, event: object) -> None: ...
    def connection_ready(self, event: object) -> None: ...
    def connection_check_out_started(self, event: object) -> None: ...
    def connection_check_out_failed(self, event: object) -> None: ...
    def connection_checked_out(self, event: object) -> None: ...
    def connection_checked_in(self, event: object) -> None: ...


async def test_a_caller_cancelled_mid_command_leaves_the_call_to_end_on_its_connection(
    mongo_server, db_name
):
    """A client gone while its chat is being made (the insert under way): the caller stops
    waiting, the call does not (``store._undisturbed``, as motor's thread did). The chat is
    made and counted once, and the connection is kept. Cancelled inside the driver (before),
    the cancellation was lost here (Python 3.11's ``wait_for`` around the send: the caller went
    on as if it had not been cancelled); a cancel landing a moment later cuts the insert off on
    a connection thrown away, and gives the count back for a chat that may have been made."""
    from pymongo import AsyncMongoClient

    from service.store import Store

    watch = _Cancels("insert", "chats")
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongo_server.uri, timeoutMS=3000, event_listeners=[watch]
    )
    store = Store(client[db_name])
    try:
        await store.ensure_indexes()
        watch.caller = asyncio.create_task(store.create_chat("alice", title="t", model=None, cap=5))
        with pytest.raises(asyncio.CancelledError):
            await watch.caller
        await store.close()  # lets the calls whose callers are gone end
        chats = await store.chats.count_documents({"user_id": "alice"})
        count = await store.chat_counts.find_one({"_id": "alice"})
        assert (chats, count["active"]) == (1, 1)
        assert watch.closed == []
    finally:
        await store.close()
        await client.close()


async def test_a_call_that_fails_once_its_caller_has_gone_is_logged(mongo_server, db_name, logs):
    """A client gone while its key is being made, and the key's insert then refused (its hash
    is taken): nobody awaits the call any more, so the store says it failed, naming the call;
    the slot the call took is given back as when its caller waits."""
    from pymongo import AsyncMongoClient

    from service.store import Store

    watch = _Cancels("insert", "api_keys")
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongo_server.uri, timeoutMS=3000, event_listeners=[watch]
    )
    store = Store(client[db_name])
    key = {"user_id": "alice", "name": "k", "hash": "h" * 64, "revoked_at": None}
    try:
        await store.ensure_indexes()
        await store.create_api_key({**key, "_id": "key_first"}, cap=5)
        watch.caller = asyncio.create_task(store.create_api_key({**key, "_id": "key_b"}, cap=5))
        with pytest.raises(asyncio.CancelledError):
            await watch.caller
        await store.close()  # lets the calls whose callers are gone end
        failed = [e for e in logs if e["event"] == "store.call_failed_unawaited"]
        assert [(e["call"], e["log_level"]) for e in failed] == [("create_api_key", "warning")]
        assert "E11000" in failed[0]["error"] or "duplicate" in failed[0]["error"].lower()
        count = await store.db["api_key_counts"].find_one({"_id": "alice"})
        assert count["active"] == 1
    finally:
        await store.close()
        await client.close()


async def test_closing_waits_for_a_call_its_caller_left_no_longer_than_a_deadline(
    mongo_server, db_name
):
    """A call whose caller left ends by the driver's deadline; one that does not (a driver
    hung past it, finding 39's kind) holds the shutdown no longer than that deadline and the
    backstop."""
    from pymongo import AsyncMongoClient

    from service.store import BACKSTOP_S, Store

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_server.uri, timeoutMS=200)
    store = Store(client[db_name])
    hung = asyncio.ensure_future(asyncio.Event().wait())
    store.undisturbed.add(hung)
    try:
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(5):
            await store.close()
        assert asyncio.get_running_loop().time() - started < 0.2 + BACKSTOP_S + 0.5
    finally:
        hung.cancel()
        await client.close()


class _Tasks(monitoring.CommandListener):
    """The asyncio task each command of one database started in."""

    def __init__(self, db_name: str) -> None:
        self.db_name = db_name
        self.tasks: list[object] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name == self.db_name:
            self.tasks.append(asyncio.current_task())

    def succeeded(self, event: object) -> None: ...
    def failed(self, event: object) -> None: ...


async def test_a_store_call_made_inside_another_runs_in_that_call_s_task(mongo_server, db_name):
    """``stale_streams`` asks ``live_replicas`` first: both store calls, one task between them
    (the outer call is out of its caller's reach already: a task more per nested call, as in
    the final writes' and the authorizations' turn-by-turn fallbacks, was work for nothing)."""
    from pymongo import AsyncMongoClient

    from service.store import Store, utcnow

    tasks = _Tasks(db_name)
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongo_server.uri, timeoutMS=3000, event_listeners=[tasks]
    )
    store = Store(client[db_name])
    try:
        await store.ensure_indexes()
        tasks.tasks.clear()
        await store.stale_streams(older_than=utcnow())
        assert len(tasks.tasks) == 2  # the replicas' find, then the messages'
        assert tasks.tasks[0] is tasks.tasks[1] is not asyncio.current_task()
    finally:
        await store.close()
        await client.close()

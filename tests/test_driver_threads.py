"""MONGODB_THREADS sizes the thread pool motor runs PyMongo in (motor's own default is five
threads per core of the machine, not of the pod); MONGODB_TIMEOUT_MS bounds a call, its wait for
one of those threads included. And the process's other setting made at start-up: the cyclic
collector's."""

from __future__ import annotations

import asyncio
import threading

import motor.frameworks.asyncio as motor_threads
from pymongo import monitoring

from service.app import create_app
from service.keys import STORE


class ThreadNames(monitoring.CommandListener):
    """The thread each of one database's commands started on."""

    def __init__(self, db_name: str) -> None:
        self.db_name = db_name
        self.names: list[str] = []
        self.commands: list[tuple[str, object]] = []  # (command, collection)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name == self.db_name:
            self.names.append(threading.current_thread().name)
            self.commands.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_the_service_s_commands_run_on_as_many_threads_as_set(
    aiohttp_client, make_settings, db_name
):
    threads = ThreadNames(db_name)
    monitoring.register(threads)  # global: the app's client is made after this
    client = await aiohttp_client(create_app(make_settings(mongodb_threads=3)))
    store = client.app[STORE]
    await asyncio.gather(*(store.chats.find_one({"_id": f"c{i}"}) for i in range(60)))
    ours = set(threads.names)
    assert ours and all(name.startswith("mongodb") for name in ours), ours
    assert len(ours) <= 3  # sixty at once, three threads (motor alone: up to 5 per core)


async def test_a_call_waiting_for_a_driver_thread_answers_503_at_the_timeout_and_is_never_sent(
    aiohttp_client, make_settings, db_name, auth
):
    """Every driver thread held (a hung server holds each command up to the timeout): a call
    queued behind them fails at MONGODB_TIMEOUT_MS from when it was made, not from when a
    thread frees up, and its command is never sent afterwards."""
    sent = ThreadNames(db_name)
    monitoring.register(sent)
    settings = make_settings(mongodb_threads=1, mongodb_timeout_ms=1000)
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/api/chat", headers=auth())).status == 200
    listed = sent.commands.count(("find", "chats"))
    held = threading.Event()
    loop = asyncio.get_running_loop()
    hung = loop.run_in_executor(motor_threads._EXECUTOR, held.wait, 30)  # the one thread, held
    try:
        resp = await asyncio.wait_for(client.get("/api/chat", headers=auth()), 10)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "database_unavailable"
        assert not held.is_set()  # answered while the thread was still held
    finally:
        held.set()
        await hung
    assert (await client.get("/api/chat", headers=auth())).status == 200
    # The one thread runs in order: the refused call's command, had it stayed queued, would
    # have been sent before this one's.
    assert sent.commands.count(("find", "chats")) == listed + 1


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

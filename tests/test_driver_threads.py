"""MONGODB_THREADS sizes the thread pool motor runs PyMongo in (motor's own default is five
threads per core of the machine, not of the pod)."""

from __future__ import annotations

import asyncio
import threading

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

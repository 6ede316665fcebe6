"""A TCP relay on loopback that can lose the network: the browser talks to the service through it.

``cut()`` resets every connection it relays and refuses new ones (each is reset as it comes in)
until ``restore()``: what a browser sees when its network drops, which Chromium's own offline
emulation does not do to a response that is already streaming. ``mute()`` first makes the drop
land between a request and its answer: the browser's bytes still reach the service, the
service's never come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.up = True
        self.muted = False  # the service's bytes are dropped instead of relayed
        self.accepted = 0  # connections relayed so far
        self.refused = 0  # connections reset as they came in, while cut
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        """Reset every relayed connection, both ways, and refuse new ones."""
        self.up = False
        for client, upstream in list(self._links):
            _reset(client)
            _reset(upstream)
        self._links.clear()

    def mute(self) -> None:
        """Keep relaying what the browser sends, drop what the service answers (until
        ``restore()``)."""
        self.muted = True

    def restore(self) -> None:
        self.up = True
        self.muted = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self.accepted += 1
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.create_task(_pump(reader, up_writer, lambda: False)),
            asyncio.create_task(_pump(up_reader, writer, lambda: self.muted)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._links.discard(link)
        for w in link:
            w.close()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, muted: Callable[[], bool]
) -> None:
    try:
        while data := await reader.read(65536):
            if muted():
                continue
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dropped network does, not with an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

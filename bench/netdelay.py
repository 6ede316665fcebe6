"""A TCP relay on loopback that delays every byte by a fixed time each way: a network between
the service and its database, for ``python -m bench --db-rtt-ms``.

SecantusDB runs on the same machine as the service, so a command's round trip here is its
processing time alone; against a MongoDB across a network each command also pays the network's
round trip, and commands sent side by side pay it once together. Each direction of each
connection is delayed by half of ``--rtt-ms``; order is kept, bandwidth is not limited.

    python -m bench.netdelay --port 0 --target 127.0.0.1:27017 --rtt-ms 2   # prints "ready <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from bench.upstream import serve_until_signalled


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay_s, data))
    except ConnectionError:
        pass
    finally:
        queue.put_nowait((loop.time() + delay_s, b""))
        with contextlib.suppress(ConnectionError):
            await sender


async def serve(port: int, target: tuple[str, int], rtt_ms: float) -> None:
    delay_s = rtt_ms / 2000

    async def accept(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w, delay_s), _pipe(server_r, client_w, delay_s))

    server = await asyncio.start_server(accept, "127.0.0.1", port)
    await serve_until_signalled(server)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.netdelay", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--rtt-ms", type=float, required=True)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    asyncio.run(serve(args.port, (host, int(port)), args.rtt_ms))


if __name__ == "__main__":
    main()

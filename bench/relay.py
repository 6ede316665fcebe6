"""The reference thin relay: an aiohttp pass-through that parses nothing (the bench's yardstick).

Same aiohttp, same event loop and the same kind of pooled client session as the service, but no
auth, no database, no parsing: the request body goes up as it came, and every read from the
upstream goes down as one write.

    python -m bench.relay --port 0 --upstream http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web


async def relay(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read()
    headers = {"Content-Type": "application/json"}
    async with session.post(request.app["url"], data=body, headers=headers) as up:
        resp = web.StreamResponse(status=up.status)
        resp.content_type = up.content_type
        await resp.prepare(request)
        async for data in up.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)  # not aiohttp's default cap of 100
    app["session"] = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 18)
    yield
    await app["session"].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port of the upstream")
    args = parser.parse_args()
    app = web.Application()
    app["url"] = args.upstream.rstrip("/") + "/v1/chat/completions"
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", relay)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        backlog=8192,
    )


if __name__ == "__main__":
    main()

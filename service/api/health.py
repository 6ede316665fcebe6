"""Liveness and readiness probes (no auth).

/healthz never depends on anything (a MongoDB outage must not restart pods). /readyz is 503
while MongoDB is unreachable or while the process drains after SIGTERM, so load balancers stop
sending new work here while the streams in flight finish.
"""

from __future__ import annotations

from aiohttp import web

from service.errors import ServiceUnavailable
from service.http import json_response
from service.keys import REGISTRY, STORE

READY_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when MongoDB answers within READY_TIMEOUT_S; 503 while draining or when it does not
    (raised: the middleware answers it, and its access line names the code)."""
    if request.app[REGISTRY].draining:  # checked first: no MongoDB round trip while stopping
        raise ServiceUnavailable("the server is shutting down", code="shutting_down")
    await request.app[STORE].ping(READY_TIMEOUT_S)
    return json_response({"status": "ready", "mongodb": "ok"})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

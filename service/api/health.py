"""Liveness and readiness probes (no auth).

/healthz never depends on anything (a MongoDB outage must not restart pods). /readyz is 503
while MongoDB is unreachable or while the process drains after SIGTERM, so load balancers stop
sending new work here while the streams in flight finish.
"""

from __future__ import annotations

from aiohttp import web

from service.errors import ServiceError, ServiceUnavailable
from service.http import error_response, json_response
from service.keys import REGISTRY, STORE

READY_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[REGISTRY].draining:  # checked first: no MongoDB round trip while stopping
        return error_response(
            ServiceUnavailable("the server is shutting down", code="shutting_down")
        )
    try:
        await request.app[STORE].ping(READY_TIMEOUT_S)
    except ServiceError as exc:
        return error_response(exc)
    return json_response({"status": "ready", "mongodb": "ok"})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

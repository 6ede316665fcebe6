"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from aiohttp import web

from service.errors import ServiceError
from service.http import error_response, json_response
from service.keys import STORE

READY_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].ping(READY_TIMEOUT_S)
    except ServiceError as exc:
        return error_response(exc)
    return json_response({"status": "ready", "mongodb": "ok"})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

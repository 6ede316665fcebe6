"""WebSocket transport endpoint: GET /api/ws (and POST /api/ws/ticket)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes (filled in by its issue)."""

"""The chat page (static SPA at /) and the dev-only token endpoint."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes (filled in by its issue)."""

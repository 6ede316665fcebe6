"""OpenAI-compatible front door: POST /v1/chat/completions and GET /v1/models."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes (filled in by its issue)."""

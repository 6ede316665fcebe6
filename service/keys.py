"""Every typed application and request key, declared once."""

from __future__ import annotations

from aiohttp import web

from service.auth import Authenticator, Principal
from service.settings import Settings
from service.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
AUTH = web.AppKey("auth", Authenticator)

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)

"""Every typed application and request key, declared once."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from service.apikeys import ApiKeys
from service.auth import Authenticator, Principal
from service.model_lists import ModelLists
from service.models import Catalogue
from service.settings import Settings
from service.store import Store
from service.stream.idempotency import Admissions
from service.stream.mirror import Resumes
from service.stream.producer import TurnProducer
from service.stream.registry import StreamRegistry
from service.transports.sse import Heartbeats
from service.transports.ws import Connection

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
AUTH = web.AppKey("auth", Authenticator)
API_KEYS = web.AppKey("api_keys", ApiKeys)  # programs' keys (also resolved by AUTH)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
CATALOGUE = web.AppKey("catalogue", Catalogue)
MODEL_LISTS = web.AppKey("model_lists", ModelLists)  # which configured models are live now
REGISTRY = web.AppKey("registry", StreamRegistry)
PRODUCER = web.AppKey("producer", TurnProducer)
WATCHER = web.AppKey("watcher", asyncio.Task[None])
HEARTBEATS = web.AppKey("heartbeats", Heartbeats)  # ``: ping`` to every idle SSE follower
RESUMES = web.AppKey("resumes", Resumes)  # follow an answer from memory, another replica, a record
ADMISSIONS = web.AppKey("admissions", Admissions)  # start a turn, or follow the one a key claimed
WS_CONNECTIONS = web.AppKey("ws_connections", set[Connection])  # open sockets, closed on shutdown

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
UPGRADED = web.RequestKey("upgraded", bool)  # a WebSocket: its access line says 101 as it ends

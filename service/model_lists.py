"""Model lists as live data: a configured model is offered only while its upstream lists it.

Each provider's list, as its upstream returns it for the gateway's own key (OpenAI-compatible
``GET /models``, Gemini ``models.list``, Anthropic ``GET /v1/models``), is cached for
``MODEL_LIST_TTL_S``.
A configured model its upstream stopped listing is hidden from ``/api/models`` and ``/v1/models``
and refused with ``404 model_not_found`` until it is listed again. Providers without a list (the
demo model) are always live.

The per-turn check never waits on the network once a list is known: a stale list is refreshed in
the background while the last one keeps answering. Only before the very first list arrives does a
caller wait for the fetch already under way, and then at most ``FIRST_LIST_WAIT_S``. A list that
cannot be read is not an outage of the models: the last known list stays (or, before any, every
configured model is offered) and the fetch is retried after ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

import structlog

from service.auth import KeyScope
from service.errors import NotFound, UpstreamError
from service.logs import error_text
from service.metrics import UPSTREAM_ERRORS
from service.models import ModelSpec
from service.providers.base import Provider

log = structlog.get_logger("service.models")

FIRST_LIST_WAIT_S = 3.0
RETRY_S = 30.0


class _ProviderList:
    __slots__ = ("answered", "expires", "ids", "task")

    def __init__(self) -> None:
        self.ids: set[str] | None = None  # None: not known (yet), or the provider has no list
        self.answered = False  # a fetch has ended (with a list or an error)
        self.expires = float("-inf")  # when to fetch again
        self.task: asyncio.Task[None] | None = None


class ModelLists:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        configured: list[ModelSpec],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._providers = providers
        self._configured = configured
        self._ttl = ttl_s
        self._clock = clock
        self._lists = {name: _ProviderList() for name in providers}

    def start(self) -> None:
        """Fetch every provider's list in the background (start-up does not wait for them)."""
        for name in self._providers:
            self._refresh(self._lists[name], name)

    async def close(self) -> None:
        tasks = [t for t in (pl.task for pl in self._lists.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def is_live(self, spec: ModelSpec) -> bool:
        entry = self._lists.get(spec.provider)
        if entry is None:
            return False  # configured, but its provider is not: never offered
        if self._clock() >= entry.expires:
            self._refresh(entry, spec.provider)
        if not entry.answered and entry.task is not None:
            # No answer yet from this upstream: wait a little for the fetch already running.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(entry.task), FIRST_LIST_WAIT_S)
        return entry.ids is None or spec.upstream in entry.ids

    async def live(self, specs: list[ModelSpec], key: KeyScope | None = None) -> list[ModelSpec]:
        """The models offered now: their upstream lists them and, for an API key with a model
        list, they are on it."""
        return [s for s in specs if (key is None or key.may_use(s.name)) and await self.is_live(s)]

    async def require(self, spec: ModelSpec, key: KeyScope | None = None) -> None:
        """Raise ``404 model_not_found`` when the upstream does not list the model now (or the
        API key ``key`` may not use it: not the caller's to use)."""
        if (key is not None and not key.may_use(spec.name)) or not await self.is_live(spec):
            raise NotFound(f"model '{spec.name}' is not available", code="model_not_found")

    def _refresh(self, entry: _ProviderList, provider: str) -> None:
        if entry.task is None or entry.task.done():
            entry.task = asyncio.create_task(
                self._fetch(entry, provider), name=f"models-{provider}"
            )

    async def _fetch(self, entry: _ProviderList, provider: str) -> None:
        try:
            ids = await self._providers[provider].list_models()
        except UpstreamError as exc:
            log.warning(
                "models.list_failed", provider=provider, code=exc.code, error=error_text(exc)
            )
            UPSTREAM_ERRORS.labels(provider, exc.code, "list").inc()
            entry.expires = self._clock() + min(self._ttl, RETRY_S)
            return
        finally:
            entry.answered = True
        self._log_changes(provider, entry.ids, ids)
        entry.ids = ids
        entry.expires = self._clock() + self._ttl

    def _log_changes(self, provider: str, old: set[str] | None, new: set[str] | None) -> None:
        mine = {m.upstream for m in self._configured if m.provider == provider}
        listed_before = mine if old is None else mine & old
        listed_now = mine if new is None else mine & new
        if listed_before - listed_now:
            log.warning(
                "models.hidden", provider=provider, models=sorted(listed_before - listed_now)
            )
        if listed_now - listed_before:
            log.info(
                "models.listed_again", provider=provider, models=sorted(listed_now - listed_before)
            )

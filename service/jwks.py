"""The identity provider's keys (``JWT_JWKS``: a URL or a file), kept fresh while we run.

Identity providers rotate their signing keys: a new ``kid`` appears in the JWKS, later the old
one goes. So the set is fetched again

- when a token names a ``kid`` we do not hold, at most once per ``JWT_JWKS_MIN_REFRESH_S``
  (a flood of made-up kids costs the provider one request per interval, not one per token);
  the token waits for that fetch;
- when it is older than ``JWT_JWKS_TTL_S``, in the background: requests go on with the keys we
  have, and a key the provider has withdrawn stops working once the new set is in.

Every fetch is one task that concurrent callers share (``asyncio.shield``: a client that goes
away does not cancel it for the others). A fetch that fails keeps the keys we have and is logged;
only the first one, at start-up, is fatal (``JwksError``): a replica that can verify no token
must not become ready. The URL is fetched with aiohttp, not PyJWT's ``PyJWKClient``: that one
is blocking urllib (a thread per fetch, which shutdown cannot cancel) and fetches again on every
unknown kid, with no rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import structlog

log = structlog.get_logger("service.jwks")

FETCH_TIMEOUT_S = 10.0
MAX_JWKS_BYTES = 1 << 20  # a JWKS holds a few keys: a few KiB


class JwksError(Exception):
    """The key set could not be fetched or holds no usable signing key."""


Fetch = Callable[[], Awaitable[bytes]]


class Jwks:
    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl_s: float,
        min_refresh_s: float,
        close: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._close = close
        self._ttl_s = ttl_s
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._keys: dict[str | None, Any] = {}
        self._first: Any = None
        self._raw: object = None
        self._loaded_at = self._attempted_at = clock()
        self._task: asyncio.Task[None] | None = None
        self.version = 0  # grows whenever a fetch brings a different key set

    @classmethod
    async def open(
        cls,
        source: str,
        *,
        ttl_s: float,
        min_refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> Jwks:
        """Load it once (raising ``JwksError`` when that fails) and return it."""
        session = None
        if source.startswith(("http://", "https://")):
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
            fetch = _url_fetcher(session, source)
        else:
            fetch = _file_fetcher(Path(source))
        jwks = cls(
            fetch,
            ttl_s=ttl_s,
            min_refresh_s=min_refresh_s,
            close=session.close if session is not None else None,
            clock=clock,
        )
        try:
            jwks._install(await fetch())
        except BaseException:
            await jwks.close()
            raise
        return jwks

    def refresh_if_stale(self) -> None:
        """Older than the TTL: fetch again in the background (the keys we hold serve meanwhile)."""
        now = self._clock()
        if now - self._loaded_at >= self._ttl_s and self._may_fetch(now, self._ttl_s):
            self._start_fetch(now)

    async def key_for(self, kid: str | None) -> Any:
        """The verification key for ``kid`` (the only one when the token names none), or None."""
        self.refresh_if_stale()
        key = self._lookup(kid)
        if key is None:
            now = self._clock()
            if self._may_fetch(now, self._min_refresh_s):
                self._start_fetch(now)
            if self._task is not None:  # ours, or one already under way: wait for its keys
                await asyncio.shield(self._task)
                key = self._lookup(kid)
        return key

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._close is not None:
            await self._close()

    # ------------------------------------------------------------------ internals
    def _lookup(self, kid: str | None) -> Any:
        return self._first if kid is None else self._keys.get(kid)

    def _may_fetch(self, now: float, gap_s: float) -> bool:
        return self._task is None and now - self._attempted_at >= min(gap_s, self._min_refresh_s)

    def _start_fetch(self, now: float) -> None:
        self._attempted_at = now
        # An empty context: the fetch's log lines belong to no request.
        self._task = asyncio.create_task(
            self._refresh(), name="jwks-refresh", context=contextvars.Context()
        )

    async def _refresh(self) -> None:
        try:
            self._install(await self._fetch())
        except JwksError as exc:
            log.warning("jwks.refresh_failed", error=str(exc), keys=len(self._keys))
        finally:
            self._task = None

    def _install(self, body: bytes) -> None:
        try:
            raw = json.loads(body)
            keyset = jwt.PyJWKSet.from_dict(raw)
        except (ValueError, AttributeError, jwt.PyJWTError) as exc:
            raise JwksError(f"not a usable JWKS ({_first_line(exc)})") from None
        signing = [k for k in keyset.keys if k.public_key_use in (None, "sig")]
        if not signing:
            raise JwksError("not a usable JWKS (no signing key)")
        self._loaded_at = self._clock()
        if raw != self._raw:
            self._raw = raw
            self._keys = {k.key_id: k.key for k in signing}
            self._first = signing[0].key
            self.version += 1
            log.info("jwks.loaded", keys=len(signing), kids=[k.key_id for k in signing])


def _url_fetcher(session: aiohttp.ClientSession, url: str) -> Fetch:
    async def fetch() -> bytes:
        try:
            async with session.get(url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise JwksError(f"cannot fetch {url}: HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"cannot fetch {url}: larger than {MAX_JWKS_BYTES} bytes")
                return bytes(body)
        except TimeoutError:
            raise JwksError(f"cannot fetch {url}: no answer within {FETCH_TIMEOUT_S:g} s") from None
        except aiohttp.ClientError as exc:
            raise JwksError(f"cannot fetch {url}: {_first_line(exc)}") from None

    return fetch


def _file_fetcher(path: Path) -> Fetch:
    async def fetch() -> bytes:
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise JwksError(f"cannot read {path}: {exc.strerror}") from None

    return fetch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

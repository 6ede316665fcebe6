"""JWKS from the identity provider: rotated keys are picked up without a restart, on an unknown
kid (at most one fetch per JWT_JWKS_MIN_REFRESH_S, shared by concurrent requests) and on a TTL;
a failed refresh keeps the keys we have; a withdrawn key stops working."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from service.app import create_app
from service.auth import Authenticator
from service.errors import Unauthorized
from service.jwks import Jwks
from tests.processes import wait_until


class SigningKey:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def token(self, user: str = "alice", kid: str | None = None) -> str:
        claims = {"sub": user, "exp": int(time.time()) + 600}
        return jwt.encode(claims, self.private, "RS256", headers={"kid": kid or self.kid})


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {kid: SigningKey(kid) for kid in ("a", "b")}


class FakeIdentityProvider:
    """GET /jwks.json: the keys it publishes now; counts fetches; can hold or fail them."""

    def __init__(self) -> None:
        self.published: list[SigningKey] = []
        self.fetches = 0
        self.status = 200
        self.release: asyncio.Event | None = None  # set: hold every answer until it is set

    async def jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.release is not None:
            await self.release.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": [k.jwk for k in self.published]})


@pytest.fixture
async def idp(aiohttp_server, keys):
    fake = FakeIdentityProvider()
    fake.published = [keys["a"]]
    app = web.Application()
    app.router.add_get("/jwks.json", fake.jwks)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("/jwks.json"))
    return fake


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rs256(make_settings):
    def factory(jwks: str, **overrides: Any):
        return make_settings(jwt_secret=None, jwt_algorithm="RS256", jwt_jwks=jwks, **overrides)

    return factory


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def authenticator(rs256, idp, clock):
    """An Authenticator on the fake provider, on the test's clock (TTL 300 s, gap 30 s)."""
    jwks = await Jwks.open(idp.url, ttl_s=300, min_refresh_s=30, clock=clock)
    auth = Authenticator(rs256(idp.url), jwks)
    yield auth
    await auth.close()


async def test_a_rotated_key_is_accepted_without_restart(aiohttp_client, rs256, idp, keys):
    client = await aiohttp_client(create_app(rs256(idp.url, jwt_jwks_min_refresh_s=0)))

    async def status(key: SigningKey) -> int:
        headers = {"Authorization": f"Bearer {key.token()}"}
        return (await client.get("/api/chat", headers=headers)).status

    assert await status(keys["a"]) == 200
    assert idp.fetches == 1  # at start-up
    idp.published = [keys["b"]]  # the provider rotates: a is withdrawn, b signs from now on
    assert await status(keys["b"]) == 200
    assert idp.fetches == 2
    assert await status(keys["a"]) == 401  # even though it was verified (and cached) before


async def test_unknown_kids_fetch_once_per_interval_shared_by_concurrent_requests(
    authenticator, idp, keys, clock
):
    async def flood(n: int) -> list[BaseException | Any]:
        tokens = [keys["a"].token(kid=uuid.uuid4().hex) for _ in range(n)]
        return await asyncio.gather(
            *(authenticator.verify(t) for t in tokens), return_exceptions=True
        )

    for result in await flood(50):  # within 30 s of the start-up fetch: none at all
        assert isinstance(result, Unauthorized) and "unknown key id" in result.message
    assert idp.fetches == 1

    clock.now += 30
    idp.release = asyncio.Event()  # hold the fetch, so every request of the flood overlaps it
    flooding = asyncio.ensure_future(flood(50))
    await wait_until(lambda: idp.fetches == 2, what="the one fetch")
    idp.release.set()
    assert all(isinstance(r, Unauthorized) for r in await flooding)
    assert idp.fetches == 2

    clock.now += 29
    await flood(20)
    assert idp.fetches == 2
    clock.now += 1
    await flood(20)
    assert idp.fetches == 3


async def test_ttl_refresh_picks_up_a_new_key_and_drops_a_withdrawn_one(
    authenticator, idp, keys, clock
):
    old = keys["a"].token()
    assert (await authenticator.verify(old)).user_id == "alice"
    idp.published = [keys["b"]]
    new = keys["b"].token()
    clock.now += 20  # an unknown kid, but within the gap: no fetch
    with pytest.raises(Unauthorized):
        await authenticator.verify(new)
    assert idp.fetches == 1
    clock.now += 300  # the set is stale
    assert (await authenticator.verify(new)).user_id == "alice"
    assert idp.fetches == 2
    with pytest.raises(Unauthorized, match="unknown key id"):
        await authenticator.verify(old)  # cached before, but its key is gone


async def test_a_cached_token_of_a_withdrawn_key_is_refused_after_the_ttl_refresh(
    authenticator, idp, keys, clock
):
    token = keys["a"].token()
    assert (await authenticator.verify(token)).user_id == "alice"
    idp.published = [keys["b"]]
    idp.release = asyncio.Event()
    clock.now += 300
    assert (await authenticator.verify(token)).user_id == "alice"  # from the cache; fetch begins
    await wait_until(lambda: idp.fetches == 2, what="the TTL fetch")
    idp.release.set()
    await wait_until(lambda: authenticator._jwks.version == 2, what="the new key set")
    with pytest.raises(Unauthorized, match="unknown key id"):
        await authenticator.verify(token)


async def test_a_failed_refresh_keeps_the_keys_and_is_retried_after_the_gap(
    authenticator, idp, keys, clock, logs
):
    token = keys["a"].token()
    idp.status = 503
    clock.now += 300
    assert (await authenticator.verify(token)).user_id == "alice"  # stale keys serve meanwhile
    await wait_until(lambda: any(e["event"] == "jwks.refresh_failed" for e in logs))
    failed = next(e for e in logs if e["event"] == "jwks.refresh_failed")
    assert "HTTP 503" in failed["error"] and failed["keys"] == 1
    assert idp.fetches == 2
    assert (await authenticator.verify(keys["a"].token("bob"))).user_id == "bob"
    assert idp.fetches == 2  # not retried on every request
    idp.status = 200
    idp.published = [keys["a"], keys["b"]]
    clock.now += 30
    assert (await authenticator.verify(keys["b"].token())).user_id == "alice"
    assert idp.fetches == 3


async def test_a_jwks_file_is_read_again_under_the_same_rules(rs256, keys, clock, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [keys["a"].jwk]}))
    jwks = await Jwks.open(str(path), ttl_s=300, min_refresh_s=30, clock=clock)
    auth = Authenticator(rs256(str(path)), jwks)
    try:
        path.write_text(json.dumps({"keys": [keys["a"].jwk, keys["b"].jwk]}))
        with pytest.raises(Unauthorized):
            await auth.verify(keys["b"].token())
        clock.now += 30
        assert (await auth.verify(keys["b"].token())).user_id == "alice"
    finally:
        await auth.close()

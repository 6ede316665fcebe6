"""Bearer JWT: every rejection is 401 + WWW-Authenticate; only the configured algorithm passes."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime

import jwt
import jwt.api_jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import service.auth
from service.app import create_app
from service.auth import Authenticator, mint_token
from service.errors import Unauthorized
from tests.conftest import TEST_SECRET


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


async def assert_401(client, headers):
    resp = await client.get("/api/chat", headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"
    return body


async def test_valid_token_is_accepted(client, auth):
    assert (await client.get("/api/chat", headers=auth())).status == 200


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer not.a.jwt"],
)
async def test_missing_or_malformed(client, header):
    await assert_401(client, {} if header is None else {"Authorization": header})


async def test_expired_token(client, settings):
    token = mint_token(settings, "alice", ttl_s=-120)  # beyond the 30 s leeway
    body = await assert_401(client, {"Authorization": f"Bearer {token}"})
    assert "expired" in body["error"]["message"]


async def test_small_clock_skew_is_allowed(client, settings):
    token = mint_token(settings, "alice", ttl_s=-5)
    assert (
        await client.get("/api/chat", headers={"Authorization": f"Bearer {token}"})
    ).status == 200


async def test_forged_signature(client):
    token = jwt.encode({"sub": "alice", "exp": time.time() + 60}, "wrong-secret" * 4, "HS256")
    await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_alg_none(client):
    token = (
        f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': 'alice', 'exp': time.time() + 60})}."
    )
    await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_other_hs_algorithm_is_rejected(client):
    token = jwt.encode({"sub": "alice", "exp": time.time() + 60}, TEST_SECRET, "HS512")
    await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_missing_exp_or_sub(client):
    for claims in ({"sub": "alice"}, {"exp": time.time() + 60}):
        token = jwt.encode(claims, TEST_SECRET, "HS256")
        await assert_401(client, {"Authorization": f"Bearer {token}"})


async def test_rs256_and_no_hs_confusion(aiohttp_client, make_settings):
    """With RS256 configured, a token HMAC-signed with the public key as secret is rejected."""
    private, public = _rsa_pair()
    settings = make_settings(jwt_secret=None, jwt_algorithm="RS256", jwt_public_key=public)
    client = await aiohttp_client(create_app(settings))
    good = mint_token(settings, "alice", private_key=private)
    assert (
        await client.get("/api/chat", headers={"Authorization": f"Bearer {good}"})
    ).status == 200
    confused = _hs_with_public_key(public)  # PyJWT refuses to sign this; forge it by hand
    await assert_401(client, {"Authorization": f"Bearer {confused}"})


def _hs_with_public_key(public: str) -> str:
    import hashlib
    import hmac

    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64({"sub": "alice", "exp": int(time.time()) + 60})
    signing = f"{header}.{payload}".encode()
    sig = hmac.new(public.encode(), signing, hashlib.sha256).digest()
    return f"{header}.{payload}.{base64.urlsafe_b64encode(sig).decode().rstrip('=')}"


async def test_jwks_file(aiohttp_client, make_settings, tmp_path):
    private, public = _rsa_pair()
    jwk = json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(serialization.load_pem_public_key(public.encode()))
    )
    jwk.update(kid="k1", use="sig", alg="RS256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    settings = make_settings(jwt_secret=None, jwt_algorithm="RS256", jwt_jwks=str(path))
    client = await aiohttp_client(create_app(settings))
    token = jwt.encode(
        {"sub": "alice", "exp": time.time() + 60}, private, "RS256", headers={"kid": "k1"}
    )
    assert (
        await client.get("/api/chat", headers={"Authorization": f"Bearer {token}"})
    ).status == 200
    other = jwt.encode(
        {"sub": "alice", "exp": time.time() + 60}, private, "RS256", headers={"kid": "nope"}
    )
    await assert_401(client, {"Authorization": f"Bearer {other}"})


async def test_issuer_and_audience_checked_when_configured(aiohttp_client, make_settings):
    settings = make_settings(jwt_issuer="https://issuer.example", jwt_audience="chat-gw")
    client = await aiohttp_client(create_app(settings))
    good = mint_token(settings, "alice")
    assert (
        await client.get("/api/chat", headers={"Authorization": f"Bearer {good}"})
    ).status == 200
    for extra in ({"iss": "https://evil.example"}, {"aud": "other"}):
        bad = mint_token(settings, "alice", extra=extra)
        await assert_401(client, {"Authorization": f"Bearer {bad}"})


async def test_health_endpoints_need_no_auth(client):
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["mongodb"] == "ok"


# ---------------------------------------------------------------- the verified-token cache
@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The tokens ``jwt.decode`` was asked to verify (the real decode still runs)."""
    calls: list[str] = []
    real = jwt.decode

    def counting(token, *args, **kwargs):
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(service.auth.jwt, "decode", counting)
    return calls


@pytest.fixture
def set_clock(monkeypatch):
    """Move the clock both the cache (``time.time``) and PyJWT (``datetime.now``) read."""

    def move(now: float) -> None:
        class _Frozen(datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.fromtimestamp(now, tz)

        monkeypatch.setattr(service.auth.time, "time", lambda: now)
        monkeypatch.setattr(jwt.api_jwt, "datetime", _Frozen)

    return move


async def test_verified_token_is_served_from_cache(settings, decodes):
    auth = Authenticator(settings)
    token = mint_token(settings, "alice")
    principal = await auth.verify(token)
    assert principal.user_id == "alice"
    auth._key = "another-secret-" + "y" * 60  # a fresh verification of `token` would now fail
    assert await auth.verify(token) == principal
    assert await auth.verify_header(f"Bearer {token}") == principal
    assert decodes == [token]
    with pytest.raises(Unauthorized):
        await auth.verify(mint_token(settings, "bob"))  # a token not seen before is fully verified


async def test_app_verifies_a_token_once(client, auth, decodes):
    headers = auth()
    for _ in range(3):
        assert (await client.get("/api/chat", headers=headers)).status == 200
    assert len(decodes) == 1


async def test_expired_cached_token_is_rejected(settings, decodes, set_clock):
    auth = Authenticator(settings)
    token = mint_token(settings, "alice", ttl_s=60)
    expires_at = (await auth.verify(token)).expires_at
    leeway = settings.jwt_leeway_s
    set_clock(expires_at + leeway - 0.5)  # still inside the leeway: a cache hit
    assert (await auth.verify(token)).user_id == "alice"
    assert len(decodes) == 1
    set_clock(expires_at + leeway)  # past it: dropped, and fully verified (and rejected) again
    for calls in (2, 3):
        with pytest.raises(Unauthorized) as exc_info:
            await auth.verify(token)
        assert exc_info.value.message == "invalid token: expired"
        assert len(decodes) == calls
    assert token not in auth._verified


async def test_failed_verifications_are_not_cached(settings, decodes):
    auth = Authenticator(settings)
    forged = jwt.encode({"sub": "alice", "exp": time.time() + 60}, "wrong-secret" * 4, "HS256")
    not_yet = mint_token(settings, "alice", extra={"nbf": int(time.time()) + 3600})
    for token in (forged, not_yet):
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await auth.verify(token)
    assert decodes == [forged, forged, not_yet, not_yet]
    assert not auth._verified


async def test_cache_is_a_bounded_lru(settings, decodes, monkeypatch):
    monkeypatch.setattr(service.auth, "VERIFIED_CACHE_SIZE", 3)
    auth = Authenticator(settings)
    tokens = [mint_token(settings, f"user{i}") for i in range(4)]
    for token in tokens[:3]:
        await auth.verify(token)
    await auth.verify(tokens[0])  # a hit: now the most recently used
    await auth.verify(tokens[3])  # over the bound: evicts the least recently used, tokens[1]
    assert list(auth._verified) == [tokens[2], tokens[0], tokens[3]]
    assert decodes == tokens
    await auth.verify(tokens[1])  # evicted, so verified again
    assert decodes == [*tokens, tokens[1]]
    assert len(auth._verified) == 3


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("not.a.jwt", "not a well-formed JWT"),
        ("garbage", "not a well-formed JWT"),
        (jwt.encode({"sub": "a", "exp": time.time() + 60}, "x" * 64, "HS256"), "signature"),
        (jwt.encode({"sub": "a", "exp": time.time() + 60}, TEST_SECRET, "HS512"), "algorithm"),
        (jwt.encode({"sub": "a"}, TEST_SECRET, "HS256"), "'exp' claim is missing"),
        (
            jwt.encode(
                {"sub": "a", "exp": time.time() + 60, "nbf": time.time() + 3600}, TEST_SECRET
            ),
            "not valid yet",
        ),
    ],
    ids=["dots", "garbage", "signature", "algorithm", "no-exp", "nbf"],
)
async def test_a_refused_token_is_explained_in_words_not_an_exception_name(client, token, words):
    """The page shows this message when a pasted token is refused: it must read as a sentence,
    on /api and on /v1 (whose models list the page asks first)."""
    headers = {"Authorization": f"Bearer {token}"}
    body = await assert_401(client, headers)
    message = body["error"]["message"]
    assert words in message
    assert not re.search(r"[a-z][A-Z]|Error", message), message
    v1 = await client.get("/v1/models", headers=headers)
    assert v1.status == 401
    assert words in (await v1.json())["error"]["message"]


WS_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}


@pytest.mark.parametrize(
    ("method", "path", "headers", "error"),
    [
        ("GET", "/api/chat", {}, None),
        ("GET", "/api/chat", {"Authorization": ""}, None),
        ("GET", "/api/ws", {}, None),
        ("POST", "/v1/messages", {}, None),
        ("POST", "/v1/messages", {"x-api-key": " "}, None),
        ("GET", "/api/chat", {"Authorization": "Bearer not.a.jwt"}, "invalid_token"),
        ("GET", "/api/chat", {"Authorization": "Bearer cgw-not-a-real-key"}, "invalid_token"),
        ("GET", "/api/ws?ticket=unknown", WS_UPGRADE, "invalid_token"),
        ("POST", "/v1/messages", {"x-api-key": "not-a-key"}, "invalid_token"),
    ],
    ids=[
        "no-bearer",
        "empty-bearer",
        "ws-no-credentials",
        "no-x-api-key",
        "empty-x-api-key",
        "bad-jwt",
        "bad-api-key",
        "bad-ticket",
        "bad-x-api-key",
    ],
)
async def test_a_challenge_names_an_error_only_when_credentials_were_sent(
    client, method, path, headers, error
):
    """RFC 6750 §3.1: a request without credentials gets a bare challenge (no error code); one
    whose credentials are refused gets ``error="invalid_token"``."""
    resp = await client.request(method, path, headers=headers)
    assert resp.status == 401
    challenge = resp.headers["WWW-Authenticate"]
    if error is None:
        assert challenge == 'Bearer realm="chat-gateway"'
    else:
        assert challenge == f'Bearer realm="chat-gateway", error="{error}"'

"""Bearer JWT verification (HS* with a secret, RS*/ES*/EdDSA with a public key or a JWKS).

Exactly one algorithm is accepted, the configured one, so ``alg: none`` and HS/RS confusion are
rejected by construction. ``exp`` and ``sub`` are required; ``iss``/``aud`` are checked when
configured; ``JWT_LEEWAY_S`` allows for clock skew. Successful verifications are remembered in a
bounded LRU keyed by the exact token string and reused until ``exp`` (plus the leeway), which is
safe because the key and the accepted algorithm (and the other checks) are fixed for the process's
life, so the same token string always verifies the same way until it expires.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from service.errors import Unauthorized
from service.settings import HS_ALGORITHMS, Settings

# Most verified tokens remembered per Authenticator (LRU); failures are never remembered.
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    expires_at: float


def _read_pem(value: str) -> str:
    return value if "-----BEGIN" in value else Path(value).read_text()


class Authenticator:
    def __init__(self, settings: Settings, jwks: jwt.PyJWKSet | None = None) -> None:
        self._alg = settings.jwt_algorithm
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._jwks = jwks
        self._key: Any = None
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        if settings.jwt_algorithm in HS_ALGORITHMS:
            if settings.jwt_secret is not None:
                self._key = settings.jwt_secret.get_secret_value()
        elif settings.jwt_public_key:
            self._key = _read_pem(settings.jwt_public_key)

    @classmethod
    async def create(cls, settings: Settings) -> Authenticator:
        """Build it, fetching a JWKS (file or URL) when one is configured."""
        jwks = None
        if settings.jwt_jwks:
            jwks = await asyncio.to_thread(_load_jwks, settings.jwt_jwks)
        return cls(settings, jwks)

    def _key_for(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._jwks.keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise Unauthorized("invalid token: unknown key id")

    def verify_header(self, header: str | None) -> Principal:
        if not header:
            raise Unauthorized("missing bearer token")
        if not header.isascii():  # a JWT is ASCII; PyJWT cannot even encode other bytes
            raise Unauthorized("invalid token: not ASCII")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            # The same test jwt.decode applies to ``exp``: valid while exp > now - leeway.
            if time.time() < cached.expires_at + self._leeway:
                self._verified.move_to_end(token)
                return cached
            del self._verified[token]  # expired: a full verification rejects it as before
        principal = self._verify_uncached(token)
        self._verified[token] = principal
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _verify_uncached(self, token: str) -> Principal:
        if self._key is None and self._jwks is None:
            raise Unauthorized("token verification is not configured")
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=[self._alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("invalid token: expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise Unauthorized("invalid token: bad subject")
        return Principal(user_id=sub, expires_at=float(claims["exp"]))


def _load_jwks(source: str) -> jwt.PyJWKSet:
    if source.startswith(("http://", "https://")):
        return jwt.PyJWKClient(source, cache_jwk_set=True).get_jwk_set()
    return jwt.PyJWKSet.from_dict(json.loads(Path(source).read_text()))


def mint_token(
    settings: Settings,
    user_id: str,
    *,
    ttl_s: int = 3600,
    private_key: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a token with the configured algorithm (HS: the secret; others: ``private_key``)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s, **(extra or {})}
    if settings.jwt_issuer:
        claims.setdefault("iss", settings.jwt_issuer)
    if settings.jwt_audience:
        claims.setdefault("aud", settings.jwt_audience)
    if settings.jwt_algorithm in HS_ALGORITHMS:
        if settings.jwt_secret is None:
            raise ValueError("no JWT_SECRET configured")
        key: Any = settings.jwt_secret.get_secret_value()
    elif private_key:
        key = _read_pem(private_key)
    else:
        raise ValueError(f"{settings.jwt_algorithm} needs --private-key to sign")
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm)

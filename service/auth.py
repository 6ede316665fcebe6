"""Bearer JWT verification (HS* with a secret, RS*/ES*/EdDSA with a public key or a JWKS).

Exactly one algorithm is accepted, the configured one, so ``alg: none`` and HS/RS confusion are
rejected by construction. ``exp`` and ``sub`` are required; ``iss``/``aud`` are checked when
configured; ``JWT_LEEWAY_S`` allows for clock skew. Successful verifications are remembered in a
bounded LRU keyed by the exact token string and reused until ``exp`` (plus the leeway), which is
safe because the accepted algorithm and the other checks are fixed for the process's life and the
cache is emptied whenever the keys change (a JWKS refresh, ``service/jwks.py``), so the same token
string always verifies the same way until it expires (the admin claim included: it is part of
the token).

A credential that starts with ``cgw-`` is an API key, not a JWT: ``verify`` hands it to the key
resolver (``service/apikeys.py``), which has its own short cache so that a revocation is seen
within ``API_KEY_CACHE_S``; keys never enter the token LRU.

A key that cannot be used stops start-up with one line naming its variable (``SettingsError``):
a public key that does not parse or is shorter than PyJWT's minimum, a JWKS that cannot be loaded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt

from service.errors import Forbidden, Unauthorized
from service.jwks import Jwks, JwksError
from service.settings import HS_ALGORITHMS, Settings, SettingsError
from service.store import KEY_ACCOUNT

# Most verified tokens remembered per Authenticator (LRU); failures are never remembered.
VERIFIED_CACHE_SIZE = 4096
API_KEY_PREFIX = "cgw-"  # what tells an API key's secret from a JWT


@dataclass(frozen=True, slots=True)
class KeyScope:
    """What an API key (``service/apikeys.py``) allows beyond being its user: the models it may
    use (None: any), and its own monthly limit inside the user's (None: the user's alone)."""

    key_id: str
    models: frozenset[str] | None = None
    limit: int | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def not_allowed(self, model: str) -> Forbidden:
        """The refusal of a model this key may not use (403 ``model_not_allowed``)."""
        return Forbidden(
            f"this API key may not use the model '{model}'",
            code="model_not_allowed",
            details={"model": model, "allowed": sorted(self.models or ())},
        )


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    expires_at: float
    key: KeyScope | None = None  # authenticated by an API key, not a token
    admin: bool = False  # may use /api/admin (the admin claim, or an admin key)

    def accepted_until(self, leeway_s: float) -> float:
        """When this principal stops being accepted: a token at its ``exp`` plus the leeway its
        check allows (``JWT_LEEWAY_S``), an API key at its expiry."""
        return self.expires_at + (0.0 if self.key is not None else leeway_s)


class KeyResolver(Protocol):
    """Turns an API key's secret into its principal (``service.apikeys.ApiKeys``)."""

    async def resolve(self, secret: str) -> Principal: ...


def has_role(claim: Any, role: str) -> bool:
    """Whether a token's role claim (a string, or a list of strings) names ``role``."""
    if isinstance(claim, str):
        return claim == role
    return isinstance(claim, list) and role in claim


def _read_pem(value: str) -> str:
    return value if "-----BEGIN" in value else Path(value).read_text()


class Authenticator:
    def __init__(self, settings: Settings, jwks: Jwks | None = None) -> None:
        self._alg = settings.jwt_algorithm
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._admin_claim = settings.admin_claim
        self._admin_role = settings.admin_role
        self._jwks = jwks
        # Set once the store exists (the app's cleanup contexts build the Authenticator first).
        self.api_keys: KeyResolver | None = None
        self._jwks_version = jwks.version if jwks is not None else 0
        self._key: Any = None
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        if settings.jwt_algorithm in HS_ALGORITHMS:
            if settings.jwt_secret is not None:
                self._key = settings.jwt_secret.get_secret_value()
        elif settings.jwt_public_key:
            self._key = _public_key(settings.jwt_algorithm, settings.jwt_public_key)

    @classmethod
    async def create(cls, settings: Settings) -> Authenticator:
        """Build it, loading the JWKS (file or URL) when one is configured."""
        jwks = None
        if settings.jwt_jwks:
            try:
                jwks = await Jwks.open(
                    settings.jwt_jwks,
                    ttl_s=settings.jwt_jwks_ttl_s,
                    min_refresh_s=settings.jwt_jwks_min_refresh_s,
                )
            except JwksError as exc:
                raise SettingsError(f"invalid setting JWT_JWKS: {exc}") from None
        return cls(settings, jwks)

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    async def _key_for(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {rejection(exc)}") from exc
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("invalid token: bad key id")
        key = await self._jwks.key_for(kid)
        if key is None:
            raise Unauthorized("invalid token: unknown key id")
        return key

    def _forget_on_key_change(self) -> None:
        """A JWKS refresh may have withdrawn the key a cached token was verified with."""
        if self._jwks is not None and self._jwks.version != self._jwks_version:
            self._jwks_version = self._jwks.version
            self._verified.clear()

    async def verify_header(self, header: str | None) -> Principal:
        if not header:
            raise Unauthorized("missing bearer token", missing=True)
        if not header.isascii():  # a JWT is ASCII; PyJWT cannot even encode other bytes
            raise Unauthorized("invalid token: not ASCII")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
        return await self.verify(token.strip())

    async def verify(self, token: str) -> Principal:
        if token.startswith(API_KEY_PREFIX):
            if self.api_keys is None:
                raise Unauthorized("invalid API key: API keys are not served here")
            return await self.api_keys.resolve(token)
        if self._jwks is not None:
            self._jwks.refresh_if_stale()  # also while every token is served from the cache
        self._forget_on_key_change()
        cached = self._verified.get(token)
        if cached is not None:
            # The same test jwt.decode applies to ``exp``: valid while exp > now - leeway.
            if time.time() < cached.expires_at + self._leeway:
                self._verified.move_to_end(token)
                return cached
            del self._verified[token]  # expired: a full verification rejects it as before
        principal = self._decode(token, await self._key_for(token))
        self._forget_on_key_change()  # the keys changed while we waited for them
        self._verified[token] = principal
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str, key: Any) -> Principal:
        if key is None:
            raise Unauthorized("token verification is not configured")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[self._alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    # A short key in a JWKS is refused (401), not a warning on every request.
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("invalid token: expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {rejection(exc)}") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or check_subject(sub) is not None:
            raise Unauthorized("invalid token: bad subject")
        return Principal(
            user_id=sub,
            expires_at=float(claims["exp"]),
            admin=has_role(claims.get(self._admin_claim), self._admin_role),
        )


def check_subject(sub: str) -> str | None:
    """Why a token's subject (its user id) is refused, or None when it is accepted. Not
    ``key:…``: that is where API keys' own months are kept (``store.key_account``), and a user
    by such a name would spend a key's budget and read its usage."""
    if not sub:
        return "must not be empty"
    if len(sub) > 256:
        return "must be at most 256 characters"
    if sub.startswith(KEY_ACCOUNT):
        return f"must not start with '{KEY_ACCOUNT}' (API keys' own accounts)"
    return None


# Why PyJWT refused a token, in words a person reads (the page shows them): never the name of an
# exception class. The most specific class is listed first (they derive from one another).
_REJECTIONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not valid yet"),
    (jwt.InvalidSignatureError, "the signature does not match"),
    (jwt.InvalidAlgorithmError, "signed with an algorithm this service does not accept"),
    (jwt.InvalidAudienceError, "meant for another audience"),
    (jwt.InvalidIssuerError, "issued by another issuer"),
    (jwt.InvalidIssuedAtError, "its issue time is in the future"),
    (jwt.InvalidKeyError, "the key cannot verify it"),
    (jwt.DecodeError, "not a well-formed JWT"),
)


def rejection(exc: jwt.PyJWTError) -> str:
    """Why ``exc`` refused a token, in words."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the '{exc.claim}' claim is missing"
    for kind, words in _REJECTIONS:
        if isinstance(exc, kind):
            return words
    return "it could not be verified"


def _public_key(algorithm: str, value: str) -> Any:
    """``JWT_PUBLIC_KEY`` (PEM text or a file), parsed once: a bad key stops start-up."""
    try:
        pem = _read_pem(value)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise SettingsError(
            f"invalid setting JWT_PUBLIC_KEY: cannot read {value} ({reason})"
        ) from None
    algo = jwt.get_algorithm_by_name(algorithm)
    try:
        key = algo.prepare_key(pem)
    except (ValueError, TypeError, jwt.PyJWTError):
        raise SettingsError(
            f"invalid setting JWT_PUBLIC_KEY: not a {algorithm} public key in PEM form"
        ) from None
    too_short = algo.check_key_length(key)
    if too_short:
        raise SettingsError(f"invalid setting JWT_PUBLIC_KEY: {too_short}")
    return key


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

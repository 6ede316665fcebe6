"""Configuration: every setting comes from the environment (or an optional ``.env``).

``load_settings`` turns a validation failure into ``SettingsError`` whose message names the
variable and the problem, one line each, so that start-up can stop with a clear message. Checks
that span several variables raise ``_Invalid`` with the variable's name, for the same reason.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.costs import Budget, parse_cost

HS_ALGORITHMS = ("HS256", "HS384", "HS512")
# RFC 7518 section 3.2: an HMAC key at least as long as the hash's output, in bytes.
HS_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "EdDSA"]


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


class _Invalid(ValueError):
    """Raised inside a model validator: carries the variable's name, which pydantic cannot."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(problem)
        self.name = name
        self.problem = problem


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- server
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    environment: Literal["local", "production"] = "production"
    data_dir: Path = Path(".data")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    request_body_timeout_s: float = Field(30.0, gt=0, le=3600)  # the whole body, once headed
    # A connection waiting for a request (its first, the next, or the rest of its headers);
    # aiohttp's default: longer than the idle timeout of any proxy in front (deploy/README.md)
    keepalive_timeout_s: float = Field(3630.0, gt=0, le=86400)
    drain_timeout_s: float = Field(20.0, ge=0)

    # --- MongoDB
    mongodb_uri: str | None = None
    mongodb_db: str = Field("chat_gateway", min_length=1)
    mongodb_timeout_ms: int = Field(3000, ge=100)
    mongodb_max_pool_size: int = Field(100, ge=1)
    # Retired with motor's thread pool (docs/performance.md, finding 39): read, from the
    # environment or .env, only to be said at start-up (``settings.retired``), not ignored.
    mongodb_threads: str | None = None

    # --- auth
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_jwks: str | None = None
    jwt_algorithm: JwtAlgorithm = "HS256"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: int = Field(30, ge=0, le=300)
    # A JWKS older than the TTL is fetched again; an unknown kid fetches it at most once a gap.
    jwt_jwks_ttl_s: float = Field(300.0, gt=0)
    jwt_jwks_min_refresh_s: float = Field(30.0, ge=0)
    # A token whose ADMIN_CLAIM is ADMIN_ROLE (or a list holding it) may use /api/admin.
    admin_claim: str = Field("role", min_length=1)
    admin_role: str = Field("admin", min_length=1)
    # How long a replica trusts an API key lookup: a revoked key stops within this everywhere.
    api_key_cache_s: float = Field(5.0, ge=0, le=300)

    # --- logs
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- chat rules
    default_token_limit: int = Field(100_000, ge=0)
    # What a month's budget counts: tokens, or money (each model's price, ``service/costs.py``).
    budget_unit: Literal["tokens", "currency"] = "tokens"
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    default_budget: str = "10.00"  # the month's budget in CURRENCY when BUDGET_UNIT=currency
    max_chats_per_user: int = Field(100, ge=1)
    message_rate_limit_ms: int = Field(1000, ge=0)  # the chat page's rule (SSE sends)
    v1_requests_per_minute: int = Field(600, ge=0, le=60_000)  # programs: /v1 and WebSocket
    max_concurrent_turns_per_user: int = Field(20, ge=0)  # programs: turns open at once
    max_message_chars: int = Field(5000, ge=1)
    context_messages: int = Field(10, ge=0)
    context_cache_chats: int = Field(1000, ge=0)
    system_prompt: str = (
        "You are a helpful assistant. Answer clearly and concisely; use Markdown when it helps."
    )

    # --- models and upstreams
    default_model: str = "demo"
    models: str | None = None  # JSON list of model entries (see README); overrides MODELS_FILE
    models_file: Path | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None
    gemini_base_url: str = "https://generativelanguage.googleapis.com/v1beta"
    gemini_api_key: SecretStr | None = None
    gemini_safety_settings: str | None = None  # JSON list of {category, threshold}
    anthropic_base_url: str = "https://api.anthropic.com"  # with or without /v1
    anthropic_api_key: SecretStr | None = None
    model_list_ttl_s: float = Field(300.0, ge=1)  # how long an upstream's model list is trusted
    demo_token_delay_ms: int = Field(30, ge=0, le=10_000)
    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    upstream_idle_timeout_s: float = Field(60.0, gt=0)
    upstream_first_token_timeout_s: float = Field(90.0, gt=0)
    upstream_total_timeout_s: float = Field(900.0, gt=0)
    upstream_max_attempts: int = Field(3, ge=1, le=10)
    upstream_retry_base_s: float = Field(0.5, ge=0)
    upstream_retry_max_s: float = Field(8.0, ge=0)
    upstream_pool_size: int = Field(1000, ge=1)

    # --- streams
    # When the last client of a chat turn goes away: finish it anyway (resumable, billed
    # exactly), or cancel it at once. Stateless /v1 turns without an Idempotency-Key always
    # cancel.
    on_disconnect: Literal["finish", "cancel"] = "finish"
    sse_heartbeat_s: float = Field(15.0, gt=0)
    stream_send_timeout_s: float = Field(30.0, gt=0)
    checkpoint_interval_s: float = Field(1.0, gt=0)
    # How often a turn followed from another replica is checkpointed, and how often that
    # replica reads it (only for turns followed elsewhere).
    follow_interval_s: float = Field(0.1, gt=0)
    watch_interval_s: float = Field(0.5, gt=0)
    stale_stream_s: float = Field(30.0, gt=0)
    reaper_interval_s: float = Field(10.0, gt=0)
    # A replica's lease on a user's month is brought to one turn's worth (shrunk, or topped up)
    # this long after its last turn ended, and goes back after LEASE_KEEP_S (or at LEASE_IDLE_S
    # if that is later).
    lease_idle_s: float = Field(2.0, ge=0)
    lease_keep_s: float = Field(30.0, ge=0)
    # How long an Idempotency-Key is kept: a retry within it replays or follows the first turn.
    idempotency_ttl_s: int = Field(86_400, ge=86_400)

    # --- WebSocket transport
    ws_allowed_origins: str = ""  # comma-separated; empty: same-origin only
    ws_max_turns_per_connection: int = Field(4, ge=1)
    ws_max_msg_bytes: int = Field(64 * 1024, ge=1024)
    ws_heartbeat_s: float = Field(20.0, gt=0)
    ws_send_queue: int = Field(256, ge=8)
    ws_ticket_ttl_s: int = Field(60, ge=5)

    # --- the chat page
    dev_token_endpoint: bool = False  # GET /api/dev/token mints tokens: local development only

    @model_validator(mode="after")
    def _check_keys(self) -> Settings:
        if self.jwt_algorithm in HS_ALGORITHMS:
            for name, value in (
                ("JWT_PUBLIC_KEY", self.jwt_public_key),
                ("JWT_JWKS", self.jwt_jwks),
            ):
                if value:
                    raise _Invalid(
                        name,
                        f"is for asymmetric algorithms; JWT_ALGORITHM={self.jwt_algorithm} "
                        "uses JWT_SECRET",
                    )
            if self.jwt_secret is not None:
                check_secret_length(self.jwt_algorithm, self.jwt_secret.get_secret_value())
        elif self.jwt_secret is not None:
            raise _Invalid(
                "JWT_SECRET",
                f"is for HS algorithms; JWT_ALGORITHM={self.jwt_algorithm} "
                "needs JWT_PUBLIC_KEY or JWT_JWKS",
            )
        return self

    @model_validator(mode="after")
    def _check_files(self) -> Settings:
        """A file named by a setting must be there at start-up, not at the first request."""
        if self.models_file is not None:
            _check_readable("MODELS_FILE", self.models_file)
        if self.jwt_public_key and "-----BEGIN" not in self.jwt_public_key:
            _check_readable("JWT_PUBLIC_KEY", Path(self.jwt_public_key))
        if self.jwt_jwks and not self.jwt_jwks.startswith(("http://", "https://")):
            _check_readable("JWT_JWKS", Path(self.jwt_jwks))
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> Settings:
        try:
            parse_cost(self.default_budget)
        except ValueError as exc:
            raise _Invalid("DEFAULT_BUDGET", str(exc)) from None
        return self

    @model_validator(mode="after")
    def _check_upstreams(self) -> Settings:
        """A URL every call would fail on, or a backoff that starts past its own cap, is a
        mistake to name at start-up, not a 502 on every send."""
        for name, url in (
            ("OPENAI_BASE_URL", self.openai_base_url),
            ("GEMINI_BASE_URL", self.gemini_base_url),
            ("ANTHROPIC_BASE_URL", self.anthropic_base_url),
        ):
            check_http_url(name, url)
        if self.upstream_retry_base_s > self.upstream_retry_max_s:
            raise _Invalid(
                "UPSTREAM_RETRY_BASE_S",
                f"{self.upstream_retry_base_s:g} s is longer than UPSTREAM_RETRY_MAX_S "
                f"({self.upstream_retry_max_s:g} s), the longest backoff",
            )
        return self

    @model_validator(mode="after")
    def _check_origins(self) -> Settings:
        for origin in self.ws_allowed_origins.split(","):
            check_origin(origin)
        return self

    @property
    def budget(self) -> Budget:
        """The month's budget: its unit and the default limit in it."""
        if self.budget_unit == "currency":
            return Budget("currency", parse_cost(self.default_budget), self.currency)
        return Budget("tokens", self.default_token_limit, self.currency)

    @property
    def is_local(self) -> bool:
        return self.environment == "local"

    @property
    def has_jwt_key(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks)


def check_secret_length(algorithm: str, secret: str) -> None:
    minimum = HS_MIN_SECRET_BYTES[algorithm]
    size = len(secret.encode())
    if size < minimum:
        raise _Invalid(
            "JWT_SECRET",
            f"{size} bytes is too short for {algorithm}: use at least {minimum} random bytes "
            "(e.g. openssl rand -base64 48)",
        )


def check_http_url(name: str, url: str) -> None:
    """An absolute http(s) URL with a host (its path, if any, is where the API lives)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError for a port that is no number or too large
    except ValueError:
        raise _Invalid(name, "not a URL (its port or host does not parse)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Invalid(name, "not an absolute http(s) URL: write https://host[:port][/path]")
    if any(c.isspace() for c in url):
        raise _Invalid(name, "a URL holds no spaces")


def check_origin(entry: str) -> None:
    """One WS_ALLOWED_ORIGINS entry, as a browser's Origin header reads: ``scheme://host[:port]``
    (a trailing slash is let through: the check ignores it, and case), or ``*``; blank entries
    are skipped."""
    written = entry.strip()
    origin = written.rstrip("/")
    if not origin or origin == "*":
        return
    if origin.lower() == "null":  # what sandboxed frames and file: pages send, any of them
        raise _Invalid(
            "WS_ALLOWED_ORIGINS", "'null' would let in any sandboxed frame or local file's page"
        )
    try:
        parts = urlsplit(origin)
        _ = parts.port  # ValueError for a port that is no number or too large
        valid = bool(parts.scheme and parts.hostname) and not (
            "@" in parts.netloc or parts.path or parts.query or parts.fragment
        )
    except ValueError:
        valid = False
    if valid and not any(c.isspace() for c in origin):
        default = {"http": 80, "https": 443}.get(parts.scheme.lower())
        if "*" in parts.netloc:
            raise _Invalid(
                "WS_ALLOWED_ORIGINS",
                f"'{written}': an origin is matched whole, list each host (or *)",
            )
        if default is not None and parts.port == default:
            raise _Invalid(
                "WS_ALLOWED_ORIGINS",
                f"'{written}': a browser leaves the default port out of its Origin "
                f"({parts.scheme}://{parts.hostname})",
            )
        return
    bare_host = "://" not in written and not any(c in written for c in "/ @?#")
    hint = f" (e.g. https://{written})" if bare_host else ""
    raise _Invalid(
        "WS_ALLOWED_ORIGINS",
        f"'{written}' is not an origin: write scheme://host[:port] as a browser sends it{hint}, "
        "or *",
    )


def _check_readable(name: str, path: Path) -> None:
    if not path.is_file():
        raise _Invalid(name, f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise _Invalid(name, f"cannot read {path}: permission denied")


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Invalid):
            lines.append(f"invalid setting {cause.name}: {cause.problem}")
            continue
        name = "_".join(str(p) for p in err["loc"]).upper() or "settings"
        lines.append(f"invalid setting {name}: {err['msg']}")
    return "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; ``overrides`` win (tests use them)."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from exc
    return resolve_local_defaults(settings)


def resolve_local_defaults(settings: Settings) -> Settings:
    """Local mode only: a development JWT secret kept in the data folder (kept across restarts).

    48 random bytes make 64 characters: long enough for HS512, the longest HMAC hash.
    """
    if settings.has_jwt_key or not settings.is_local or settings.jwt_algorithm not in HS_ALGORITHMS:
        return settings
    path = settings.data_dir / "dev-jwt-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    secret = path.read_text().strip()
    try:
        check_secret_length(settings.jwt_algorithm, secret)
    except _Invalid as exc:
        raise SettingsError(
            f"invalid setting JWT_SECRET: the development key in {path}: {exc.problem}; "
            "delete the file to have a new one made"
        ) from None
    return settings.model_copy(update={"jwt_secret": SecretStr(secret)})


def require_server_settings(settings: Settings) -> None:
    """What ``serve`` needs beyond valid values: a MongoDB and a JWT key."""
    if not settings.mongodb_uri:
        raise SettingsError(
            "invalid setting MONGODB_URI: not set (a replica-set URI; make run starts a local one)"
        )
    if not settings.has_jwt_key:
        raise SettingsError(
            "invalid setting JWT_SECRET: no JWT key configured (set JWT_SECRET, JWT_PUBLIC_KEY "
            "or JWT_JWKS; ENVIRONMENT=local creates a development key)"
        )
    if settings.dev_token_endpoint and not settings.is_local:
        raise SettingsError(
            "invalid setting DEV_TOKEN_ENDPOINT: true lets anyone mint a token for any user; "
            f"it is refused unless ENVIRONMENT=local (ENVIRONMENT={settings.environment})"
        )

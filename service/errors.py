"""The service's own exception tree, and the one JSON error shape.

    ServiceError                      status  code
    ├── BadRequest                    400     bad_request | invalid_json | validation_error | ...
    ├── Unauthorized                  401     unauthorized (with WWW-Authenticate)
    ├── Forbidden                     403     forbidden | model_not_allowed | ...
    ├── BudgetExceeded                403     budget_exceeded
    ├── NotFound                      404     not_found | chat_not_found | model_not_found | ...
    ├── Conflict                      409     chat_limit_reached | ...
    ├── PayloadTooLarge               413     payload_too_large
    ├── UnsupportedEncoding           415     unsupported_content_encoding
    ├── RateLimited                   429     rate_limited (with Retry-After, retry-after-ms)
    ├── StoreUnavailable              503     database_unavailable
    ├── ServiceUnavailable            503     shutting_down | ...
    └── UpstreamError                 502/503/504  upstream_* (see ``UPSTREAM_STATUS``)

Third-party errors (pymongo, aiohttp client) are converted at the boundary that calls
them, with ``raise ... from exc``. Anything else reaching the middleware becomes a 500 with
the same shape; the traceback goes only to the log.
"""

from __future__ import annotations

import math
from typing import Any

from service.limits import CONCURRENCY_RETRY_S, Allowance

JsonDict = dict[str, Any]


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    close_connection = False  # answered before the request's body was all read: not reused

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details
        self.headers = headers or {}

    def body(self) -> JsonDict:
        err: JsonDict = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    """401 with a Bearer challenge. ``missing``: the request sent no credentials at all, so the
    challenge names no error (RFC 6750 §3.1); otherwise what it sent was refused
    (``error="invalid_token"``)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, details: Any = None, missing: bool = False) -> None:
        challenge = 'Bearer realm="chat-gateway"'
        if not missing:
            challenge += ', error="invalid_token"'
        super().__init__(message, details=details, headers={"WWW-Authenticate": challenge})


class Forbidden(ServiceError):
    """Authenticated, but not allowed this: an admin route, a model outside a key's list."""

    status = 403
    code = "forbidden"


class BudgetExceeded(ServiceError):
    """The month's budget cannot hold the turn: used up, until the next month or a higher
    limit (403; the SDKs are told not to retry)."""

    status = 403
    code = "budget_exceeded"

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        allowance: Allowance | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, details=details, headers=headers)
        self.allowance = allowance  # the usage that refused (for a client's rate-limit headers)

    def restated(self, message: str, details: Any) -> BudgetExceeded:
        """The same refusal (its kind, its usage) in other words."""
        return type(self)(message, details=details, allowance=self.allowance)


class BudgetHeld(BudgetExceeded):
    """The month's budget would hold the turn but for what running turns (or replicas' leases)
    reserve: not used up, free again as they end. 429 with a Retry-After, as the concurrency
    rule's, so clients retry; ``HELD`` words it."""

    status = 429
    code = "budget_held"

    def __init__(self, message: str, *, details: Any = None, allowance: Allowance | None = None):
        wait_ms, headers = retry_headers(CONCURRENCY_RETRY_S)
        details = {"retry_after_ms": wait_ms, **(details or {})}
        super().__init__(message, details=details, allowance=allowance, headers=headers)


HELD = "is held by turns still running: retry when they end"  # "the rest of <whose budget> ..."


def retry_headers(retry_after_s: float) -> tuple[int, dict[str, str]]:
    """The wait in milliseconds, and the headers that say it: Retry-After in whole seconds
    (HTTP), and retry-after-ms, which OpenAI's SDKs read first, to the millisecond."""
    seconds = max(1, math.ceil(retry_after_s))
    wait_ms = math.ceil(round(retry_after_s * 1000, 3))  # never early; no float noise
    return wait_ms, {"Retry-After": str(seconds), "retry-after-ms": str(wait_ms)}


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    close_connection = True


class RequestTimeout(ServiceError):
    """The request's body did not arrive in time (``REQUEST_BODY_TIMEOUT_S``)."""

    status = 408
    code = "request_timeout"
    close_connection = True


class UnsupportedEncoding(ServiceError):
    status = 415
    code = "unsupported_content_encoding"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        details: Any = None,
        allowance: Allowance | None = None,
    ) -> None:
        wait_ms, headers = retry_headers(retry_after_s)
        super().__init__(
            message, details={"retry_after_ms": wait_ms, **(details or {})}, headers=headers
        )
        self.retry_after_s = retry_after_s
        self.allowance = allowance  # the usage that refused (for a client's rate-limit headers)


class StoreUnavailable(ServiceError):
    status = 503
    code = "database_unavailable"


class ServiceUnavailable(ServiceError):
    status = 503
    code = "service_unavailable"


UPSTREAM_STATUS = {
    "upstream_auth": 502,
    "upstream_billing": 502,  # the gateway's account at the vendor out of credit or quota
    "upstream_bad_request": 502,  # 400 when the vendor said the request is invalid (400/422)
    "upstream_bad_response": 502,
    "upstream_rate_limited": 503,
    "upstream_unavailable": 503,
    "upstream_timeout": 504,
    "upstream_refused": 502,
    "upstream_content_filtered": 400,
}


class UpstreamError(ServiceError):
    """A model vendor failed; ``code`` is one of ``UPSTREAM_STATUS``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = UPSTREAM_STATUS.get(code, 502)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.upstream_status = upstream_status

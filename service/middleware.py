"""Request middleware: request id, one access line, errors as JSON, bearer auth.

``request_context`` binds the request id to every log line, authenticates (``/api`` and ``/v1``),
turns every exception into the one JSON error shape (a 500 keeps its traceback in the log only)
and writes the access line. ``/v1`` takes OpenAI's error shape, except the Anthropic-compatible
routes (``/v1/messages``, ``/v1/messages/...``, and ``/v1/models`` asked with
``anthropic-version``): they take Anthropic's, and also accept the token in ``x-api-key`` (what
Claude Code and Anthropic's SDKs send for an API key).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from service.auth import Principal
from service.errors import PayloadTooLarge, ServiceError, Unauthorized
from service.http import anthropic_error_response, error_response, openai_error_response
from service.keys import AUTH, PRINCIPAL, REQUEST_ID, UPGRADED
from service.logs import bind_request, log_access, start_request
from service.transports.sse import FollowingResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger("service.access")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PUBLIC_PREFIXES = ("/api/dev/",)
SELF_AUTHENTICATING = frozenset({"/api/ws"})  # browsers cannot set headers on a WebSocket
GUARDED_PREFIXES = ("/api/", "/v1/")
SERVER_NAME = "chat-gateway"
ANTHROPIC_ROUTE = "/v1/messages"
MODELS_ROUTE = "/v1/models"  # both vendors' SDKs ask it: ``anthropic-version`` tells them apart
ANTHROPIC_VERSION_HEADER = "anthropic-version"
API_KEY_HEADER = "x-api-key"


def is_anthropic(request: web.Request) -> bool:
    """Whether ``request`` is for the Anthropic-compatible API (its errors, its key): the
    Messages routes, and the models' routes both SDKs share when asked by an Anthropic client
    (which sends ``anthropic-version``)."""
    path = request.path
    if path == ANTHROPIC_ROUTE or path.startswith(ANTHROPIC_ROUTE + "/"):
        return True
    shared = path == MODELS_ROUTE or path.startswith(MODELS_ROUTE + "/")
    return shared and ANTHROPIC_VERSION_HEADER in request.headers


def _request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex


# The headers of aiohttp's own text body, which the JSON error replaces; every other header an
# HTTPException carries stays (a 405's Allow, which RFC 9110 requires, a Retry-After...).
_BODY_HEADERS = frozenset(
    {"content-type", "content-length", "content-encoding", "transfer-encoding"}
)


def _from_http_exception(exc: web.HTTPException) -> ServiceError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body too large")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    err = ServiceError(exc.reason, code=code, headers=headers)
    err.status = exc.status
    return err


def _renderer(request: web.Request) -> Callable[[ServiceError], web.Response]:
    """``/v1`` is the OpenAI-compatible API, and ``/v1/messages`` the Anthropic-compatible one:
    their errors take their vendor's shape; ``/api`` keeps ours."""
    if is_anthropic(request):
        rid = request.get(REQUEST_ID)
        return lambda exc: anthropic_error_response(exc, rid)
    return openai_error_response if request.path.startswith("/v1/") else error_response


def _to_response(request: web.Request, exc: BaseException) -> tuple[web.StreamResponse, str | None]:
    """The error's response in the route's shape, and its code (for the access line)."""
    openai = request.path.startswith("/v1/")
    render = _renderer(request)
    if isinstance(exc, ServiceError):
        response = render(exc)
        if exc.close_connection:  # aiohttp reads what is left for at most its lingering time
            response.force_close()  # (10 s), then closes: the connection serves nothing more
        return response, exc.code
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return exc, None
        err = _from_http_exception(exc)
        if openai and exc.status == 404:
            err.message, err.code = f"Invalid URL ({request.method} {request.path})", "unknown_url"
        return render(err), err.code
    log.error("request.unhandled_exception", path=request.path, exc_info=exc)
    err = ServiceError("internal error; see the log with this request id")
    return render(err), err.code


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: a streaming request stays in it for the whole answer, so it holds a
    single frame and no context manager per request."""
    rid = _request_id(request)
    request[REQUEST_ID] = rid
    started = time.perf_counter()
    start_request(rid)  # aiohttp runs each request in its own task: nothing to reset after
    try:
        await authenticate(request)
        response = await handler(request)
    except asyncio.CancelledError:  # the client closed the connection: 499, but a WebSocket's
        # exchange was 101 whoever closed it (its close codes are in ``ws.closed``)
        log_access(request, 101 if request.get(UPGRADED) else 499, started)
        raise
    except Exception as exc:  # noqa: BLE001 - every error becomes the JSON shape
        response, code = _to_response(request, exc)
        log_access(request, response.status, started, error_code=code)
        return response
    if isinstance(response, FollowingResponse):  # it streams from here: its line when it closes
        response.access_started = started
    else:
        log_access(request, response.status, started)
    return response


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streaming ones included, echoes the request id."""
    rid = request.get(REQUEST_ID)
    if rid:
        response.headers["X-Request-ID"] = rid


async def authenticate(request: web.Request) -> None:
    """Guard ``/api`` and ``/v1`` (but the public and self-authenticating paths): the bearer
    token's principal goes on the request and on every log line of it."""
    path = request.path
    if (
        path.startswith(GUARDED_PREFIXES)
        and not path.startswith(PUBLIC_PREFIXES)
        and path not in SELF_AUTHENTICATING
    ):
        principal = await _verify(request)
        request[PRINCIPAL] = principal
        if principal.key is not None:  # which key acted, on every line of the request
            bind_request(user_id=principal.user_id, key_id=principal.key.key_id)
        else:
            bind_request(user_id=principal.user_id)


async def _verify(request: web.Request) -> Principal:
    """The caller's token: ``Authorization: Bearer``, or on the Anthropic-compatible routes
    ``x-api-key`` (which wins when both are sent, as it does at Anthropic)."""
    auth = request.app[AUTH]
    if is_anthropic(request):
        key = request.headers.get(API_KEY_HEADER)
        if key is not None:
            if not key.strip():
                raise Unauthorized("missing token: x-api-key is empty", missing=True)
            if not key.isascii():
                raise Unauthorized("invalid token: not ASCII")
            return await auth.verify(key.strip())
        if "Authorization" not in request.headers:
            raise Unauthorized(
                "missing API key: send x-api-key or Authorization: Bearer", missing=True
            )
    return await auth.verify_header(request.headers.get("Authorization"))

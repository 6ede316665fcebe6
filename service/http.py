"""Small HTTP helpers shared by the handlers: JSON in, JSON out, one error shape."""

from __future__ import annotations

import asyncio
import unicodedata
import uuid
import zlib
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedEncoding,
)

M = TypeVar("M", bound=BaseModel)

# REQUEST_BODY_TIMEOUT_S, for ``read_body`` (set by ``create_app``; service.keys imports this).
BODY_TIMEOUT_S = web.AppKey("request_body_timeout_s", float)


def dumps(obj: Any) -> bytes:
    """JSON bytes; datetimes (always UTC here) as ISO 8601 with a ``Z``."""
    return orjson.dumps(obj, option=orjson.OPT_UTC_Z)


def json_response(
    obj: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(obj), status=status, headers=headers, content_type="application/json"
    )


def error_response(exc: ServiceError) -> web.Response:
    return json_response(exc.body(), status=exc.status, headers=exc.headers)


def problem(error: Any) -> str:
    """A pydantic error's words for a person: a validator's own, without pydantic's prefix."""
    msg: str = error["msg"]
    return msg.removeprefix("Value error, ")


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {
            "field": ".".join(str(p) for p in e["loc"]) or None,
            "problem": problem(e),
            "type": e["type"],
        }
        for e in exc.errors(include_url=False, include_input=False)
    ]


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(
            "request validation failed", code="validation_error", details=_validation_details(exc)
        ) from exc


class _NoQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def one_line(value: str) -> str:
    """A name shown on one line (a chat's title, an API key's name): no control characters
    (C0, NUL and line breaks included, DEL, C1)."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters (line breaks, tabs, NUL...)")
    return value


def no_query(request: web.Request) -> None:
    """A route that takes no query parameters refuses one (400 ``validation_error`` naming it),
    as the routes that take some refuse those they do not know: none is silently ignored."""
    if request.query:
        validate(_NoQuery, dict(request.query))


# Request body codings we decode (``Content-Encoding``). aiohttp's own decoding is off (see
# ``create_app``): it knows br and zstd only when optional packages are installed and refuses
# them before the app runs otherwise, and its decoding errors reach the handler unlabelled.
BODY_CODINGS = ("gzip", "x-gzip", "deflate")
_IDENTITY = ("", "identity")


def _body_coding(request: web.Request) -> str | None:
    """The body's one coding, None for identity; 415 for anything else (several codings too)."""
    values = request.headers.getall("Content-Encoding", [])
    coding = values[0].strip().lower() if len(values) == 1 else "several"
    if not values or coding in _IDENTITY:
        return None
    if coding not in BODY_CODINGS:
        raise UnsupportedEncoding(
            "unsupported Content-Encoding: send the body as identity, gzip or deflate",
            details={"supported": ["identity", "gzip", "deflate"]},
        )
    return coding


class BodyDecoder:
    """Incremental gzip/deflate decoding that never inflates more than ``limit`` + 1 bytes."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.produced = 0
        self._head = b""  # the first bytes, until there are enough to tell the framing
        self._zlib: Any = None

    def feed(self, data: bytes) -> bytes:
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            self._zlib = zlib.decompressobj(self._wbits(data))
        try:
            out: bytes = self._zlib.decompress(data, self.limit + 1 - self.produced)
        except zlib.error as exc:
            raise self._invalid() from exc
        if self._zlib.eof and self._zlib.unused_data:
            raise self._invalid()  # bytes after the end of the compressed stream
        self.produced += len(out)
        return out

    def finish(self) -> None:
        if self._head or (self._zlib is not None and not self._zlib.eof):
            raise self._invalid()  # truncated

    def _wbits(self, first: bytes) -> int:
        if self.coding != "deflate":
            return 16 + zlib.MAX_WBITS  # gzip framing
        # "deflate" is zlib-framed (RFC 9110), but many clients send a raw deflate stream.
        zlib_header = first[0] & 0x0F == 8 and int.from_bytes(first[:2], "big") % 31 == 0
        return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS

    def _invalid(self) -> BadRequest:
        return BadRequest(f"request body is not valid {self.coding} data", code="invalid_body")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body too large (limit {limit} bytes)")


async def read_body(request: web.Request) -> bytes:
    """The body, decoded when it came gzip or deflate; 413 (``PayloadTooLarge``) when it is
    over ``client_max_size`` as sent (said by its Content-Length: before reading any) or once
    decoded, 415 for other codings, 400 when it does not decode, 408 when it has not all come
    within ``REQUEST_BODY_TIMEOUT_S`` (a client trickling it, or gone quiet, holds its request
    no longer, and its connection is not reused: ``close_connection``).

    Not ``request.read()``: that keeps the bytes on the request, and a streaming turn's request
    lives as long as its stream (a long prompt would stay in memory for the whole answer)."""
    coding = _body_coding(request)  # before reading: a refused coding needs no body
    limit = request.client_max_size
    if limit and (request.content_length or 0) > limit:
        raise _too_large(limit)
    decoder = BodyDecoder(coding, limit) if coding else None
    body, sent = bytearray(), 0

    async def read() -> None:
        nonlocal sent
        while chunk := await request.content.readany():
            sent += len(chunk)
            body.extend(decoder.feed(chunk) if decoder else chunk)
            if limit and max(sent, len(body)) > limit:
                raise _too_large(limit)

    if request.content.is_eof():  # all here already (a small body comes with its headers)
        await read()
    else:
        timeout_s = request.app[BODY_TIMEOUT_S]
        try:
            async with asyncio.timeout(timeout_s):
                await read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not all arrive within {timeout_s:g} s"
            ) from None
    if decoder:
        decoder.finish()
    return bytes(body)


async def read_json(request: web.Request, model: type[M], *, empty_ok: bool = False) -> M:
    """Read, parse and validate a JSON body (413 when over ``client_max_size``)."""
    raw = await read_body(request)
    if not raw.strip() and empty_ok:
        return validate(model, {})
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return validate(model, data)


def parse_uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise BadRequest(
            f"{what} must be a UUID", code="invalid_id", details={"field": what}
        ) from exc


def not_found(what: str) -> NotFound:
    return NotFound(f"{what} not found", code=f"{what.replace(' ', '_')}_not_found")


# --------------------------------------------------------------------------- OpenAI error shape
# Our codes that OpenAI names differently: (status, type, code). Anything else keeps our code,
# with the type following the status (see ``_OPENAI_TYPES``).
_OPENAI_CODES: dict[str, tuple[int, str, str]] = {
    "budget_exceeded": (429, "insufficient_quota", "insufficient_quota"),
    "budget_held": (429, "requests", "rate_limit_exceeded"),  # retried, as a rate limit is
    "rate_limited": (429, "requests", "rate_limit_exceeded"),
    "unauthorized": (401, "authentication_error", "invalid_api_key"),
    "context_too_long": (400, "invalid_request_error", "context_length_exceeded"),
}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "requests"}


def openai_error_parts(exc: ServiceError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``exc`` as OpenAI renders errors: status, ``{"error": {message, type, param, code}}``
    and headers (Retry-After, WWW-Authenticate kept; quota errors say ``x-should-retry: false``
    so the SDKs do not retry what only a new period or a higher limit can fix)."""
    headers = dict(exc.headers)
    if exc.code in _OPENAI_CODES:
        status, kind, code = _OPENAI_CODES[exc.code]
    else:
        status, code = exc.status, exc.code
        if status >= 500:
            kind = "server_error"
        else:
            kind = _OPENAI_TYPES.get(status, "invalid_request_error")
    if exc.code == "budget_exceeded":
        headers["x-should-retry"] = "false"
    param = exc.details.get("param") if isinstance(exc.details, dict) else None
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}
    return status, body, headers


def wire_status(transport: str, exc: ServiceError) -> int:
    """The status a client of ``transport`` is answered for ``exc``: the ``/v1`` routes speak
    their vendor's (the month's budget is OpenAI's and Anthropic's 429, the page's 403)."""
    if transport == "openai":
        return openai_error_parts(exc)[0]
    if transport == "anthropic":
        return anthropic_error_parts(exc)[0]
    return exc.status


def openai_error_response(exc: ServiceError) -> web.Response:
    status, body, headers = openai_error_parts(exc)
    return json_response(body, status=status, headers=headers)


# --------------------------------------------------------------------------- Anthropic error shape
# Anthropic's error types by status; a status it has no type for takes the client's or the
# server's general one.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_parts(
    exc: ServiceError, request_id: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``exc`` as Anthropic renders errors: status, ``{"type": "error", "error": {type,
    message}, "request_id"}`` and headers. The month's budget is a 429 ``rate_limit_error``
    (as Anthropic's own spend limits are) with ``x-should-retry: false``, so the SDKs do not
    retry what only a new period or a higher limit can fix."""
    headers = dict(exc.headers)
    status = exc.status
    if exc.code == "budget_exceeded":
        status = 429
        headers["x-should-retry"] = "false"
    kind = _ANTHROPIC_TYPES.get(status) or (
        "api_error" if status >= 500 else "invalid_request_error"
    )
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": exc.message}}
    if request_id is not None:
        body["request_id"] = request_id
        headers["request-id"] = request_id
    return status, body, headers


def anthropic_error_response(exc: ServiceError, request_id: str | None = None) -> web.Response:
    status, body, headers = anthropic_error_parts(exc, request_id)
    return json_response(body, status=status, headers=headers)

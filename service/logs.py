"""structlog, configured once at start-up.

JSON lines when stdout is not a terminal (or ``LOG_FORMAT=json``), a readable console otherwise
(in colour only on a terminal). Every line carries its request's fields (``bind_request``: the
request id, then who acts): one context variable, set per request (aiohttp gives each request a
task, so a context, of its own; a turn's task starts with a copy). Standard-library loggers
(aiohttp, pymongo) and Python warnings go through the same processors and renderer, so every
line is one JSON document: a traceback is rendered as text into its ``exception`` field.

Nothing a client sends may put a credential in the log: aiohttp's parse errors echo the raw
request line or header, a JWT included. ``scrub`` replaces what looks like a credential in every
string field (JWTs, ``Bearer`` values, ``Authorization``/``Cookie``/API-key header values,
``ticket=``/``token=``/``key=`` query values, OpenAI and Google API keys, and this service's own
``cgw-`` keys) and bounds each
field's length, on our own lines as well: they are few per request, and a field runs the
expression only when a few substring tests say it might match (about 3 µs a line).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pymongo.errors import BulkWriteError
from structlog.typing import EventDict, WrappedLogger

if TYPE_CHECKING:
    from aiohttp import web

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

REDACTED = "[redacted]"
MAX_FIELD_CHARS = 2000  # a request line or header aiohttp echoes can be 8 KiB
MAX_EXCEPTION_CHARS = 8000  # a traceback's text
_CREDENTIAL = re.compile(
    # a JWS or JWE: base64url JSON header ("eyJ" is '{"'), then 2 to 4 more segments
    r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){2,4}"
    # OpenAI-style and Google API keys, and this service's own (``cgw-``)
    r"|\bsk-[A-Za-z0-9_-]{16,}|\bAIza[A-Za-z0-9_-]{30,}|\bcgw-[A-Za-z0-9_-]{8,}"
    # Authorization/Cookie headers: the whole value, whatever its scheme
    r"|(?P<h>(?i:\b(?:proxy-)?authorization|\bcookie|\bset-cookie)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\"'\r\n]+"
    # a bearer token anywhere
    r"|(?P<b>(?i:\bbearer)[\s\x00-\x1f]+)\S+"
    # API-key headers and fields
    r"|(?P<k>(?i:\b(?:x-goog-api-key|x-api-key|api[_-]?key))[\"']?\s*[:=]\s*[\"']?)"
    r"[^\"'\s,;&}]+"
    # credentials in a query string
    r"|(?P<q>(?i:(?<![A-Za-z0-9])(?:ticket|(?:access_|id_|refresh_)?token|key|password|secret)=))"
    r"[^&\s\"'#]+"
)


def _replace(match: re.Match[str]) -> str:
    return (match["h"] or match["b"] or match["k"] or match["q"] or "") + REDACTED


def _may_hold_credential(text: str) -> bool:
    """A fast test (a few substring searches) that every match of the expression passes: most
    fields (paths, ids, event names) skip the expression, which costs 10-20 times as much."""
    low = text.lower()
    return (
        "=" in low
        or "eyj" in low
        or "key" in low
        or "bearer" in low
        or "auth" in low
        or "cookie" in low
        or "sk-" in low
        or "cgw-" in low
        or "aiza" in low
    )


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``[redacted]``."""
    return _CREDENTIAL.sub(_replace, text) if _may_hold_credential(text) else text


MAX_ERROR_CHARS = 300  # an underlying error's words in a line: the driver's run to 600 and more
# A URL's user and password (``mongodb://user:pass@host``): a driver may echo the URI it was given.
_USERINFO = re.compile(r"(?P<s>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def error_text(exc: BaseException) -> str:
    """What went wrong beneath ``exc``, for its log line (``error=``): the type and words of its
    cause (the driver's or the HTTP client's error a ``ServiceError`` was raised from), or its
    own; credentials and a URL's password masked, at most about ``MAX_ERROR_CHARS``."""
    cause = exc.__cause__ or exc
    if isinstance(cause, BulkWriteError):  # its str() holds the documents: a user's text
        errors = cause.details.get("writeErrors") or ()
        words = "; ".join(f"{e.get('code')}: {e.get('errmsg')}" for e in errors[:3])
    else:
        words = str(cause)
    text = f"{type(cause).__name__}: {words}" if words else type(cause).__name__
    text = redact(_USERINFO.sub(rf"\g<s>{REDACTED}@", text[: 4 * MAX_ERROR_CHARS]))
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


def _bound(text: str, limit: int, head: int) -> str:
    """At most about ``limit`` characters: the first ``head`` and the rest from the end."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:head]}…[{cut} characters cut]…{text[len(text) - limit + head :]}"


def scrub(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: redact credentials in, and bound the length of, every string field."""
    for key, value in event_dict.items():
        if isinstance(value, str) and (len(value) > MAX_FIELD_CHARS or _may_hold_credential(value)):
            event_dict[key] = _scrubbed(value, exception=key == "exception")
    return event_dict


def _scrubbed(text: str, *, exception: bool) -> str:
    # A traceback keeps its first line and its end (the frames nearest the error).
    limit = MAX_EXCEPTION_CHARS if exception else MAX_FIELD_CHARS
    head = limit // 4 if exception else limit
    # Cut first, so the expression never scans megabytes; a token split by the cut is still
    # redacted (its prefix matches) or no longer usable.
    return _bound(redact(_bound(text, 4 * limit, head)), limit, head)


# The request's fields for every log line written while it is handled. One variable, set as a
# whole (never a variable per field, and no token kept to reset it): thousands of requests
# stream at once, and each holds its fields for as long as it streams.
_REQUEST_FIELDS: ContextVar[Mapping[str, Any] | None] = ContextVar("request_fields", default=None)


def bind_request(**fields: Any) -> None:
    """Add ``fields`` to every log line of this request from now on (this task's context and
    the tasks it starts)."""
    _REQUEST_FIELDS.set({**(_REQUEST_FIELDS.get() or {}), **fields})


def start_request(request_id: str) -> None:
    """A new request: its fields are its id alone, whatever this context held before."""
    _REQUEST_FIELDS.set({"request_id": request_id})


_access = structlog.get_logger("service.access")


def log_access(
    request: web.BaseRequest, status: int, started: float, *, error_code: str | None = None
) -> None:
    """The request's access line (``http.request``), when it ends: a stream's when it closes;
    an error answer's with its ``error_code`` (the code in its body)."""
    _access.info(
        "http.request",
        method=request.method,
        path=request.path,
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        **({"error_code": error_code} if error_code else {}),
    )


def merge_request(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the request's fields under the line's own."""
    fields = _REQUEST_FIELDS.get()
    return {**fields, **event_dict} if fields else event_dict


# DEL and the C1 control characters (U+0080-U+009F: U+0085 is a line break to some readers,
# U+009B starts a terminal's escape sequence), which JSON leaves raw; only a string holds them.
_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0))}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    # orjson escapes C0 control characters; the others are escaped here too (a line that is all
    # ASCII, as nearly all are, is only searched for DEL: ``translate`` costs ~4 us a line).
    text = orjson.dumps(obj, default=default).decode()
    if text.isascii():
        return text.replace("\x7f", "\\u007f") if "\x7f" in text else text
    return text.translate(_JSON_CONTROLS)


# Every control character (C0, DEL, C1), escaped as ``repr`` escapes them (``\x00``, ``\n``,
# ``\x1b``, ``\x9b``): a raw one in the console log (a NUL in a path or a token's subject) makes
# grep call the file binary, and an ESC drives the terminal showing it. JSON lines need none of
# this: the encoder escapes C0 (``\u0000``; the others in ``_orjson_dumps``).
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS_BUT_NEWLINE = {c: e for c, e in _CONTROLS.items() if c != ord("\n")}


def _escaped(value_repr: Callable[[object], str]) -> Callable[[object], str]:
    def render(value: object) -> str:
        return value_repr(value).translate(_CONTROLS)

    return render


class _ConsoleRenderer(structlog.dev.ConsoleRenderer):
    """structlog's console renderer with no raw control character in a line. It writes a string
    value as it is unless it holds a space, a quote or a line break (then its ``repr``), and the
    event, logger name and timestamp always as they are: every column's text is escaped. A
    traceback (``exception``, ``stack``) keeps its line breaks and loses every other control."""

    def __init__(self, *, colors: bool) -> None:
        super().__init__(colors=colors)
        self.columns = [
            structlog.dev.Column(
                col.key,
                dataclasses.replace(col.formatter, value_repr=_escaped(col.formatter.value_repr)),
            )
            if isinstance(col.formatter, structlog.dev.KeyValueColumnFormatter)
            else col
            for col in self.columns
        ]

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        for key in ("exception", "stack"):
            text = event_dict.get(key)
            if isinstance(text, str):
                event_dict[key] = text.translate(_CONTROLS_BUT_NEWLINE)
        return super().__call__(logger, name, event_dict)


def configure_logging(fmt: str = "auto", level: str = "info", *, cache: bool = True) -> None:
    tty = sys.stdout.isatty()
    json_output = fmt == "json" or (fmt == "auto" and not tty)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if json_output
        else _ConsoleRenderer(colors=tty)
    )
    shared: list[Any] = [
        merge_request,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = _LEVELS.get(level, logging.ERROR)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, scrub, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.add_logger_name,
                structlog.processors.format_exc_info,
                scrub,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric > logging.DEBUG else numeric)
    # Our middleware writes one access line per request; aiohttp's own would duplicate it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)
    # A library's warning (PyJWT's, aiohttp's) becomes a log line, not raw text on stderr.
    logging.captureWarnings(True)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

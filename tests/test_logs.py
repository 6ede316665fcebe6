"""The log: one JSON document per line, no credential a client sends, bounded lines, and colour
only on a terminal."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys

import pytest

from service.auth import mint_token
from service.logs import MAX_EXCEPTION_CHARS, MAX_FIELD_CHARS, REDACTED, redact, scrub
from service.settings import load_settings
from tests.conftest import TEST_SECRET
from tests.processes import ROOT, wait_until

MAX_LINE_CHARS = 16_000  # every field bounded: a line stays well under this


def a_real_token(user: str = "alice") -> str:
    return mint_token(load_settings(jwt_secret=TEST_SECRET), user)


async def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes no HTTP client would (control characters), read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_what_a_client_sends_never_puts_a_credential_in_the_log(services):
    """aiohttp's parse errors echo the raw request line or header at level error: a token
    followed by a control character used to land in the log in full."""
    (svc,) = await services.start("a")
    token = a_real_token()
    secrets = [token, "sk-" + "k" * 40, "opaque-bearer-secret-value", "my-api-key-value"]
    requests = [
        f"GET /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n",
        f"GET /api/ws?ticket={token}\x01&token={token} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /api/chat?key={secrets[1]}&x=\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secrets[2]}\x01\r\n\r\n",
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {secrets[3]}\x01\r\n\r\n",
        f"GET /api/chat?x={'a' * 7000}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for request in requests:
        answer = await raw_request(svc.port, request.encode())
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]

    def parse_errors() -> list[dict]:
        return [e for e in svc.lines() if e.get("logger") == "aiohttp.server"]

    await wait_until(lambda: len(parse_errors()) == len(requests), what="every parse error")
    for line in svc.text().splitlines():
        json.loads(line)  # every line is one JSON document: no raw traceback, no raw warning
        assert len(line) < MAX_LINE_CHARS
        for secret in secrets:
            assert secret not in line
        assert token.split(".")[1] not in line and token.split(".")[2] not in line
    for error in parse_errors():
        assert error["level"] == "error"
        assert "exc_info" not in error
        assert error["exception"].startswith("Traceback")  # the traceback, as text
        assert "BadHttpMessage" in error["exception"] or "InvalidURLError" in error["exception"]
    assert sum(REDACTED in e["exception"] for e in parse_errors()) == len(requests) - 1


CASES = [
    ("Authorization: Bearer {jwt}\x01", "Authorization: [redacted]"),
    ("b'authorization: Basic dXNlcjpwYXNz'", "b'authorization: [redacted]'"),
    (
        "<CIMultiDict('Authorization': 'Bearer abc')>",
        "<CIMultiDict('Authorization': '[redacted]')>",
    ),
    ("sent bearer\x01abc.def to it", "sent bearer\x01[redacted] to it"),
    ("GET /api/ws?ticket=t1ck3t&x=1", "GET /api/ws?ticket=[redacted]&x=1"),
    ("/v1beta/models?key=AIzaSyA-1234567890abcdefghijklmnopqrstu", "/v1beta/models?key=[redacted]"),
    ("x-goog-api-key: AIzaSyA-1234567890abcdefghijklmnopqrstu", "x-goog-api-key: [redacted]"),
    ('{"api_key": "abc123", "n": 1}', '{"api_key": "[redacted]", "n": 1}'),
    ("X-Api-Key=abc123;", "X-Api-Key=[redacted];"),
    ("upstream key sk-proj-abcdefghijklmnop1234 refused", "upstream key [redacted] refused"),
    ("a token {jwt} in prose", "a token [redacted] in prose"),
    ("access_token={jwt}&id_token={jwt}", "access_token=[redacted]&id_token=[redacted]"),
    ("stream.first_token", "stream.first_token"),
    ("http.request GET /api/chat 200", "http.request GET /api/chat 200"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_credentials_are_redacted(text, expected):
    jwt = a_real_token()
    assert redact(text.replace("{jwt}", jwt)) == expected


def test_every_string_field_is_redacted_and_bounded():
    jwt = a_real_token()
    event = {
        "event": "x" * (MAX_FIELD_CHARS + 500) + jwt,
        "header": f"Bearer {jwt}",
        "exception": "Traceback (most recent call last):\n" + "  frame\n" * 5000 + "Boom",
        "count": 3,
    }
    out = scrub(None, "error", dict(event))
    assert out["event"].startswith("x" * MAX_FIELD_CHARS)
    assert out["event"].endswith(f"…[{500 + len(REDACTED)} characters cut]…")  # redacted, cut
    assert out["header"] == "Bearer [redacted]"
    assert out["exception"].startswith("Traceback (most recent call last):\n")
    assert out["exception"].endswith("  frame\nBoom")  # and its end, nearest the error
    assert len(out["exception"]) < MAX_EXCEPTION_CHARS + 40
    assert out["count"] == 3


def python(code: str, *, tty: bool = False) -> str:
    """Run ``code`` in a fresh interpreter, stdout to a pipe (or a pseudo-terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not tty:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
        ).stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, env=env)
    os.close(follower)
    data = b""
    try:
        while chunk := os.read(leader, 4096):
            data += chunk
    except OSError:  # EIO: the terminal's other end is closed and everything was read
        pass
    finally:
        os.close(leader)
        proc.wait(30)
    return data.decode()


def test_a_library_warning_is_one_json_line():
    token = a_real_token()
    code = (
        "import warnings; from service.logs import configure_logging;"
        "configure_logging('json');"
        f"warnings.warn('key material in a warning: {token}\\nsecond line', UserWarning)"
    )
    lines = python(code).splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["logger"] == "py.warnings" and line["level"] == "warning"
    assert "UserWarning: key material in a warning: [redacted]" in line["event"]
    assert token not in lines[0]


LOG_A_LINE = (
    "from service.logs import configure_logging, get_logger;"
    "configure_logging('console'); get_logger('t').warning('hello', n=1)"
)


def test_console_output_has_colour_only_on_a_terminal():
    piped = python(LOG_A_LINE)
    assert "hello" in piped and "\x1b[" not in piped
    on_terminal = python(LOG_A_LINE, tty=True)
    assert "hello" in on_terminal and "\x1b[" in on_terminal


async def test_service_console_log_written_to_a_file_has_no_colour_codes(services):
    """What `make run > file` does: LOG_FORMAT=console with stdout to a file."""
    (svc,) = await services.start("a", log_format="console")
    text = svc.text()
    assert "service.listening" in text
    assert "\x1b[" not in text


CONTROLS = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))  # C0, DEL, C1
ESCAPED = "".join(repr(c)[1:-1] for c in CONTROLS)  # \x00\x01...\t\n...\x1b...\x7f
LOG_CONTROLS = (
    "from service.logs import configure_logging, get_logger\n"
    "configure_logging({fmt!r}); log = get_logger('t'); c = {controls!r}\n"
    "bare = c.translate({{9: None, 10: None, 13: None}})  # no tab or line break: not quoted\n"
    "log.warning('event' + c, full='a' + c, bare='a' + bare)\n"
    "try:\n"
    "    raise ValueError('boom' + c)\n"
    "except ValueError:\n"
    "    log.exception('failed')\n"
)


def test_the_console_log_escapes_every_control_character():
    """A raw NUL makes grep call the log binary, a raw ESC drives the terminal: the event, every
    field (structlog writes a string without a space, quote or line break as it is) and the
    traceback's text carry them escaped; only a traceback keeps its line breaks (its message's
    too)."""
    out = python(LOG_CONTROLS.format(fmt="console", controls=CONTROLS))
    assert set(out) & set(CONTROLS) == {"\n"}, [c for c in out if c in CONTROLS and c != "\n"]
    first, *traceback = out.splitlines()
    assert f"event{ESCAPED}" in first
    assert f"full='a{ESCAPED}'" in first
    assert "bare=a" + ESCAPED.replace("\\t", "").replace("\\n", "").replace("\\r", "") in first
    assert traceback[1] == "Traceback (most recent call last):"
    assert out.endswith("ValueError: boom" + ESCAPED.replace("\\n", "\n") + "\n")


def test_the_json_log_escapes_every_control_character():
    """JSON escapes C0 itself; DEL and C1, which it may leave raw, are escaped too
    (``\\u007f``, ``\\u0085``)."""
    out = python(LOG_CONTROLS.format(fmt="json", controls=CONTROLS))
    lines = out.splitlines()
    assert len(lines) == 2 and not set(out) & set(CONTROLS) - {"\n"}
    warning, error = map(json.loads, lines)
    assert warning["event"] == "event" + CONTROLS and warning["full"] == "a" + CONTROLS
    assert error["exception"].endswith(f"ValueError: boom{CONTROLS}")


async def test_a_control_character_a_client_sends_is_escaped_in_the_console_log(services):
    """`make run > file`: a NUL in a path (``%00``) or in a token's subject reached the log raw."""
    (svc,) = await services.start("a", log_format="console")
    token = a_real_token("eve\x00\x1b[31m")
    requests = [
        "GET /api/x%00y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        f"GET /api/none HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n",
    ]
    for request, status in zip(requests, (b" 401 ", b" 404 "), strict=True):
        answer = await raw_request(svc.port, request.encode())
        assert status in answer.split(b"\r\n")[0]
    await wait_until(
        lambda: "path=/api/x\\x00y" in svc.text() and "user_id=eve\\x00\\x1b[31m" in svc.text(),
        what="both access lines",
    )
    assert not set(svc.text()) & set(CONTROLS) - {"\n"}


def test_an_error_s_cause_is_logged_bounded_without_its_credentials():
    """``error_text``: the cause's type and words (what a ``ServiceError`` was raised from),
    a URL's password and anything shaped like a key masked, the length bounded."""
    from service.logs import MAX_ERROR_CHARS, error_text

    try:
        try:
            raise ConnectionError(
                "mongodb://chat:hunter2-pw@db.example:27017 refused; key sk-"
                + "k" * 30
                + " "
                + "x" * 2000
            )
        except ConnectionError as exc:
            raise RuntimeError("the database is unavailable") from exc
    except RuntimeError as exc:
        text = error_text(exc)
    assert text.startswith(f"ConnectionError: mongodb://{REDACTED}@db.example:27017 refused")
    assert "hunter2" not in text and "sk-kkk" not in text
    assert len(text) <= MAX_ERROR_CHARS + 1
    assert error_text(TimeoutError()) == "TimeoutError"


async def test_port_0_logs_the_port_the_system_chose(services):
    """``service.listening`` names the port the server got, not ``:0``: the one to connect to."""
    import aiohttp

    from tests.processes import ServiceProcess, service_env

    env = service_env(
        mongodb_uri=services.mongodb_uri,
        mongodb_db=services.mongodb_db,
        upstream_url=services.upstream_url,
        port=0,
    )
    svc = ServiceProcess("zero", env, services.workdir / "zero.log")
    services.procs.append(svc)  # killed by the fixture
    svc.spawn()
    url = (await svc.wait_for_log("service.listening", deadline_s=30))["url"]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0, url
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        assert resp.status == 200

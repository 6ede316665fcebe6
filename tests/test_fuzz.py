"""Fuzzing every route's inputs with a fixed seed: hostile bodies, query strings, headers and
path parameters, with and without a valid token, and random WebSocket frames.

Whatever comes in: never a 5xx, every error is the documented JSON shape for its prefix
(Anthropic's on /v1/messages, OpenAI's on the rest of /v1, ours elsewhere) with a request id, a
stream that starts ends with its terminal event and never with ``internal_error``, and nothing
is logged at error level. The routes are read from the router, so a new route is fuzzed without
touching this file (a body template for it reaches its deep paths).

Each request starts valid (the user's own ids, a well-formed body) and has some of its parts
made hostile, so that the deep paths (streams, persisted turns, cancels) are reached as well as
the validation at the edge. Requests go over a bare socket (tests/raw_http.py), so header values
may hold any byte an HTTP/1.1 parser accepts (obs-text 0x80-0xFF included). Bytes the parser
refuses (control characters, CR/LF) are left out: aiohttp answers those itself, the exception
the README documents and tests/test_wire.py pins.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
import pytest
import structlog

from service.app import create_app
from service.keys import STORE
from tests import raw_http

SEED = 20261130
ROUNDS_PER_ROUTE = 60
WS_FRAMES = 120
WS_MAX_MSG_BYTES = 65536  # the setting's default: a larger frame is closed with 1009
USERS = ("alice", "bob")
ADMIN = {"role": "admin"}  # the admin claim
CORRUPT = 0.35  # the chance that each part of a request is made hostile

# ------------------------------------------------------------------------ hostile values
NUMBERS: list[Any] = [
    0, -1, 1, -0.0, 1e308, -1e308, 2**63, 2**63 - 1, -(2**63) - 1, 10**30, 0.5, 1e-308,
]  # fmt: skip
STRINGS = [
    "", " ", "\x00", "\t\n", "null", "0", "-1", "-0", "1e308", "NaN", "Infinity", "9" * 25,
    "é", "𝄞", "\u202e", "\ufeff", "\u0000\u0001", "a" * 6000, "../../etc/passwd", "%00",
    "<script>", "' OR 1=1 --", "{}", "[]", "\\", '"', "demo", "gpt-test", "user",
]  # fmt: skip
QUERY_VALUES = [
    b"", b"0", b"-1", b"1", b"100", b"101", b"501", b"1.5", b"-0", b"1e3", b"9" * 23,
    b"-" + b"9" * 23, b"9223372036854775807", b"9223372036854775808", b"\xff\xfe", b"%",
    b"\x00", b"true", b"null", b"a" * 300, b"\xe2\x80\xae", b"&", b"=",
]  # fmt: skip
QUERY_KEYS = [b"limit", b"cursor", b"after", b"ticket", b"user", b"stream", b"q", b"x", b""]
VALID_QUERIES = [b"", b"?limit=5", b"?after=0", b"?limit=1&after=-1", b"?user=fuzz"]
# Routes whose queries are their own (search needs its q; an admin's actions on a user take
# none, and refuse any).
NO_QUERY = [b""]
ROUTE_QUERIES = {
    "/api/search": [b"?q=hi", b"?q=fuzz+hi&limit=5", b"?q=%F0%9D%84%9E"],
    "/api/admin/users/{user_id}/limit": NO_QUERY,
    "/api/admin/users/{user_id}/reset": NO_QUERY,
    "/api/admin/users/{user_id}/keys": NO_QUERY,
    "/api/admin/users/{user_id}/keys/{key_id}": NO_QUERY,
    "/api/admin/keys": [b"", b"?limit=5", b"?admin=true"],
}
CONTENT_TYPES = [
    b"application/json", b"text/plain", b"application/json; charset=latin-1",
    b"multipart/form-data; boundary=zz", b"application/x-www-form-urlencoded", b"\xff\xfe",
    b";;;", b"application/json; charset=\xe9",
]  # fmt: skip
CONTENT_ENCODINGS = [b"gzip", b"deflate", b"br", b"zstd", b"gzip, gzip", b"identity", b"\xff"]
BODY_TEMPLATES: dict[str, dict[str, Any]] = {
    "/api/chat": {"title": "fuzz", "model": "demo"},
    "/api/admin/users/{user_id}/limit": {"limit": 100_000},  # PUT: the default, as it was
    "/api/chat/{chat_id}": {"title": "Renamed"},  # PATCH
    "/api/chat/{chat_id}/message": {"message": "Hi", "model": "demo"},
    "/api/chat/{chat_id}/messages/{message_id}/feedback": {"rating": "down", "comment": "Hi"},
    "/api/chat/{chat_id}/messages/{message_id}/edit": {"message": "Hi", "model": "demo"},
    "/v1/chat/completions": {
        "model": "demo",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "stream": True,
    },
    "/v1/messages": {
        "model": "demo",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "stream": True,
    },
    "/v1/messages/count_tokens": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]},
    "/api/keys": {"name": "fuzz", "models": ["demo"], "limit": 1000},
}


def anthropic_route(path: bytes) -> bool:
    return path == b"/v1/messages" or path.startswith((b"/v1/messages/", b"/v1/messages?"))


def header_bytes(rng: random.Random, size: int) -> bytes:
    """Bytes a header value may hold: HTAB, visible ASCII, obs-text; never CR, LF, NUL, CTLs."""
    alphabet = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
    return bytes(rng.choice(alphabet) for _ in range(size)).strip(b" \t") or b"x"


def hostile_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if pick < 0.4 or depth > 2:
        return rng.choice([*NUMBERS, *STRINGS, None, True, False])
    if pick < 0.6:
        return [hostile_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if pick < 0.8:
        return {rng.choice(STRINGS): hostile_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return "".join(chr(rng.choice([rng.randint(1, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                   for _ in range(rng.randint(1, 20)))  # fmt: skip


@dataclass
class Ids:
    """What exists, per user: their chats, messages and API keys."""

    chats: dict[str, list[str]] = field(default_factory=dict)
    messages: dict[str, list[str]] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Fuzzer:
    rng: random.Random
    tokens: dict[str, str]
    ids: Ids
    user: str = "alice"
    chat_pool: slice = field(default_factory=lambda: slice(None))

    def request(self, method: str, canonical: str) -> tuple[bytes, bytes]:
        """(path, the request's bytes): valid, with some parts made hostile."""
        self.user = self.rng.choice(USERS)
        # A user's first chat holds the messages (a message id goes with it) and is never
        # deleted; DELETE takes the others.
        self.chat_pool = slice(1, None) if method == "DELETE" else slice(None)
        if "{message_id}" in canonical:
            self.chat_pool = slice(0, 1)
        path = self.path(canonical)
        valid = ROUTE_QUERIES.get(canonical, VALID_QUERIES)
        query = self.query() if self.hostile() else self.rng.choice(valid)
        headers = self.auth() + (self.headers() if self.hostile() else [])
        body = b""
        if method in ("POST", "PUT", "PATCH"):
            body, coding = self.body(canonical)
            if coding is not None:
                headers.append((b"Content-Encoding", coding))
        return path, raw_http.build(method, path + query, headers, body)

    def hostile(self) -> bool:
        return self.rng.random() < CORRUPT

    # ------------------------------------------------------------------ path
    def path(self, canonical: str) -> bytes:
        out = canonical
        for name in ("chat_id", "message_id", "key_id", "model", "path", "user_id"):
            if "{" + name in out:
                start = out.index("{" + name)
                end = out.index("}", start) + 1
                out = out[:start] + self.param(name) + out[end:]
        return out.encode()

    def param(self, name: str) -> str:
        rng = self.rng
        valid = {
            "chat_id": self.ids.chats[self.user][self.chat_pool],
            "message_id": self.ids.messages[self.user],
            "key_id": self.ids.keys[self.user],
            "model": ["demo", "gpt-test"],
            "path": ["style.css", "js/app.js", "index.html"],
            "user_id": list(USERS),
        }[name]
        if not self.hostile():
            return rng.choice(valid)
        other = self.ids.chats[rng.choice(USERS)] if name == "chat_id" else valid
        choice = rng.choice(
            [*STRINGS[:-3], str(uuid.uuid4()), uuid.uuid4().hex, "x" * 3000, rng.choice(other)]
        ).encode()
        if rng.random() < 0.1:
            choice = choice.upper()
        if rng.random() < 0.1:
            choice = rng.choice([b"\xff\xfe", b"\xc3(", b"\xed\xa0\x80", b"%2e%2e"])
        return quote_from_bytes(choice[:3000], safe="") or "x"

    # ------------------------------------------------------------------ query
    def query(self) -> bytes:
        rng = self.rng
        pairs = []
        for _ in range(rng.randint(1, 4)):
            value = rng.choice(QUERY_VALUES)
            if rng.random() < 0.15:
                value = str(rng.choice(NUMBERS)).encode()
            raw = rng.random() < 0.2 and all(0x21 <= b < 0x7F for b in value)
            encoded = value if raw else quote_from_bytes(value, safe="").encode()
            pairs.append(rng.choice(QUERY_KEYS) + b"=" + encoded)
        return b"?" + b"&".join(pairs)

    # ------------------------------------------------------------------ headers
    def auth(self) -> list[tuple[bytes, bytes]]:
        rng = self.rng
        token = self.tokens[self.user].encode()
        if not self.hostile():
            return [(b"Authorization", b"Bearer " + token)]
        variants = [
            b"",
            b"Bearer",
            b"Bearer ",
            b"bearer " + token,
            b"Basic dXNlcjpwYXNz",
            b"Bearer " + token[:-3] + b"abc",
            b"Bearer " + token + b"\xff",
            b"Bearer \xff\xfe.a.b",
            b"Bearer " + header_bytes(rng, rng.randint(1, 300)),
            header_bytes(rng, rng.randint(1, 50)),
        ]
        return [(b"Authorization", rng.choice(variants))] if rng.random() < 0.9 else []

    def headers(self) -> list[tuple[bytes, bytes]]:
        rng = self.rng
        chats = self.ids.chats[self.user]
        optional = {
            b"X-Request-ID": lambda: header_bytes(rng, rng.randint(1, 200)),
            b"X-Chat-Id": lambda: (
                rng.choice(chats).encode() if rng.random() < 0.5 else header_bytes(rng, 40)
            ),
            b"Content-Type": lambda: rng.choice(CONTENT_TYPES),
            b"Last-Event-ID": lambda: header_bytes(rng, rng.randint(1, 40)),
            b"Accept": lambda: rng.choice([b"text/html", b"*/*", b"\xff"]),
            b"Origin": lambda: rng.choice([b"null", b"https://evil.example", b"\xff\xfe"]),
            b"Accept-Encoding": lambda: rng.choice([b"gzip", b"br", b"\xff"]),
            b"x-api-key": lambda: rng.choice(
                [self.tokens[self.user].encode(), b"", header_bytes(rng, rng.randint(1, 300))]
            ),
        }
        return [(name, make()) for name, make in optional.items() if rng.random() < 0.4]

    # ------------------------------------------------------------------ body
    def body(self, canonical: str) -> tuple[bytes, bytes | None]:
        """The body and the Content-Encoding it is sent with (None: no header)."""
        rng = self.rng
        template = dict(BODY_TEMPLATES.get(canonical, {}))
        for key, choices in (("model", ["demo", "gpt-test"]), ("stream", [True, False])):
            if key in template:  # the demo model and the fake upstream; streamed or not
                template[key] = rng.choice(choices)
        data = json.dumps(template).encode() if template else b""
        if self.hostile():
            data = self.hostile_body(template)
        if self.hostile():
            roll = rng.random()
            if roll < 0.4:
                return gzip.compress(data, mtime=0), b"gzip"
            return data, rng.choice(CONTENT_ENCODINGS)
        return data, None

    def hostile_body(self, template: dict[str, Any]) -> bytes:
        rng = self.rng
        kind = rng.randrange(9)
        if kind == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
        if kind == 1:
            return json.dumps(hostile_json(rng)).encode()
        if kind == 2:
            depth = rng.choice([100, 600, 1100])
            return b"[" * depth + b"]" * depth
        if kind == 3:
            return json.dumps({**template, "message": "x" * 70_000}).encode()  # over the limit
        if kind == 4:
            return b'{"message": "\\ud800", "title": "\\udfff", "model": "demo"}'
        if kind == 5:
            return json.dumps(template).encode().replace(b'"Hi"', b'"Hi\\u0000"')
        if kind == 6:
            return json.dumps([template, template]).encode()
        if kind == 7:
            return b""
        return json.dumps(self.mutate(template), ensure_ascii=rng.random() < 0.5).encode(
            "utf-8", "surrogatepass"
        )

    def mutate(self, template: dict[str, Any]) -> Any:
        rng = self.rng
        value = json.loads(json.dumps(template))
        for _ in range(rng.randint(1, 3)):
            keys = [*value, "unknown", "messages", "stream_options", "temperature", "stop"]
            key = rng.choice(keys)
            action = rng.random()
            if action < 0.2:
                value.pop(key, None)
            elif action < 0.35 and key == "messages":
                message = {"role": rng.choice(["user", "system", "tool", "x", None]),
                           "content": hostile_json(rng)}  # fmt: skip
                value[key] = [message] * rng.choice([0, 1, 3, 2001])
            else:
                value[key] = hostile_json(rng)
        return value


# ------------------------------------------------------------------------ checks
def routes(app) -> list[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            out.add((route.method, route.resource.canonical))
    return sorted(out)


def check_error_shape(path: bytes, resp: raw_http.RawResponse) -> None:
    where = (path[:120], resp.status, resp.body[:300])
    assert resp.headers.get("content-type", "").startswith("application/json"), where
    assert resp.headers.get("x-request-id"), where
    body = resp.json()
    if anthropic_route(path):
        assert isinstance(body, dict) and set(body) == {"type", "error", "request_id"}, where
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, where
        assert body["error"]["type"] != "api_error", where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
        return
    assert isinstance(body, dict) and set(body) == {"error"}, where
    err = body["error"]
    if path.startswith(b"/v1/"):
        assert set(err) == {"message", "type", "param", "code"}, where
        assert isinstance(err["type"], str) and err["type"], where
    else:
        assert set(err) <= {"code", "message", "details"}, where
    assert isinstance(err["code"], str) and err["code"] != "internal_error", where
    assert isinstance(err["message"], str) and err["message"], where


def check_stream(path: bytes, resp: raw_http.RawResponse) -> None:
    text = resp.body.decode()
    assert "internal_error" not in text, (path, text[-300:])
    if anthropic_route(path):
        events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
        assert events and events[-1] in ("message_stop", "error"), (path, text[-300:])
        return
    if path.startswith(b"/v1/"):
        assert text.rstrip().endswith("data: [DONE]"), (path, text[-300:])
        return
    events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert events and events[-1] in ("done", "error"), (path, text[-300:])


def check(path: bytes, resp: raw_http.RawResponse) -> None:
    assert resp.status < 500, (path[:120], resp.status, resp.body[:300])
    assert resp.headers.get("server") == "chat-gateway", (path[:120], resp.headers)
    if resp.status >= 400:
        check_error_shape(path, resp)
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(path, resp)


def errors_logged(logs: list[dict[str, Any]], caplog) -> list[Any]:
    structured = [
        e for e in logs if (e.get("log_level") or e.get("level")) in ("error", "critical")
    ]
    stdlib = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return structured + stdlib


# ------------------------------------------------------------------------ fixtures
@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event, each first rendered by the service's own JSON pipeline (the one
    tests/conftest.py configures for the session, as ``serve`` does): a value the renderer
    cannot encode raises here as it would in production, where it turns the request into a
    500. (The shared ``logs`` fixture captures without rendering.)"""
    saved = structlog.get_config()
    production = saved["processors"]
    assert isinstance(production[-1], structlog.processors.JSONRenderer)
    capture = structlog.testing.LogCapture()

    def render_then_capture(logger: Any, method: str, event: Any) -> Any:
        production[-1](logger, method, dict(event))
        return capture(logger, method, event)

    structlog.configure(processors=[*production[:-1], render_then_capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


@pytest.fixture
async def fuzz_client(aiohttp_client, stream_settings):
    settings = stream_settings(dev_token_endpoint=True, default_token_limit=10_000_000)
    return await aiohttp_client(create_app(settings))


async def existing_ids(client, tokens: dict[str, str]) -> Ids:
    """Three chats per user, the first with a finished turn, so the fuzz can name ids that
    exist."""
    ids = Ids()
    for user in USERS:
        h = {"Authorization": f"Bearer {tokens[user]}"}
        chats = []
        for _ in range(3):
            resp = await client.post("/api/chat", json={"model": "demo"}, headers=h)
            chats.append((await resp.json())["chat_id"])
        resp = await client.post(f"/api/chat/{chats[0]}/message", json={"message": "Hi"}, headers=h)
        await resp.read()
        found = await client.app[STORE].messages.find({"chat_id": {"$in": chats}}).to_list(None)
        ids.chats[user] = chats
        ids.messages[user] = [m["_id"] for m in found]
        ids.keys[user] = [await new_key(client, h) for _ in range(3)]
    return ids


async def new_key(client, headers: dict[str, str]) -> str:
    resp = await client.post("/api/keys", json={"name": "fuzz"}, headers=headers)
    return str((await resp.json())["id"])


async def replace_chat(client, fuzzer: Fuzzer, deleted: str) -> None:
    """A deleted chat is 404 from then on: give its user a new one, so later rounds still
    reach the routes behind the chat lookup."""
    for user, chats in fuzzer.ids.chats.items():
        if deleted in chats:
            h = {"Authorization": f"Bearer {fuzzer.tokens[user]}"}
            resp = await client.post("/api/chat", json={"model": "demo"}, headers=h)
            chats[chats.index(deleted)] = (await resp.json())["chat_id"]


async def replace_key(client, fuzzer: Fuzzer, path: bytes) -> None:
    """A revoked key is 404 from then on: give its user a new one."""
    revoked = path.decode().rsplit("/", 1)[1]
    for user, keys in fuzzer.ids.keys.items():
        if revoked in keys:
            h = {"Authorization": f"Bearer {fuzzer.tokens[user]}"}
            keys[keys.index(revoked)] = await new_key(client, h)


# What a route answers once past authentication and validation, where that is not a 2xx: a
# cancel of a finished answer is 409, so is an edit of an answer (or of a question replaced
# since), and /api/ws over plain HTTP stops at its upgrade check (its frames are the WebSocket
# test's).
DEEP = {
    ("POST", "/api/chat/{chat_id}/messages/{message_id}/cancel"): {202, 409},
    ("POST", "/api/chat/{chat_id}/messages/{message_id}/edit"): {200, 409},
    ("POST", "/api/chat/{chat_id}/messages/{message_id}/regenerate"): {200, 409},
    ("GET", "/api/ws"): {400},
    # a key of another user than the path's, mostly: its lookup's 404 is past validation
    ("DELETE", "/api/admin/users/{user_id}/keys/{key_id}"): {204, 404},
}


# ------------------------------------------------------------------------ the fuzz tests
async def test_every_route_survives_hostile_http_inputs(fuzz_client, token_for, logs, caplog):
    client = fuzz_client
    # bob is an administrator, so the admin routes are reached past their guard too
    tokens = {user: token_for(user, extra=ADMIN if user == "bob" else None) for user in USERS}
    fuzzer = Fuzzer(random.Random(SEED), tokens, await existing_ids(client, tokens))
    host, port = client.server.host, client.server.port
    table = routes(client.app)
    assert ("POST", "/v1/chat/completions") in table and ("GET", "/api/dev/token") in table
    statuses: dict[tuple[str, str], set[int]] = {route: set() for route in table}
    started = time.monotonic()
    for _ in range(ROUNDS_PER_ROUTE):
        for method, canonical in table:
            path, request = fuzzer.request(method, canonical)
            resp = await raw_http.send(host, port, request)
            check(path, resp)
            statuses[(method, canonical)].add(resp.status)
            if (method, canonical, resp.status) == ("DELETE", "/api/chat/{chat_id}", 200):
                await replace_chat(client, fuzzer, resp.json()["chat_id"])
            if (method, canonical, resp.status) == ("DELETE", "/api/keys/{key_id}", 204):
                await replace_key(client, fuzzer, path)
        # and a method no route takes, on a path that one does
        method = fuzzer.rng.choice(["PUT", "PATCH", "OPTIONS", "TRACE", "DELETE", "POST"])
        path, request = fuzzer.request(method, fuzzer.rng.choice(table)[1])
        check(path, await raw_http.send(host, port, request))
    assert not errors_logged(logs, caplog)
    for route, seen in statuses.items():  # every route was reached past its validation
        assert seen & DEEP.get(route, set(range(200, 300))), (route, seen)
    assert time.monotonic() - started < 60


async def test_websocket_survives_hostile_frames(fuzz_client, token_for, logs, caplog):
    """Random text and JSON frames: malformed ones get exactly one ``invalid_frame`` error,
    no frame gets ``internal_error``, and the socket stays open throughout."""
    client = fuzz_client
    tokens = {user: token_for(user) for user in USERS}
    fuzzer = Fuzzer(random.Random(SEED + 1), tokens, await existing_ids(client, tokens))
    await hostile_handshakes(client, fuzzer)
    ws = await client.ws_connect("/api/ws", headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert json.loads((await ws.receive(timeout=5)).data)["type"] == "ready"
    kinds: set[str] = set()
    for n in range(WS_FRAMES):
        frame, malformed = ws_frame(fuzzer, n)
        await ws.send_str(frame)
        await ws.send_str('{"type": "ping"}')
        replies = await until_settled(ws, turn_of(frame))
        errors = [f for f in replies if f.get("type") == "error"]
        for err in errors:
            assert err["code"] != "internal_error", (frame[:200], err)
            assert isinstance(err["message"], str) and err["message"], err
        if malformed:
            assert [e["code"] for e in errors] == ["invalid_frame"], (frame[:200], replies)
        kinds |= {f["type"] for f in replies}
    assert {"started", "done", "error", "pong"} <= kinds
    await ws.close()
    assert not errors_logged(logs, caplog)


async def hostile_handshakes(client, fuzzer: Fuzzer, count: int = 30) -> None:
    """Upgrade requests with hostile tickets, tokens and Origins: 101, 401 or 403, never 5xx.
    (Non-ASCII header bytes on /api/ws are the HTTP fuzz's: aiohttp's client sends text.)"""
    rng = fuzzer.rng
    for _ in range(count):
        headers, params = {}, {}
        if rng.random() < 0.5:
            headers["Authorization"] = rng.choice(
                ["Bearer x.y.z", "Basic a", "", f"Bearer {fuzzer.tokens['bob']}"]
            )
        if rng.random() < 0.5:
            params["ticket"] = quote_from_bytes(rng.choice(QUERY_VALUES), safe="")
        if rng.random() < 0.3:
            headers["Origin"] = rng.choice(["null", "https://evil.example", "http://127.0.0.1"])
        status = 101
        try:
            ws = await client.ws_connect("/api/ws", headers=headers, params=params)
            await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
        assert status in (101, 401, 403), (headers, params, status)


def ws_frame(fuzzer: Fuzzer, n: int) -> tuple[str, bool]:
    """A frame no larger than WS_MAX_MSG_BYTES, and whether it is malformed for certain."""
    while True:
        frame, malformed = _ws_frame(fuzzer, n)
        if len(frame.encode()) <= WS_MAX_MSG_BYTES:
            return frame, malformed


def _ws_frame(fuzzer: Fuzzer, n: int) -> tuple[str, bool]:
    rng = fuzzer.rng
    pick = rng.random()
    if pick < 0.15:
        return "".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(0, 40))), True
    if pick < 0.3:  # never an object with a "type": malformed
        return json.dumps(hostile_json(rng)), True
    chat_id = rng.choice(fuzzer.ids.chats["alice"])
    turn = {"type": "send", "id": f"t{n}", "chat_id": chat_id, "message": "Hi", "model": "demo"}
    if pick < 0.5:
        return json.dumps(turn), False
    if pick < 0.6:
        return json.dumps({"type": "cancel", "id": rng.choice([f"t{n - 1}", 7, None, ""])}), False
    return json.dumps(fuzzer.mutate(turn)), False


def turn_of(frame: str) -> str | None:
    """The id of the turn a frame asks for, when it is a send that names one."""
    try:
        value = json.loads(frame)
    except ValueError:
        return None
    if isinstance(value, dict) and value.get("type") == "send":
        turn_id = value.get("id")
        return turn_id if isinstance(turn_id, str) and 0 < len(turn_id) <= 128 else None
    return None


async def until_settled(ws, turn_id: str | None) -> list[dict[str, Any]]:
    """Frames until the pong, and until the frame's turn (refused ones answer after the pong)
    and every turn that started have ended."""
    frames: list[dict[str, Any]] = []
    open_turns: set[str] = {turn_id} if turn_id else set()
    ponged = False
    while not ponged or open_turns:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, (msg, frames[-3:])
        frame = json.loads(msg.data)
        frames.append(frame)
        kind = frame.get("type")
        if kind == "pong":
            ponged = True
        elif kind == "started":
            open_turns.add(frame["id"])
        elif kind in ("done", "error") and frame.get("id") in open_turns:
            open_turns.discard(frame["id"])
    return frames

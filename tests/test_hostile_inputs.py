"""Hostile inputs get a 4xx in the route's error shape, never a 500: raw bytes in the bearer
token, integers MongoDB cannot hold, bodies in encodings we do not speak or that do not decode."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import time
import uuid
import zlib

import pytest

from service.app import create_app
from service.http import BodyDecoder
from tests import raw_http


def guarded_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every authenticated route, path parameters filled in."""
    out = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD" or not path.startswith(("/api/", "/v1/")):
            continue
        if path.startswith("/api/dev/"):
            continue
        path = path.replace("{model}", "demo")
        for name in ("{chat_id}", "{message_id}"):
            path = path.replace(name, str(uuid.uuid4()))
        out.append((route.method, path))
    return out


def assert_api_error(status: int, body: dict, code: str) -> None:
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert set(body["error"]) <= {"code", "message", "details"}, body


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


def assert_anthropic_error(body: dict, kind: str) -> None:
    assert set(body) == {"type", "error", "request_id"}, body
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and body["error"]["message"], body


# --------------------------------------------------------------------------- bearer token bytes
@pytest.mark.parametrize(
    "token",
    [b"\xff\xfe.a.b", b"eyJ\xc3\xa9.e30.sig", b"\xe2\x80\x8b", b"a.b.\x80"],
    ids=["ff-fe", "utf8-e-acute", "zero-width-space", "lone-continuation"],
)
async def test_non_ascii_bearer_token_is_401_on_every_guarded_route(client, token):
    """Raw non-UTF-8 / non-ASCII bytes in the token: 401 with the usual body, on every route."""
    routes = guarded_routes(client.app)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/api/ws") in routes
    for method, path in routes:
        request = raw_http.build(method, path, [(b"Authorization", b"Bearer " + token)])
        resp = await raw_http.send(client.server.host, client.server.port, request)
        assert resp.status == 401, (method, path, resp)
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.headers["www-authenticate"].startswith("Bearer ")
        if path.startswith("/v1/messages"):
            assert_anthropic_error(resp.json(), "authentication_error")
            # and as Anthropic's clients send a key
            request = raw_http.build(method, path, [(b"x-api-key", token)])
            resp = await raw_http.send(client.server.host, client.server.port, request)
            assert resp.status == 401, (method, path, resp)
            assert_anthropic_error(resp.json(), "authentication_error")
        elif path.startswith("/v1/"):
            assert_openai_error(resp.json(), "invalid_api_key")
        else:
            assert_api_error(resp.status, resp.json(), "unauthorized")


# --------------------------------------------------------------------------- integers
def cursor_of(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_after_beyond_a_mongodb_integer_is_400(client, auth):
    h = auth()
    chat_id = (await (await client.post("/api/chat", headers=h)).json())["chat_id"]
    for after in (str(10**22), str(2**63), "-" + str(10**22)):
        resp = await client.get(f"/api/chat/{chat_id}", params={"after": after}, headers=h)
        assert resp.status == 400, after
        body = await resp.json()
        assert_api_error(400, body, "validation_error")
        assert body["error"]["details"][0]["field"] == "after"
    resp = await client.get(f"/api/chat/{chat_id}", params={"after": str(2**63 - 1)}, headers=h)
    assert resp.status == 200 and (await resp.json())["messages"] == []


@pytest.mark.parametrize(
    "value",
    [[1e300, "x"], [10**22, "x"], [2**63, "x"], [-(10**20), "x"], [10**15, "x"], [1e15, "x"]],
)
async def test_cursor_holding_an_out_of_range_time_is_400(client, auth, value):
    resp = await client.get("/api/chat", params={"cursor": cursor_of(value)}, headers=auth())
    assert resp.status == 400
    assert_api_error(400, await resp.json(), "invalid_cursor")


async def test_a_cursor_from_a_page_still_pages(client, auth):
    h = auth()
    for _ in range(3):
        await client.post("/api/chat", headers=h)
    first = await (await client.get("/api/chat", params={"limit": "2"}, headers=h)).json()
    second = await client.get("/api/chat", params={"cursor": first["next_cursor"]}, headers=h)
    assert second.status == 200 and len((await second.json())["chats"]) == 1


# --------------------------------------------------------------------------- Content-Encoding
BODY = b'{"title": "zipped"}'


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "payload"),
    [
        ("gzip", gz(BODY)),
        ("x-gzip", gz(BODY)),
        ("GZip", gz(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", raw_deflate(BODY)),  # what many clients send for "deflate"
        ("identity", BODY),
        (" identity ", BODY),
    ],
    ids=["gzip", "x-gzip", "mixed-case", "zlib-deflate", "raw-deflate", "identity", "spaces"],
)
async def test_gzip_and_deflate_bodies_are_decoded(client, auth, encoding, payload, caplog):
    resp = await client.post(
        "/api/chat", data=payload, headers={**auth(), "Content-Encoding": encoding}
    )
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["title"] == "zipped"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def body_routes(chat_id: str) -> list[tuple[str, bool]]:
    """Every route that reads a request body, and whether it speaks OpenAI's error shape."""
    return [
        ("/api/chat", False),
        (f"/api/chat/{chat_id}/message", False),
        ("/v1/chat/completions", True),
    ]


async def post_all(client, h, encoding, payload, status, code, caplog):
    chat_id = (await (await client.post("/api/chat", headers=h)).json())["chat_id"]
    for path, openai in body_routes(chat_id):
        caplog.clear()
        resp = await client.post(path, data=payload, headers={**h, "Content-Encoding": encoding})
        assert resp.status == status, (path, await resp.text())
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.json()
        if openai:
            assert_openai_error(body, code)
            assert body["error"]["type"] == "invalid_request_error"
        else:
            assert_api_error(status, body, code)
        # aiohttp must not be left to trip over an undecodable payload after we answered
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], path
        assert (await client.get("/api/models", headers=h)).status == 200  # connection reused


@pytest.mark.parametrize(
    "encoding", ["br", "zstd", "compress", "gzip, gzip", "identity, gzip", "exotic", "gzip;q=1"]
)
async def test_other_encodings_are_415_whatever_is_installed(client, auth, encoding, caplog):
    """br and zstd too: aiohttp could decode them only with optional packages installed."""
    await post_all(
        client,
        auth(),
        encoding,
        b"\x00\x01 compressed somehow",
        415,
        "unsupported_content_encoding",
        caplog,
    )


@pytest.mark.parametrize(
    ("encoding", "payload"),
    [
        ("gzip", b"this is not gzip"),
        ("deflate", b"this is not deflate"),
        ("gzip", gz(BODY)[:-6]),  # truncated
        ("gzip", gz(BODY) + b"trailing junk"),
        ("deflate", zlib.compress(BODY)[:-3]),
    ],
    ids=["not-gzip", "not-deflate", "truncated-gzip", "gzip-trailing-junk", "truncated-deflate"],
)
async def test_bodies_that_do_not_decode_are_400(client, auth, encoding, payload, caplog):
    await post_all(client, auth(), encoding, payload, 400, "invalid_body", caplog)


async def test_decoded_size_is_what_counts_against_the_body_limit(
    aiohttp_client, make_settings, auth
):
    """A gzip bomb stops at the limit (413) without inflating the rest."""
    client = await aiohttp_client(create_app(make_settings(max_body_bytes=4096)))
    bomb = gz(b'{"title": "' + b" " * 2_000_000 + b'"}')
    assert len(bomb) < 4096
    resp = await client.post("/api/chat", data=bomb, headers={**auth(), "Content-Encoding": "gzip"})
    assert resp.status == 413
    assert_api_error(413, await resp.json(), "payload_too_large")


@pytest.mark.parametrize(
    ("coding", "payload"),
    [("gzip", gz(BODY)), ("deflate", zlib.compress(BODY)), ("deflate", raw_deflate(BODY))],
    ids=["gzip", "zlib-deflate", "raw-deflate"],
)
def test_decoding_does_not_depend_on_how_the_body_is_split(coding, payload):
    """A chunked body may arrive a byte at a time: the framing is told from the first two."""
    decoder = BodyDecoder(coding, limit=1024)
    out = b"".join(decoder.feed(payload[i : i + 1]) for i in range(len(payload)))
    decoder.finish()
    assert out == BODY


def _head(path: str, token: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_body_said_too_large_is_refused_before_it_is_sent(client, token_for):
    """A Content-Length over MAX_BODY_BYTES is 413 at once: the service does not wait for (or
    read) a gigabyte it will refuse."""
    for path in ("/api/chat", "/v1/chat/completions"):
        head = _head(path, token_for("alice"), 1_000_000_000)
        resp = await raw_http.answer_without_close(
            client.server.host, client.server.port, head + b"{"
        )
        assert resp.status == 413, (path, resp)
        assert b"too large" in resp.body


async def test_a_body_that_does_not_all_arrive_in_time_is_408(
    aiohttp_client, make_settings, token_for
):
    """A client that sends its headers and part of its body, then trickles or goes quiet, is
    answered 408 ``request_timeout`` after REQUEST_BODY_TIMEOUT_S, and its connection serves
    nothing more: the rest of the body and a next request on it get no answer, it is closed."""
    client = await aiohttp_client(create_app(make_settings(request_body_timeout_s=0.3)))
    body = b'{"title": "' + b"x" * 86 + b'"}'
    head = _head("/api/chat", token_for("alice"), len(body))
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head + body[:10])
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        resp = raw_http.parse(answer)
        resp.body = await reader.readexactly(int(resp.headers["content-length"]))
        assert resp.status == 408 and resp.headers["connection"] == "close"
        assert_api_error(408, resp.json(), "request_timeout")
        writer.write(body[10:] + raw_http.build("GET", "/healthz"))  # too late; then another
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    finally:
        writer.close()


async def test_the_demo_model_cuts_a_prompts_long_word_with_few_counts():
    """The demo echoes a prompt's first words; one of tens of thousands of characters cut at
    ``max_tokens`` took a count per character (seconds of the loop for every user). By halves:
    a few dozen counts, and the cut still fits with one character more being too many."""
    from service.providers.base import CompletionRequest
    from service.providers.demo import DemoProvider
    from service.tokens import TokenCounter

    class Counting(TokenCounter):
        calls = 0

        def count(self, text: str) -> int:
            self.calls += 1
            return super().count(text)

    counter = Counting()
    demo = DemoProvider(counter, delay_s=0)
    word = "ab" * 20_000
    request = CompletionRequest(
        model="demo", messages=[{"role": "user", "content": word}], max_tokens=1000
    )
    chunks = [c async for c in await demo.open(request)]
    text = "".join(c.text for c in chunks if c.text)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 1000
    full = demo.answer_for(request.messages)
    assert full.startswith(text) and word[:8] in text  # cut inside the long word
    plain = TokenCounter()
    assert plain.count(text) <= 1000 < plain.count(full[: len(text) + 1])
    assert counter.calls < 60, counter.calls  # a count per character: thousands here


async def test_a_connection_without_a_request_is_closed_after_keepalive_timeout_s(services):
    """A connection that sends nothing, one whose headers come a byte at a time, and one kept
    alive after its response are each closed ``KEEPALIVE_TIMEOUT_S`` after their last request
    (or their opening), for a gateway exposed with no proxy in front (deploy/README.md)."""
    [svc] = await services.start("a", keepalive_timeout_s=0.5)
    opened = time.monotonic()
    silent, trickling, kept = [
        await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(3)
    ]
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    trickling[1].write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")

    async def trickle() -> None:
        reader, writer = trickling
        while not reader.at_eof():
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 0.05)

    async def until_closed(reader: asyncio.StreamReader) -> bytes:
        return await asyncio.wait_for(reader.read(), 10)  # every byte, up to the server's close

    async with asyncio.timeout(10):
        _, nothing, answered = await asyncio.gather(
            trickle(), until_closed(silent[0]), until_closed(kept[0])
        )
    assert time.monotonic() - opened >= 0.4
    assert nothing == b""
    assert answered.startswith(b"HTTP/1.1 200 ")
    for _, writer in (silent, trickling, kept):
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

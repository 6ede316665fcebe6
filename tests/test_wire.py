"""What reaches the wire besides the handlers' bodies: a ``Server`` header without versions on
every kind of response, and the requests aiohttp rejects itself before the app runs (the
exception the README's API section documents)."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect as ws_lib_connect

from tests import raw_http
from tests.sse_client import collect

SERVER = "chat-gateway"
JWT = (
    b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0."
    b"c2lnbmF0dXJlLXRoYXQtaXMtbm90LXJlYWwtYnV0LWxvbmctZW5vdWdo"
)


async def new_chat(client, h) -> str:
    return (await (await client.post("/api/chat", headers=h)).json())["chat_id"]


# --------------------------------------------------------------------------- Server header
async def test_server_header_names_no_versions_on_plain_responses(client, auth):
    h = auth()
    responses = [
        await client.get("/healthz"),
        await client.head("/healthz"),
        await client.get("/metrics"),
        await client.get("/api/chat", headers=h),
        await client.get("/api/chat"),  # 401
        await client.get("/no/such/path"),  # 404 from the router
        await client.delete("/api/usage", headers=h),  # 405
        await client.get("/v1/models", headers=h),
        await client.get("/v1/models"),  # 401 in OpenAI's shape
    ]
    for resp in responses:
        assert resp.headers["Server"] == SERVER, (resp.url, resp.status)


async def test_server_header_on_static_files_and_304(client):
    page = await client.get("/")
    css = await client.get("/static/style.css")
    assert page.status == 200 and css.status == 200
    again = await client.get("/static/style.css", headers={"If-None-Match": css.headers["ETag"]})
    assert again.status == 304
    for resp in (page, css, again):
        assert resp.headers["Server"] == SERVER


async def test_server_header_on_streams_and_the_websocket_upgrade(stream_client, auth, token_for):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    sse = await client.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h)
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    assert (await collect(sse))[-1]["event"] == "done"
    chunks = await client.post(
        "/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        headers=h,
    )
    assert chunks.headers["Content-Type"].startswith("text/event-stream")
    assert (await chunks.read()).rstrip().endswith(b"data: [DONE]")
    for resp in (sse, chunks):
        assert resp.headers["Server"] == SERVER

    uri = f"ws://127.0.0.1:{client.server.port}/api/ws"
    headers = {"Authorization": f"Bearer {token_for('alice')}"}
    async with ws_lib_connect(uri, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        assert ws.response.status_code == 101
        assert ws.response.headers["Server"] == SERVER


# --------------------------------------------------------------------------- aiohttp's own 400s
REJECTED = {
    "header over 8190 bytes": raw_http.build(
        "GET", "/api/chat", [(b"Authorization", b"Bearer " + JWT + b"A" * 9000)]
    ),
    "control character in a header": raw_http.build(
        "GET", "/api/chat", [(b"Authorization", b"Bearer " + JWT + b"\x01")]
    ),
    "NUL in a header": raw_http.build(
        "GET", "/api/chat", [(b"Authorization", b"Bearer " + JWT + b"\x00")]
    ),
    "bad chunk size": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + JWT
    + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "request line over 8190 bytes": raw_http.build("GET", "/api/chat?x=" + "a" * 9000),
    "more than 128 headers": raw_http.build(
        "GET", "/api/chat", [(b"X-H%d" % i, b"v") for i in range(200)]
    ),
    "unknown HTTP version": b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", REJECTED.values(), ids=REJECTED.keys())
async def test_requests_aiohttp_rejects_get_its_plain_text_400(client, request_bytes):
    """Pins the exception the README documents: aiohttp answers these before the app runs and
    offers no public hook to render them (aio-libs/aiohttp#3287), so they are 400 text/plain
    with no request id, and the connection is closed; their Server header is the service's
    (service/app.py sets the module global aiohttp reads it from). If this test starts failing,
    aiohttp changed: update the README's note, service/app.py and this test."""
    resp = await raw_http.send(client.server.host, client.server.port, request_bytes)
    assert resp.status == 400
    assert resp.headers["content-type"].startswith("text/plain")
    assert resp.headers["server"] == SERVER
    assert "x-request-id" not in resp.headers
    assert resp.version == "HTTP/1.0"  # no keep-alive: aiohttp closes the connection


async def test_aiohttp_quotes_the_offending_line_back_to_its_sender(client):
    """What the README warns about: the 400's text quotes the start of a header that is too
    long (100 bytes: a JWT's header and part of its payload, never its signature) and the
    whole of a header line with a forbidden character."""
    host, port = client.server.host, client.server.port
    too_long = await raw_http.send(host, port, REJECTED["header over 8190 bytes"])
    assert b"Bearer " + JWT[:60] in too_long.body and JWT not in too_long.body
    forbidden = await raw_http.send(host, port, REJECTED["control character in a header"])
    assert JWT in forbidden.body

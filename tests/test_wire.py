"""What reaches the wire besides the handlers' bodies: a ``Server`` header without versions on
every kind of response."""

from __future__ import annotations

import json

from websockets.asyncio.client import connect as ws_lib_connect

from tests.sse_client import collect

SERVER = "chat-gateway"


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

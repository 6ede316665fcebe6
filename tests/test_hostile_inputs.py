"""Hostile inputs get a 4xx in the route's error shape, never a 500: raw bytes in the bearer
token, integers MongoDB cannot hold."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

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
        if path.startswith("/v1/"):
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

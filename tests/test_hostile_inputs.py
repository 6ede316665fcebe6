"""Hostile inputs get a 4xx in the route's error shape, never a 500."""

from __future__ import annotations

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

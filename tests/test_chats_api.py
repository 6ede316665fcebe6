"""The chat API: create, list, read, soft delete, and every error a client can cause."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from aiohttp import web

from service.app import create_app


async def create(client, headers, **body):
    resp = await client.post("/api/chat", json=body or None, headers=headers)
    return resp.status, await resp.json()


def assert_error_shape(body: dict, code: str) -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_create_list_read_delete_roundtrip(client, auth):
    """A created chat is listed, readable, and gone everywhere after a soft delete."""
    h = auth("alice")
    status, chat = await create(client, h, title="Trip", model="demo")
    assert status == 201
    assert chat["title"] == "Trip" and chat["model"] == "demo"
    uuid.UUID(chat["chat_id"])

    listed = await (await client.get("/api/chat", headers=h)).json()
    assert [c["chat_id"] for c in listed["chats"]] == [chat["chat_id"]]

    resp = await client.get(f"/api/chat/{chat['chat_id']}", headers=h)
    assert resp.status == 200
    body = await resp.json()
    assert body["chat_id"] == chat["chat_id"] and body["messages"] == []

    resp = await client.delete(f"/api/chat/{chat['chat_id']}", headers=h)
    assert resp.status == 200
    deleted = await resp.json()
    assert deleted["chat_id"] == chat["chat_id"] and deleted["deleted_at"].endswith("Z")

    for method in ("GET", "DELETE"):
        resp = await client.request(method, f"/api/chat/{chat['chat_id']}", headers=h)
        assert resp.status == 404
        assert_error_shape(await resp.json(), "chat_not_found")
    listed = await (await client.get("/api/chat", headers=h)).json()
    assert listed["chats"] == []


async def test_create_with_empty_body(client, auth):
    """Title and model are optional: an empty body creates an untitled chat."""
    resp = await client.post("/api/chat", headers=auth())
    assert resp.status == 201
    assert (await resp.json())["title"] is None


async def test_a_chat_of_a_model_that_is_not_offered_is_refused_when_created(client, auth):
    """A model the catalogue does not have is refused as a send in the chat would be (404
    ``model_not_found``), and no chat is made: not a chat whose every send then fails."""
    h = auth("alice")
    status, body = await create(client, h, title="Trip", model="gpt-nope")
    assert status == 404
    assert_error_shape(body, "model_not_found")
    listed = await (await client.get("/api/chat", headers=h)).json()
    assert listed["chats"] == []


async def test_list_is_newest_first_and_paginates(client, auth):
    """Listing pages through every chat once, newest activity first."""
    h = auth("pager")
    ids = [(await create(client, h, title=f"c{i}"))[1]["chat_id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/api/chat", params=params, headers=h)).json()
        assert len(page["chats"]) <= 2
        seen += [c["chat_id"] for c in page["chats"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_other_users_chat_is_not_found(client, auth):
    """Another user's chat is 404 for read and delete, and stays intact."""
    _, chat = await create(client, auth("alice"))
    for method in ("GET", "DELETE"):
        resp = await client.request(method, f"/api/chat/{chat['chat_id']}", headers=auth("mallory"))
        assert resp.status == 404
        assert_error_shape(await resp.json(), "chat_not_found")
    resp = await client.get(f"/api/chat/{chat['chat_id']}", headers=auth("alice"))
    assert resp.status == 200


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_chat_id_must_be_uuid(client, auth, method):
    resp = await client.request(method, "/api/chat/not-a-uuid", headers=auth())
    assert resp.status == 400
    assert_error_shape(await resp.json(), "invalid_id")


async def test_bad_json_is_400(client, auth):
    resp = await client.post(
        "/api/chat", data=b"{nope", headers={**auth(), "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert_error_shape(await resp.json(), "invalid_json")


async def test_non_object_json_is_400(client, auth):
    resp = await client.post("/api/chat", json=[1, 2], headers=auth())
    assert resp.status == 400
    assert_error_shape(await resp.json(), "invalid_json")


@pytest.mark.parametrize(
    "body", [{"unknown": 1}, {"title": 5}, {"title": ""}, {"model": ["x"]}, {"title": "x" * 201}]
)
async def test_invalid_fields_are_400_with_details(client, auth, body):
    resp = await client.post("/api/chat", json=body, headers=auth())
    assert resp.status == 400
    err = await resp.json()
    assert_error_shape(err, "validation_error")
    assert err["error"]["details"] and "field" in err["error"]["details"][0]


async def test_oversize_body_is_413(aiohttp_client, make_settings, auth):
    client = await aiohttp_client(create_app(make_settings(max_body_bytes=1024)))
    resp = await client.post("/api/chat", json={"title": "x" * 4096}, headers=auth())
    assert resp.status == 413
    assert_error_shape(await resp.json(), "payload_too_large")


async def test_bad_pagination_params_are_400(client, auth):
    for params in ({"limit": "0"}, {"limit": "abc"}, {"cursor": "!!!"}, {"bogus": "1"}):
        resp = await client.get("/api/chat", params=params, headers=auth())
        assert resp.status == 400, params
        assert (await resp.json())["error"]["code"] in {"validation_error", "invalid_cursor"}


async def test_a_route_that_takes_no_query_parameter_refuses_one(client, auth):
    """As ``/api/chat`` refuses a parameter it does not know, the routes that take none refuse
    any: nothing sent is silently ignored."""
    chat = await (await client.post("/api/chat", json={}, headers=auth())).json()
    mid = "00000000-0000-4000-8000-000000000000"
    paths = ["/api/usage", "/api/models", "/api/keys"]
    paths.append(f"/api/chat/{chat['chat_id']}/messages/{mid}/versions")
    for path in paths:
        resp = await client.get(path, params={"period": "2026-01"}, headers=auth())
        assert resp.status == 400, path
        error = (await resp.json())["error"]
        assert error["code"] == "validation_error", path
        assert error["details"][0]["field"] == "period" and error["details"][0]["type"] == (
            "extra_forbidden"
        )
        assert (await client.get(path, headers=auth())).status in (200, 404), path


async def test_chat_cap_holds_under_concurrent_creates(aiohttp_client, make_settings, auth):
    """20 concurrent creates against a cap of 7: exactly 7 succeed, the rest get 409."""
    client = await aiohttp_client(create_app(make_settings(max_chats_per_user=7)))
    h = auth("busy")
    results = await asyncio.gather(*(create(client, h) for _ in range(20)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) == 7 and statuses.count(409) == 13
    assert all(b["error"]["code"] == "chat_limit_reached" for s, b in results if s == 409)
    listed = await (await client.get("/api/chat", params={"limit": "100"}, headers=h)).json()
    assert len(listed["chats"]) == 7
    # Deleting one frees exactly one slot.
    await client.delete(f"/api/chat/{listed['chats'][0]['chat_id']}", headers=h)
    assert (await create(client, h))[0] == 201
    assert (await create(client, h))[0] == 409


async def test_unknown_route_and_method_use_the_error_shape(client, auth):
    resp = await client.get("/api/nothing-here", headers=auth())
    assert resp.status == 404
    assert_error_shape(await resp.json(), "not_found")
    resp = await client.put("/api/chat", headers=auth())
    assert resp.status == 405
    assert_error_shape(await resp.json(), "method_not_allowed")


async def test_request_id_is_echoed_or_generated(client, auth):
    resp = await client.get("/api/chat", headers={**auth(), "X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/api/chat", headers={**auth(), "X-Request-ID": "bad id\twith junk"})
    assert resp.headers["X-Request-ID"] not in ("", "bad id\twith junk")
    resp = await client.get("/api/chat/not-a-uuid", headers=auth())
    assert len(resp.headers["X-Request-ID"]) == 32


async def test_unexpected_exception_is_500_json_without_traceback(
    aiohttp_client, make_settings, auth, logs
):
    """A bug becomes a 500 with the error shape; the traceback goes to the log only."""
    from service.keys import STORE

    app = create_app(make_settings())

    async def boom(*args, **kwargs):
        raise ZeroDivisionError("secret detail")

    async def install(app):
        app[STORE].list_chats = boom  # a deliberately broken dependency
        yield

    app.cleanup_ctx.append(install)
    client = await aiohttp_client(app)
    resp = await client.get("/api/chat", headers=auth())
    assert resp.status == 500
    text = await resp.text()
    assert "secret detail" not in text and "Traceback" not in text
    assert_error_shape(await resp.json(), "internal_error")
    errors = [e for e in logs if e["event"] == "request.unhandled_exception"]
    assert errors and errors[0]["request_id"] == resp.headers["X-Request-ID"]


async def test_access_log_line_per_request(client, auth, logs):
    resp = await client.get("/api/chat", headers={**auth("logger"), "X-Request-ID": "req-42"})
    assert resp.status == 200
    lines = [e for e in logs if e["event"] == "http.request" and e.get("request_id") == "req-42"]
    assert len(lines) == 1
    assert lines[0]["status"] == 200 and lines[0]["path"] == "/api/chat"
    assert "duration_ms" in lines[0] and lines[0]["user_id"] == "logger"
    assert "error_code" not in lines[0]
    assert not any("Bearer" in str(e) for e in logs)


async def test_an_error_answers_access_line_has_its_code(client, auth, logs):
    """An operator reading the access lines sees why a request failed, not only its status."""
    missing = "/api/chat/00000000-0000-4000-8000-000000000000"
    resp = await client.get(missing, headers={**auth("logger"), "X-Request-ID": "req-43"})
    assert resp.status == 404
    (line,) = [e for e in logs if e["event"] == "http.request" and e["request_id"] == "req-43"]
    assert line["status"] == 404 and line["error_code"] == (await resp.json())["error"]["code"]


async def test_a_request_s_log_fields_are_its_own_on_a_kept_alive_connection(client, auth, logs):
    """The request's fields (id, who acts) are set per request, never reset after it: the next
    request on the same connection, unauthenticated, carries none of the previous one's."""
    first = await client.get("/api/chat", headers={**auth("logger"), "X-Request-ID": "req-1"})
    second = await client.get("/healthz", headers={"X-Request-ID": "req-2"})
    assert first.status == second.status == 200
    lines = {e["request_id"]: e for e in logs if e["event"] == "http.request"}
    assert lines["req-1"]["user_id"] == "logger"
    assert "user_id" not in lines["req-2"] and lines["req-2"]["path"] == "/healthz"


# --------------------------------------------------------------------------- titles
async def test_a_title_is_trimmed_when_created_as_when_renamed(client, auth):
    h = auth()
    status, chat = await create(client, h, title="  Trip  ")
    assert status == 201 and chat["title"] == "Trip"
    resp = await client.patch(f"/api/chat/{chat['chat_id']}", json={"title": " Lisbon "}, headers=h)
    assert resp.status == 200 and (await resp.json())["title"] == "Lisbon"
    got = await (await client.get(f"/api/chat/{chat['chat_id']}", headers=h)).json()
    assert got["title"] == "Lisbon"


@pytest.mark.parametrize(
    "title",
    ["   ", " \t ", "a\u0000b", "a\nb", "a\rb", "a\tb", "a\u001bb", "a\u007fb", "a\u0085b"],
)
async def test_a_blank_title_or_one_with_a_control_character_is_refused(client, auth, title):
    """On create as on rename: 400 naming the field, nothing created or renamed."""
    h = auth()
    status, err = await create(client, h, title=title)
    assert status == 400
    assert_error_shape(err, "validation_error")
    assert [d["field"] for d in err["error"]["details"]] == ["title"]
    listed = await (await client.get("/api/chat", headers=h)).json()
    assert listed["chats"] == []

    status, chat = await create(client, h, title="kept")
    resp = await client.patch(f"/api/chat/{chat['chat_id']}", json={"title": title}, headers=h)
    assert resp.status == 400
    err = await resp.json()
    assert_error_shape(err, "validation_error")
    assert [d["field"] for d in err["error"]["details"]] == ["title"]
    got = await (await client.get(f"/api/chat/{chat['chat_id']}", headers=h)).json()
    assert got["title"] == "kept"


async def test_a_title_may_be_any_other_text(client, auth):
    status, chat = await create(client, auth(), title='Café — 東京 ✓ "quoted" <b>')
    assert status == 201 and chat["title"] == 'Café — 東京 ✓ "quoted" <b>'


async def test_an_http_error_keeps_its_headers_in_the_json_shape(aiohttp_client, settings, auth):
    """RFC 9110: a 405 names the allowed methods in ``Allow``, on /api and /v1 alike; any other
    header an aiohttp error carries (a Retry-After) stays too. Only the headers of aiohttp's own
    text body go: the JSON error replaces it."""
    app = create_app(settings)

    async def busy(request):
        raise web.HTTPServiceUnavailable(headers={"Retry-After": "7"})

    app.router.add_get("/api/test-busy", busy)
    client = await aiohttp_client(app)
    h = auth()

    async def error_of(resp, status):
        assert resp.status == status
        body = await resp.read()
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["Content-Length"] == str(len(body))
        return json.loads(body)

    err = await error_of(await client.put("/api/chat", headers=h), 405)
    assert_error_shape(err, "method_not_allowed")
    resp = await client.put("/api/chat", headers=h)
    assert {"GET", "POST"} <= set(resp.headers["Allow"].split(","))
    assert "PUT" not in resp.headers["Allow"]
    resp = await client.get("/v1/chat/completions", headers=h)
    await error_of(resp, 405)
    assert resp.headers["Allow"] == "POST"
    resp = await client.get("/api/test-busy", headers=h)
    assert_error_shape(await error_of(resp, 503), "http_error")
    assert resp.headers["Retry-After"] == "7"

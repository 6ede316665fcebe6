"""API keys (#20): made by a token, shown once, used wherever a token is (Bearer on /api and /v1,
x-api-key on /v1/messages, the WebSocket's header and tickets), scoped to their models, never in
the log, and stopped within API_KEY_CACHE_S on every replica once revoked or expired."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import make_mocked_request

from service.api.ws import _redeem
from service.apikeys import MAX_KEYS_PER_USER, NEVER
from service.app import create_app
from service.auth import mint_token
from service.keys import API_KEYS, AUTH, STORE
from service.logs import redact
from service.store import utcnow
from tests.fake_openai import Script
from tests.faults import calls
from tests.sse_client import collect, text_of

HI = [{"role": "user", "content": "Hi"}]


# --------------------------------------------------------------------------- helpers
def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def make_key(client, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/keys", json={"name": "ci", **body}, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def error_of(resp) -> dict[str, Any]:
    return (await resp.json())["error"]


async def until(probe, within_s: float = 5.0) -> float:
    """Poll an async ``probe`` until it is true, with a deadline; returns the time it took."""
    started = time.monotonic()
    while not await probe():
        assert time.monotonic() - started < within_s, "condition not met before the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", headers=headers)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["chat_id"]


# --------------------------------------------------------------------------- lifecycle
async def test_a_key_is_shown_once_listed_without_its_secret_and_stops_when_revoked(client, auth):
    created = await make_key(client, auth(), name="laptop", limit=5000)
    secret = created["key"]
    assert secret.startswith("cgw-") and len(secret) == 4 + 43
    assert created["prefix"] == secret[4:12] and created["id"].startswith("key_")
    assert created["name"] == "laptop" and created["limit"] == 5000
    assert created["admin"] is False and created["last_used_at"] is None
    assert created["models"] is None and created["expires_at"] is None

    stored = await client.app[STORE].db["api_keys"].find_one({"_id": created["id"]})
    assert stored["hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps(stored, default=str)

    listed = await (await client.get("/api/keys", headers=auth())).json()
    assert [k["id"] for k in listed["items"]] == [created["id"]]
    assert "key" not in listed["items"][0] and "hash" not in listed["items"][0]
    assert secret not in json.dumps(listed)

    assert (await client.get("/api/chat", headers=bearer(secret))).status == 200
    assert (await client.delete(f"/api/keys/{created['id']}", headers=auth())).status == 204
    resp = await client.get("/api/chat", headers=bearer(secret))  # this replica: at once
    assert resp.status == 401
    assert (await error_of(resp))["message"] == "invalid API key: revoked"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert (await (await client.get("/api/keys", headers=auth())).json())["items"] == []
    assert (await client.delete(f"/api/keys/{created['id']}", headers=auth())).status == 404


async def test_keys_are_listed_newest_first_and_are_their_users_own(client, auth):
    first = await make_key(client, auth("alice"), name="one")
    second = await make_key(client, auth("alice"), name="two")
    bobs = await make_key(client, auth("bob"), name="bob's")
    listed = await (await client.get("/api/keys", headers=auth("alice"))).json()
    assert [k["id"] for k in listed["items"]] == [second["id"], first["id"]]
    resp = await client.delete(f"/api/keys/{bobs['id']}", headers=auth("alice"))
    assert resp.status == 404 and (await error_of(resp))["code"] == "key_not_found"
    assert (await client.delete("/api/keys/key_000000000000", headers=auth())).status == 404
    assert (await client.get("/api/chat", headers=bearer(bobs["key"]))).status == 200


async def test_an_unknown_key_is_refused_without_echoing_it(client):
    secret = "cgw-" + "A" * 43
    resp = await client.get("/api/chat", headers=bearer(secret))
    assert resp.status == 401
    err = await error_of(resp)
    assert err["message"] == "invalid API key: unknown" and secret not in await resp.text()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({}, "name"),
        ({"name": "k", "limit": -1}, "limit"),
        ({"name": "k", "limit": "5"}, "limit"),
        ({"name": "k", "limit": 1.5}, "limit"),
        ({"name": "k", "admin": "yes"}, "admin"),
        ({"name": "k", "models": []}, "models"),
        ({"name": "k", "models": "demo"}, "models"),
        ({"name": "k", "colour": "red"}, "colour"),
        ({"name": "k", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),  # no offset
        ({"name": "k", "expires_at": "2999-01-01"}, "expires_at"),
        ({"name": "k", "expires_at": "2999-01-01T00:00:00+25:00"}, "expires_at"),
        ({"name": "k", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),  # past
        ({"name": "k", "expires_at": 4102444800}, "expires_at"),
    ],
)
async def test_a_bad_key_request_is_400_naming_the_field(client, auth, body, field):
    resp = await client.post("/api/keys", json=body, headers=auth())
    assert resp.status == 400, await resp.text()
    err = await error_of(resp)
    assert err["code"] == "validation_error"
    assert field in json.dumps(err["details"])


async def test_an_unknown_model_is_400_and_known_ones_are_kept(client, auth):
    resp = await client.post(
        "/api/keys", json={"name": "k", "models": ["demo", "gpt-9"]}, headers=auth()
    )
    assert resp.status == 400
    err = await error_of(resp)
    assert err["code"] == "unknown_model" and err["details"]["unknown"] == ["gpt-9"]
    key = await make_key(
        client, auth(), models=["demo", "demo"], expires_at="2999-01-01T01:00:00+01:00"
    )
    assert key["models"] == ["demo"] and key["expires_at"] == "2999-01-01T00:00:00Z"


async def test_a_user_has_at_most_the_cap_of_keys_not_revoked(client, auth):
    ids = [(await make_key(client, auth(), name=f"k{i}"))["id"] for i in range(MAX_KEYS_PER_USER)]
    resp = await client.post("/api/keys", json={"name": "one more"}, headers=auth())
    assert resp.status == 409
    err = await error_of(resp)
    assert err["code"] == "key_limit_reached" and err["details"]["limit"] == MAX_KEYS_PER_USER
    assert (await client.delete(f"/api/keys/{ids[0]}", headers=auth())).status == 204
    await make_key(client, auth(), name="in its place")
    await make_key(client, auth("bob"), name="another user's")


async def test_a_key_cannot_create_list_or_revoke_keys(client, auth):
    key = await make_key(client, auth())
    h = bearer(key["key"])
    for resp in (
        await client.post("/api/keys", json={"name": "minted"}, headers=h),
        await client.get("/api/keys", headers=h),
        await client.delete(f"/api/keys/{key['id']}", headers=h),
    ):
        assert resp.status == 403
        assert (await error_of(resp))["code"] == "forbidden"
    assert len((await (await client.get("/api/keys", headers=auth())).json())["items"]) == 1


# --------------------------------------------------------------------------- admin
@pytest.mark.parametrize(
    ("claims", "admin"),
    [
        ({"role": "admin"}, True),
        ({"role": ["user", "admin"]}, True),
        ({"role": "user"}, False),
        ({"role": ["user"]}, False),
        ({"role": "administrator"}, False),
        ({}, False),
    ],
)
async def test_only_an_admin_token_may_create_an_admin_key(client, settings, claims, admin):
    headers = bearer(mint_token(settings, "alice", extra=claims))
    resp = await client.post("/api/keys", json={"name": "ops", "admin": True}, headers=headers)
    assert resp.status == (201 if admin else 403), await resp.text()
    principal = await client.app[AUTH].verify(headers["Authorization"][7:])
    assert principal.admin is admin
    assert (await client.app[AUTH].verify(headers["Authorization"][7:])).admin is admin  # LRU
    if admin:
        key = await resp.json()
        assert key["admin"] is True
        by_key = await client.app[AUTH].verify(key["key"])
        assert by_key.admin is True and by_key.key is not None
    else:
        assert (await error_of(resp))["code"] == "forbidden"
    plain = await make_key(client, headers, name="plain")
    assert plain["admin"] is False
    assert (await client.app[AUTH].verify(plain["key"])).admin is False


async def test_the_admin_claim_and_role_are_settings(aiohttp_client, make_settings):
    settings = make_settings(admin_claim="groups", admin_role="ops")
    client = await aiohttp_client(create_app(settings))
    verify = client.app[AUTH].verify
    assert (await verify(mint_token(settings, "a", extra={"groups": ["ops"]}))).admin is True
    assert (await verify(mint_token(settings, "a", extra={"role": "admin"}))).admin is False


# --------------------------------------------------------------------------- front doors
async def test_a_key_sends_a_chat_message_over_sse(stream_client, auth, logs):
    key = await make_key(stream_client, auth())
    h = bearer(key["key"])
    chat_id = await new_chat(stream_client, h)
    resp = await stream_client.post(
        f"/api/chat/{chat_id}/message", json={"message": "Hello"}, headers=h
    )
    assert resp.status == 200
    evs = await collect(resp)
    assert evs[-1]["event"] == "done" and text_of(evs) == "Hello, world!"
    started = next(e for e in logs if e["event"] == "stream.started")
    assert started["user_id"] == "alice" and started["key_id"] == key["id"]


async def test_a_key_scoped_to_models_is_refused_another_on_the_chat_route(stream_client, auth):
    key = await make_key(stream_client, auth(), models=["demo"])
    h = bearer(key["key"])
    chat_id = await new_chat(stream_client, h)
    url = f"/api/chat/{chat_id}/message"
    resp = await stream_client.post(url, json={"message": "Hi", "model": "gpt-test"}, headers=h)
    assert resp.status == 403
    err = await error_of(resp)
    assert err["code"] == "model_not_allowed" and err["details"]["allowed"] == ["demo"]
    resp = await stream_client.post(url, json={"message": "Hi", "model": "demo"}, headers=h)
    assert resp.status == 200 and (await collect(resp))[-1]["event"] == "done"


async def test_a_key_without_the_default_model_is_given_the_first_it_may_use(
    stream_client, auth, logs
):
    """The default (``gpt-test`` here) is not on the key's list: ``/api/models`` says the
    key's default is ``demo``, and a send that names no model uses it (it was 403)."""
    key = await make_key(stream_client, auth(), models=["demo"])
    h = bearer(key["key"])
    listed = await (await stream_client.get("/api/models", headers=h)).json()
    assert listed["default"] == "demo"
    listed = await (await stream_client.get("/api/models", headers=auth())).json()
    assert listed["default"] == "gpt-test"
    chat_id = await new_chat(stream_client, h)
    resp = await stream_client.post(
        f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h
    )
    assert resp.status == 200, await resp.text()
    assert (await collect(resp))[-1]["event"] == "done"
    started = next(e for e in logs if e["event"] == "stream.started")
    assert started["model"] == "demo"


async def test_a_key_is_offered_only_its_models(stream_client, auth):
    """``/api/models``, ``/v1/models`` (the SDK's ``models.list``) and ``/v1/models/{model}``
    offer a key with a model list those models only, and a chat cannot be made with another
    (403 ``model_not_allowed``, as a send in it would be); a token is offered every one."""
    key = await make_key(stream_client, auth(), models=["gpt-test"])
    h = bearer(key["key"])
    listed = await (await stream_client.get("/api/models", headers=h)).json()
    assert [m["name"] for m in listed["models"]] == ["gpt-test"]
    listed = await (await stream_client.get("/api/models", headers=auth())).json()
    assert sorted(m["name"] for m in listed["models"]) == ["demo", "gpt-test"]
    base_url = str(stream_client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key["key"], max_retries=0) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["gpt-test"]
        assert (await sdk.models.retrieve("gpt-test")).id == "gpt-test"
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.models.retrieve("demo")
        assert missing.value.body["code"] == "model_not_found"
    resp = await stream_client.post("/api/chat", json={"model": "demo"}, headers=h)
    assert resp.status == 403
    assert (await error_of(resp))["code"] == "model_not_allowed"
    resp = await stream_client.post("/api/chat", json={"model": "gpt-test"}, headers=h)
    assert resp.status == 201
    chats = await (await stream_client.get("/api/chat", headers=h)).json()
    assert [c["model"] for c in chats["chats"]] == ["gpt-test"]


async def test_the_openai_sdk_works_with_a_key_and_its_model_list(stream_client, auth):
    key = await make_key(stream_client, auth(), models=["gpt-test"])
    base_url = str(stream_client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key["key"], max_retries=0) as sdk:
        answer = await sdk.chat.completions.create(model="gpt-test", messages=HI)
        assert answer.choices[0].message.content == "Hello, world!"
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await sdk.chat.completions.create(model="demo", messages=HI)
        assert refused.value.status_code == 403
        assert refused.value.body["code"] == "model_not_allowed"
        assert refused.value.body["type"] == "permission_error"
        assert (await stream_client.delete(f"/api/keys/{key['id']}", headers=auth())).status == 204
        with pytest.raises(openai.AuthenticationError) as denied:
            await sdk.chat.completions.create(model="gpt-test", messages=HI)
        assert "invalid API key: revoked" in denied.value.body["message"]
        assert denied.value.body["code"] == "invalid_api_key"


async def test_the_anthropic_sdk_sends_a_key_as_x_api_key(stream_client, auth):
    key = await make_key(stream_client, auth())
    base_url = str(stream_client.make_url(""))
    async with anthropic.AsyncAnthropic(
        base_url=base_url, api_key=key["key"], max_retries=0
    ) as sdk:
        answer = await sdk.messages.create(model="gpt-test", max_tokens=64, messages=HI)
        assert answer.content[0].text == "Hello, world!"
        await stream_client.delete(f"/api/keys/{key['id']}", headers=auth())
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await sdk.messages.create(model="gpt-test", max_tokens=64, messages=HI)
        assert "invalid API key: revoked" in str(denied.value)


async def ws_turn(ws, chat_id: str, model: str | None = None) -> dict[str, Any]:
    """Send one message and read up to its terminal frame."""
    ready = await ws.receive_json(timeout=5)
    assert ready["type"] == "ready"
    frame = {"type": "send", "id": "t1", "chat_id": chat_id, "message": "Hi"}
    await ws.send_json({**frame, **({"model": model} if model else {})})
    while True:
        msg = await ws.receive_json(timeout=5)
        if msg["type"] in ("done", "error"):
            return msg


async def test_a_key_opens_a_websocket_by_header(stream_client, auth, logs):
    key = await make_key(stream_client, auth(), models=["gpt-test"])
    h = bearer(key["key"])
    chat_id = await new_chat(stream_client, h)
    async with stream_client.ws_connect("/api/ws", headers=h) as ws:
        assert (await ws_turn(ws, chat_id))["status"] == "complete"
    started = next(e for e in logs if e["event"] == "stream.started")
    assert started["transport"] == "ws" and started["key_id"] == key["id"]
    async with stream_client.ws_connect("/api/ws", headers=h) as ws:
        refused = await ws_turn(ws, chat_id, model="demo")
        assert refused["type"] == "error" and refused["code"] == "model_not_allowed"


async def test_a_socket_opened_with_a_key_closes_once_the_key_is_revoked(
    aiohttp_client, stream_settings, auth, logs
):
    """Revoking a key closes its open WebSockets (4001, as a token's expiry) within
    API_KEY_CACHE_S; a socket of another key, or of a token, stays open."""
    client = await aiohttp_client(create_app(stream_settings(api_key_cache_s=0.2)))
    doomed, kept = await make_key(client, auth()), await make_key(client, auth(), name="kept")
    async with (
        client.ws_connect("/api/ws", headers=bearer(doomed["key"])) as ws,
        client.ws_connect("/api/ws", headers=bearer(kept["key"])) as other,
        client.ws_connect("/api/ws", headers=auth()) as token,
    ):
        for sock in (ws, other, token):
            assert (await sock.receive_json(timeout=5))["type"] == "ready"
        resp = await client.delete(f"/api/keys/{doomed['id']}", headers=auth())
        assert resp.status == 204
        started = time.monotonic()
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert ws.close_code == 4001 and "revoked" in (msg.extra or "")
        assert time.monotonic() - started < 2 * 1.0 + 1.0  # a second's rounds, twice at most
        await other.send_json({"type": "ping"})  # the others are still served
        await token.send_json({"type": "ping"})
        assert not other.closed and not token.closed
    assert any(e["event"] == "ws.key_refused" for e in logs)
    assert doomed["key"] not in repr(logs)


async def test_a_ticket_asked_for_with_a_key_carries_the_key(stream_client, auth):
    key = await make_key(stream_client, auth(), models=["gpt-test"])
    h = bearer(key["key"])
    chat_id = await new_chat(stream_client, h)

    async def ticket(headers) -> str:
        resp = await stream_client.post("/api/ws/ticket", headers=headers)
        assert resp.status == 200
        return (await resp.json())["ticket"]

    first = await ticket(h)
    stored = await stream_client.app[STORE].db["ws_tickets"].find_one({})
    assert stored["key_id"] == key["id"] and stored["admin"] is False
    async with stream_client.ws_connect("/api/ws", params={"ticket": first}) as ws:
        refused = await ws_turn(ws, chat_id, model="demo")  # the key's model list holds
        assert refused["type"] == "error" and refused["code"] == "model_not_allowed"
    async with stream_client.ws_connect("/api/ws", params={"ticket": await ticket(h)}) as ws:
        assert (await ws_turn(ws, chat_id))["status"] == "complete"

    unused = await ticket(h)
    await stream_client.delete(f"/api/keys/{key['id']}", headers=auth())
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ticket:
        await stream_client.ws_connect("/api/ws", params={"ticket": unused})
    assert refused_ticket.value.status == 401


async def test_a_redeemed_ticket_is_the_principal_that_asked_for_it(stream_client, settings):
    admin_token = mint_token(settings, "root", extra={"role": "admin"})
    key = await make_key(stream_client, bearer(admin_token), admin=True, limit=7)
    app = stream_client.app
    for credential in (admin_token, key["key"]):
        asked = await app[AUTH].verify(credential)
        resp = await stream_client.post("/api/ws/ticket", headers=bearer(credential))
        ticket = (await resp.json())["ticket"]
        redeemed = await _redeem(make_mocked_request("GET", "/api/ws", app=app), ticket)
        assert redeemed.admin is True and redeemed.user_id == "root"
        assert redeemed.key == asked.key
    assert redeemed.key is not None and redeemed.key.limit == 7


# --------------------------------------------------------------------------- expiry
async def test_a_key_past_its_expiry_is_refused(client, auth):
    doc = {
        "_id": "key_expired0001",
        "user_id": "alice",
        "name": "old",
        "hash": hashlib.sha256(b"cgw-expired-secret-0001").hexdigest(),
        "prefix": "expired-",
        "created_at": utcnow() - timedelta(days=2),
        "last_used_at": None,
        "expires_at": utcnow() - timedelta(days=1),
        "models": None,
        "limit": None,
        "admin": False,
        "revoked_at": None,
    }
    await client.app[STORE].create_api_key(doc, cap=MAX_KEYS_PER_USER)
    resp = await client.get("/api/chat", headers=bearer("cgw-expired-secret-0001"))
    assert resp.status == 401 and (await error_of(resp))["message"] == "invalid API key: expired"


async def test_a_cached_key_stops_at_its_expiry(client, auth):
    """The lookup is cached for API_KEY_CACHE_S (5 s here); the expiry is checked anyway."""
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    key = await make_key(client, auth(), expires_at=expires.isoformat())
    h = bearer(key["key"])
    assert (await client.get("/api/chat", headers=h)).status == 200
    principal = await client.app[AUTH].verify(key["key"])
    assert abs(principal.expires_at - expires.timestamp()) < 0.01

    async def refused() -> bool:
        resp = await client.get("/api/chat", headers=h)
        return resp.status == 401 and (await error_of(resp))["message"].endswith("expired")

    await until(refused, within_s=4.0)
    assert time.time() >= expires.timestamp()


async def test_a_key_without_expiry_has_a_finite_far_expiry(client, auth):
    key = await make_key(client, auth())
    assert (await client.app[AUTH].verify(key["key"])).expires_at == NEVER


async def test_requests_of_a_key_at_once_share_one_lookup(aiohttp_client, make_settings, auth):
    """A busy key whose cache entry is old (API_KEY_CACHE_S=0: always) sends MongoDB one read
    for the requests that arrive together, not one each."""
    client = await aiohttp_client(create_app(make_settings(api_key_cache_s=0)))
    key = await make_key(client, auth())
    before = calls("find_api_key")
    responses = await asyncio.gather(
        *(client.get("/api/chat", headers=bearer(key["key"])) for _ in range(20))
    )
    assert [r.status for r in responses] == [200] * 20
    reads = calls("find_api_key") - before
    assert 1 <= reads < 20, reads


# --------------------------------------------------------------------------- last_used_at
async def test_last_used_at_is_written_once_a_minute_per_replica(client, auth):
    key = await make_key(client, auth())
    store = client.app[STORE]
    before = calls("touch_api_key")
    for _ in range(5):
        assert (await client.get("/api/chat", headers=bearer(key["key"]))).status == 200

    async def written() -> bool:
        doc = await store.db["api_keys"].find_one({"_id": key["id"]})
        return doc["last_used_at"] is not None

    await until(written)
    assert calls("touch_api_key") - before == 1
    listed = (await (await client.get("/api/keys", headers=auth())).json())["items"][0]
    assert listed["last_used_at"] is not None


class _Spy:
    """The real store with one method replaced (a fault no real MongoDB gives on demand)."""

    def __init__(self, store, **overrides) -> None:
        self._store = store
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._store, name)


async def test_a_failed_last_used_at_write_does_not_fail_the_request(client, auth, logs):
    key = await make_key(client, auth())
    store = client.app[STORE]

    async def broken(key_id, at):
        raise RuntimeError("disk full")

    client.app[API_KEYS].store = _Spy(store, touch_api_key=broken)
    assert (await client.get("/api/chat", headers=bearer(key["key"]))).status == 200

    async def logged() -> bool:
        return any(e["event"] == "api_key.touch_failed" for e in logs)

    await until(logged)


# --------------------------------------------------------------------------- logs
def test_a_key_in_any_log_field_is_redacted():
    secret = "cgw-" + "Zk3_q-" * 7 + "a"
    assert redact(f"GET /v1/models?x={secret}\x01 HTTP/1.1") == (
        "GET /v1/models?x=[redacted]\x01 HTTP/1.1"
    )
    assert redact(f"a key {secret} in prose") == "a key [redacted] in prose"


async def test_a_key_never_reaches_the_log(stream_client, auth, logs):
    key = await make_key(stream_client, auth())
    h = bearer(key["key"])
    chat_id = await new_chat(stream_client, h)
    await collect(
        await stream_client.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h)
    )
    await stream_client.get("/api/keys", headers=h)  # 403
    await stream_client.delete(f"/api/keys/{key['id']}", headers=auth())
    await stream_client.get("/api/chat", headers=h)  # 401
    assert logs and key["key"] not in json.dumps(logs, default=str)
    assert key["key"][4:] not in json.dumps(logs, default=str)


# --------------------------------------------------------------------------- replicas
async def test_a_revoked_key_stops_on_another_replica_within_the_cache_time(services, token_for):
    cache_s = 0.5
    a, b = await services.start("a", "b", api_key_cache_s=cache_s)
    token = bearer(token_for("alice"))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{a.url}/api/keys", json={"name": "ci"}, headers=token)
        key = await resp.json()
        h = bearer(key["key"])
        for replica in (a, b):  # both replicas now hold the key in their cache
            assert (await http.get(f"{replica.url}/api/chat", headers=h)).status == 200
        # The secret in a request line aiohttp cannot parse: it logs the line, redacted.
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        writer.write(f"GET /v1/models?x={key['key']}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        assert b" 400 " in (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n")[0]
        writer.close()

        resp = await http.delete(f"{a.url}/api/keys/{key['id']}", headers=token)
        assert resp.status == 204
        revoked_at = time.monotonic()
        assert (await http.get(f"{a.url}/api/chat", headers=h)).status == 401

        async def refused_on_b() -> bool:
            return (await http.get(f"{b.url}/api/chat", headers=h)).status == 401

        await until(refused_on_b, within_s=cache_s + 3.0)
        assert time.monotonic() - revoked_at < cache_s + 1.0

    await b.wait_for_log("http.request", status=401, path="/api/chat")
    assert any(e.get("logger") == "aiohttp.server" for e in b.lines())
    for replica in (a, b):
        assert key["key"] not in replica.text() and key["key"][4:20] not in replica.text()
        assert any(e.get("key_id") == key["id"] for e in replica.lines())


# --------------------------------------------------------------------------- request checks
@pytest.mark.parametrize(
    "expires_at",
    ["9999-12-31T23:59:59-14:00", "9999-12-31T23:00:00-01:00", "0001-01-01T00:00:00+14:00"],
)
async def test_an_expiry_outside_the_calendar_in_utc_is_400_not_500(client, auth, expires_at):
    resp = await client.post(
        "/api/keys", json={"name": "k", "expires_at": expires_at}, headers=auth()
    )
    assert resp.status == 400, await resp.text()
    err = await error_of(resp)
    assert err["code"] == "validation_error"
    assert [d["field"] for d in err["details"]] == ["expires_at"]
    assert set(err["details"][0]) == {"field", "problem", "type"}
    assert (await (await client.get("/api/keys", headers=auth())).json())["items"] == []


async def test_the_latest_expiry_in_any_offset_is_kept(client, auth):
    key = await make_key(client, auth(), expires_at="9999-12-31T23:59:59+14:00")
    assert key["expires_at"] == "9999-12-31T09:59:59Z"


@pytest.mark.parametrize("name", ["a\u0000b", "a\nb", "a\tb", "a\u001bb", "a\u007fb", "a\u0085b"])
async def test_a_key_name_with_a_control_character_is_400(client, auth, name):
    resp = await client.post("/api/keys", json={"name": name}, headers=auth())
    assert resp.status == 400, await resp.text()
    err = await error_of(resp)
    assert err["code"] == "validation_error"
    assert [d["field"] for d in err["details"]] == ["name"]
    assert (await (await client.get("/api/keys", headers=auth())).json())["items"] == []


async def test_a_key_name_is_trimmed_and_may_be_any_other_text(client, auth):
    key = await make_key(client, auth(), name="  CI — 東京 ✓  ")
    assert key["name"] == "CI — 東京 ✓"


async def test_a_key_counts_tokens_only_for_its_models(stream_client, auth):
    """Counting may be a call to the vendor's own count on the operator's key: a key with a
    model list counts for those models only (403, as a turn would be), and one that names no
    model counts for its own default."""
    key = await make_key(stream_client, auth(), models=["demo"])
    url = "/v1/messages/count_tokens"
    headers = {"x-api-key": key["key"], "anthropic-version": "2023-06-01"}
    resp = await stream_client.post(
        url, json={"model": "gpt-test", "messages": HI}, headers=headers
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "permission_error"
    resp = await stream_client.post(url, json={"model": "demo", "messages": HI}, headers=headers)
    assert resp.status == 200 and (await resp.json())["input_tokens"] > 0


async def test_a_replay_is_only_for_a_credential_that_may_use_its_model(
    stream_client, auth, fake_openai
):
    """An Idempotency-Key is the user's, whichever credential sent it: a key with a model list
    retrying another credential's request for a model outside its list is refused (403), not
    handed the answer."""
    fake_openai.default = Script(chunks=["the ", "secret"], usage=(5, 2))
    body = {"model": "gpt-test", "messages": HI}
    first = await stream_client.post(
        "/v1/chat/completions", json=body, headers={**auth(), "Idempotency-Key": "once"}
    )
    assert (
        first.status == 200 and "secret" in (await first.json())["choices"][0]["message"]["content"]
    )
    key = await make_key(stream_client, auth(), models=["demo"])
    again = await stream_client.post(
        "/v1/chat/completions", json=body, headers={**bearer(key["key"]), "Idempotency-Key": "once"}
    )
    assert again.status == 403 and "Idempotent-Replayed" not in again.headers
    assert (await again.json())["error"]["code"] == "model_not_allowed"
    same = await stream_client.post(
        "/v1/chat/completions", json=body, headers={**auth(), "Idempotency-Key": "once"}
    )
    assert same.status == 200 and same.headers["Idempotent-Replayed"] == "true"

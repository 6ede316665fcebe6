"""Operators' routes over API keys: a user's keys listed and revoked by an administrator (one,
or all at once, as when offboarding someone or taking an admin role away), every user's admin
keys paged for an audit, and a revoked key refused on every replica within API_KEY_CACHE_S, its
WebSocket closed. Real sockets, SecantusDB."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import STORE
from service.store import utcnow
from tests.test_api_keys import bearer, error_of, make_key, until


@pytest.fixture
def admin(token_for):
    """Headers of an administrator (the token's ``role: admin`` claim)."""

    def factory(user: str = "root") -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(user, extra={'role': 'admin'})}"}

    return factory


async def works(client, secret: str, path: str = "/api/chat") -> int:
    return (await client.get(path, headers=bearer(secret))).status


# --------------------------------------------------------------------------- a user's keys
async def test_an_administrator_lists_a_users_keys_as_the_user_sees_them(client, auth, admin):
    """The same items as the user's own ``GET /api/keys`` (never a secret or hash; revoked keys
    left out as there), only that user's; a user with no keys has an empty list."""
    await make_key(client, auth("alice"), name="laptop", limit=500)
    gone = await make_key(client, auth("alice"), name="old")
    await make_key(client, auth("alice"), name="ci")
    bobs = await make_key(client, auth("bob"), name="bob's")
    assert (await client.delete(f"/api/keys/{gone['id']}", headers=auth("alice"))).status == 204

    resp = await client.get("/api/admin/users/alice/keys", headers=admin())
    assert resp.status == 200, await resp.text()
    listed = await resp.json()
    own = await (await client.get("/api/keys", headers=auth("alice"))).json()
    assert listed == own and [k["name"] for k in listed["items"]] == ["ci", "laptop"]
    assert listed["items"][1]["used"] == 0 and listed["items"][1]["remaining"] == 500
    text = json.dumps(listed)
    assert bobs["id"] not in text and "cgw-" not in text and '"hash"' not in text
    resp = await client.get("/api/admin/users/nobody/keys", headers=admin())
    assert resp.status == 200 and await resp.json() == {"items": []}


async def test_an_admin_key_revoked_by_another_admin_stops_on_every_replica(
    aiohttp_client, make_settings, token_for, admin, logs
):
    """ops's admin key, revoked by root: 401 at once on the replica that revoked it, on the
    other within API_KEY_CACHE_S, /api/admin included; its WebSocket there closes (4001); the
    revocation is logged with who, whose and which key, never the secret."""
    cache_s = 0.3
    settings = make_settings(api_key_cache_s=cache_s)
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    ops = {"Authorization": f"Bearer {token_for('ops', extra={'role': 'admin'})}"}
    key = await make_key(a, ops, name="ops laptop", admin=True)
    for replica in (a, b):  # both replicas hold the key, as an admin's
        assert await works(replica, key["key"], "/api/admin/users") == 200
    async with b.ws_connect("/api/ws", headers=bearer(key["key"])) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "ready"

        resp = await a.delete(f"/api/admin/users/ops/keys/{key['id']}", headers=admin("root"))
        assert resp.status == 204, await resp.text()
        revoked_at = time.monotonic()
        for path in ("/api/chat", "/api/admin/users"):
            resp = await a.get(path, headers=bearer(key["key"]))
            assert resp.status == 401, path
            assert (await error_of(resp))["message"] == "invalid API key: revoked"

        async def refused_on_b() -> bool:
            return await works(b, key["key"], "/api/admin/users") == 401

        await until(refused_on_b, within_s=cache_s + 3.0)
        assert time.monotonic() - revoked_at < cache_s + 1.0
        msg = await ws.receive(timeout=5)  # checked every max(API_KEY_CACHE_S, 1 s)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert ws.close_code == 4001 and "revoked" in (msg.extra or "")

    line = next(e for e in logs if e["event"] == "admin.key_revoked")
    assert (line["admin_id"], line["admin_key_id"]) == ("root", None)
    assert (line["target_user_id"], line["target_key_id"]) == ("ops", key["id"])
    assert key["key"] not in repr(logs) and key["key"][4:] not in repr(logs)
    assert (await (await a.get("/api/keys", headers=ops)).json())["items"] == []
    resp = await a.delete(f"/api/admin/users/ops/keys/{key['id']}", headers=admin("root"))
    assert resp.status == 404  # already revoked


async def test_a_key_that_is_not_that_users_is_404_and_left_alone(client, auth, admin):
    bobs = await make_key(client, auth("bob"))
    for path in (
        f"/api/admin/users/alice/keys/{bobs['id']}",  # bob's key, under alice
        "/api/admin/users/bob/keys/key_000000000000",  # no such key
    ):
        resp = await client.delete(path, headers=admin())
        assert resp.status == 404, path
        error = await error_of(resp)
        assert error["code"] == "key_not_found" and set(error) == {"code", "message"}
    assert await works(client, bobs["key"]) == 200


async def test_an_administrator_revokes_all_of_a_users_keys_at_once(client, auth, admin, logs):
    """Every key of the user not revoked yet: the answer says how many and which; they all stop,
    another user's keys go on, the user may make keys again (the cap's count is given back),
    and a second call revokes none."""
    alices = [await make_key(client, auth("alice"), name=f"k{i}") for i in range(3)]
    assert (
        await client.delete(f"/api/keys/{alices[0]['id']}", headers=auth("alice"))
    ).status == 204
    bobs = await make_key(client, auth("bob"))

    resp = await client.delete("/api/admin/users/alice/keys", headers=admin())
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["user_id"] == "alice" and answer["revoked"] == 2
    assert sorted(answer["key_ids"]) == sorted(k["id"] for k in alices[1:])
    for key in alices:
        assert await works(client, key["key"]) == 401
    assert await works(client, bobs["key"]) == 200
    assert (await (await client.get("/api/keys", headers=auth("alice"))).json())["items"] == []
    counts = await client.app[STORE].db["api_key_counts"].find_one({"_id": "alice"})
    assert counts["active"] == 0

    line = next(e for e in logs if e["event"] == "admin.keys_revoked")
    assert (line["admin_id"], line["target_user_id"], line["revoked"]) == ("root", "alice", 2)
    assert sorted(line["target_key_ids"]) == sorted(answer["key_ids"])
    resp = await client.delete("/api/admin/users/alice/keys", headers=admin())
    assert await resp.json() == {"user_id": "alice", "revoked": 0, "key_ids": []}


async def test_a_non_administrator_revokes_and_lists_nothing(client, auth, token_for):
    """403 for the user themself, a token with another role and a plain key of theirs: bob's
    keys still work. (Every admin route's 403 shape: test_admin.py's guard tests.)"""
    bobs = await make_key(client, auth("bob"))
    plain = await make_key(client, auth("alice"))
    other_role = {"Authorization": f"Bearer {token_for('carol', extra={'role': 'user'})}"}
    for headers in (auth("bob"), other_role, bearer(plain["key"])):
        for method, path in (
            ("GET", "/api/admin/users/bob/keys"),
            ("GET", "/api/admin/keys"),
            ("DELETE", f"/api/admin/users/bob/keys/{bobs['id']}"),
            ("DELETE", "/api/admin/users/bob/keys"),
        ):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 403, (method, path)
            assert (await error_of(resp))["code"] == "forbidden"
    assert await works(client, bobs["key"]) == 200


# --------------------------------------------------------------------------- requests refused
@pytest.mark.parametrize(
    ("method", "path", "params", "field"),
    [
        ("GET", "/api/admin/users/alice/keys", {"all": "1"}, "all"),
        ("DELETE", "/api/admin/users/alice/keys", {"dry_run": "true"}, "dry_run"),
        ("DELETE", "/api/admin/users/alice/keys/{key_id}", {"force": "1"}, "force"),
        ("GET", "/api/admin/keys", {"user": "alice"}, "user"),
        ("GET", "/api/admin/keys", {"admin": "maybe"}, "admin"),
        ("GET", "/api/admin/keys", {"limit": "0"}, "limit"),
        ("GET", "/api/admin/keys", {"limit": "201"}, "limit"),
        ("GET", "/api/admin/keys", {"limit": "ten"}, "limit"),
        ("GET", "/api/admin/users/key:key_abc/keys", {}, "user_id"),
        ("DELETE", "/api/admin/users/key:key_abc/keys", {}, "user_id"),
        ("GET", f"/api/admin/users/{'u' * 257}/keys", {}, "user_id"),
    ],
)
async def test_a_bad_query_or_user_is_400_and_changes_nothing(
    client, auth, admin, method, path, params, field
):
    """A parameter a route does not know is refused, not ignored (a ``dry_run`` must not
    revoke); a bad value is named; a user id that is a key's own month, or too long, is 400."""
    key = await make_key(client, auth("alice"))
    resp = await client.request(
        method, path.format(key_id=key["id"]), params=params, headers=admin()
    )
    assert resp.status == 400, await resp.text()
    error = await error_of(resp)
    assert error["code"] == "validation_error"
    assert [d["field"] for d in error["details"]] == [field]
    assert await works(client, key["key"]) == 200


@pytest.mark.parametrize("cursor", ["!!!", "WzEsMl0", "Wy05OTk5OTk5OTk5OTk5OTk5OSwia2V5Il0"])
async def test_a_bad_cursor_is_400_invalid_cursor(client, admin, cursor):
    """Not base64 JSON; a pair of the wrong types ([1, 2]); a time no date has."""
    resp = await client.get("/api/admin/keys", params={"cursor": cursor}, headers=admin())
    assert resp.status == 400, await resp.text()
    assert (await error_of(resp))["code"] == "invalid_cursor"


# --------------------------------------------------------------------------- the audit
async def test_every_admin_key_is_listed_newest_first_page_by_page(client, token_for, admin):
    """``?admin=true`` pages through every user's admin keys not revoked, each once, newest
    first (keys made in the same millisecond ordered by id), with its ``user_id``; the plain
    keys are ``?admin=false``'s, and with neither every key is listed."""
    db = client.app[STORE].db
    made: dict[str, list[tuple[str, str]]] = {"admin": [], "plain": []}
    for user in ("ann", "ben", "cat"):
        h = {"Authorization": f"Bearer {token_for(user, extra={'role': 'admin'})}"}
        for kind in ("admin", "admin", "plain"):
            key = await make_key(client, h, name=kind, admin=kind == "admin")
            made[kind].append((user, key["id"]))
    gone_user, gone = made["admin"].pop()
    resp = await client.delete(f"/api/admin/users/{gone_user}/keys/{gone}", headers=admin())
    assert resp.status == 204
    # Three of them made in one millisecond: the cursor must not skip or repeat one.
    same = utcnow() - timedelta(days=1)
    tied = [key_id for _, key_id in made["admin"][1:4]]
    await db["api_keys"].update_many({"_id": {"$in": tied}}, {"$set": {"created_at": same}})
    stored = {d["_id"]: d["created_at"] for d in await db["api_keys"].find().to_list(None)}

    async def pages(**params: str) -> list[dict[str, Any]]:
        items, cursor, seen = [], None, 0
        while True:
            query = {**params, "limit": "2", **({"cursor": cursor} if cursor else {})}
            resp = await client.get("/api/admin/keys", params=query, headers=admin())
            assert resp.status == 200, await resp.text()
            page = await resp.json()
            assert len(page["items"]) <= 2
            items += page["items"]
            cursor, seen = page["next_cursor"], seen + 1
            if cursor is None:
                return items
            assert seen < 10, "the cursor does not move on"

    def expected(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return sorted(pairs, key=lambda p: (stored[p[1]], p[1]), reverse=True)

    admins = await pages(admin="true")
    assert [(k["user_id"], k["id"]) for k in admins] == expected(made["admin"])
    assert all(k["admin"] is True and "key" not in k for k in admins)
    plain = await pages(admin="false")
    assert [(k["user_id"], k["id"]) for k in plain] == expected(made["plain"])
    every = await pages()
    assert [(k["user_id"], k["id"]) for k in every] == expected(made["admin"] + made["plain"])


async def test_a_revoke_all_failing_half_way_logs_the_keys_it_revoked(client, auth, admin, logs):
    """MongoDB fails on the 2nd of 3 revocations: the answer is 503, and the 1st key, revoked,
    is named in the log line all the same (``complete`` false): before, no line said who
    revoked it, or that it was revoked at all (found by review)."""
    for i in range(3):
        await make_key(client, auth("alice"), name=f"k{i}")
    store = client.app[STORE]
    real, calls = store._revoke_api_key, []

    async def flaky(user_id, key_id):
        calls.append(key_id)
        if len(calls) == 2:
            raise StoreUnavailable("the database is unavailable; try again shortly")
        return await real(user_id, key_id)

    store._revoke_api_key = flaky
    resp = await client.delete("/api/admin/users/alice/keys", headers=admin())
    assert resp.status == 503
    revoked = [
        d["_id"]
        for d in await store.db["api_keys"].find({"revoked_at": {"$ne": None}}).to_list(None)
    ]
    assert revoked, "the first key was revoked before the failure"
    logged = {
        k
        for e in logs
        if e["event"] in ("admin.key_revoked", "admin.keys_revoked")
        for k in e.get("target_key_ids", [e.get("target_key_id")])
    }
    assert set(revoked) <= logged, (revoked, logged)


async def test_a_revoke_whose_answer_is_late_is_logged_and_refused_here_at_once(
    make_settings, aiohttp_client, token_for, admin, logs
):
    """The revoke's write lands but its answer comes past MONGODB_TIMEOUT_MS: the handler says
    503, the write goes on. The key is refused on this replica at once all the same (README:
    'refused at once on the replica that made it'), and a line names the revocation that may
    have landed (``admin.key_revoke_unconfirmed``); before, this replica kept accepting it from
    its cache for API_KEY_CACHE_S and no line named it (found by review)."""
    from service.app import create_app

    client = await aiohttp_client(create_app(make_settings(mongodb_timeout_ms=500)))
    alice = {"Authorization": f"Bearer {token_for('alice')}"}
    key = await make_key(client, alice)
    assert await works(client, key["key"]) == 200  # cached on this replica
    store = client.app[STORE]
    real = store._revoke_api_key

    async def slow(user_id, key_id):
        doc = await real(user_id, key_id)
        await asyncio.sleep(1.0)  # the count's update slow: past the 0.5 s deadline
        return doc

    store._revoke_api_key = slow
    resp = await client.delete(f"/api/admin/users/alice/keys/{key['id']}", headers=admin())
    assert resp.status == 503

    async def revoked() -> bool:  # the write goes on past the deadline, and lands
        doc = await store.db["api_keys"].find_one({"_id": key["id"]})
        return doc["revoked_at"] is not None

    await until(revoked)
    still = await works(client, key["key"])
    named = any(
        e["event"].startswith("admin.") and e.get("target_key_id") == key["id"] for e in logs
    )
    assert named and still == 401, (
        [e["event"] for e in logs if e["event"].startswith("admin.")],
        still,
    )


async def test_an_admin_key_lists_keys_but_revokes_none(client, auth, token_for, admin):
    """Revoking cannot be undone (a secret is shown once: every integration re-keyed), so it
    takes a token, as on the user's own key routes: a leaked admin key may list every key, not
    revoke them (403), another admin's included."""
    ops = {"Authorization": f"Bearer {token_for('ops', extra={'role': 'admin'})}"}
    leaked = await make_key(client, ops, name="ops ci", admin=True)
    victims = [
        await make_key(client, auth("bob")),
        await make_key(client, admin("root"), admin=True),
    ]
    listing = await (
        await client.get("/api/admin/keys", headers={"Authorization": f"Bearer {leaked['key']}"})
    ).json()
    targets = {(k["user_id"], k["id"]) for k in listing["items"]}
    assert {("bob", victims[0]["id"]), ("root", victims[1]["id"])} <= targets
    statuses = []
    for user, key_id in sorted(targets):
        if key_id == leaked["id"]:
            continue
        resp = await client.delete(
            f"/api/admin/users/{user}/keys/{key_id}",
            headers={"Authorization": f"Bearer {leaked['key']}"},
        )
        statuses.append(resp.status)
    assert statuses and all(s == 403 for s in statuses), statuses
    assert all([await works(client, v["key"]) == 200 for v in victims])

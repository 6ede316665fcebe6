"""Operators' routes (issue #20): the admin guard, a user's limit (read, set, reset), a limit's
effect on the next turn, the standing limit of new months, users by usage, and analytics over
the daily rollup (JSON and CSV). Real sockets, SecantusDB, the fake upstream."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.analytics import rollup_docs
from service.app import create_app
from service.costs import format_cost
from service.keys import STORE
from service.store import ReserveRequest, key_account, utcnow
from service.stream.producer import period_of
from tests import openai_recordings as rec
from tests.fake_openai import Script
from tests.faults import rolled_up, settled
from tests.sse_client import collect
from tests.test_costs import PRICED, brute_force

ROUTES = [
    ("GET", "/api/admin/users"),
    ("GET", "/api/admin/users/alice/limit"),
    ("PUT", "/api/admin/users/alice/limit"),
    ("POST", "/api/admin/users/alice/reset"),
    ("GET", "/api/admin/usage"),
    ("GET", "/api/admin/keys"),
    ("GET", "/api/admin/users/alice/keys"),
    ("DELETE", "/api/admin/users/alice/keys"),
    ("DELETE", "/api/admin/users/alice/keys/key_000000000000"),
]
V1 = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def admin(token_for):
    """Headers of an administrator (the token's ``role: admin`` claim)."""

    def factory(user: str = "root") -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(user, extra={'role': 'admin'})}"}

    return factory


async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", json={}, headers=headers)
    assert resp.status == 201
    return str((await resp.json())["chat_id"])


async def sse_turn(client, chat_id: str, headers) -> Any:
    return await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "Hi there"}, headers=headers
    )


def month() -> str:
    return period_of(utcnow())


# --------------------------------------------------------------------------- the guard
async def test_every_admin_route_refuses_a_non_administrator(client, auth, admin, token_for):
    """403 forbidden, one error shape, for each route; a token whose role is something else is
    not an administrator either."""
    other_role = {"Authorization": f"Bearer {token_for('bob', extra={'role': 'user'})}"}
    for headers in (auth("alice"), other_role):
        for method, path in ROUTES:
            resp = await client.request(method, path, json={"limit": 5}, headers=headers)
            assert resp.status == 403, (method, path)
            body = await resp.json()
            assert body["error"]["code"] == "forbidden", (method, path)
            assert set(body["error"]) == {"code", "message"}
    for method, path in ROUTES:  # and no token at all is 401, as everywhere under /api
        assert (await client.request(method, path)).status == 401
    assert (await client.get("/api/admin/users", headers=admin())).status == 200


async def test_an_api_key_is_an_administrator_only_when_it_is_an_admin_key(client, admin, logs):
    """A key an administrator made without the role is refused every admin route; an admin key
    is let in, and its id is on the admin's log line (never its secret)."""

    async def make(admin_key: bool) -> str:
        body = {"name": "ops", "admin": admin_key}
        resp = await client.post("/api/keys", json=body, headers=admin())
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["key"])

    plain = {"Authorization": f"Bearer {await make(False)}"}
    for method, path in ROUTES:
        resp = await client.request(method, path, json={"limit": 5}, headers=plain)
        assert resp.status == 403, (method, path)
    secret = await make(True)
    ops = {"Authorization": f"Bearer {secret}"}
    assert (await client.get("/api/admin/users", headers=ops)).status == 200
    resp = await client.put("/api/admin/users/carol/limit", json={"limit": 7}, headers=ops)
    assert resp.status == 200
    line = next(e for e in logs if e["event"] == "admin.limit_set")
    assert line["admin_key_id"].startswith("key_") and line["target_user_id"] == "carol"
    assert secret not in repr(logs)


async def test_a_users_routes_refuse_a_query_parameter_they_do_not_take(client, admin):
    """A month's limit and its reset take no ``period``: asked with one, they say so (400
    naming it) rather than answer for, or reset, the current month instead."""
    await client.put("/api/admin/users/alice/limit", json={"limit": 5}, headers=admin())
    for method, path in (
        ("GET", "/api/admin/users/alice/limit"),
        ("PUT", "/api/admin/users/alice/limit"),
        ("POST", "/api/admin/users/alice/reset"),
    ):
        resp = await client.request(
            method, path, params={"period": "2026-01"}, json={"limit": 9}, headers=admin()
        )
        assert resp.status == 400, (method, path)
        error = (await resp.json())["error"]
        assert error["code"] == "validation_error"
        assert error["details"][0]["field"] == "period", (method, path)
    assert (await client.app[STORE].get_usage("alice", month()))["limit"] == 5


# --------------------------------------------------------------------------- limits
async def test_an_administrator_reads_sets_and_resets_a_users_limit(
    stream_client, auth, admin, fake_openai, logs
):
    client = stream_client
    store = client.app[STORE]
    fake_openai.default = Script(chunks=["a ", "b"], usage=(30, 5))
    chat = await new_chat(client, auth())
    resp = await sse_turn(client, chat, auth())
    assert resp.status == 200
    await collect(resp)
    await settled(store.db)
    await store.usage.update_one(
        {"user_id": "alice", "period": month()}, {"$set": {"cost": 1_234_500}}
    )  # what the core's pricing writes

    resp = await client.get("/api/admin/users/alice/limit", headers=admin())
    assert resp.status == 200
    assert await resp.json() == {
        "user_id": "alice",
        "period": month(),
        "unit": "tokens",
        "limit": 100_000,
        "used": 35,
        "reserved": 0,
        "remaining": 100_000 - 35,
        "cost": "0.0012345",
        "currency": "USD",
        "standing_limit": None,
    }

    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 500}, headers=admin())
    assert resp.status == 200
    view = await resp.json()
    assert (view["limit"], view["used"], view["remaining"]) == (500, 35, 465)
    assert view["standing_limit"] == 500
    user = await store.db["users"].find_one({"_id": "alice"})
    assert user["limit"] == 500 and user["updated_by"] == "root" and user["updated_at"]
    assert (await store.get_usage("alice", month()))["limit"] == 500

    # A user with no usage yet: the month's document is made with the limit.
    resp = await client.put("/api/admin/users/carol/limit", json={"limit": 0}, headers=admin())
    assert resp.status == 200 and (await resp.json())["remaining"] == 0
    carol = await store.get_usage("carol", month())
    assert (carol["limit"], carol["used"], carol["reserved"]) == (0, 0, 0)

    # Reset while a turn holds a reservation: used and cost go, the reservation stays.
    await store.usage.update_one(
        {"user_id": "alice", "period": month()},
        {"$set": {"reserved": 40, "open": [{"mid": "m-running", "grant": 40, "at": utcnow()}]}},
    )
    resp = await client.post("/api/admin/users/alice/reset", headers=admin())
    assert resp.status == 200
    view = await resp.json()
    assert (view["used"], view["reserved"], view["cost"], view["limit"]) == (0, 40, "0.00", 500)
    doc = await store.get_usage("alice", month())
    assert (doc["used"], doc["cost"], doc["reserved"], len(doc["open"])) == (0, 0, 40, 1)
    await store.settle_usage("alice", month(), "m-running", billed=12)
    assert (await store.get_usage("alice", month()))["used"] == 12  # the running turn settles

    # A user with no month at all: reset makes nothing.
    resp = await client.post("/api/admin/users/nobody/reset", headers=admin())
    assert resp.status == 200 and (await resp.json())["used"] == 0
    assert await store.get_usage("nobody", month()) is None

    by_event = {e["event"]: e for e in logs if e["event"].startswith("admin.")}
    set_line = next(e for e in logs if e["event"] == "admin.limit_set")
    assert set_line["admin_id"] == "root" and set_line["admin_key_id"] is None
    assert set_line["target_user_id"] == "alice" and set_line["period"] == month()
    assert (set_line["old_limit"], set_line["old_standing_limit"], set_line["new_limit"]) == (
        100_000,
        None,
        500,
    )
    reset = by_event["admin.period_reset"]
    assert reset["target_user_id"] == "nobody"  # the last one; the first was alice's
    first_reset = next(e for e in logs if e["event"] == "admin.period_reset")
    assert (first_reset["old_used"], first_reset["old_cost"], first_reset["reserved"]) == (
        35,
        1_234_500,
        40,
    )
    assert not any("Bearer" in repr(e) or "eyJ" in repr(e) for e in logs)  # never a token


async def test_a_reset_frees_the_users_api_keys_held_to_their_own_limits(
    stream_client, auth, admin, fake_openai
):
    """A key spent to its own limit is refused; after the user's reset it sends again (the
    reset zeroes the key's own month too, not the user's alone)."""
    client = stream_client
    db = client.app[STORE].db
    fake_openai.default = Script(chunks=["a"], usage=(100, 150))
    resp = await client.post("/api/keys", json={"name": "ci", "limit": 100}, headers=auth())
    key = await resp.json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    await settled(db)
    await settled(db, users=(key_account(key["id"]),))
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 429 and "API key" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/admin/users/alice/reset", headers=admin())
    assert resp.status == 200
    own = await db.usage.find_one({"user_id": key_account(key["id"]), "period": month()})
    assert (own["used"], own["cost"]) == (0, 0)
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    "body",
    [
        {"limit": -1},
        {"limit": 1.5},
        {"limit": "100"},
        {"limit": True},
        {"limit": None},
        {"limit": 2**63},
        {},
        {"limit": 5, "extra": 1},
    ],
)
async def test_a_bad_limit_is_refused(client, admin, body):
    """Refused; a value of the wrong kind says what a limit is, as a negative one does (1.5 was
    answered with pydantic's union noise, one problem per type of ``int | str``)."""
    resp = await client.put("/api/admin/users/alice/limit", json=body, headers=admin())
    assert resp.status == 400, body
    error = (await resp.json())["error"]
    assert error["code"] in ("validation_error", "invalid_json")
    assert await client.app[STORE].db["users"].find_one({"_id": "alice"}) is None
    if set(body) == {"limit"}:
        assert error["details"] == [
            {
                "field": "limit",
                "problem": "a whole number of tokens, 0 or more",
                "type": "value_error",
            }
        ], body


async def test_an_api_keys_account_is_not_a_user(client, admin):
    for method, path in (
        ("GET", "/api/admin/users/key:key_0123/limit"),
        ("PUT", "/api/admin/users/key:key_0123/limit"),
        ("POST", "/api/admin/users/key:key_0123/reset"),
    ):
        resp = await client.request(method, path, json={"limit": 1}, headers=admin())
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "validation_error" and error["details"][0]["field"] == "user_id"


async def test_a_lowered_limit_refuses_the_pages_next_turn_and_a_raised_one_admits_it(
    stream_client, auth, admin, fake_openai
):
    """The page's turns have no lease: a limit change holds from the very next turn."""
    client = stream_client
    fake_openai.default = Script(chunks=["a ", "b"], usage=(30, 5))
    chat = await new_chat(client, auth())
    resp = await sse_turn(client, chat, auth())
    assert resp.status == 200
    await collect(resp)
    await settled(client.app[STORE].db)
    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 40}, headers=admin())
    assert (await resp.json())["remaining"] == 5
    resp = await sse_turn(client, chat, auth())
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "budget_exceeded" and error["details"]["limit"] == 40
    await client.put("/api/admin/users/alice/limit", json={"limit": 50_000}, headers=admin())
    resp = await sse_turn(client, chat, auth())
    assert resp.status == 200
    await collect(resp)


async def test_a_lowered_limit_refuses_the_next_program_turn_once_the_lease_is_back(
    stream_client, auth, admin, fake_openai
):
    """A /v1 turn after the replica gave its lease back is admitted by the month's document,
    which holds the new limit; raised again, the next turn is admitted."""
    client = stream_client  # LEASE_IDLE_S 0.1
    fake_openai.default = Script(chunks=["a ", "b"], usage=(30, 5))
    assert (await client.post("/v1/chat/completions", json=V1, headers=auth())).status == 200
    await settled(client.app[STORE].db)  # the lease went back
    await client.put("/api/admin/users/alice/limit", json={"limit": 40}, headers=admin())
    resp = await client.post("/v1/chat/completions", json=V1, headers=auth())
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "insufficient_quota"
    await client.put("/api/admin/users/alice/limit", json={"limit": 50_000}, headers=admin())
    assert (await client.post("/v1/chat/completions", json=V1, headers=auth())).status == 200


async def test_a_lease_held_before_a_change_admits_only_from_what_it_holds(
    aiohttp_client, stream_settings, auth, admin, fake_openai
):
    """The documented window: a lease taken before the limit was lowered still admits turns
    from what it holds; once it is given back, the month's new limit refuses the next turn."""
    client = await aiohttp_client(create_app(stream_settings(lease_idle_s=30.0)))
    store = client.app[STORE]
    fake_openai.default = Script(chunks=["a ", "b"], usage=(30, 5))
    assert (await client.post("/v1/chat/completions", json=V1, headers=auth())).status == 200
    await client.put("/api/admin/users/alice/limit", json={"limit": 40}, headers=admin())
    # The lease holds two turns' grant: this one is admitted from memory, over the new limit.
    assert (await client.post("/v1/chat/completions", json=V1, headers=auth())).status == 200
    from service.keys import REGISTRY

    await client.app[REGISTRY].leases.release_idle(0.0, everything=True)
    doc = await store.get_usage("alice", month())
    assert doc["reserved"] == 0 and doc["used"] == 70
    resp = await client.post("/v1/chat/completions", json=V1, headers=auth())
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "insufficient_quota"


async def test_a_new_month_takes_the_standing_limit(client, admin):
    store = client.app[STORE]
    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 777}, headers=admin())
    assert resp.status == 200
    now = utcnow()
    first = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    later = first + timedelta(days=40)
    for user in ("alice", "bob", "key:key_0123"):
        for at in (first, later):
            request = ReserveRequest(
                user,
                period_of(at),
                f"m-{user}-{at:%m}",
                want=100,
                need=10,
                default_limit=100_000,
                rate_limit_ms=0,
                now=at,
            )
            await store.reserve(request)
    for at in (first, later):
        assert (await store.get_usage("alice", period_of(at)))["limit"] == 777
        assert "limit" not in await store.get_usage("bob", period_of(at))
        assert "limit" not in await store.get_usage("key:key_0123", period_of(at))
    # An alice turn past the standing limit in a new month is refused by it.
    too_big = ReserveRequest(
        "alice",
        period_of(later),
        "m-big",
        want=2_000,
        need=1_000,
        default_limit=100_000,
        rate_limit_ms=0,
        now=later,
    )
    with pytest.raises(Exception) as refused:
        await store.reserve(too_big)
    assert getattr(refused.value, "code", None) == "budget_exceeded"


async def test_before_a_months_first_turn_its_limit_is_the_standing_one(client, admin, auth, logs):
    """A new month has no usage document until the user's first turn creates it with the
    standing limit: until then the admin's view, a reset's answer, the limit change's log and
    the user's own usage say that limit, not the default."""
    store = client.app[STORE]
    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 777}, headers=admin())
    assert resp.status == 200
    # As at the start of the next month: the standing limit, no document for the month yet.
    await store.usage.delete_one({"user_id": "alice", "period": month()})

    resp = await client.get("/api/admin/users/alice/limit", headers=admin())
    view = await resp.json()
    assert (view["limit"], view["remaining"], view["standing_limit"]) == (777, 777, 777)
    resp = await client.get("/api/usage", headers=auth())
    mine = await resp.json()
    assert (mine["limit"], mine["remaining"], mine["percent"]) == (777, 777, 0.0)
    resp = await client.post("/api/admin/users/alice/reset", headers=admin())
    assert (await resp.json())["limit"] == 777
    assert await store.get_usage("alice", month()) is None

    # What a turn would be held to is what was shown.
    request = ReserveRequest(
        "alice",
        month(),
        "m-1",
        want=700,
        need=10,
        default_limit=100_000,
        rate_limit_ms=0,
        now=utcnow(),
    )
    assert (await store.reserve(request)).allowance.limit == 777
    await store.usage.delete_one({"user_id": "alice", "period": month()})

    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 900}, headers=admin())
    assert resp.status == 200
    changes = [e for e in logs if e["event"] == "admin.limit_set"]
    assert (changes[-1]["old_limit"], changes[-1]["old_standing_limit"]) == (777, 777)


# --------------------------------------------------------------------------- users by usage
async def test_users_are_listed_by_usage_most_first(client, admin):
    store = client.app[STORE]
    period = month()
    docs = [
        {"user_id": f"u{i:02d}", "period": period, "used": used, "reserved": i, "cost": used * 10}
        for i, used in enumerate([5, 500, 50, 500, 0, 7000, 12])
    ]
    docs.append({"user_id": "key:key_aaaa", "period": period, "used": 10**6, "reserved": 0})
    docs.append({"user_id": "u99", "period": "2001-01", "used": 10**6, "reserved": 0})
    docs[1]["limit"] = 600
    await store.usage.insert_many(docs)
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        url = "/api/admin/users?limit=3" + (f"&cursor={cursor}" if cursor else "")
        resp = await client.get(url, headers=admin())
        assert resp.status == 200
        body = await resp.json()
        assert body["period"] == period and body["unit"] == "tokens"
        seen += body["users"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [u["user_id"] for u in seen] == ["u05", "u01", "u03", "u02", "u06", "u00", "u04"]
    u01 = next(u for u in seen if u["user_id"] == "u01")
    assert u01 == {
        "user_id": "u01",
        "used": 500,
        "reserved": 1,
        "limit": 600,
        "remaining": 99,
        "cost": "0.000005",
    }
    old = await (await client.get("/api/admin/users?period=2001-01", headers=admin())).json()
    assert [u["user_id"] for u in old["users"]] == ["u99"]
    for bad in ("period=2001-13", "period=2001-1", "limit=0", "limit=201", "cursor=%%%", "x=1"):
        resp = await client.get(f"/api/admin/users?{bad}", headers=admin())
        assert resp.status == 400, bad
    indexes = await store.usage.index_information()
    assert "period_used" in indexes


# --------------------------------------------------------------------------- analytics
def line(day: str, user: str, model: str, key: str | None, **n: int) -> dict[str, Any]:
    outcomes = {o: n.get(o, 0) for o in ("completed", "cancelled", "failed", "interrupted")}
    return {
        "day": day,
        "user_id": user,
        "model": model,
        "key_id": key,
        "turns": sum(outcomes.values()),
        "outcomes": outcomes,
        "prompt": n.get("prompt", 0),
        "completion": n.get("completion", 0),
        "cached": n.get("cached", 0),
        "reasoning": n.get("reasoning", 0),
        "cost": n.get("cost", 0),
    }


ROLLUP = [
    line("2026-03-01", "alice", "gpt", None, completed=2, prompt=100, completion=20, cost=1),
    line("2026-03-01", "alice", "gpt", "key_a", completed=1, failed=1, prompt=50, completion=5),
    line("2026-03-01", "bob", "demo", None, cancelled=1, prompt=10, completion=3, cost=10**9),
    line(
        "2026-03-02",
        "alice",
        "demo",
        None,
        completed=3,
        interrupted=1,
        prompt=40,
        completion=9,
        cached=7,
        reasoning=2,
        cost=123_456_789,
    ),
    line("2026-03-02", "=cmd()", "gpt", None, completed=1, prompt=1, completion=1, cost=5),
    line("2026-02-28", "alice", "gpt", None, completed=9, prompt=900, completion=90),
    line("2026-03-03", "bob", "gpt", None, completed=9, prompt=900, completion=90),
]


async def seed_rollup(client) -> None:
    """The rollup documents settlement leaves for these lines (the month's totals too)."""
    await client.app[STORE].rollup.insert_many(rollup_docs([dict(d) for d in ROLLUP]))


async def usage_of(client, admin, query: str) -> dict[str, Any]:
    resp = await client.get(f"/api/admin/usage?{query}", headers=admin())
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_analytics_group_by_every_dimension_by_default(client, admin):
    await seed_rollup(client)
    body = await usage_of(client, admin, "from=2026-03-01&to=2026-03-02")
    assert (body["from"], body["to"], body["currency"]) == ("2026-03-01", "2026-03-02", "USD")
    assert body["by"] == ["day", "model", "user_id", "key_id"]
    keys = [(r["day"], r["model"], r["user_id"], r["key_id"]) for r in body["rows"]]
    assert keys == [
        ("2026-03-01", "demo", "bob", None),
        ("2026-03-01", "gpt", "alice", None),
        ("2026-03-01", "gpt", "alice", "key_a"),
        ("2026-03-02", "demo", "alice", None),
        ("2026-03-02", "gpt", "=cmd()", None),
    ]
    alice_demo = body["rows"][3]
    assert alice_demo["turns"] == 4
    assert alice_demo["outcomes"] == {
        "completed": 3,
        "cancelled": 0,
        "failed": 0,
        "interrupted": 1,
    }
    assert alice_demo["tokens"] == {
        "prompt": 40,
        "completion": 9,
        "cached": 7,
        "reasoning": 2,
        "total": 49,
    }
    assert alice_demo["cost"] == "0.123456789"
    assert body["totals"] == {
        "turns": 10,
        "outcomes": {"completed": 7, "cancelled": 1, "failed": 1, "interrupted": 1},
        "tokens": {"prompt": 201, "completion": 38, "cached": 7, "reasoning": 2, "total": 239},
        "cost": "1.123456795",
    }


async def test_analytics_group_and_filter_on_what_is_asked(client, admin):
    await seed_rollup(client)
    by_model = await usage_of(client, admin, "from=2026-02-01&to=2026-03-31&by=model")
    assert by_model["by"] == ["model"]
    assert [(r["model"], r["turns"], r["cost"]) for r in by_model["rows"]] == [
        ("demo", 5, "1.123456789"),
        ("gpt", 23, "0.000000006"),
    ]
    assert set(by_model["rows"][0]) == {"model", "turns", "outcomes", "tokens", "cost"}
    user_day = await usage_of(client, admin, "from=2026-03-01&to=2026-03-31&by=user,day&user=alice")
    assert user_day["by"] == ["day", "user_id"]  # always in the canonical order
    assert [(r["day"], r["user_id"], r["turns"]) for r in user_day["rows"]] == [
        ("2026-03-01", "alice", 4),
        ("2026-03-02", "alice", 4),
    ]
    keyed = await usage_of(client, admin, "from=2026-03-01&to=2026-03-31&by=key&key=key_a")
    assert keyed["rows"] == [
        {
            "key_id": "key_a",
            "turns": 2,
            "outcomes": {"completed": 1, "cancelled": 0, "failed": 1, "interrupted": 0},
            "tokens": {"prompt": 50, "completion": 5, "cached": 0, "reasoning": 0, "total": 55},
            "cost": "0.00",
        }
    ]
    gpt_bob = await usage_of(client, admin, "from=2026-03-01&to=2026-03-31&by=day&model=gpt")
    assert [(r["day"], r["turns"]) for r in gpt_bob["rows"]] == [
        ("2026-03-01", 4),
        ("2026-03-02", 1),
        ("2026-03-03", 9),
    ]
    nothing = await usage_of(client, admin, "from=2025-01-01&to=2025-01-31")
    assert nothing["rows"] == [] and nothing["totals"]["turns"] == 0
    assert nothing["totals"]["cost"] == "0.00"


async def test_analytics_take_back_the_by_they_answer(client, admin):
    """The answer's ``by`` names the rows' fields (``user_id``, ``key_id``); asked again as
    ``by``, it gives the same answer (``by=user_id`` was refused: only ``user`` was taken)."""
    await seed_rollup(client)
    span = "from=2026-03-01&to=2026-03-31"
    short = await usage_of(client, admin, f"{span}&by=key,user")
    assert short["by"] == ["user_id", "key_id"]
    again = await usage_of(client, admin, f"{span}&by={','.join(short['by'])}")
    assert again == short
    mixed = await usage_of(client, admin, f"{span}&by=day,user_id,key")
    assert mixed["by"] == ["day", "user_id", "key_id"] and mixed["rows"]


async def test_analytics_as_csv(client, admin):
    await seed_rollup(client)
    for how in ({"params": {"format": "csv"}}, {"headers": {"Accept": "text/csv"}}):
        headers = {**admin(), **how.get("headers", {})}
        params = {"from": "2026-03-01", "to": "2026-03-02", **how.get("params", {})}
        resp = await client.get("/api/admin/usage", params=params, headers=headers)
        assert resp.status == 200
        assert resp.content_type == "text/csv" and resp.charset == "utf-8"
        assert "usage-2026-03-01-2026-03-02.csv" in resp.headers["Content-Disposition"]
        rows = list(csv.reader(io.StringIO(await resp.text())))
        assert rows[0] == [
            "day",
            "model",
            "user_id",
            "key_id",
            "turns",
            "completed",
            "cancelled",
            "failed",
            "interrupted",
            "prompt",
            "completion",
            "cached",
            "reasoning",
            "total_tokens",
            "cost",
        ]
        assert len(rows) == 6
        keys = ["2026-03-01", "gpt", "alice", "key_a"]
        counts = [2, 1, 0, 1, 0, 50, 5, 0, 0, 55]
        expected = [*keys, *map(str, counts), "0.00"]
        assert rows[3] == expected
        assert rows[4][-1] == "0.123456789"
        assert rows[5][2] == "'=cmd()"  # a spreadsheet must not run a user id as a formula
    resp = await client.get(
        "/api/admin/usage?from=2026-03-01&to=2026-03-02&by=model&format=csv", headers=admin()
    )
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert rows[0][:2] == ["model", "turns"] and [r[0] for r in rows[1:]] == ["demo", "gpt"]


@pytest.mark.parametrize(
    "query",
    [
        "from=2026-3-01&to=2026-03-02",
        "from=20260301&to=2026-03-02",
        "from=2026-02-30&to=2026-03-02",
        "from=2026-03-02&to=2026-03-01",
        "from=2025-01-01&to=2026-01-02",
        "from=2026-03-01&to=2026-03-02&by=week",
        "from=2026-03-01&to=2026-03-02&by=day,day",
        "from=2026-03-01&to=2026-03-02&by=user,user_id",
        "from=2026-03-01&to=2026-03-02&by=day_id",
        "from=2026-03-01&to=2026-03-02&by=",
        "from=2026-03-01&to=2026-03-02&format=xml",
        "from=2026-03-01&to=2026-03-02&users=alice",
        "from=2026-03-01&to=2026-03-02&user=",
    ],
)
async def test_analytics_refuse_a_bad_query(client, admin, query):
    resp = await client.get(f"/api/admin/usage?{query}", headers=admin())
    assert resp.status == 400, query
    error = (await resp.json())["error"]
    assert error["code"] == "validation_error" and error["details"][0]["field"]


async def test_analytics_default_to_this_month_and_take_a_whole_year(client, admin):
    body = await usage_of(client, admin, "")
    today = datetime.now(UTC).date()
    assert (body["from"], body["to"]) == (today.replace(day=1).isoformat(), today.isoformat())
    leap = await usage_of(client, admin, "from=2024-01-01&to=2024-12-31")  # 366 days
    assert leap["rows"] == []


async def test_in_currency_a_limit_is_a_decimal_string(aiohttp_client, make_settings, admin):
    client = await aiohttp_client(create_app(make_settings(budget_unit="currency")))
    store = client.app[STORE]
    url = "/api/admin/users/alice/limit"
    resp = await client.put(url, json={"limit": "25.5"}, headers=admin())
    assert resp.status == 200
    view = await resp.json()
    assert (view["unit"], view["limit"], view["remaining"], view["used"]) == (
        "USD",
        "25.50",
        "25.50",
        "0.00",
    )
    assert (await store.get_usage("alice", month()))["limit"] == 25_500_000_000
    for bad in (25, 25.5, "-1", "0.0000000001", "ten"):
        resp = await client.put(url, json={"limit": bad}, headers=admin())
        assert resp.status == 400, bad
        (detail,) = (await resp.json())["error"]["details"]
        assert detail["problem"] == 'a decimal string of USD, such as "25.00"', bad


async def test_analytics_equal_a_brute_force_sum_over_the_messages(
    aiohttp_client, stream_settings, fake_openai, auth, admin
):
    """Real turns (three users, two priced models, over /v1 and the page; completed, failed
    and cancelled), then the analytics, grouped every way, against sums over the records."""
    client = await aiohttp_client(create_app(stream_settings(models=json.dumps(PRICED))))
    db = client.app[STORE].db
    fake_openai.scripts = [Script(frames=rec.TOOL_CALLS), *[Script(status=500)] * 3]
    fake_openai.default = Script(usage=(30, 5))
    users = ["alice", "bob", "carol"]
    for i, user in enumerate(users * 3):
        body = {**V1, "stream": True, "model": "demo" if i % 2 else "gpt-test"}
        r = await client.post("/v1/chat/completions", json=body, headers=auth(user))
        await r.read()
    chat = await new_chat(client, auth("carol"))
    resp = await sse_turn(client, chat, auth("carol"))
    await collect(resp)
    fake_openai.default = Script(chunks=["x"] * 5, gate_after=1, usage=(30, 5))
    r = await client.post("/v1/chat/completions", json={**V1, "stream": True}, headers=auth("bob"))
    await r.content.readany()
    r.close()  # a stateless stream whose client goes: cancelled
    await asyncio.wait_for(fake_openai.disconnected.wait(), 10)
    await settled(db, users=tuple(users))
    await rolled_up(db)
    statuses = {m["status"] async for m in db.messages.find({"role": "assistant"})}
    assert {"complete", "failed", "cancelled"} <= statuses
    want = await brute_force(db)
    days = sorted({day for day, *_ in want})
    span = f"from={days[0]}&to={days[-1]}"

    def summed(keep) -> dict[Any, dict[str, Any]]:
        out: dict[Any, dict[str, Any]] = {}
        for key, row in want.items():
            acc = out.setdefault(keep(key), {"turns": 0, "outcomes": Counter(), "cost": 0})
            acc["turns"] += row["turns"]
            acc["outcomes"].update(row["outcomes"])
            acc["cost"] += row["cost"]
            for field in ("prompt", "completion", "cached", "reasoning"):
                acc[field] = acc.get(field, 0) + row[field]
        return out

    def check(rows: list[dict[str, Any]], expected: dict[Any, dict[str, Any]], key) -> None:
        assert len(rows) == len(expected)
        for row in rows:
            exp = expected[key(row)]
            assert row["turns"] == exp["turns"]
            outcomes = {o: exp["outcomes"].get(o, 0) for o in row["outcomes"]}
            assert row["outcomes"] == outcomes and sum(outcomes.values()) == exp["turns"]
            for field in ("prompt", "completion", "cached", "reasoning"):
                assert row["tokens"][field] == exp[field], field
            assert row["tokens"]["total"] == exp["prompt"] + exp["completion"]
            assert row["cost"] == format_cost(exp["cost"])

    every = await usage_of(client, admin, span)
    check(every["rows"], want, lambda r: (r["day"], r["user_id"], r["model"], r["key_id"]))
    by_model = await usage_of(client, admin, span + "&by=model")
    check(by_model["rows"], summed(lambda k: k[2]), lambda r: r["model"])
    bob = await usage_of(client, admin, span + "&by=user&user=bob")
    check(bob["rows"], {"bob": summed(lambda k: k[1])["bob"]}, lambda r: r["user_id"])
    whole = summed(lambda k: None)[None]
    check([every["totals"]], {None: whole}, lambda r: None)
    assert any(row["cost"] != "0.00" for row in every["rows"])  # the prices were applied


def test_csv_cells_are_quoted_as_a_spreadsheet_reads_them():
    """A user id with a comma, a quote or a line break comes back whole through a CSV reader;
    one that starts like a formula stays text."""
    from datetime import date

    from service.analytics import UsageQuery, rollup_docs, to_csv

    users = ['a,"b"', "line\nbreak", "=1+1", " =2+2", "plain"]
    query = UsageQuery.parse({"from": "2026-03-01", "to": "2026-03-01"}, date(2026, 3, 1))
    docs = rollup_docs([line("2026-03-01", u, "gpt", None, completed=1, cost=5) for u in users])
    rows = list(csv.reader(io.StringIO(to_csv(query, query.group(docs)), newline="")))
    assert rows[0][:4] == ["day", "model", "user_id", "key_id"]
    assert sorted(r[2] for r in rows[1:]) == sorted(
        ['a,"b"', "line\nbreak", "'=1+1", "' =2+2", "plain"]
    )
    assert all(r[-1] == "0.000000005" and r[4] == "1" for r in rows[1:])


async def test_the_collector_runs_again_after_a_report(client, admin):
    """The report pauses Python's cyclic collector while it builds the rows: it is back on
    after the answer, a JSON one, a CSV one, and one that failed."""
    import gc

    await seed_rollup(client)
    for query in ("from=2026-03-01&to=2026-03-02", "from=2026-03-01&to=2026-03-02&format=csv"):
        assert (await client.get(f"/api/admin/usage?{query}", headers=admin())).status == 200
        assert gc.isenabled()
    from service.analytics import collector_paused

    def build() -> None:
        with collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("a report that failed")

    with pytest.raises(RuntimeError):
        build()
    assert gc.isenabled()


async def test_a_turn_is_counted_in_the_month_it_is_billed_to_when_it_ends_in_the_next(
    aiohttp_client, make_settings, admin
):
    """A turn admitted on a month's last seconds is billed to that month (its reservation,
    its ``period``), whenever it ends: a replica killed at 23:59:50 UTC on the 31st leaves its
    turn to the reaper, which settles it in the next month. The analytics of the month it was
    billed to count it (they equal the month's usage), not the day the reaper came."""
    from service.stream.watcher import reap

    # The replica's own reaper judges no turn dead (a day of silence is not enough): this
    # test's reaper round is the one that comes after midnight.
    client = await aiohttp_client(create_app(make_settings(stale_stream_s=86_400 * 400)))
    store = client.app[STORE]
    first = utcnow().date().replace(day=1)
    late = datetime(first.year, first.month, 1, tzinfo=UTC) - timedelta(seconds=10)
    period = period_of(late)
    record = {
        "_id": "dead-at-midnight",
        "chat_id": None,
        "user_id": "ghost",
        "seq": None,
        "role": "assistant",
        "content": "the answer so far",
        "status": "streaming",
        "model": "demo",
        "transport": "openai",
        "period": period,
        "reservation": 300,
        "prompt_tokens": 40,
        "encoding": "o200k_base",
        "alive_at": late,
        "checkpoint_at": late,
        "created_at": late,
        "replica": "gone",
    }
    reserved = await store.reserve(
        ReserveRequest("ghost", period, "dead-at-midnight", 300, 50, 10_000, 0, late)
    )
    assert reserved.grant == 300
    assert await store.insert_messages([[record]]) == [None]
    assert await reap(store, make_settings(stale_stream_s=5)) == 1
    await rolled_up(store.db)
    assert (await store.messages.find_one({"_id": "dead-at-midnight"}))["status"] == "interrupted"
    usage = await store.usage.find_one({"user_id": "ghost", "period": period})
    assert usage["reserved"] == 0 and usage["used"] > 0
    span = f"from={late.date().replace(day=1)}&to={late.date()}&user=ghost&by=user"
    billed = await usage_of(client, admin, span)
    assert billed["totals"]["turns"] == 1
    assert billed["totals"]["tokens"]["total"] == usage["used"]
    now = await usage_of(client, admin, f"from={first}&to={utcnow().date()}&user=ghost&by=user")
    assert now["totals"]["turns"] == 0  # this month's usage has none of it either
    assert await store.usage.find_one({"user_id": "ghost", "period": month()}) is None

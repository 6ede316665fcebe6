"""An API key's own monthly limit, inside its user's: every turn made with the key is reserved on
the key's month too, so concurrent turns never overspend the key by more than one reservation,
and the key's month, the user's month, the records and the rollup agree."""

from __future__ import annotations

import asyncio
from collections import Counter

from service.analytics import lines_of
from service.app import create_app
from service.keys import STORE
from service.store import key_account
from tests.fake_openai import Script
from tests.faults import calls, rolled_up, settled

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


async def test_a_key_s_own_limit_holds_under_30_concurrent_turns(
    aiohttp_client, stream_settings, fake_openai, auth
):
    settings = stream_settings(max_concurrent_turns_per_user=0, v1_requests_per_minute=0)
    client = await aiohttp_client(create_app(settings))
    db = client.app[STORE].db
    limit = 1200  # a few turns' worth; the user's own limit (100,000) is far away
    resp = await client.post("/api/keys", json={"name": "ci", "limit": limit}, headers=auth())
    assert resp.status == 201
    key = await resp.json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    fake_openai.default = Script(chunks=["a", "b"], usage=(21, 4))
    grouped = calls("reserve_many")
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=BODY, headers=headers) for _ in range(30))
    )
    assert calls("reserve_many") > grouped  # the key's reservations arriving together, grouped
    bodies = [await r.json() if r.status != 200 else await r.read() for r in responses]
    statuses = Counter(r.status for r in responses)
    assert statuses[200] >= 1 and statuses[429] >= 1, statuses  # the key's limit refused some
    refused = [b for r, b in zip(responses, bodies, strict=True) if r.status == 429]
    assert all("API key" in b["error"]["message"] for b in refused)  # named as the key's
    # a token of the same user is not held to the key's limit
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert resp.status == 200
    await resp.read()
    await settled(db)
    await settled(db, users=(key_account(key["id"]),))
    await rolled_up(db)
    records = await db.messages.find({"role": "assistant"}).to_list(None)
    mine = [r for r in records if r.get("key_id") == key["id"]]
    assert len(mine) == statuses[200] and len(records) == statuses[200] + 1
    own = await db.usage.find_one({"user_id": key_account(key["id"])})
    user = await db.usage.find_one({"user_id": "alice"})
    billed = sum(r["tokens"]["total"] for r in mine)
    assert own["used"] == billed and own["reserved"] == 0 and not own.get("open")
    assert user["used"] == billed + 25  # and the token's turn
    grant = max(r["reservation"] for r in mine)  # one turn's reservation on the key
    assert own["used"] <= limit + grant
    rows = lines_of(await db.usage_rollup.find({"user_id": "alice"}).to_list(None))
    assert sum(r["turns"] for r in rows if r["key_id"] == key["id"]) == len(mine)


async def test_in_currency_a_key_s_limit_is_money(aiohttp_client, stream_settings, auth):
    import json

    from tests.test_costs import PRICED

    settings = stream_settings(models=json.dumps(PRICED), budget_unit="currency")
    client = await aiohttp_client(create_app(settings))
    resp = await client.post("/api/keys", json={"name": "ci", "limit": "0.25"}, headers=auth())
    assert resp.status == 201
    key = await resp.json()
    assert key["limit"] == "0.25"
    listed = await (await client.get("/api/keys", headers=auth())).json()
    assert listed["items"][0]["limit"] == "0.25"
    assert (listed["items"][0]["used"], listed["items"][0]["remaining"]) == ("0.00", "0.25")
    assert (key["used"], key["remaining"]) == ("0.00", "0.25")  # as made
    stored = await client.app[STORE].db["api_keys"].find_one({"_id": key["id"]})
    assert stored["limit"] == 250_000_000  # nano-units
    for bad in (5, "abc", "-1", "0.0000000001"):
        resp = await client.post("/api/keys", json={"name": "x", "limit": bad}, headers=auth())
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["details"][0]["field"] == "limit"


async def test_a_token_named_as_a_keys_own_account_is_refused(
    aiohttp_client, stream_settings, fake_openai, auth, token_for
):
    """A key's own month is kept as the user ``key:<id>``: a token whose ``sub`` is that name
    would spend the key's budget and read its usage. It is refused (401), as is any ``key:``
    subject, and the key's month is untouched."""
    client = await aiohttp_client(create_app(stream_settings()))
    resp = await client.post("/api/keys", json={"name": "ci", "limit": 200}, headers=auth())
    key = await resp.json()
    fake_openai.default = Script(chunks=["a"], usage=(150, 40))
    for sub in (key_account(key["id"]), "key:", "key:anything"):
        headers = {"Authorization": f"Bearer {token_for(sub)}"}
        for method, path, body in (
            ("POST", "/v1/chat/completions", BODY),
            ("GET", "/api/usage", None),
        ):
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401, (sub, path)
    assert await client.app[STORE].db.usage.find_one({"user_id": key_account(key["id"])}) is None
    resp = await client.post(
        "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key['key']}"}
    )
    assert resp.status == 200  # the key's whole budget is its own
    await resp.read()


async def test_a_key_s_view_shows_what_it_used_of_its_own_limit_this_month(
    stream_client, fake_openai, auth
):
    """``GET /api/keys`` shows each key with a limit of its own its month's ``used`` and
    ``remaining`` (less what running turns hold), from the key's own month, every key's in one
    read; a key without a limit of its own shows null for both (its use is the user's month)."""
    client = stream_client
    db = client.app[STORE].db

    async def make(**body) -> dict:
        resp = await client.post("/api/keys", json={"name": "ci", **body}, headers=auth())
        assert resp.status == 201
        return await resp.json()

    spent, idle, plain = await make(limit=1000), await make(limit=500), await make()
    fake_openai.default = Script(chunks=["a"], usage=(30, 5))
    body = {**BODY, "stream": False}
    resp = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {spent['key']}"}
    )
    assert resp.status == 200, await resp.text()
    await settled(db)
    await settled(db, users=(key_account(spent["id"]),))
    await db.usage.update_one(  # a turn of the key running now holds 100 more
        {"user_id": key_account(spent["id"])}, {"$inc": {"reserved": 100}}
    )
    reads = calls("key_months")
    listed = await (await client.get("/api/keys", headers=auth())).json()
    assert calls("key_months") == reads + 1  # one read for the listing, not one per key
    views = {k["id"]: (k["used"], k["remaining"]) for k in listed["items"]}
    assert views == {spent["id"]: (35, 865), idle["id"]: (0, 500), plain["id"]: (None, None)}

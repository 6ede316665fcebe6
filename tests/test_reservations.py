"""The group commit of the chat page's reservations: the page's turns arriving while a
reservation runs share the next command, and every rule holds as it did one turn at a time."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from service.app import create_app
from service.errors import RateLimited
from service.keys import PRODUCER, STORE
from service.metrics import REGISTRY
from service.store import FinalOp, ReserveRequest, key_account, utcnow
from service.stream.groups import Reservations
from service.stream.producer import period_of
from tests.fake_openai import Script
from tests.faults import answers_lost, calls, cancelled_while_running, settled
from tests.processes import eventually, wait_until
from tests.sse_client import collect, text_of

OPERATION_COUNT = "gateway_mongodb_operation_seconds_count"


def page_turn(
    user: str, mid: str, *, want: int = 100, limit: int = 100_000, gap_ms: int = 1000
) -> ReserveRequest:
    now = utcnow()
    return ReserveRequest(
        user_id=user,
        period=period_of(now),
        message_id=mid,
        want=want,
        need=want,
        default_limit=limit,
        rate_limit_ms=gap_ms,
        now=now,
    )


async def test_page_turns_arriving_while_a_reservation_runs_share_the_next_one(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    """Twelve users send while MongoDB is slow to answer the first two reservations (two
    sends, one after the other): the two commands running hold, the ten others' turns queue,
    and the queue goes as one group (one bulk, one read); every turn runs and is billed on its
    own user's month."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    users = [f"user{i}" for i in range(12)]
    chats = {}
    for user in users:
        resp = await client.post("/api/chat", headers=auth(user))
        chats[user] = (await resp.json())["chat_id"]
    reserve, reserve_many = store.reserve, store.reserve_many
    go, commands = asyncio.Event(), []  # the turns of each reservation command, in order

    async def slow(req):  # MongoDB is slow until ``go``
        commands.append([req])
        await go.wait()
        return await reserve(req)

    async def slow_many(reqs):
        commands.append(list(reqs))
        await go.wait()
        return await reserve_many(reqs)

    monkeypatch.setattr(store, "reserve", slow)
    monkeypatch.setattr(store, "reserve_many", slow_many)
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2))

    def post(user: str) -> asyncio.Future[Any]:
        url = f"/api/chat/{chats[user]}/message"
        return asyncio.ensure_future(client.post(url, json={"message": "Hi"}, headers=auth(user)))

    posts = []
    for u in users[:2]:  # one after the other: each is a command of its own, held
        posts.append(post(u))
        sent = len(posts)
        await wait_until(lambda: len(commands) == sent)  # noqa: B023 - awaited here, at once
    posts += [post(u) for u in users[2:]]
    queued = client.app[PRODUCER].reservations
    await wait_until(lambda: len(queued) == 10)  # the two commands run: the rest queue
    waited = len(queued)
    go.set()
    responses = await asyncio.gather(*posts)
    assert [r.status for r in responses] == [200] * len(users)
    assert [text_of(await collect(r)) for r in responses] == ["x y"] * len(users)
    assert [len(c) for c in commands[2:]] == [waited]  # 3 commands, not 12
    await settled(store.db, users=tuple(users))
    for user in users:
        doc = await store.usage.find_one({"user_id": user})
        assert (doc["used"], doc["reserved"], doc["open"]) == (12, 0, [])


async def test_a_group_holds_each_rule_as_one_turn_after_another(aiohttp_client, stream_settings):
    """In one group: a user's second send meets the message gap the first moved (429, the
    gap's wait), a user with room for one turn gets one (the other: budget exhausted), and a
    user whose month has no document yet is reserved on its own, as its first turn is."""
    store = (await aiohttp_client(create_app(stream_settings()))).app[STORE]
    for user in ("gap", "poor"):  # their months exist (the group's read finds them)
        first = page_turn(user, f"{user}-0", want=1)
        await store.reserve(first)
        await store.unreserve(user, first.period, first.message_id, now=first.now, gap_ms=0)
    await store.usage.update_many({}, {"$unset": {"next_at": ""}})
    before = calls("reserve_many")
    reservations = Reservations(store, lambda task: None)
    reqs = [
        page_turn("gap", "gap-1"),
        page_turn("gap", "gap-2"),
        page_turn("poor", "poor-1", want=60, limit=100, gap_ms=0),
        page_turn("poor", "poor-2", want=60, limit=100, gap_ms=0),
        page_turn("new", "new-1"),
    ]
    outcomes = await asyncio.gather(
        *(reservations.reserve(r) for r in reqs), return_exceptions=True
    )
    assert calls("reserve_many") - before == 1  # the five in one group
    told = dict(zip((r.message_id for r in reqs), outcomes, strict=True))
    gap = sorted(told[m].__class__.__name__ for m in ("gap-1", "gap-2"))
    assert gap == ["RateLimited", "Reservation"]  # one of the two, whichever came first
    waited = next(told[m] for m in ("gap-1", "gap-2") if isinstance(told[m], RateLimited))
    assert 0 < waited.retry_after_s <= 1  # the gap the other one moved
    poor = sorted(told[m].__class__.__name__ for m in ("poor-1", "poor-2"))
    assert poor == ["BudgetHeld", "Reservation"]  # room for one of the two (held by it)
    assert not isinstance(told["new-1"], Exception) and told["new-1"].grant == 100
    for user in ("gap", "poor", "new"):
        doc = await store.usage.find_one({"user_id": user})
        assert len(doc["open"]) == 1 and doc["reserved"] == doc["open"][0]["grant"]


async def test_a_groups_read_of_the_months_keeps_only_its_own_pairs(
    aiohttp_client, stream_settings
):
    """The group's one read of the months asks for its users in its periods (``$in`` on each
    field, what SecantusDB takes through the index): a listed user's month that no turn of
    the group is in (another pair's period) is not among what it returns."""
    store = (await aiohttp_client(create_app(stream_settings()))).app[STORE]
    for user in ("ann", "bob"):
        for period in ("2026-11", "2026-12"):
            await store.usage.insert_one({"user_id": user, "period": period, "used": 7})
    months = await store._months({("ann", "2026-11"), ("bob", "2026-12")})
    assert sorted(months) == [("ann", "2026-11"), ("bob", "2026-12")]
    assert all(d["user_id"] == u and d["period"] == p for (u, p), d in months.items())
    assert await store._months({("carl", "2026-12")}) == {}


async def test_a_reservation_whose_answer_was_lost_is_given_back_at_once(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    """MongoDB took a page turn's reservation, but its answer did not come (the send is 503
    ``database_unavailable``): the reservation is given back at once, its grant and the message
    gap it moved, not when the reaper finds it old minutes later. The user's next send, within
    what would have been the gap, goes through."""
    client = await aiohttp_client(create_app(stream_settings(message_rate_limit_ms=60_000)))
    store = client.app[STORE]
    chat = (await (await client.post("/api/chat", headers=auth("ann"))).json())["chat_id"]
    reserve = answers_lost(monkeypatch, store, "reserve")
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2))
    url = f"/api/chat/{chat}/message"
    resp = await client.post(url, json={"message": "Hi"}, headers=auth("ann"))
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "database_unavailable"

    async def given_back() -> bool:
        doc = await store.usage.find_one({"user_id": "ann"})
        return (doc["reserved"], doc["open"]) == (0, [])

    await eventually(given_back, deadline_s=5, what="the lost reservation given back")
    monkeypatch.setattr(store, "reserve", reserve)
    resp = await client.post(url, json={"message": "Hi"}, headers=auth("ann"))
    assert resp.status == 200 and text_of(await collect(resp)) == "x y"
    await settled(store.db, users=("ann",))


async def test_a_keys_own_reservation_whose_answer_was_lost_is_given_back_at_once(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    """The reservation on an API key's own month (its ``limit``) was taken, but its answer
    did not come: the turn is 503, and the key's month holds nothing for it at once, not when
    the reaper finds the entry old; the key's next turn goes through."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    resp = await client.post("/api/keys", json={"name": "ci", "limit": 5000}, headers=auth())
    key = await resp.json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    reserve = answers_lost(monkeypatch, store, "reserve")
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2))
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "database_unavailable"

    async def given_back() -> bool:
        doc = await store.usage.find_one({"user_id": key_account(key["id"])})
        return (doc["reserved"], doc["open"]) == (0, [])

    await eventually(given_back, deadline_s=5, what="the key's lost reservation given back")
    monkeypatch.setattr(store, "reserve", reserve)
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200 and (await resp.json())["usage"]["total_tokens"] == 12
    await settled(store.db, users=(key_account(key["id"]),))
    await settled(store.db)


async def test_a_reservation_whose_client_left_while_it_ran_is_given_back(
    aiohttp_client, stream_settings, monkeypatch
):
    """The client leaves (its request cancelled) while its turn's reservation command runs:
    the command goes on, and what it takes is given back once it lands, not when the reaper
    finds it old."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    reservations = client.app[PRODUCER].reservations
    turn = await cancelled_while_running(
        monkeypatch, store, "reserve", lambda: reservations.reserve(page_turn("gone", "turn-1"))
    )

    async def given_back() -> bool:
        doc = await store.usage.find_one({"user_id": "gone"})
        return doc is not None and "next_at" in doc and (doc["reserved"], doc["open"]) == (0, [])

    await eventually(given_back, deadline_s=5, what="the reservation given back")
    assert turn.cancelled()


async def test_undoing_a_reservation_leaves_the_same_turns_later_one(
    aiohttp_client, stream_settings
):
    """A turn whose prediction missed is reserved again under its id: undoing the first
    reservation (the withdrawal of one whose answer was lost may come after the second) gives
    back that one alone, the entry taken at its time, and leaves the second's grant held."""
    store = (await aiohttp_client(create_app(stream_settings()))).app[STORE]
    first = page_turn("twice", "turn-1", want=40, gap_ms=0)
    await store.reserve(first)
    again = dataclasses.replace(first, want=70, need=70, now=first.now + timedelta(seconds=1))
    await store.reserve(again)
    await store.unreserve("twice", first.period, "turn-1", now=first.now, gap_ms=0)
    doc = await store.usage.find_one({"user_id": "twice"})
    assert doc["reserved"] == 70 and [(e["mid"], e["grant"]) for e in doc["open"]] == [
        ("turn-1", 70)
    ]
    await store.unreserve("twice", first.period, "turn-1", now=first.now, gap_ms=0)  # again
    assert (await store.usage.find_one({"user_id": "twice"}))["reserved"] == 70


async def test_a_reservation_group_refused_otherwise_than_by_an_outage_is_not_reserved_twice(
    aiohttp_client, stream_settings
):
    """A group's bulk that MongoDB applied but answered with an error that is not an outage (a
    write concern error other than a timeout): each turn is run again on its own, to find whose
    it was. That second run must not reserve the turn again (two entries of it, its grant twice
    in ``reserved``, of which its settlement would give back one: held for the rest of the
    month with no entry left for the reaper). Each turn is told its one reservation, and once
    they are settled the month holds nothing."""
    from pymongo.errors import BulkWriteError

    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    real_usage = store.usage

    class WriteConcernFails:
        """The usage collection, whose bulk writes apply and then answer with a write
        concern error."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real_usage, name)

        async def bulk_write(self, ops: Any, **kw: Any) -> Any:
            result = await real_usage.bulk_write(ops, **kw)
            raise BulkWriteError(
                {
                    "writeErrors": [],
                    "writeConcernErrors": [{"code": 100, "errmsg": "UnsatisfiableWriteConcern"}],
                    "nInserted": 0,
                    "nUpserted": 0,
                    "nMatched": result.matched_count,
                    "nModified": result.modified_count,
                    "nRemoved": 0,
                    "upserted": [],
                }
            )

    first = page_turn("alice", "first", want=300, gap_ms=0)
    await store.reserve(first)  # the month exists: the group's read finds it
    await store.settle_usage("alice", first.period, "first", billed=0)
    failed = {"operation": "reserve_many", "result": "error"}
    before = REGISTRY.get_sample_value(OPERATION_COUNT, failed) or 0.0
    store.usage = WriteConcernFails()  # type: ignore[assignment]
    reservations = Reservations(store, lambda task: None)
    try:
        got = await asyncio.gather(
            *(reservations.reserve(page_turn("alice", m, want=300, gap_ms=0)) for m in "abc")
        )
    finally:
        store.usage = real_usage
    after = REGISTRY.get_sample_value(OPERATION_COUNT, failed) or 0.0
    assert after - before == 1  # the three in one group, which failed (not an outage)
    doc = await store.usage.find_one({"user_id": "alice"})
    assert sorted(e["mid"] for e in doc["open"]) == ["a", "b", "c"]
    assert doc["reserved"] == sum(r.grant for r in got) == 900
    for mid in "abc":  # each turn ends, billed nothing
        await store.settle_usage("alice", first.period, mid, billed=0)
    doc = await store.usage.find_one({"user_id": "alice"})
    assert (doc["reserved"], doc["open"]) == (0, [])


async def test_a_turn_reserved_twice_under_its_id_gives_back_both_when_it_ends(
    aiohttp_client, stream_settings
):
    """A turn whose prediction missed is reserved again under its id; when the undo of the
    first reservation failed (MongoDB did not answer it), its month holds two entries of the
    turn. Its settlement, on its own or with its group's final writes, pulls both and gives
    back what both hold: nothing stays in ``reserved`` without an entry."""
    store = (await aiohttp_client(create_app(stream_settings()))).app[STORE]
    for settle in ("alone", "grouped"):
        first = page_turn(settle, "turn-1", want=40, gap_ms=0)
        await store.reserve(first)
        again = dataclasses.replace(first, want=70, need=70, now=first.now + timedelta(seconds=1))
        await store.reserve(again)
        doc = await store.usage.find_one({"user_id": settle})
        assert doc["reserved"] == 110 and len(doc["open"]) == 2
        if settle == "alone":
            await store.settle_usage(settle, first.period, "turn-1", billed=25)
        else:
            op = FinalOp(settle, first.period, "turn-1", 70, 25, None, {"status": "complete"})
            await store.finish_many([op])
        doc = await store.usage.find_one({"user_id": settle})
        assert (doc["used"], doc["reserved"], doc["open"]) == (25, 0, [])
        await store.settle_usage(settle, first.period, "turn-1", billed=25)  # once
        assert (await store.usage.find_one({"user_id": settle}))["used"] == 25

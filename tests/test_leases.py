"""Budget leases: programs' turns admitted from a replica's lease on the user's month, every
cross-replica rule kept (two real service processes on one SecantusDB where it matters)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from datetime import datetime, timedelta
from typing import Any

import pytest

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import REGISTRY, STORE
from service.store import LeaseRequest, ReserveRequest, open_turns, utcnow
from service.stream.leases import Leases
from service.stream.producer import period_of
from service.tokens import TokenCounter
from tests.conftest import TEST_MODELS
from tests.fake_openai import Script
from tests.faults import answers_lost, cancelled_while_running, settled
from tests.processes import eventually, new_chat, session, start_behind_proxy, wait_until
from tests.sse_client import events

HI = [{"role": "user", "content": "Hi"}]
BODY = {"model": "gpt-test", "messages": HI}
SPEC = next(m for m in TEST_MODELS if m["name"] == "gpt-test")
PROMPT = TokenCounter().count_messages(HI)
WANT = PROMPT + SPEC["max_output_tokens"]  # one turn's full grant


async def usage(db) -> dict[str, Any]:
    return await db.usage.find_one({"user_id": "alice"}) or {}


def lease_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in doc.get("open") or () if e.get("replica")]


async def local_leases(aiohttp_client, stream_settings) -> tuple[Any, Leases]:
    """A replica's store and a ``Leases`` of its own that keeps an idle lease (300 s): the
    tests below drive its admissions directly."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    return store, Leases(store, client.app[REGISTRY].replica_id, idle_s=0.0, keep_s=300.0)


async def a_settled_turn_s_lease(aiohttp_client, stream_settings) -> tuple[Any, Leases, str]:
    """A replica's store, a ``Leases`` of its own that gives an idle lease back at once, and
    the period of alice's lease there, whose one turn ended and is settled."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    leases = Leases(store, client.app[REGISTRY].replica_id, idle_s=0.0, keep_s=0.0)
    now = utcnow()
    period = period_of(now)
    first = await leases.admit(lease_turn("m1", now))
    leases.ended("alice", period, grant=first.grant, billed=10)
    await store.settle_leased("alice", period, leases.lease_id, "m1", billed=10, grant=first.grant)
    return store, leases, period


def lease_turn(mid: str, now: datetime, **rules: int) -> ReserveRequest:
    """One of alice's turns as the producer asks a lease for it (``rules``: its rate limits)."""
    return ReserveRequest(
        user_id="alice",
        period=period_of(now),
        message_id=mid,
        want=WANT,
        need=PROMPT + 16,
        default_limit=100_000,
        rate_limit_ms=0,
        now=now,
        **rules,
    )


async def test_a_burst_of_program_turns_is_admitted_from_one_lease(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The first turn takes the lease; the next ones of the burst are admitted from memory
    (the lease entry is not touched again); once idle, the lease goes back and the month is
    exactly the turns' usage."""
    client = await aiohttp_client(create_app(stream_settings(lease_idle_s=30.0)))
    db = client.app[STORE].db
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert resp.status == 200
    (first,) = lease_of(await usage(db))
    assert first["took"]["tokens"] == 2 * WANT and first["turns"] == 1  # this turn's, the next's
    for _ in range(3):  # one at a time: the lease has room for each
        resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
        assert resp.status == 200
    doc = await usage(db)
    (lease,) = lease_of(doc)
    assert lease["at"] == first["at"] and lease["took"] == first["took"]  # no second take
    assert doc["used"] == 4 * 12 and doc["reserved"] == lease["grant"]  # billed as it went
    # Headers and the final event say what the user may still spend: the lease's room is theirs.
    body = await resp.json()
    assert body["usage"]["total_tokens"] == 12
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 3 * 12 - WANT)


async def test_an_idle_lease_goes_back(aiohttp_client, stream_settings, fake_openai, auth):
    client = await aiohttp_client(create_app(stream_settings(lease_idle_s=0.2)))
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=BODY, headers=auth())).status == 200
    await settled(client.app[STORE].db)  # reserved 0, nothing open: the lease was given back
    doc = await usage(client.app[STORE].db)
    assert doc["used"] == 24 and doc["open"] == []


async def test_an_idle_lease_keeps_one_turn_for_the_next_then_goes_back(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """LEASE_IDLE_S after its last turn a lease shrinks to what the user's next turn needs (its
    latest want, a turn slot), so the next turn within LEASE_KEEP_S is still admitted from
    memory; after LEASE_KEEP_S it goes back, and the month is exactly the turns' usage."""
    client = await aiohttp_client(
        create_app(stream_settings(lease_idle_s=0.1, lease_keep_s=1.5, watch_interval_s=0.05))
    )
    db = client.app[STORE].db
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    assert (await client.post("/v1/chat/completions", json=BODY, headers=auth())).status == 200
    (first,) = lease_of(await usage(db))
    assert first["took"]["tokens"] == 2 * WANT and first["turns"] == 1

    async def shrunk() -> bool:
        doc = await usage(db)
        return bool(lease_of(doc)) and lease_of(doc)[0]["grant"] == WANT

    await eventually(shrunk, 5, "the idle lease shrunk to one turn's want")
    doc = await usage(db)
    assert doc["reserved"] == WANT and lease_of(doc)[0]["turns"] == 1
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert resp.status == 200
    (kept,) = lease_of(await usage(db))
    assert kept["at"] == first["at"] and kept["took"] == first["took"]  # no second take
    await settled(db)  # given back LEASE_KEEP_S after the second turn
    doc = await usage(db)
    assert doc["used"] == 24 and doc["open"] == [] and doc["reserved"] == 0


async def test_turns_further_apart_than_lease_idle_s_are_all_admitted_from_memory(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A user whose turns come further apart than LEASE_IDLE_S (and within LEASE_KEEP_S): while
    idle, the lease is brought to one turn's worth each time, shrunk after the first turn and
    topped up with what each later turn spent, so no turn after the first waits for a take (the
    lease entry's ``at`` moves only when one is taken). Once it goes back the month is exactly
    the turns' usage."""
    client = await aiohttp_client(
        # LEASE_IDLE_S well above a read's time: the check after each turn comes before its
        # idle lease is topped up again
        create_app(stream_settings(lease_idle_s=0.5, lease_keep_s=3, watch_interval_s=0.05))
    )
    db = client.app[STORE].db
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))

    async def one_turn_s_worth() -> bool:
        return [e["grant"] for e in lease_of(await usage(db))] == [WANT]

    for turn in range(4):
        if turn:
            await eventually(one_turn_s_worth, 5, f"the idle lease holding one turn ({turn})")
            (before,) = lease_of(await usage(db))
        resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
        assert resp.status == 200
        await resp.read()
        if turn:
            (after,) = lease_of(await usage(db))
            assert after["at"] == before["at"], f"turn {turn} waited for a take"
    await settled(db)  # given back LEASE_KEEP_S after the last turn
    doc = await usage(db)
    assert doc["used"] == 4 * 12 and doc["open"] == [] and doc["reserved"] == 0


async def test_a_top_up_the_month_refuses_leaves_the_lease_and_is_not_asked_again(
    aiohttp_client, stream_settings, logs
):
    """The month ran out elsewhere while the lease was idle: its top-up is refused, the lease
    stays as it was (nothing taken beyond the limit), the refusal is asked once per idle spell
    (not at every round), and the next turn gets what the lease has left, as before."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    # This replica's id: its heartbeat keeps the reaper from giving the lease back.
    leases = Leases(store, client.app[REGISTRY].replica_id, idle_s=0.0, keep_s=300.0)
    now = utcnow()
    period = period_of(now)
    loop = asyncio.get_running_loop()

    for mid in ("m1", "m2"):  # the first shrinks the lease to one turn, the second spends 100
        grant = (await leases.admit(lease_turn(mid, now))).grant
        leases.ended("alice", period, grant=grant, billed=100)
        await store.settle_leased("alice", period, leases.lease_id, mid, billed=100, grant=grant)
        await leases.release_idle(loop.time() + 1)
    (entry,) = lease_of(await usage(store.db))
    assert entry["grant"] == WANT  # topped up after the second turn

    grant = (await leases.admit(lease_turn("m3", now))).grant
    leases.ended("alice", period, grant=grant, billed=100)
    await store.settle_leased("alice", period, leases.lease_id, "m3", billed=100, grant=grant)
    doc = await usage(store.db)  # another replica spends the rest of the month
    await store.db.usage.update_one(
        {"_id": doc["_id"]}, {"$set": {"used": 100_000 - doc["reserved"]}}
    )
    for _ in range(3):
        await leases.release_idle(loop.time() + 1)
    (after,) = lease_of(await usage(store.db))
    assert after["grant"] == WANT - 100 and after["at"] == entry["at"]
    refused = [e for e in logs if e["event"] == "stream.lease_top_up_refused"]
    assert [e["code"] for e in refused] == ["budget_held"]  # the rest is the lease's own
    last = await leases.admit(lease_turn("m4", now))  # what the lease has left
    assert last.grant == WANT - 100


async def test_a_lease_short_of_a_turn_grows_by_what_it_lacks(aiohttp_client, stream_settings):
    """The lease holds 200 free, the month 500 more: a turn wanting 600 fits in the two
    together, and is admitted (the growth asks the month for what the lease lacks), not
    refused as if the lease's own tokens were another turn's."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    now = utcnow()
    period = period_of(now)
    small = dataclasses.replace(lease_turn("m1", now), want=300, need=300, default_limit=1000)
    grant = (await leases.admit(small)).grant
    leases.ended("alice", period, grant=grant, billed=300)
    await store.settle_leased("alice", period, leases.lease_id, "m1", billed=300, grant=grant)
    doc = await usage(store.db)
    assert (doc["used"], doc["reserved"], leases.free("alice", period)) == (300, 200, 200)
    large = dataclasses.replace(small, message_id="m2", want=600, need=600)
    assert (await leases.admit(large)).grant == 600
    doc = await usage(store.db)
    assert doc["used"] + doc["reserved"] <= 1000


async def test_a_lease_with_a_free_turn_slot_grows_its_tokens_only(aiohttp_client, stream_settings):
    """Two turns at once allowed, the lease holds two slots and one turn runs: a turn wanting
    more tokens than the lease has free asks the month for tokens only, and is admitted. Before,
    the growth asked for one more slot too, and was refused "too many turns at once (2
    running, at most 2)" with one running."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    now = utcnow()
    period = period_of(now)
    rules = {"max_concurrent": 2}
    first = dataclasses.replace(
        lease_turn("m1", now, **rules), want=300, need=300, default_limit=1000
    )
    g1 = (await leases.admit(first)).grant
    g2 = (await leases.admit(dataclasses.replace(first, message_id="m2"))).grant
    assert (g1, g2) == (300, 300)
    leases.ended("alice", period, grant=g1, billed=100)
    await store.settle_leased("alice", period, leases.lease_id, "m1", billed=100, grant=g1)
    assert leases.free("alice", period) == 400  # and one of its two slots
    larger = dataclasses.replace(first, message_id="m3", want=600, need=600)
    assert (await leases.admit(larger)).grant == 600
    doc = await usage(store.db)
    assert doc["used"] + doc["reserved"] <= 1000
    assert lease_of(doc)[0]["turns"] == 2  # no slot more than the two


async def test_a_lease_holding_a_request_grows_its_tokens_only(aiohttp_client, stream_settings):
    """Three requests a minute: two growths took all three, the lease still holds one, and a
    third turn short of tokens asks the month for tokens only, and is admitted. Before, the
    growth asked for a request too, and the empty bucket refused it ("too many requests")."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    now = utcnow()
    turn = dataclasses.replace(
        lease_turn("m1", now, requests_per_minute=3), want=300, need=300, default_limit=1000
    )
    for mid in ("m1", "m2", "m3"):
        assert (await leases.admit(dataclasses.replace(turn, message_id=mid))).grant == 300
    doc = await usage(store.db)
    assert doc["used"] + doc["reserved"] <= 1000


async def test_what_a_growth_counts_on_is_not_taken_by_a_turn_admitted_meanwhile(
    aiohttp_client, stream_settings
):
    """A turn short of tokens grows the lease counting on the request the lease holds; a small
    turn arriving while that growth runs is admitted from memory. It must not take that
    request: before, it did, and the growing turn found no room after its growth (503
    ``database_unavailable`` with MongoDB answering)."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    now = utcnow()
    turn = dataclasses.replace(
        lease_turn("m0", now, requests_per_minute=120), want=1000, need=1000, default_limit=10_000
    )
    assert (await leases.admit(turn)).grant == 1000  # the lease: 2,000 tokens, 2 requests
    take, growing, go_on = store.take_lease, asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        growing.set()
        await go_on.wait()
        return await take(*args, **kwargs)

    store.take_lease = held
    large = asyncio.ensure_future(
        leases.admit(dataclasses.replace(turn, message_id="a", want=3000, need=3000))
    )
    await asyncio.wait_for(growing.wait(), 5)
    small = asyncio.ensure_future(
        leases.admit(dataclasses.replace(turn, message_id="b", want=200, need=200))
    )
    await asyncio.sleep(0)  # the small turn's admission from memory, if it may have one
    go_on.set()
    store.take_lease = take
    assert (await large).grant == 3000
    assert (await small).grant == 200
    doc = await usage(store.db)
    assert doc["used"] + doc["reserved"] <= 10_000


async def test_thirty_turns_over_two_replicas_never_overspend(services, fake_openai, token_for, db):
    """30 turns of one user at once, half on each replica, on a budget for five: while all are
    held by the upstream, the month's reservations never pass the limit; at the end the usage is
    exactly the turns' and at most the limit plus one grant."""
    limit = 5 * WANT + PROMPT + 100
    a, b = await services.start("a", "b", default_token_limit=limit, lease_idle_s=0.2)
    fake_openai.default = Script(chunks=["x ", "y"], gate_after=1, usage=None)
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        streamed = {**BODY, "stream": True}  # answered once the upstream opened
        responses = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=streamed) for http in [on_a, on_b] * 15)
        )
        try:
            admitted = [r for r in responses if r.status == 200]
            refused = [r for r in responses if r.status != 200]
            assert 1 <= len(admitted) <= 6 and len(admitted) + len(refused) == 30
            for r in refused:  # nothing used yet: what is left is held by the running turns
                err = (await r.json())["error"]
                assert r.status == 429 and err["code"] == "rate_limit_exceeded", err
                assert "x-should-retry" not in r.headers and r.headers["Retry-After"] == "1"
            held = await usage(db)
            assert held["used"] == 0 and held["reserved"] <= limit
            grants = [m["reservation"] async for m in db.messages.find({"status": "streaming"})]
            assert len(grants) == len(admitted) and sum(grants) <= limit
        finally:
            fake_openai.gate.set()
            for r in responses:
                await r.read()
                r.release()
    await settled(db, deadline_s=10)
    done = await usage(db)
    totals = [m["tokens"]["total"] async for m in db.messages.find({"role": "assistant"})]
    assert done["used"] == sum(totals) <= limit + max(grants)


async def test_a_killed_replicas_lease_is_released_and_spendable_elsewhere(
    services, fake_openai, token_for, db
):
    """A holds a lease (its idle time is long); A is SIGKILLed; the reaper on B gives the lease
    back, and the room it held is B's to grant."""
    limit = WANT + PROMPT + 10  # one full turn, then not enough while A's lease holds the rest
    (a,) = await services.start("a", default_token_limit=limit, lease_idle_s=300)
    (b,) = await services.start("b", default_token_limit=limit)
    fake_openai.default = Script(chunks=["x ", "y"], usage=(PROMPT, 2))
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        async with on_a.post("/v1/chat/completions", json=BODY) as resp:
            assert resp.status == 200
        held = await usage(db)
        (lease,) = lease_of(held)
        assert held["used"] == PROMPT + 2 and held["reserved"] == lease["grant"] > 0
        async with on_b.post("/v1/chat/completions", json=BODY) as resp:  # A's lease holds it
            assert resp.status == 429 and "x-should-retry" not in resp.headers
            assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"  # held, not spent

        a.send(signal.SIGKILL)
        assert await a.wait_exit(5) == -signal.SIGKILL

        async def released() -> bool:
            doc = await usage(db)
            return doc["reserved"] == 0 and doc["open"] == []

        await eventually(released, 10, "the dead replica's lease released")
        async with on_b.post("/v1/chat/completions", json=BODY) as resp:
            assert resp.status == 200
    await wait_until(lambda: b.events("stream.lease_released"), 5, "B's log line")
    await settled(db, deadline_s=10)
    totals = [m["tokens"]["total"] async for m in db.messages.find({"role": "assistant"})]
    assert (await usage(db))["used"] == sum(totals)


async def test_a_growth_whose_answer_was_lost_is_undone_at_once(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    """MongoDB took a lease's growth, but its answer did not come (the turn is 503): what it
    took (tokens, a turn slot, requests from the per-minute bucket) goes back at once, not
    when the lease is given back; the next turn takes the lease again."""
    settings = stream_settings(lease_idle_s=300.0, v1_requests_per_minute=600)
    client = await aiohttp_client(create_app(settings))
    store = client.app[STORE]
    asked = []
    take_lease = answers_lost(monkeypatch, store, "take_lease", asked)
    fake_openai.default = Script(chunks=["x ", "y"], usage=(PROMPT, 2))
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "database_unavailable"

    async def undone() -> bool:
        doc = await usage(store.db)
        (entry,) = lease_of(doc)
        return (doc["reserved"], entry["grant"], entry["turns"]) == (0, 0, 0)

    await eventually(undone, deadline_s=5, what="the lost growth undone")
    took = asked[0].turn.now  # the requests it moved the bucket by are back: at the take's time
    due = (await usage(store.db))["requests_due"]
    assert due == took.replace(microsecond=took.microsecond // 1000 * 1000)
    monkeypatch.setattr(store, "take_lease", take_lease)
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert resp.status == 200 and (await resp.json())["usage"]["total_tokens"] == PROMPT + 2
    (entry,) = lease_of(await usage(store.db))
    assert entry["took"]["tokens"] == 2 * WANT and entry["turns"] == 1  # as a first take

    async def billed() -> bool:
        doc = await usage(store.db)
        return doc["used"] == PROMPT + 2 and doc["reserved"] == lease_of(doc)[0]["grant"]

    await eventually(billed, deadline_s=5, what="the turn billed from the new growth")


async def test_a_growth_whose_turns_client_left_while_it_ran_is_undone(
    aiohttp_client, stream_settings, monkeypatch
):
    """The client leaves (the turn's admission cancelled) while the lease's growth runs: the
    command goes on, and what it takes, which this replica will never count, is undone once
    it lands."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    leases = Leases(store, client.app[REGISTRY].replica_id, idle_s=300.0)
    turn = await cancelled_while_running(
        monkeypatch, store, "take_lease", lambda: leases.admit(lease_turn("m1", utcnow()))
    )

    async def undone() -> bool:
        doc = await usage(store.db)
        entries = lease_of(doc)
        return bool(entries) and (doc["reserved"], entries[0]["grant"]) == (0, 0)

    await eventually(undone, deadline_s=5, what="the growth undone")
    assert turn.cancelled() and leases.free("alice", period_of(utcnow())) == 0


async def test_undoing_a_growth_leaves_a_later_one(aiohttp_client, stream_settings):
    """The undo of a lost growth comes after the lease grew again: the entry notes its latest
    growth only, so nothing is undone (what the lost one took goes back with the lease); the
    undo of the latest one takes exactly what it added, once."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    replica = client.app[REGISTRY].replica_id  # live: the reaper leaves its lease alone
    now = utcnow()
    for growth, tokens in ((1, 300), (2, 500)):
        await store.take_lease(
            LeaseRequest(
                turn=lease_turn(f"m{growth}", now),
                lease_id="lease:r",
                replica=replica,
                want_tokens=tokens,
                want_turns=1,
                want_requests=0,
                growth=growth,
            )
        )
    await store.undo_growth("alice", period_of(now), "lease:r", 1, interval_ms=0)
    doc = await usage(store.db)
    assert doc["reserved"] == 800 and (lease_of(doc)[0]["grant"], lease_of(doc)[0]["turns"]) == (
        800,
        2,
    )
    for _ in range(2):
        await store.undo_growth("alice", period_of(now), "lease:r", 2, interval_ms=0)
    doc = await usage(store.db)
    assert doc["reserved"] == 300 and (lease_of(doc)[0]["grant"], lease_of(doc)[0]["turns"]) == (
        300,
        1,
    )


async def idle_after_a_burst(store: Any, leases: Leases) -> Any:
    """Six of alice's turns at once (the lease grows its slots, tokens and requests), ended
    and settled: the idle lease, as this replica holds it."""
    now = utcnow()
    period = period_of(now)
    turns = [lease_turn(f"m{i}", now, max_concurrent=20, requests_per_minute=600) for i in range(6)]
    admitted = [await leases.admit(turn) for turn in turns]
    for turn, reservation in zip(turns, admitted, strict=True):
        leases.ended("alice", period, grant=reservation.grant, billed=0)
        await store.settle_leased(
            "alice", period, leases.lease_id, turn.message_id, billed=0, grant=reservation.grant
        )
    return leases._leases[("alice", period)]


def shrink_answer_lost_once(monkeypatch: Any, store: Any) -> list[dict[str, Any]]:
    """``store.shrink_lease`` applies its first shrink and loses the answer (StoreUnavailable);
    the later ones answer. What each was asked, in order."""
    real = store.shrink_lease
    asked: list[dict[str, Any]] = []

    async def answer_lost_once(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        doc = await real(*args, **kwargs)
        if len(asked) == 1:
            raise StoreUnavailable("the database is unavailable; try again shortly")
        return doc

    monkeypatch.setattr(store, "shrink_lease", answer_lost_once)
    return asked


async def test_a_shrink_whose_answer_was_lost_is_not_applied_twice(
    aiohttp_client, stream_settings, monkeypatch
):
    """An idle lease's shrink is applied but its answer is lost (an outage, a deadline): the
    next round asks the same shrink again, which MongoDB applies once (its number is noted in
    the entry). Asked anew, the same relative give-back was applied twice: the entry and the
    month's ``reserved`` went below nothing (-2630 tokens, -7 turn slots) while the replica
    granted from one turn's worth, and the bucket got its requests back twice."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    lease = await idle_after_a_burst(store, leases)
    given_back = lease.requests - 1  # the shrink keeps one request for the next turn
    due = (await usage(store.db))["requests_due"]
    asked = shrink_answer_lost_once(monkeypatch, store)
    loop = asyncio.get_running_loop()
    for later in (1, 2):  # applied, its answer lost; then asked again at the next round
        await leases.release_idle(loop.time() + later)
    assert len(asked) == 2 and asked[0] == asked[1]
    doc = await usage(store.db)
    (entry,) = lease_of(doc)
    assert (lease.tokens, lease.turns, lease.requests) == (WANT, 1, 1)
    assert (entry["grant"], entry["turns"], doc["reserved"]) == (WANT, 1, WANT)
    assert doc["requests_due"] == due - given_back * timedelta(milliseconds=100)  # 600 a minute


async def test_a_growth_between_a_lost_shrink_and_its_retry_keeps_it_applied_once(
    aiohttp_client, stream_settings, monkeypatch
):
    """The lease grows after a shrink whose answer was lost and before it is asked again (the
    user's turns come back): the growth rewrites the entry, and keeps the number of the shrink
    applied, so the retry still changes nothing. What the shrink gave back was not granted
    from meanwhile: the replica counts it gone from the moment it asked."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    lease = await idle_after_a_burst(store, leases)
    asked = shrink_answer_lost_once(monkeypatch, store)
    loop = asyncio.get_running_loop()
    await leases.release_idle(loop.time() + 1)  # applied, its answer lost
    assert (lease.tokens, lease.turns) == (WANT, 1)  # what it gave back is not granted from
    now = utcnow()
    turns = [lease_turn(f"n{i}", now, max_concurrent=20, requests_per_minute=600) for i in (1, 2)]
    admitted = [await leases.admit(turn) for turn in turns]  # the second grows the lease
    for turn, reservation in zip(turns, admitted, strict=True):
        leases.ended("alice", turn.period, grant=reservation.grant, billed=10)
        await store.settle_leased(
            "alice",
            turn.period,
            leases.lease_id,
            turn.message_id,
            billed=10,
            grant=reservation.grant,
        )
    await leases.release_idle(loop.time() + 2)  # asked again: applied before, nothing changes
    assert len(asked) == 2 and asked[0] == asked[1]
    doc = await usage(store.db)
    (entry,) = lease_of(doc)
    assert (entry["grant"], entry["turns"], doc["reserved"]) == (
        lease.tokens,
        lease.turns,
        lease.tokens,
    )
    assert lease.tokens > WANT and lease.shrink is None


async def test_a_lost_shrink_asked_again_leaves_a_new_entry_alone(
    aiohttp_client, stream_settings, monkeypatch
):
    """The lease is given back (the reaper, taking its replica for dead) after a shrink whose
    answer was lost, and a growth makes its entry anew before the shrink is asked again: the
    new entry counts that shrink as done, so the retry does not give back what the new entry
    never held (``reserved`` below nothing)."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    lease = await idle_after_a_burst(store, leases)
    asked = shrink_answer_lost_once(monkeypatch, store)
    loop = asyncio.get_running_loop()
    await leases.release_idle(loop.time() + 1)  # applied, its answer lost
    await store.release_lease("alice", lease.period, leases.lease_id)  # as the reaper does
    now = utcnow()
    for mid in ("n1", "n2"):  # the second grows the lease: its entry made anew
        await leases.admit(lease_turn(mid, now, max_concurrent=20, requests_per_minute=600))
    (made,) = lease_of(await usage(store.db))
    for _ in ("n1", "n2"):
        leases.ended("alice", lease.period, grant=WANT, billed=0)
    await leases.release_idle(loop.time() + 2)  # asked again: for the entry that is gone
    assert len(asked) == 2 and asked[0] == asked[1]
    doc = await usage(store.db)
    (entry,) = lease_of(doc)
    assert (entry["grant"], entry["turns"], doc["reserved"]) == (
        made["grant"],
        made["turns"],
        made["grant"],
    )


async def test_a_release_whose_answer_was_lost_grants_nothing_from_the_released_lease(
    aiohttp_client, stream_settings, monkeypatch
):
    """An idle lease's release is applied but its answer is lost: the replica cannot tell
    whether the month still holds the lease, so it grants nothing from it. A turn arriving
    while MongoDB still does not answer is 503; once it answers, the next turn releases the
    lease again (nothing left to give back) and takes a new one the month counts whole.
    Before, the lease was kept open and the next turn admitted from memory: room nobody sees
    held (``reserved`` 0), which a later growth would make anew below what the replica counts."""
    store, leases, period = await a_settled_turn_s_lease(aiohttp_client, stream_settings)
    real = store.release_lease

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise StoreUnavailable("the database is unavailable; try again shortly")

    monkeypatch.setattr(store, "release_lease", answer_lost)
    loop = asyncio.get_running_loop()
    assert await leases.release_idle(loop.time() + 1) == 0  # applied, its answer lost
    with pytest.raises(StoreUnavailable):  # released again first: MongoDB still away
        await leases.admit(lease_turn("m2", utcnow()))
    assert (await usage(store.db))["reserved"] == 0  # nothing granted
    monkeypatch.setattr(store, "release_lease", real)
    second = await leases.admit(lease_turn("m3", utcnow()))
    doc = await usage(store.db)
    (entry,) = lease_of(doc)  # the new lease, wholly counted
    assert doc["reserved"] == entry["grant"] == leases._leases[("alice", period)].tokens
    assert entry["grant"] >= second.grant == WANT and doc["used"] == 10


async def test_a_pending_settlement_of_a_lease_given_back_does_not_shrink_the_next_lease(
    aiohttp_client, stream_settings
):
    """A leased turn ends while MongoDB is away: its grant and turn slot are free at once, its
    settlement waits in the replica's queue of final writes. The idle lease is not given back
    until that settlement is written: given back before, the user's next turn made a new lease
    under the same entry id, which the late settlement then shrank by the old turn's tokens
    (MongoDB counting less than the replica grants from), with no replica cut off."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    leases = Leases(store, client.app[REGISTRY].replica_id, idle_s=0.0, keep_s=0.0)
    now = utcnow()
    period = period_of(now)
    first = await leases.admit(lease_turn("m1", now))
    leases.ended("alice", period, grant=first.grant, billed=200)
    landed = leases.settling("alice", period)  # its final write waits in the queue
    loop = asyncio.get_running_loop()
    assert await leases.release_idle(loop.time() + 1) == 0  # its settlement not written yet
    await store.settle_leased("alice", period, leases.lease_id, "m1", billed=200, grant=first.grant)
    landed()  # the queue's retry wrote it
    assert await leases.release_idle(loop.time() + 2) == 1
    await leases.admit(lease_turn("m2", utcnow()))  # a new lease
    doc = await usage(store.db)
    (entry,) = lease_of(doc)
    assert doc["reserved"] == entry["grant"] == leases._leases[("alice", period)].tokens
    assert doc["used"] == 200


async def test_a_lease_is_kept_while_a_final_write_of_its_turns_waits_in_the_queue(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    """The producer's side of the above: a program turn's final write MongoDB does not take
    (an outage) waits in the replica's queue, and its lease stays busy until the queue's retry
    has written it; then it is given back as any idle lease, the month exactly the turn's use."""
    client = await aiohttp_client(create_app(stream_settings(lease_idle_s=300, lease_keep_s=300)))
    store, registry = client.app[STORE], client.app[REGISTRY]
    leases = registry.leases
    finish_many = store.finish_many

    async def away(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("the database is unavailable; try again shortly")

    settle_leased = store.settle_leased
    retrying, written = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:  # the queue's retry, held in MongoDB
        retrying.set()
        await written.wait()
        return await settle_leased(*args, **kwargs)

    monkeypatch.setattr(store, "finish_many", away)
    monkeypatch.setattr(store, "settle_leased", held)
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert resp.status == 200 and len(registry.pending) == 1  # the client told, the write queued
    monkeypatch.setattr(store, "finish_many", finish_many)
    await asyncio.wait_for(retrying.wait(), 5)
    loop = asyncio.get_running_loop()
    assert await leases.release_idle(loop.time() + 1000) == 0  # busy: its settlement on its way
    assert lease_of(await usage(store.db))
    written.set()
    await wait_until(lambda: not registry.pending, 5, "the queued final write")
    assert await leases.release_idle(loop.time() + 1000) == 1
    await settled(store.db, registry=registry)
    assert (await usage(store.db))["used"] == 12


async def test_a_chat_deleted_on_one_replica_refuses_its_next_turn_on_the_other(
    services, fake_openai, token_for
):
    a, b = await services.start("a", "b")
    async with session(a, token_for("alice")) as on_a, session(b, token_for("alice")) as on_b:
        chat = await new_chat(on_a)
        headers = {"X-Chat-Id": chat}
        async with on_b.post("/v1/chat/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 200  # B knows the chat now (and holds a lease)
        async with on_a.delete(f"/api/chat/{chat}") as resp:
            assert resp.status == 200
        async with on_b.post("/v1/chat/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "chat_not_found"


def test_open_turns_counts_a_leases_turns():
    doc = {"open": [{"mid": "m", "grant": 5}, {"mid": "lease:r", "replica": "r", "turns": 3}]}
    assert open_turns(doc) == 4


async def test_a_turn_billed_past_its_grant_leaves_the_lease_whole(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """An upstream that bills more than the turn was granted (its own count, or one that
    ignores max_tokens): the overage goes to ``used`` as it would for a reservation, the lease
    keeps the rest, and the next turn is admitted from it as usual."""
    client = await aiohttp_client(create_app(stream_settings(lease_idle_s=30.0)))
    fake_openai.default = Script(chunks=["a ", "b"], usage=(PROMPT, 5 * WANT))
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=BODY, headers=auth())
        assert resp.status == 200, await resp.text()
    doc = await usage(client.app[STORE].db)
    (lease,) = lease_of(doc)
    assert doc["used"] == 3 * (PROMPT + 5 * WANT)
    assert doc["reserved"] == lease["grant"] >= 0


async def test_a_turn_arriving_while_its_lease_is_given_back_takes_a_new_one(
    aiohttp_client, stream_settings
):
    """The release and a new turn race: the turn waits for the release and grows a new lease,
    so the month's reserved always covers what this replica believes it holds."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    leases = Leases(store, "racer", idle_s=0.0)
    now = utcnow()

    def turn(mid: str) -> ReserveRequest:
        return lease_turn(mid, now, requests_per_minute=600, max_concurrent=20)

    first = await leases.admit(turn("m1"))
    leases.ended("alice", period_of(now), grant=first.grant, billed=10)
    await store.settle_leased(
        "alice", period_of(now), leases.lease_id, "m1", billed=10, grant=first.grant
    )
    loop = asyncio.get_running_loop()
    released, second = await asyncio.gather(
        leases.release_idle(loop.time() + 1), leases.admit(turn("m2"))
    )
    assert released == 1 and second.grant == WANT
    doc = await usage(store.db)
    (entry,) = lease_of(doc)  # the new lease, wholly counted
    assert doc["reserved"] == entry["grant"] >= second.grant
    assert doc["used"] == 10


async def test_a_turn_arriving_while_a_lease_released_elsewhere_is_shrunk_takes_a_new_one(
    aiohttp_client, stream_settings
):
    """The lease was released behind this replica's back (the reaper, taking it for dead) and
    an idle round shrinks it as a turn arrives: the shrink finds nothing, and the turn, which
    waited for it, takes a new lease rather than a grant from one the month no longer counts."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    leases = Leases(store, "presumed-dead", idle_s=0.0, keep_s=300.0)
    now = utcnow()
    period = period_of(now)

    first = await leases.admit(lease_turn("m1", now))
    leases.ended("alice", period, grant=first.grant, billed=0)
    await store.release_lease("alice", period, leases.lease_id)  # as the reaper does
    loop = asyncio.get_running_loop()
    released, second = await asyncio.gather(
        leases.release_idle(loop.time() + 1), leases.admit(lease_turn("m2", now))
    )
    assert released == 0 and second.grant == WANT
    doc = await usage(store.db)
    (entry,) = lease_of(doc)  # the new lease, wholly counted
    assert doc["reserved"] == entry["grant"] >= second.grant


async def test_a_lease_whose_release_fails_otherwise_is_still_the_replica_s(
    aiohttp_client, stream_settings
):
    """A release MongoDB refuses with an error other than an outage (here a write conflict)
    keeps the lease, open: a turn that arrived meanwhile is admitted from it (it waited on the
    lease's lock for ever before), and the release is tried again at a later round."""
    from pymongo.errors import OperationFailure

    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]

    class Conflicting:
        """The real store, whose first lease release meets a write conflict."""

        def __init__(self) -> None:
            self.failed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def release_lease(self, *args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise OperationFailure("WriteConflict", code=112)
            return await store.release_lease(*args, **kwargs)

    leases = Leases(Conflicting(), "conflicted", idle_s=0.0)  # type: ignore[arg-type]
    now = utcnow()
    period = period_of(now)

    first = await leases.admit(lease_turn("m1", now))
    leases.ended("alice", period, grant=first.grant, billed=10)
    loop = asyncio.get_running_loop()
    failed, second = await asyncio.wait_for(
        asyncio.gather(
            leases.release_idle(loop.time() + 1),
            leases.admit(lease_turn("m2", now)),
            return_exceptions=True,
        ),
        timeout=5,
    )
    assert isinstance(failed, OperationFailure)
    assert not isinstance(second, BaseException) and second.grant > 0
    leases.ended("alice", period, grant=second.grant, billed=10)
    assert await leases.release_idle(loop.time() + 2) == 1  # given back at the next round
    assert not lease_of(await usage(store.db))


async def test_a_slow_lease_upkeep_does_not_hold_a_cancel_from_another_replica(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The idle leases' upkeep (a command or two per lease, after a burst of users) runs apart
    from the watcher's control loop: while it waits on MongoDB, a cancel another replica wrote
    still reaches the stream here within a round."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    resp = await a.post("/v1/chat/completions", json=BODY, headers=auth("bob"))
    assert resp.status == 200  # bob's lease on A, idle from now, given back at LEASE_KEEP_S

    entered, held = asyncio.Event(), asyncio.Event()
    store = a.app[STORE]
    release = store.release_lease

    async def slow_release(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await held.wait()  # MongoDB slow to answer the upkeep's command
        return await release(*args, **kwargs)

    store.release_lease = slow_release  # type: ignore[method-assign]
    h = auth("alice")
    chat_id = await new_chat_of(a, h)
    fake_openai.scripts = [Script(chunks=["one ", "two"], gate_after=1)]
    fake_openai.gate.clear()
    try:
        await asyncio.wait_for(entered.wait(), 10)
        turn = await a.post(f"/api/chat/{chat_id}/message", json={"message": "Hi"}, headers=h)
        seen: list[dict[str, Any]] = []
        async for ev in events(turn):
            seen += [ev] if "event" in ev else []
            if seen[-1:] and seen[-1]["event"] == "delta" and len(seen) == 2:
                message_id = seen[0]["data"]["message_id"]
                cancel = f"/api/chat/{chat_id}/messages/{message_id}/cancel"
                assert (await b.post(cancel, headers=h)).status == 202  # B flags it; A polls
        assert seen[-1]["event"] == "done", seen
        assert seen[-1]["data"]["reason"] == "user_cancel"
        assert not held.is_set()  # the upkeep was still waiting all along
    finally:
        held.set()
        fake_openai.gate.set()


async def new_chat_of(client: Any, headers: dict[str, str]) -> str:
    resp = await client.post("/api/chat", json={}, headers=headers)
    assert resp.status == 201
    return str((await resp.json())["chat_id"])


async def test_a_lease_the_reaper_gave_back_while_its_replica_was_cut_off_is_not_granted_from(
    services, fake_openai, token_for, db, mongo_server
):
    """A loses MongoDB (B does not) past STALE_STREAM_S with a program turn running: B's reaper
    settles the turn and gives A's lease back. Once A hears of it (the turn's final write
    finds its record ended, and the month without A's lease), A's next turn takes a new lease
    that MongoDB counts; admitted from the lease A remembered, it held nothing every replica
    sees (``reserved``, the turns at once), and B could grant the same room again."""
    # A keeps an idle lease (a long LEASE_IDLE_S): only the reaper gives it back.
    a, proxy = await start_behind_proxy(
        services, mongo_server.port, "a", lease_idle_s=300, lease_keep_s=300
    )
    try:
        (b,) = await services.start("b")
        fake_openai.default = Script(chunks=["one ", "two ", "three"], gate_after=2)
        streamed = {**BODY, "stream": True}
        async with session(a, token_for("alice")) as on_a:
            first = await on_a.post("/v1/chat/completions", json=streamed)
            assert first.status == 200
            await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
            (lease,) = lease_of(await usage(db))
            proxy.cut()

            async def reaped() -> bool:
                doc = await usage(db)
                return not lease_of(doc) and doc["reserved"] == 0 and doc["used"] > 0

            await eventually(reaped, 15, "B's reaper: the turn settled, A's lease given back")
            await wait_until(lambda: b.events("stream.lease_released"), 5, "B's log line")
            proxy.restore()
            fake_openai.gate.set()
            await first.read()
            await wait_until(lambda: a.events("stream.ended_elsewhere"), 10, "A's final write")
            fake_openai.gate.clear()
            fake_openai.reached_gate.clear()
            second = await on_a.post("/v1/chat/completions", json=streamed)
            assert second.status == 200
            await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
            held = await usage(db)
            fake_openai.gate.set()
            await second.read()
        (again,) = lease_of(held)  # A's turn runs on a lease MongoDB holds
        assert again["mid"] == lease["mid"] and held["reserved"] == again["grant"] > 0
    finally:
        await proxy.close()
    await settled(db, deadline_s=10)
    totals = [m["tokens"]["total"] async for m in db.messages.find({"role": "assistant"})]
    assert (await usage(db))["used"] == sum(totals)


async def test_shutdown_gives_back_a_lease_whose_shrink_answer_was_lost(
    aiohttp_client, stream_settings, monkeypatch
):
    """A shrink's answer is lost; then the replica shuts down: its one pass of
    ``release_idle(everything=True)`` gives the lease back whole. It only asked the shrink
    again: the lease stayed in the month (reserved, a turn slot) until another replica's
    reaper took this one for dead (found by review)."""
    store, leases = await local_leases(aiohttp_client, stream_settings)
    await idle_after_a_burst(store, leases)
    shrink_answer_lost_once(monkeypatch, store)
    loop = asyncio.get_running_loop()
    await leases.release_idle(loop.time() + 1)  # applied, answer lost
    await leases.release_idle(0.0, everything=True)  # app.py's shutdown pass
    doc = await usage(store.db)
    assert lease_of(doc) == [] and doc["reserved"] == 0, (lease_of(doc), doc["reserved"])


async def test_shutdown_during_a_shrink_still_gives_the_lease_back(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch, db
):
    """No outage at all: SIGTERM arrives while the watcher's idle-lease loop awaits a shrink.
    The watcher is cancelled (the shrink stays pending); the shutdown's release pass gives the
    lease back all the same (it only asked the shrink again, and the lease was left in MongoDB
    after the process was gone)."""
    client = await aiohttp_client(
        create_app(stream_settings(lease_idle_s=0.1, lease_keep_s=300, watch_interval_s=0.05))
    )
    store = client.app[STORE]
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    real = store.shrink_lease
    entered = asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> Any:
        doc = await real(*args, **kwargs)
        if not entered.is_set():
            entered.set()
            await asyncio.sleep(3600)  # MongoDB applied it; the answer is slow to come
        return doc

    monkeypatch.setattr(store, "shrink_lease", slow)
    # two turns at once: the lease takes two slots, so an idle one is shrunk
    r1, r2 = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=BODY, headers=auth()) for _ in range(2))
    )
    assert r1.status == r2.status == 200
    await asyncio.wait_for(entered.wait(), 10)
    await client.close()  # graceful shutdown: watcher cancelled, then release_idle(everything)
    doc = await usage(db)
    assert lease_of(doc) == [] and doc["reserved"] == 0, (lease_of(doc), doc["reserved"])


async def test_a_release_cancelled_at_shutdown_is_not_granted_from(aiohttp_client, stream_settings):
    """The watcher is cancelled (SIGTERM) while the idle lease's release runs; MongoDB applied
    it. A cancelled release is a lost answer, not a refusal: a turn that waited on the lease's
    lock is not admitted from memory (a grant from an entry the month no longer holds) but
    takes a lease the month counts."""
    store, leases, period = await a_settled_turn_s_lease(aiohttp_client, stream_settings)
    real, entered = store.release_lease, asyncio.Event()

    async def applied_then_slow(*args: Any, **kwargs: Any) -> Any:
        doc = await real(*args, **kwargs)
        entered.set()
        await asyncio.sleep(3600)
        return doc

    store.release_lease = applied_then_slow  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    upkeep = asyncio.ensure_future(leases.release_idle(loop.time() + 1))
    await asyncio.wait_for(entered.wait(), 5)
    turn = asyncio.ensure_future(leases.admit(lease_turn("m2", utcnow())))
    lock = leases._leases[("alice", period)].lock

    async def waiting() -> bool:  # the turn waits on the lease's lock
        return bool(lock._waiters)

    await eventually(waiting, 5, "the turn waiting on the lease")
    upkeep.cancel()  # app shutdown: watcher.cancel()
    store.release_lease = real  # type: ignore[method-assign]
    second = await asyncio.wait_for(turn, 5)
    doc = await usage(store.db)
    assert doc["reserved"] >= second.grant, (second.grant, doc["reserved"], lease_of(doc))


async def test_a_pass_does_not_release_the_new_lease_under_a_stale_unreleased_one(
    aiohttp_client, stream_settings
):
    """``release_idle`` walks a snapshot of the leases, awaiting each one's command. Alice's
    lease L1 is ``unreleased`` (a release whose answer was lost). During a pass, while it waits
    on bob's release, alice's next turn releases L1 (``admit``: answered), forgets it and grows
    a new lease L2 under the same entry id; the turn runs on L2. The pass skips its stale L1:
    released by entry id, which is L2's, and forgotten, L2's running turn held room the month
    no longer counted (found by review)."""
    client = await aiohttp_client(create_app(stream_settings()))
    store = client.app[STORE]
    leases = Leases(store, client.app[REGISTRY].replica_id, idle_s=0.0, keep_s=300.0)
    now = utcnow()
    period = period_of(now)
    bob = dataclasses.replace(lease_turn("b1", now), user_id="bob")
    b1 = await leases.admit(bob)  # bob's lease first in the replica's dict: walked first
    a1 = await leases.admit(lease_turn("a1", now))
    leases.ended("alice", period, grant=a1.grant, billed=10)
    await store.settle_leased("alice", period, leases.lease_id, "a1", billed=10, grant=a1.grant)
    real = store.release_lease
    lost, hold, holding = [True], asyncio.Event(), asyncio.Event()

    async def release(user_id: str, *args: Any, **kwargs: Any) -> Any:
        if user_id == "bob":
            holding.set()
            await hold.wait()
        doc = await real(user_id, *args, **kwargs)
        if user_id == "alice" and lost[0]:
            lost[0] = False
            raise StoreUnavailable("the database is unavailable; try again shortly")
        return doc

    store.release_lease = release  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    await leases.release_idle(loop.time() + 1000)  # bob runs; alice's release: answer lost
    old = leases._leases[("alice", period)]
    assert old.unreleased
    leases.ended("bob", period, grant=b1.grant, billed=0)  # bob idle now
    upkeep = asyncio.ensure_future(leases.release_idle(loop.time() + 1000))
    await asyncio.wait_for(holding.wait(), 5)  # the pass waits on bob's release
    a2 = await leases.admit(lease_turn("a2", utcnow()))  # releases L1, grows L2, runs
    assert leases._leases[("alice", period)] is not old
    hold.set()
    await asyncio.wait_for(upkeep, 5)
    doc = await store.db.usage.find_one({"user_id": "alice"})
    assert lease_of(doc) and doc["reserved"] >= a2.grant, (lease_of(doc), doc["reserved"])
    assert ("alice", period) in leases._leases, "the running turn's lease was forgotten"

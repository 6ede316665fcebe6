"""The context cache: a chat's next turn on the replica that ran its previous one does not read
the history from MongoDB again, and the prompt is exactly what a read would have given, also when
another replica or a concurrent turn wrote to the chat in between."""

from __future__ import annotations

import asyncio
from typing import Any

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import PRODUCER, STORE
from service.metrics import REGISTRY
from service.store import utcnow
from service.stream.context import ContextCache
from tests.fake_openai import Script
from tests.faults import settled
from tests.processes import eventually, wait_until
from tests.sse_client import collect
from tests.test_stream_sse import new_chat, records, send


def history_reads() -> float:
    """How many times the store has read a chat's recent messages (this process, so far)."""
    labels = {"operation": "recent_messages", "result": "ok"}
    return REGISTRY.get_sample_value("gateway_mongodb_operation_seconds_count", labels) or 0.0


def prompt(fake_openai, i: int = -1) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in fake_openai.requests[i]["messages"][1:]]


async def test_next_turn_on_this_replica_skips_the_history_read(stream_client, fake_openai, auth):
    client, h = stream_client, auth("cached")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["first answer"]),
        Script(chunks=["cut", " more"], reset_after=1),
    ]
    await collect(await send(client, chat_id, h, "q1"))
    before = history_reads()
    await collect(await send(client, chat_id, h, "q2"))
    await collect(await send(client, chat_id, h, "q3"))
    assert history_reads() == before  # turns 2 and 3: no read
    sent = prompt(fake_openai)
    assert [r for r, _ in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[:2] == [("user", "q1"), ("assistant", "first answer")]
    assert sent[2] == ("user", "q2") and "cut off" in sent[3][1] and sent[4] == ("user", "q3")


async def test_turn_on_another_replica_in_between_is_read(
    aiohttp_client, stream_settings, fake_openai, auth
):
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("roaming")
    chat_id = await new_chat(a, h)
    fake_openai.scripts = [Script(chunks=["from A"]), Script(chunks=["from B"])]
    await collect(await send(a, chat_id, h, "q1"))
    await collect(await send(b, chat_id, h, "q2"))
    before = history_reads()
    await collect(await send(a, chat_id, h, "q3"))
    assert history_reads() == before + 1  # A's entry is stale: read
    assert prompt(fake_openai) == [
        ("user", "q1"),
        ("assistant", "from A"),
        ("user", "q2"),
        ("assistant", "from B"),
        ("user", "q3"),
    ]


async def test_concurrent_turn_of_the_chat_is_not_cached_half_done(
    stream_client, fake_openai, auth
):
    """Turn B runs while turn A streams: B saw A's answer unfinished, so B leaves no entry, and
    the next turn reads A's final answer rather than B's stale view of it."""
    client, h = stream_client, auth("overlap")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["A part one", " and two"], gate_after=1),
        Script(chunks=["B answer"]),
    ]
    fake_openai.gate.clear()
    resp_a = await send(client, chat_id, h, "qa")
    reading_a = asyncio.create_task(collect(resp_a))
    await fake_openai.reached_gate.wait()
    await collect(await send(client, chat_id, h, "qb"))
    fake_openai.gate.set()
    await reading_a
    await collect(await send(client, chat_id, h, "qc"))
    assert prompt(fake_openai) == [
        ("user", "qa"),
        ("assistant", "A part one and two"),
        ("user", "qb"),
        ("assistant", "B answer"),
        ("user", "qc"),
    ]


def test_cache_stops_being_trusted_while_it_misses_and_recovers():
    """Replicas taking turns of the same chats make entries stale: the producer then reads the
    history alongside the authorization again instead of after a miss."""
    cache = ContextCache(size=10)
    for seq in range(0, 40, 2):  # every entry is stale by two seqs
        cache.put("c", seq + 2, [])
        assert cache.resolve("c", seq + 4) is None
    cache.put("c", 42, [])
    assert not cache.trusted("c")
    for seq in range(42, 80, 2):  # hits, scored on the concurrent path
        assert cache.resolve("c", seq) == []
        cache.put("c", seq + 2, [])
    assert cache.trusted("c")


def test_cache_is_bounded_and_never_holds_a_streaming_message():
    cache = ContextCache(size=2)
    for chat in ("a", "b", "c"):
        cache.put(chat, 2, [{"seq": 0, "status": "complete"}])
    assert len(cache) == 2 and not cache.trusted("a")
    cache.put("b", 4, [{"seq": 1, "status": "streaming"}])
    assert not cache.trusted("b")
    cache.put("c", 0, [])  # older than the entry held: ignored
    assert cache.resolve("c", 2) == [{"seq": 0, "status": "complete"}]


async def test_a_view_missing_an_earlier_turn_s_records_is_not_cached(
    stream_client, fake_openai, auth, monkeypatch
):
    """Turn A took its seqs first but its records are not written yet when turn B reads the chat
    (A's insert runs alongside its upstream request): B's view lacks A's messages, so B must
    leave no entry, and the next turn reads them all."""
    client, h = stream_client, auth("late-insert")
    chat_id = await new_chat(client, h)
    store = client.app[STORE]
    insert, released = store.insert_messages, asyncio.Event()

    async def late_for_qa(groups):
        if any(docs[0]["content"] == "qa" for docs in groups):
            await released.wait()
        return await insert(groups)

    monkeypatch.setattr(store, "insert_messages", late_for_qa)
    fake_openai.scripts = [Script(chunks=["A answer"]), Script(chunks=["B answer"])]
    sending_a = asyncio.ensure_future(send(client, chat_id, h, "qa"))  # answers once written
    await wait_until(lambda: len(fake_openai.requests) == 1)  # A has its seqs and its upstream
    await collect(await send(client, chat_id, h, "qb"))
    assert prompt(fake_openai) == [("user", "qb")]  # B could not see A's records
    released.set()
    await collect(await sending_a)
    await collect(await send(client, chat_id, h, "qc"))
    assert prompt(fake_openai) == [
        ("user", "qa"),
        ("assistant", "A answer"),
        ("user", "qb"),
        ("assistant", "B answer"),
        ("user", "qc"),
    ]


async def test_a_known_chat_s_turn_is_reserved_while_its_authorization_runs(
    stream_client, fake_openai, auth
):
    """The chat's previous turn ran here: the next turn's seq, model and history are predicted,
    so its reservation does not wait for the chat's authorization (which checks the prediction).
    The authorization is held here until the reservation is done: a turn that waited for one
    before the other would never start."""
    client, h = stream_client, auth("predicted")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [Script(chunks=["first answer"]), Script(chunks=["second answer"])]
    await collect(await send(client, chat_id, h, "q1"))
    producer = client.app[PRODUCER]
    store = producer.store
    reserved = asyncio.Event()

    class AuthorizedAfterReserving:
        """The real store, whose chat authorization waits until a reservation was made."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def begin_chat_turn(self, *args: Any) -> Any:
            await reserved.wait()
            return await store.begin_chat_turn(*args)

        async def reserve(self, req: Any) -> Any:
            reservation = await store.reserve(req)
            reserved.set()
            return reservation

    wrapped = AuthorizedAfterReserving()
    producer.store = producer.reservations.store = wrapped  # type: ignore[assignment]
    try:
        async with asyncio.timeout(10):
            events = await collect(await send(client, chat_id, h, "q2"))
    finally:
        producer.store = producer.reservations.store = store
    assert events[-1]["event"] == "done"
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "first answer"), ("user", "q2")]
    docs = await records(client, chat_id)
    assert [d["seq"] for d in docs] == [0, 1, 2, 3] and docs[3]["content"] == "second answer"


async def gap_passed(client, user: str) -> None:
    """Poll (with a deadline) until the user's message gap has passed."""

    async def passed() -> bool:
        doc = await client.app[STORE].usage.find_one({"user_id": user})
        return doc is None or doc.get("next_at") is None or doc["next_at"] <= utcnow()

    await eventually(passed, 5, "the message gap passed")


async def test_a_known_chat_deleted_elsewhere_is_refused_and_its_send_takes_nothing(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Predicted on A, deleted on B: the authorization refuses (404, as without a prediction),
    and the reservation made meanwhile is undone, the message gap with it: the user's next
    send, to another chat at once, is not held by the refused one's."""
    settings = stream_settings(message_rate_limit_ms=1000)
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("deleted")
    gone, other = await new_chat(a, h), await new_chat(a, h)
    await collect(await send(a, gone, h, "q1"))
    assert (await b.delete(f"/api/chat/{gone}", headers=h)).status == 200
    await gap_passed(a, "deleted")
    refused = await send(a, gone, h, "q2")
    assert refused.status == 404 and (await refused.json())["error"]["code"] == "chat_not_found"
    resp = await send(a, other, h, "q3")
    assert resp.status == 200, await resp.text()
    assert (await collect(resp))[-1]["event"] == "done"
    await settled(a.app[STORE].db, users=("deleted",))


async def test_a_prediction_another_replica_outdated_is_admitted_again_within_the_gap(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A predicts from its last turn, B had one since: A's reservation is undone (its message
    gap too) and the turn admitted again with the chat as B left it, not refused by its own
    first reservation's gap."""
    settings = stream_settings(message_rate_limit_ms=1000)
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("outdated")
    chat_id = await new_chat(a, h)
    fake_openai.scripts = [Script(chunks=["from A"]), Script(chunks=["from B"]), Script()]
    await collect(await send(a, chat_id, h, "q1"))
    await gap_passed(a, "outdated")
    await collect(await send(b, chat_id, h, "q2"))
    await gap_passed(a, "outdated")
    resp = await send(a, chat_id, h, "q3")
    assert resp.status == 200, await resp.text()
    assert (await collect(resp))[-1]["event"] == "done"
    assert prompt(fake_openai)[:4] == [
        ("user", "q1"),
        ("assistant", "from A"),
        ("user", "q2"),
        ("assistant", "from B"),
    ]
    docs = await records(a, chat_id)
    assert [d["seq"] for d in docs] == [0, 1, 2, 3, 4, 5]  # no seq left unused
    await settled(a.app[STORE].db, users=("outdated",))


async def test_a_prediction_outdated_and_refused_twice_is_counted_once(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A predicts, B's turn came since and moved the message gap: A's predicted reservation is
    refused, the turn admitted again with the chat as it is and refused again by the same gap:
    one rejection, one 429."""
    settings = stream_settings(message_rate_limit_ms=60_000)
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("refused-twice")
    chat_id = await new_chat(a, h)
    await collect(await send(a, chat_id, h, "q1"))
    # the gap lifted for B's turn alone; A still predicts from q1
    await a.app[STORE].usage.update_one({"user_id": "refused-twice"}, {"$unset": {"next_at": ""}})
    await collect(await send(b, chat_id, h, "q2"))
    rejected = {"reason": "rate_limited"}
    before = REGISTRY.get_sample_value("gateway_turn_rejections_total", rejected) or 0.0
    resp = await send(a, chat_id, h, "q3")
    assert resp.status == 429
    after = REGISTRY.get_sample_value("gateway_turn_rejections_total", rejected) or 0.0
    assert after - before == 1


async def test_a_prediction_outdated_whose_undo_failed_holds_nothing_once_it_ends(
    aiohttp_client, stream_settings, fake_openai, auth, monkeypatch
):
    """A predicts from its last turn, B had one since, and A's undo of the predicted
    reservation fails (MongoDB did not answer it): the turn is admitted again under its id, so
    its month holds two entries of it. When it ends, its settlement gives back what both hold:
    nothing stays in ``reserved`` for the rest of the month with no entry the reaper could
    release."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("undo-failed")
    chat_id = await new_chat(a, h)
    fake_openai.scripts = [Script(chunks=["from A"]), Script(chunks=["from B"]), Script()]
    await collect(await send(a, chat_id, h, "q1"))
    await collect(await send(b, chat_id, h, "q2"))
    store = a.app[STORE]
    undone: list[str] = []

    async def unreserve_fails(user_id: str, period: str, message_id: str, **kw: Any) -> None:
        undone.append(message_id)
        raise StoreUnavailable("the database is unavailable; try again shortly")

    monkeypatch.setattr(store, "unreserve", unreserve_fails)
    resp = await send(a, chat_id, h, "q3")
    assert resp.status == 200, await resp.text()
    assert (await collect(resp))[-1]["event"] == "done"
    assert len(undone) == 1  # the prediction missed, and its undo failed
    await settled(store.db, users=("undo-failed",), deadline_s=5)

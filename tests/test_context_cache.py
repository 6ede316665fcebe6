"""The context cache: a chat's next turn on the replica that ran its previous one does not read
the history from MongoDB again, and the prompt is exactly what a read would have given, also when
another replica or a concurrent turn wrote to the chat in between."""

from __future__ import annotations

import asyncio

from service.app import create_app
from service.keys import STORE
from service.metrics import REGISTRY
from service.stream.context import ContextCache
from tests.fake_openai import Script
from tests.sse_client import collect
from tests.test_stream_sse import new_chat, send


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
    reading_a = asyncio.create_task(collect(await send(client, chat_id, h, "qa")))
    await collect(await send(client, chat_id, h, "qb"))
    assert prompt(fake_openai) == [("user", "qb")]  # B could not see A's records
    released.set()
    await reading_a
    await collect(await send(client, chat_id, h, "qc"))
    assert prompt(fake_openai) == [
        ("user", "qa"),
        ("assistant", "A answer"),
        ("user", "qb"),
        ("assistant", "B answer"),
        ("user", "qc"),
    ]

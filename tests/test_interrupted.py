"""A turn whose process died (SIGKILL, OOM) is settled later from its last checkpoint: billed for
the text it had produced, its reservation released, reported as interrupted — by the reaper or
when read. The state is produced the way a dead process leaves it: a real turn is started, its
checkpoint written, and the process's clock stopped (no finalization runs)."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.errors import StoreUnavailable
from service.keys import REGISTRY, SETTINGS, STORE
from service.settings import Settings
from service.store import ReserveRequest, Store, utcnow
from service.stream import watcher
from service.stream.finals import FinalWrite
from service.stream.producer import period_of
from service.stream.watcher import reap, reap_own, settle_interrupted
from service.tokens import TokenCounter
from tests.fake_openai import Script
from tests.processes import eventually
from tests.sse_client import collect


async def dead_turn(
    store: Store,
    user: str,
    chat_id: str | None,
    content: str,
    *,
    age_s: float,
    replica: str = "gone",
):
    """Write exactly what a process leaves behind when it dies mid-stream."""
    now = utcnow()
    period = period_of(now)
    mid = f"dead-{age_s}-{len(content)}-{replica}"
    reservation = await store.reserve(
        ReserveRequest(
            user, period, mid, want=300, need=50, default_limit=10_000, rate_limit_ms=0, now=now
        )
    )
    seen = now - timedelta(seconds=age_s)
    assert await store.insert_messages(
        [
            [
                {
                    "_id": mid,
                    "chat_id": chat_id,
                    "user_id": user,
                    "seq": 1,
                    "role": "assistant",
                    "content": content,
                    "status": "streaming",
                    "model": "demo",
                    "transport": "sse",
                    "period": period,
                    "reservation": reservation.grant,
                    "prompt_tokens": 40,
                    "encoding": "o200k_base",
                    "alive_at": seen,
                    "checkpoint_at": seen,
                    "created_at": seen,
                    "replica": replica,
                }
            ]
        ]
    ) == [None]
    return mid, reservation.grant


async def test_reaper_settles_dead_turn_from_its_checkpoint(client, settings: Settings, logs):
    store = client.app[STORE]
    mid, grant = await dead_turn(store, "ghost", None, "half of an answer", age_s=120)
    live_mid, _ = await dead_turn(store, "ghost", None, "still going", age_s=0)
    assert (await store.usage.find_one({"user_id": "ghost"}))["reserved"] == 2 * grant

    assert await reap(store, settings) == 1  # the fresh one is alive, not touched

    msg = await store.messages.find_one({"_id": mid})
    completion = TokenCounter().count("half of an answer")
    assert msg["status"] == "interrupted" and msg["content"] == "half of an answer"
    assert msg["tokens"] == {
        "prompt": 40,
        "completion": completion,
        "total": 40 + completion,
        "source": "tokenizer",
    }
    usage = await store.usage.find_one({"user_id": "ghost"})
    assert usage["used"] == 40 + completion and usage["reserved"] == grant  # only the live one
    assert [e["mid"] for e in usage["open"]] == [live_mid]
    assert any(e["event"] == "stream.ended" and e["outcome"] == "interrupted" for e in logs)

    assert await reap(store, settings) == 0  # idempotent: nothing billed twice
    assert (await store.usage.find_one({"user_id": "ghost"}))["used"] == 40 + completion


async def test_a_reaped_turn_is_counted_interrupted_and_the_help_names_that_outcome(
    client, settings: Settings
):
    """deploy/README.md's alerts read gateway_turns_total{outcome="interrupted"}: the reaper
    counts it, and the metric's HELP lists every outcome its series carry."""
    store = client.app[STORE]

    async def turns() -> tuple[str, dict[tuple[str, str], float]]:
        resp = await client.get("/metrics")
        assert resp.status == 200
        families = text_string_to_metric_families(await resp.text())
        (family,) = [f for f in families if f.name == "gateway_turns"]
        return family.documentation, {
            (s.labels["outcome"], s.labels["reason"]): s.value
            for s in family.samples
            if s.name == "gateway_turns_total" and s.labels["transport"] == "sse"
        }

    _, before = await turns()
    await dead_turn(store, "counted", None, "cut short", age_s=120)
    assert await reap(store, settings) == 1
    documentation, after = await turns()
    key = ("interrupted", "interrupted")
    assert after[key] - before.get(key, 0.0) == 1
    named = set(re.findall(r"\w+", documentation.partition("by outcome (")[2].partition(")")[0]))
    assert {outcome for outcome, _reason in after} <= named, documentation


async def test_dead_stream_is_reported_interrupted_on_read(client, auth):
    chat = await (await client.post("/api/chat", headers=auth("reader"))).json()
    store = client.app[STORE]
    await dead_turn(store, "reader", chat["chat_id"], "partial text", age_s=300)
    body = await (await client.get(f"/api/chat/{chat['chat_id']}", headers=auth("reader"))).json()
    [msg] = body["messages"]
    assert msg["status"] == "interrupted" and msg["content"] == "partial text"
    usage = await store.usage.find_one({"user_id": "reader"})
    assert usage["reserved"] == 0 and usage["used"] == msg["tokens"]["total"]


async def test_reservation_without_a_turn_record_is_released(aiohttp_client, make_settings):
    """The process died between reserving and persisting: the reservation is released unbilled."""
    settings = make_settings(
        upstream_first_token_timeout_s=1, upstream_total_timeout_s=1, stale_stream_s=1
    )
    client = await aiohttp_client(create_app(settings))
    store = client.app[STORE]
    old = utcnow() - timedelta(seconds=60)
    await store.reserve(
        ReserveRequest(
            "orphan",
            period_of(old),
            "never-persisted",
            want=500,
            need=50,
            default_limit=10_000,
            rate_limit_ms=0,
            now=old,
        )
    )
    await reap(store, settings)
    usage = await store.usage.find_one({"user_id": "orphan"})
    assert usage["reserved"] == 0 and usage["used"] == 0 and usage["open"] == []


async def test_an_old_reservation_is_released_alone_and_a_long_turn_is_not_taken_for_dead(
    client, settings: Settings
):
    """The reaper releases a reservation whose turn can no longer be running: older than the
    longest turn (its first token's timeout, then the whole answer's, then STALE_STREAM_S).
    Before, it took every reservation of a month that held one such, young ones included (a
    running turn ended ``interrupted``, a turn being admitted released and never billed), and a
    turn whose first token came late was taken for dead before its answer's time was up."""
    store, now = client.app[STORE], utcnow()
    period = period_of(now)

    async def reserve(mid: str, age_s: float) -> None:
        at = now - timedelta(seconds=age_s)
        await store.reserve(
            ReserveRequest("busy", period, mid, 300, 50, 10_000, rate_limit_ms=0, now=at)
        )

    await reserve("orphan", 7200)  # its process died before writing its records
    await reserve("admitting", 0)  # being admitted now: its records not written yet
    running, _ = await dead_turn(store, "busy", None, "so far", age_s=1, replica="here")
    longest = settings.upstream_first_token_timeout_s + settings.upstream_total_timeout_s
    late_mid, _ = await dead_turn(store, "busy", None, "thought", age_s=1, replica="slow")
    old = now - timedelta(seconds=longest - 30)  # first token at 60 s, answering since
    await store.usage.update_one(
        {"user_id": "busy", "period": period, "open.mid": late_mid}, {"$set": {"open.$.at": old}}
    )

    await reap(store, settings)
    usage = await store.usage.find_one({"user_id": "busy", "period": period})
    assert sorted(e["mid"] for e in usage["open"]) == sorted(["admitting", running, late_mid])
    assert usage["used"] == 0 and usage["reserved"] == 3 * 300
    for mid in (running, late_mid):
        assert (await store.messages.find_one({"_id": mid}))["status"] == "streaming"


async def test_a_record_its_live_replica_no_longer_runs_is_settled_by_that_replica(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The records' insert answered as failed (its answer lost): the send is refused 503, its
    final write ends nothing. MongoDB took the insert after all: the record stays ``streaming``
    on a live replica, which no reaper takes for dead (its chat's answer "running" for ever).
    Past the longest turn, that replica's own reaper settles it; a turn it still runs, however
    old its last save, is left alone."""
    client = await aiohttp_client(create_app(stream_settings()))
    h, store, registry = auth(), client.app[STORE], client.app[REGISTRY]
    chat = (await (await client.post("/api/chat", json={}, headers=h)).json())["chat_id"]
    real, late = store.insert_messages, []

    async def lost_answer(groups):
        store.insert_messages = real
        late.extend(d for docs in groups for d in docs)
        raise StoreUnavailable("the database is unavailable; try again shortly")

    store.insert_messages = lost_answer
    refused = await client.post(f"/api/chat/{chat}/message", json={"message": "a"}, headers=h)
    assert refused.status == 503

    async def finalized() -> bool:  # its final write done: it found nothing to end
        return not registry.streams

    await eventually(finalized, 5, "the refused turn's final write")
    long_ago = utcnow() - timedelta(hours=2)
    for doc in late:  # MongoDB takes it now (backdated: as if the longest turn had passed)
        doc.update(created_at=long_ago, alive_at=long_ago, checkpoint_at=long_ago)
    await store.messages.insert_many(late)
    orphan = next(d["_id"] for d in late if d["role"] == "assistant")

    fake_openai.default = Script(chunks=["held ", "answer"], gate_after=1)
    running = await client.post(f"/api/chat/{chat}/message", json={"message": "b"}, headers=h)
    assert running.status == 200
    await fake_openai.reached_gate.wait()
    mine = next(iter(registry.streams))
    await store.messages.update_one({"_id": mine}, {"$set": {"checkpoint_at": long_ago}})

    assert await reap_own(store, registry, client.app[SETTINGS]) == 1
    assert (await store.messages.find_one({"_id": orphan}))["status"] == "interrupted"
    fake_openai.gate.set()
    events = await collect(running)
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "complete"
    assert (await store.messages.find_one({"_id": mine}))["status"] == "complete"


async def test_a_replica_retrying_its_waiting_final_writes_is_not_taken_for_dead(
    aiohttp_client, make_settings
):
    """After an outage a replica applies its waiting final writes one after the other (up to
    10,000: minutes). That ran in the loop that also writes its heartbeat: past STALE_STREAM_S
    another replica's reaper took it for dead and ended the very records the writes were for
    ``interrupted``, at their checkpoints from before the outage (their clients told ``done``).
    The heartbeat has a loop of its own now."""
    settings = make_settings(stale_stream_s=1.0, watch_interval_s=0.05, reaper_interval_s=0.2)
    a = await aiohttp_client(create_app(settings))
    await aiohttp_client(create_app(settings))  # another replica, reaping
    store, registry = a.app[STORE], a.app[REGISTRY]
    before, period = utcnow() - timedelta(seconds=20), period_of(utcnow())
    ids = [f"w{i}" for i in range(400)]
    record = {"chat_id": None, "user_id": "alice", "seq": None, "role": "assistant"}
    record |= {"content": "partial", "status": "streaming", "model": "demo", "period": period}
    record |= {"transport": "openai", "reservation": 0, "prompt_tokens": 5}
    record |= {"alive_at": before, "checkpoint_at": before, "created_at": before}
    record |= {"replica": registry.replica_id}
    await store.messages.insert_many([{**record, "_id": mid} for mid in ids])
    done = {"status": "complete", "content": "partial and the rest", "completed_at": utcnow()}
    for mid in ids:  # the final writes an outage deferred
        registry.pending.add(FinalWrite("alice", period, mid, grant=0, billed=7, fields=done))

    oldest_beat, loop = 0.0, asyncio.get_running_loop()
    end = loop.time() + 60
    while registry.pending and loop.time() < end:
        beat = await store.replicas.find_one({"_id": registry.replica_id})
        oldest_beat = max(oldest_beat, (utcnow() - beat["alive_at"]).total_seconds())
        await asyncio.sleep(0.05)  # sampling the heartbeat's age, not waiting for an event
    assert not registry.pending and oldest_beat < settings.stale_stream_s
    statuses = await store.messages.distinct("status", {"_id": {"$in": ids}})
    assert statuses == ["complete"]


async def test_quiet_stream_of_a_live_replica_is_not_reaped(client, auth, settings: Settings):
    """Liveness is the replica's heartbeat, not a write per stream: a turn with nothing new to
    save for longer than STALE_STREAM_S (a model thinking before its first token) is left alone
    while its replica beats, by the reaper and by a read; the same turn of a replica whose
    heartbeat stopped is settled."""
    store = client.app[STORE]
    me = client.app[REGISTRY].replica_id

    async def beating() -> bool:
        return me in await store.live_replicas(since=utcnow() - timedelta(seconds=5))

    await eventually(beating, 5, "this replica's heartbeat")
    stopped = utcnow() - timedelta(seconds=600)
    await store.replicas.insert_one({"_id": "stopped", "alive_at": stopped})
    chat = await (await client.post("/api/chat", headers=auth("thinker"))).json()
    quiet, _ = await dead_turn(store, "thinker", chat["chat_id"], "", age_s=300, replica=me)
    dead, _ = await dead_turn(store, "thinker", None, "some text", age_s=300, replica="stopped")

    assert await reap(store, settings) == 1
    assert (await store.messages.find_one({"_id": quiet}))["status"] == "streaming"
    assert (await store.messages.find_one({"_id": dead}))["status"] == "interrupted"
    body = await (await client.get(f"/api/chat/{chat['chat_id']}", headers=auth("thinker"))).json()
    assert [m["status"] for m in body["messages"]] == ["streaming"]
    assert (await store.messages.find_one({"_id": quiet}))["status"] == "streaming"


async def test_the_replica_s_own_commands_are_labelled_and_a_turn_s_are_not(mongo_server, db_name):
    """The watcher's commands carry ``comment: gateway:replica`` (MongoDB's profiler, logs and
    currentOp show it, and the bench counts them apart from a turn's); a turn's commands do not."""
    from pymongo import AsyncMongoClient, monitoring

    from service.store import REPLICA_WORK

    class Recorder(monitoring.CommandListener):
        def __init__(self) -> None:
            self.comments: dict[str, list[object]] = {}

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            target = event.command.get(event.command_name)
            if isinstance(target, str):  # a collection's command, not the driver's housekeeping
                key = f"{event.command_name}:{target}"
                self.comments.setdefault(key, []).append(event.command.get("comment"))

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    recorder = Recorder()
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        mongo_server.uri, tz_aware=True, event_listeners=[recorder]
    )
    try:
        store = Store(client[db_name])
        await store.ensure_indexes()
        recorder.comments.clear()
        await dead_turn(store, "alice", None, "partial text", age_s=600)
        turn_commands = dict(recorder.comments)
        recorder.comments = {}
        await store.heartbeat("replica-1")
        await store.flagged_turns()
        await store.follow_turns(["some-id"], until=utcnow())
        await store.read_turns(["some-id"])
        await store.checkpoint_many([("some-id", "text")])
        await store.stale_streams(older_than=utcnow())
        await store.old_reservations(older_than=utcnow())
    finally:
        await client.close()
    replica = recorder.comments
    assert set(replica) >= {
        "update:replicas",
        "find:messages",
        "update:messages",
        "find:replicas",
        "find:usage",
    }
    assert all(c == REPLICA_WORK for cs in replica.values() for c in cs)
    assert set(turn_commands) >= {"findAndModify:usage", "insert:messages"}
    assert all(c is None for cs in turn_commands.values() for c in cs)


async def test_a_dead_priced_turn_is_billed_at_its_recorded_price_on_the_key_too(
    client, settings: Settings
):
    """The reaper prices a dead turn by the price its record kept (not today's catalogue),
    settles the API key's own month it was reserved on, and adds it to the daily rollup once."""
    from service.costs import Price, cost_nanos
    from service.store import key_account

    store = client.app[STORE]
    mid, _ = await dead_turn(store, "ghost", None, "half of an answer", age_s=120)
    period = period_of(utcnow())
    key = await store.reserve(
        ReserveRequest(
            key_account("k1"),
            period,
            mid,
            want=300,
            need=50,
            default_limit=1000,
            rate_limit_ms=0,
            now=utcnow(),
        )
    )
    price = {"input": "3", "output": "15"}
    await store.messages.update_one(
        {"_id": mid},
        {"$set": {"price": price, "currency": "USD", "key_id": "k1", "key_grant": key.grant}},
    )
    assert await reap(store, settings) == 1
    completion = TokenCounter().count("half of an answer")
    cost = cost_nanos(Price.model_validate(price), prompt=40, completion=completion)
    msg = await store.messages.find_one({"_id": mid})
    assert msg["cost"] == cost
    user = await store.usage.find_one({"user_id": "ghost"})
    mine = await store.usage.find_one({"user_id": key_account("k1")})
    assert user["cost"] == mine["cost"] == cost
    assert mine["used"] == 40 + completion and mine["reserved"] == 0 and not mine["open"]
    from service.analytics import lines_of

    async def lines(user: str | None) -> list[dict]:
        return lines_of(await store.rollup.find({"user_id": user}).to_list(None))

    rows = await lines("ghost")
    assert len(rows) == 1 and rows[0]["key_id"] == "k1" and rows[0]["cost"] == cost
    assert rows[0]["outcomes"] == {"interrupted": 1} and rows[0]["turns"] == 1
    [total] = await lines(None)  # the month's totals, per (day, model)
    assert total["turns"] == 1 and total["cost"] == cost and total["key_id"] is None
    assert await reap(store, settings) == 0  # nothing billed or rolled up twice
    assert [r["turns"] for r in await lines("ghost")] == [1]


async def test_two_settlements_of_one_dead_turn_in_the_same_millisecond_count_it_once(
    client, monkeypatch
):
    """The reaper, a chat read, a mirror's poll and the replica's own reaper each settle a dead
    record; two of them on the same record (two replicas' reapers, two tabs reading the chat)
    are told apart by which one ended it: the other's end is not taken for its own, even in
    the same millisecond (found by review: a queued final write's look at its record counted
    such a turn twice in the rollup)."""
    store = client.app[STORE]
    budget = client.app[SETTINGS].budget
    mid, _ = await dead_turn(store, "ghost", None, "half of an answer", age_s=120)
    doc = await store.get_message(mid)
    frozen = utcnow()
    monkeypatch.setattr(watcher, "utcnow", lambda: frozen)  # both end in the same ms
    done = await asyncio.gather(
        settle_interrupted(store, doc, budget), settle_interrupted(store, doc, budget)
    )
    assert sorted(done) == [False, True]
    rollup = await store.rollup.find_one({"user_id": "ghost"})
    assert sum(line["turns"] for line in rollup["lines"].values()) == 1

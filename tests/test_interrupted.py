"""A turn whose process died (SIGKILL, OOM) is settled later from its last checkpoint: billed for
the text it had produced, its reservation released, reported as interrupted — by the reaper or
when read. The state is produced the way a dead process leaves it: a real turn is started, its
checkpoint written, and the process's clock stopped (no finalization runs)."""

from __future__ import annotations

from datetime import timedelta

from service.app import create_app
from service.keys import REGISTRY, STORE
from service.settings import Settings
from service.store import ReserveRequest, Store, utcnow
from service.stream.producer import period_of
from service.stream.watcher import reap
from service.tokens import TokenCounter
from tests.processes import eventually


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
    await store.insert_messages(
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
    )
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
    settings = make_settings(upstream_total_timeout_s=1, stale_stream_s=1)
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

"""One background loop per replica, independent of how many streams are live:

- cancel requests written to MongoDB by any replica reach the local stream (``user_cancel``),
  and so does a chat's delete to a turn whose records came after it flagged the chat's turns;
- first-token, idle (between chunks) and total deadlines are enforced (``timeout``);
- the replica's heartbeat is written, so that a stream left ``streaming`` by a dead process can
  be told apart from a slow one (one write per replica, however many streams it runs);
- the text of every live stream that grew is checkpointed, in one bulk write per interval;
- the budget leases of users whose program turns have stopped are brought to one turn's worth,
  then given back;
- the reaper settles such dead turns: billed for the text of their last checkpoint, the
  reservation released, the message marked ``interrupted``; and it releases reservations whose
  turn never got persisted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from service.costs import NANOS, Budget, Price, cost_nanos
from service.errors import ServiceError
from service.logs import error_text
from service.metrics import COST, TURNS
from service.records import Status, final_fields, tokens_doc
from service.settings import Settings
from service.store import Doc, Rollup, Store, key_account, utcnow
from service.stream.registry import StreamRegistry
from service.tokens import TokenCounter

log = structlog.get_logger("service.stream")
ALIVE_EVERY_S = 5.0


async def settle_interrupted(store: Store, doc: Doc, budget: Budget) -> bool:
    """Settle one turn whose process died (billed at the price its record kept). Idempotent;
    False when someone else settled it."""
    content = doc.get("content") or ""
    counter = TokenCounter(doc.get("encoding"))
    completion = counter.count(content)
    prompt = int(doc.get("prompt_tokens", 0))
    price = Price.from_record(doc.get("price"))
    cost = cost_nanos(price, prompt=prompt, completion=completion) if price else None
    billed = budget.billed(prompt, completion, cost or 0)
    if doc.get("key_grant") is not None:  # also reserved on its API key's own month
        await store.settle_usage(
            key_account(doc["key_id"]),
            doc["period"],
            doc["_id"],
            billed=billed,
            cost=cost or 0,
        )
    if doc.get("lease"):  # billed from its replica's lease, which the reaper releases
        await store.settle_leased(
            doc["user_id"],
            doc["period"],
            doc["lease"],
            doc["_id"],
            billed=billed,
            grant=int(doc["reservation"]),
            cost=cost or 0,
        )
    else:
        await store.settle_usage(
            doc["user_id"],
            doc["period"],
            doc["_id"],
            billed=billed,
            cost=cost or 0,
        )
    ended_at = utcnow()
    done = await store.finish_message(
        doc["_id"],
        final_fields(
            Status.INTERRUPTED,
            "interrupted",
            finish_reason=None,
            error=("interrupted", "the server stopped while answering"),
            tokens=tokens_doc(prompt, completion, counter.source),
            cost=cost,
            completed_at=ended_at,
        ),
    )
    if done:
        if cost:
            COST.labels(doc.get("model") or "").inc(cost / NANOS)
        await store.roll_up(
            [
                Rollup(
                    day=(doc.get("created_at") or ended_at).date().isoformat(),
                    user_id=doc["user_id"],
                    model=doc.get("model") or "",
                    key_id=doc.get("key_id"),
                    outcome="interrupted",
                    prompt=prompt,
                    completion=completion,
                    cached=0,
                    reasoning=0,
                    cost=cost or 0,
                )
            ]
        )
        TURNS.labels(doc.get("transport") or "sse", "interrupted", "interrupted").inc()
        log.info(
            "stream.ended",
            outcome="interrupted",
            reason="interrupted",
            stream_id=doc["_id"],
            message_id=doc["_id"],
            chat_id=doc.get("chat_id"),
            user_id=doc["user_id"],
            model=doc.get("model"),
            transport=doc.get("transport"),
            tokens={"prompt": prompt, "completion": completion, "total": prompt + completion},
            token_source=counter.source,
        )
    return done


async def reap(store: Store, settings: Settings) -> int:
    now = utcnow()
    settled = 0
    for doc in await store.stale_streams(
        older_than=now - timedelta(seconds=settings.stale_stream_s)
    ):
        settled += await settle_interrupted(store, doc, settings.budget)
    live = await store.live_replicas(since=now - timedelta(seconds=settings.stale_stream_s))
    for usage in await store.dead_leases(live):
        for entry in usage.get("open", []):
            if entry.get("replica") and entry["replica"] not in live:
                await store.release_lease(usage["user_id"], usage["period"], entry["mid"])
                log.info("stream.lease_released", user_id=usage["user_id"], lease=entry["mid"])
    cutoff = now - timedelta(seconds=_longest_turn_s(settings))
    for usage in await store.old_reservations(older_than=cutoff):
        for entry in usage.get("open", []):
            if entry.get("replica") or not entry["at"] < cutoff:
                continue  # a lease (released above when its replica is dead), or a young one
            message = await store.get_message(entry["mid"])
            if message is not None and message.get("status") == Status.STREAMING:
                settled += await settle_interrupted(store, message, settings.budget)
            else:  # never persisted, or already final: nothing was produced for it
                await store.settle_usage(
                    usage["user_id"],
                    usage["period"],
                    entry["mid"],
                    billed=0,
                )
    return settled


async def reap_own(store: Store, registry: StreamRegistry, settings: Settings) -> int:
    """Settle this replica's records it no longer runs: their replica lives, so no reaper takes
    them for dead, and they would stay ``streaming`` (a chat's answer "running" for ever, a
    lease's turn unbilled) for the replica's life. Settled as a dead replica's are
    (``interrupted``, their checkpoint):

    - the turns whose final write was given up (``PendingFinals``: too many waited for MongoDB,
      or MongoDB refused it), at once; a record that is not there, or already ended, is let go;
    - a record no turn here runs or waits to finalize, older than the longest turn: one whose
      insert MongoDB took after its turn had ended (the insert's answer lost, the turn refused),
      so its final write found nothing to end."""
    ids = registry.pending.given_up
    settled, wanted = 0, list(ids)
    if wanted:
        for doc in await store.read_turns(wanted):
            if doc.get("status") == Status.STREAMING:
                settled += await settle_interrupted(store, doc, settings.budget)
            ids.discard(doc["_id"])
        ids.difference_update(wanted)  # those with no record: nothing to settle
    cutoff = utcnow() - timedelta(seconds=_longest_turn_s(settings))
    for doc in await store.own_streaming(registry.replica_id, older_than=cutoff):
        if doc["_id"] not in registry.streams and doc["_id"] not in registry.pending:
            settled += await settle_interrupted(store, doc, settings.budget)
    return settled


def _longest_turn_s(settings: Settings) -> float:
    """No turn runs longer than its first token's timeout and then its answer's; past that and
    ``STALE_STREAM_S``, nothing runs for a record or a reservation any more."""
    longest = settings.upstream_first_token_timeout_s + settings.upstream_total_timeout_s
    return longest + settings.stale_stream_s


async def watch(store: Store, registry: StreamRegistry, settings: Settings) -> None:
    """The replica's loops, apart so that no slow round of one delays another: the heartbeat;
    control (deadlines, cancels, deleted chats); upkeep (the final writes waiting for MongoDB,
    the reaper); checkpoints; the idle leases' upkeep. After an outage the upkeep may apply
    thousands of waiting final writes, one after the other: meanwhile the heartbeat still goes
    (other replicas would take this one for dead and end the very records the writes are for),
    and so do deadlines and cancels."""
    await asyncio.gather(
        _heartbeat(store, registry, settings),
        _control(store, registry, settings),
        _upkeep(store, registry, settings),
        _checkpoints(store, registry, settings),
        _idle_leases(registry, settings),
    )


async def _heartbeat(store: Store, registry: StreamRegistry, settings: Settings) -> None:
    """This replica is alive: one small write every few seconds, and at once (each round) while
    another loop found MongoDB failing, so ``store_answered`` says when it is back."""
    loop = asyncio.get_running_loop()
    next_alive = loop.time()

    async def beat() -> None:
        nonlocal next_alive
        now = loop.time()
        if now >= next_alive or registry.store_failing:
            await store.heartbeat(registry.replica_id)
            next_alive = now + min(ALIVE_EVERY_S, settings.stale_stream_s / 3)
            registry.store_answered(now)

    await _every_round(beat, registry, settings)


async def _control(store: Store, registry: StreamRegistry, settings: Settings) -> None:
    loop = asyncio.get_running_loop()

    async def control() -> None:
        now = loop.time()
        _deadlines(registry, now)
        _stalled_writes(registry, now, settings.stream_send_timeout_s)
        if registry.streams:
            _flags(registry, await store.flagged_turns(), now)
        if registry.written:
            await _deleted_chats(store, registry)

    await _every_round(control, registry, settings)


async def _upkeep(store: Store, registry: StreamRegistry, settings: Settings) -> None:
    """The final writes waiting for MongoDB, retried each round once it answers (in order,
    until it fails again), and the reaper every ``REAPER_INTERVAL_S``."""
    loop = asyncio.get_running_loop()
    next_reap = loop.time()

    async def upkeep() -> None:
        nonlocal next_reap
        if registry.pending and not registry.store_failing:  # the heartbeat says when
            await registry.pending.retry(store, registry.rollups)
        now = loop.time()
        if now >= next_reap and registry.may_reap(now, settings.stale_stream_s):
            next_reap = now + settings.reaper_interval_s
            await reap(store, settings)
            await reap_own(store, registry, settings)

    await _every_round(upkeep, registry, settings)


async def _idle_leases(registry: StreamRegistry, settings: Settings) -> None:
    """Every ``WATCH_INTERVAL_S``, the leases idle for ``LEASE_IDLE_S`` brought to one turn's
    worth, and those idle for ``LEASE_KEEP_S`` given back (``Leases.release_idle``: one lease
    after the other, a command or two each); what could not be done is done at a later round."""
    leases = registry.leases
    if leases is None:
        return
    loop = asyncio.get_running_loop()

    async def upkeep() -> None:
        await leases.release_idle(loop.time())

    await _every_round(upkeep, registry, settings)


async def _every_round(
    work: Callable[[], Awaitable[None]], registry: StreamRegistry, settings: Settings
) -> None:
    """``work`` every ``WATCH_INTERVAL_S``, for ever: a round MongoDB failed is noted (the
    heartbeat then tries at each round, and says when it is back) and logged, as is any
    other error; neither ends the loop."""
    while True:
        try:
            await work()
        except ServiceError as exc:
            registry.store_failing = True
            log.warning("stream.watch_failed", code=exc.code, error=error_text(exc))
        except Exception:  # one failed round must not end the loop
            log.exception("stream.watch_failed")
        await asyncio.sleep(settings.watch_interval_s)


async def _deleted_chats(store: Store, registry: StreamRegistry) -> None:
    """Stop the turns written since the last round whose chat is deleted. A delete flags the
    chat's records that exist (``Store.delete_chat``); a turn authorized before it whose
    records came after is found here, one round later: its records written, the chat was
    already inactive when it was read. One read a round, only when such turns started."""
    written = [live for live in registry.written if live.final is None]  # ended: nothing to stop
    registry.written = []
    if not written:
        return
    try:
        deleted = await store.deleted_chats(list({w.chat_id for w in written if w.chat_id}))
    except BaseException:
        registry.written = written + registry.written  # looked at again at the next round
        raise
    for live in written:
        if live.chat_id in deleted:
            live.cancel("user_cancel")


def _deadlines(registry: StreamRegistry, now: float) -> None:
    for live in list(registry.streams.values()):
        if live.deadline and now > live.deadline:
            live.cancel("timeout")


def _stalled_writes(registry: StreamRegistry, now: float, send_timeout_s: float) -> None:
    """A client whose write has waited past STREAM_SEND_TIMEOUT_S stopped reading: drop it
    (``slow_client``); its turn goes on, or stops, as when any client leaves."""
    for follower in list(registry.followers):
        since = follower.writing_since
        if since and now - since > send_timeout_s and follower.abort is not None:
            follower.reason = "slow_client"
            follower.abort.abort()


def _flags(registry: StreamRegistry, docs: list[Doc], now: float) -> None:
    """Cancel requests and remote followers of this replica's turns, from any replica."""
    wall = utcnow()
    followed = set()
    for doc in docs:
        live = registry.streams.get(doc["_id"])
        if live is None:
            continue
        if doc.get("cancel_requested"):
            live.cancel("user_cancel")
        until = doc.get("followed_until")
        if until is not None and until > wall:
            live.followed_until = now + (until - wall).total_seconds()
            followed.add(live)
    registry.followed = followed


async def _flush_rollups(store: Store, registry: StreamRegistry) -> None:
    try:
        await registry.rollups.flush(store)
    except ServiceError as exc:  # kept: the next round writes them
        log.warning(
            "stream.rollup_failed",
            code=exc.code,
            error=error_text(exc),
            pending=len(registry.rollups),
        )
    except Exception:
        log.exception("stream.rollup_failed")


async def _checkpoints(store: Store, registry: StreamRegistry, settings: Settings) -> None:
    """Every ``CHECKPOINT_INTERVAL_S``, the text of every live stream that grew since its last
    checkpoint, in one bulk write for the whole replica; every ``FOLLOW_INTERVAL_S``, that of
    the turns a follower on another replica reads (only while there are such)."""
    loop = asyncio.get_running_loop()
    next_full = loop.time() + settings.checkpoint_interval_s
    while True:
        now = loop.time()
        fast = [live for live in registry.followed if live.followed_until > now]
        step = settings.follow_interval_s if fast else settings.checkpoint_interval_s
        await asyncio.sleep(max(0.0, min(step, next_full - now)))
        full = loop.time() >= next_full
        if full:
            next_full = loop.time() + settings.checkpoint_interval_s
            await _flush_rollups(store, registry)
        candidates = registry.streams.values() if full else fast
        grown = [live for live in candidates if live.grown()]
        if not grown:
            continue
        saved = [live.length for live in grown]
        try:
            await store.checkpoint_many([(live.message_id, live.text()) for live in grown])
        except ServiceError as exc:
            log.warning("stream.checkpoint_failed", code=exc.code, error=error_text(exc))
            continue
        except Exception:  # the next round retries; streams go on regardless
            log.exception("stream.checkpoint_failed")
            continue
        for live, n in zip(grown, saved, strict=True):
            live.saved = n

"""A chat page's turn whose admission its replica expects asks its upstream beside its
reservation (and beside its chat's authorization, when the chat's previous turn ran here), not
after them: MongoDB's round trips hide behind the model's time to its first token. A turn
refused after all drops that upstream unread and takes nothing, exactly as it was refused
before; what the upstream sent before the turn was admitted is kept (read ahead). A program's
turn does the same when its lease must grow."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from service.app import create_app
from service.keys import STORE
from service.stream.ahead import Ahead
from service.stream.producer import Turn
from tests.fake_openai import Script
from tests.faults import settled
from tests.processes import eventually
from tests.sse_client import collect
from tests.test_context_cache import gap_passed
from tests.test_stream_sse import new_chat, records, send, usage_doc

HOLD_S = 5.0  # how long a held command waits for the upstream's request before going on


def held_until(
    event: asyncio.Event, command: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    """``command``, sent only once ``event`` is set (at most ``HOLD_S`` later): the request the
    turn made meanwhile, if any, has reached the upstream by then."""

    async def held(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(TimeoutError):  # not asked early: the assertions say so
            await asyncio.wait_for(event.wait(), HOLD_S)
        return await command(*args, **kwargs)

    return held


def admin_headers(token_for) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for('root', extra={'role': 'admin'})}"}


async def test_the_upstream_is_asked_while_the_reservation_is_on_its_way(
    stream_client, fake_openai, auth
):
    """The user's second turn on this replica: its reservation is sent only once the upstream
    has the request (before, the upstream was asked after the reservation answered, and the
    reservation waited for it in vain); the answer is then whole and billed as ever."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    await collect(await send(client, chat_id, h, "q1"))  # its first: reserved, then asked
    store = client.app[STORE]
    store.reserve = held_until(fake_openai.reached_gate, store.reserve)
    fake_openai.default = Script(chunks=["early ", "bird"], gate_after=0)
    sending = asyncio.ensure_future(send(client, chat_id, h, "q2"))
    await asyncio.wait_for(fake_openai.reached_gate.wait(), HOLD_S)
    assert len(fake_openai.requests) == 2 and not sending.done()  # asked; not yet admitted
    fake_openai.gate.set()
    seen = await collect(await sending)
    assert "".join(e["data"]["text"] for e in seen if e["event"] == "delta") == "early bird"
    assert seen[-1]["event"] == "done"
    await settled(store.db)
    _, _, _, answer = await records(client, chat_id)
    assert answer["status"] == "complete" and answer["content"] == "early bird"
    usage = await usage_doc(client)
    assert usage["used"] == 2 * 25 and usage["reserved"] == 0  # both turns, as the upstream said


async def test_a_turn_read_ahead_to_its_end_leaves_nothing_to_the_cyclic_collector(
    stream_client, fake_openai, auth
):
    """The read-ahead reaches the upstream's end before the turn is admitted (the upstream
    answered whole meanwhile): what it keeps of that end is not the StopAsyncIteration that
    said so, whose traceback held the read-ahead's frame and so, through the turn's own frame,
    the read-ahead and the turn in a cycle. Each page turn's objects then waited for the cyclic
    collector; now none is left to it."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    await collect(await send(client, chat_id, h, "q1"))  # its first: reserved, then asked
    store = client.app[STORE]
    reserve = store.reserve
    answered = asyncio.Event()

    async def after_the_answer(*args: Any, **kwargs: Any) -> Any:
        await asyncio.wait_for(answered.wait(), HOLD_S)  # the read-ahead has it all by then
        await asyncio.sleep(0.05)
        return await reserve(*args, **kwargs)

    store.reserve = after_the_answer
    fake_openai.default = Script(chunks=["early ", "bird"], gate_after=0)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable stays in gc.garbage
    try:
        sending = asyncio.ensure_future(send(client, chat_id, h, "q2"))
        await asyncio.wait_for(fake_openai.reached_gate.wait(), HOLD_S)
        fake_openai.gate.set()
        answered.set()
        seen = await collect(await sending)
        await settled(store.db)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, Ahead | Turn)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert "".join(e["data"]["text"] for e in seen if e["event"] == "delta") == "early bird"
    assert len(fake_openai.requests) == 2  # the second turn asked early, and read ahead
    assert left == []


async def test_a_turn_refused_after_all_drops_the_upstream_it_asked_and_takes_nothing(
    stream_client, fake_openai, auth, token_for, logs
):
    """An operator lowers the user's limit (this replica cannot know): the turn asked its
    upstream expecting admission; the reservation refuses it (403, as before), its upstream
    request is closed unread and it bills nothing."""
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    await collect(await send(client, chat_id, h, "q1"))
    admin = admin_headers(token_for)
    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 25}, headers=admin)
    assert resp.status == 200, await resp.text()
    store = client.app[STORE]
    store.reserve = held_until(fake_openai.reached_gate, store.reserve)
    fake_openai.default = Script(chunks=["never ", "shown"], gate_after=0)
    refused = await send(client, chat_id, h, "q2")
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "budget_exceeded"
    assert len(fake_openai.requests) == 2  # it was asked early
    await asyncio.wait_for(fake_openai.disconnected.wait(), HOLD_S)  # and dropped
    assert [e for e in logs if e["event"] == "stream.early_upstream_dropped"]
    await settled(store.db)
    assert len(await records(client, chat_id)) == 2  # the first turn's only
    usage = await usage_doc(client)
    assert usage["used"] == 25 and usage["reserved"] == 0 and not usage.get("open")


async def test_a_chat_deleted_on_another_replica_drops_the_upstream_asked_beside_its_check(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A predicts the chat (its previous turn ran here) and asks the upstream beside the
    chat's authorization; B deleted the chat meanwhile: 404 as before, the upstream request
    closed unread."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("gone")
    chat_id = await new_chat(a, h)
    await collect(await send(a, chat_id, h, "q1"))
    assert (await b.delete(f"/api/chat/{chat_id}", headers=h)).status == 200
    store = a.app[STORE]
    store.begin_chat_turn = held_until(fake_openai.reached_gate, store.begin_chat_turn)
    fake_openai.default = Script(chunks=["never"], gate_after=0)
    refused = await send(a, chat_id, h, "q2")
    assert refused.status == 404
    assert (await refused.json())["error"]["code"] == "chat_not_found"
    assert len(fake_openai.requests) == 2
    await asyncio.wait_for(fake_openai.disconnected.wait(), HOLD_S)
    await settled(store.db, users=("gone",))
    usage = await usage_doc(a, "gone")
    assert usage["used"] == 25 and usage["reserved"] == 0 and not usage.get("open")


async def test_a_message_sent_on_another_replica_refuses_the_turn_asked_early_here(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The message gap holds across replicas: A's last send was long enough ago, so A expects
    the next and asks its upstream early; the user sent through B meanwhile, so A's reservation
    refuses (429 ``message_rate``, as before), and A's upstream request is closed unread."""
    settings = stream_settings(message_rate_limit_ms=2000)
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("roaming")
    here, there = await new_chat(a, h), await new_chat(a, h)
    await collect(await send(a, here, h, "q1"))
    await gap_passed(a, "roaming")
    fake_openai.scripts = [Script(), Script(chunks=["never"], gate_after=0)]
    await collect(await send(b, there, h, "q2"))  # B moves the gap
    store = a.app[STORE]
    store.reserve = held_until(fake_openai.reached_gate, store.reserve)
    refused = await send(a, here, h, "q3")
    assert refused.status == 429
    assert (await refused.json())["error"]["details"]["rule"] == "message_rate"
    assert len(fake_openai.requests) == 3  # A asked early
    await asyncio.wait_for(fake_openai.disconnected.wait(), HOLD_S)
    await settled(store.db, users=("roaming",))
    usage = await usage_doc(a, "roaming")
    assert usage["used"] == 2 * 25 and usage["reserved"] == 0 and not usage.get("open")


BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


async def lease_given_back(client) -> None:
    """Poll (with a deadline) until alice's idle lease went back (``LEASE_KEEP_S``)."""

    async def gone() -> bool:
        doc = await usage_doc(client)
        return doc is not None and not any(e.get("replica") for e in doc.get("open") or ())

    await eventually(gone, 10, "the idle lease given back")


async def after_a_lease(
    aiohttp_client, stream_settings, fake_openai, auth, **settings: Any
) -> tuple[Any, Any]:
    """A replica whose leases go back 0.1 s after their last turn, and alice's headers: she has
    had a program turn there (an admission it expects her next to pass), and its lease is gone."""
    client = await aiohttp_client(
        create_app(
            stream_settings(lease_idle_s=0.05, lease_keep_s=0.1, watch_interval_s=0.05, **settings)
        )
    )
    h = auth()
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    assert (await client.post("/v1/chat/completions", json=BODY, headers=h)).status == 200
    await lease_given_back(client)
    return client, h


async def test_a_program_turn_whose_lease_must_grow_asks_the_upstream_beside_the_growth(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """A program's turn after its lease went back (a minute after the previous, say) must ask
    MongoDB for a new one: it asks its upstream beside that growth, which is sent only once the
    upstream has the request (before, never: the upstream was asked after it)."""
    client, h = await after_a_lease(aiohttp_client, stream_settings, fake_openai, auth)
    store = client.app[STORE]
    store.take_lease = held_until(fake_openai.reached_gate, store.take_lease)
    fake_openai.default = Script(chunks=["c ", "d"], usage=(10, 2), gate_after=0)
    sending = asyncio.ensure_future(client.post("/v1/chat/completions", json=BODY, headers=h))
    await asyncio.wait_for(fake_openai.reached_gate.wait(), HOLD_S)
    assert len(fake_openai.requests) == 2 and not sending.done()
    fake_openai.gate.set()
    resp = await sending
    assert resp.status == 200
    body = await resp.read()
    frames = [orjson.loads(line[6:]) for line in body.split(b"\n\n") if line[6:7] == b"{"]
    text = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"])
    assert text == "c d" and body.endswith(b"data: [DONE]\n\n")
    await settled(store.db)
    await lease_given_back(client)
    usage = await usage_doc(client)
    assert usage["used"] == 2 * 12 and usage["reserved"] == 0


async def test_a_program_turn_refused_after_all_drops_the_upstream_it_asked(
    aiohttp_client, stream_settings, fake_openai, auth, token_for
):
    """The limit lowered by an operator after the lease went back: the growth refuses (429
    ``insufficient_quota``, as before), the upstream request asked beside it is closed unread
    and nothing is billed."""
    client, h = await after_a_lease(aiohttp_client, stream_settings, fake_openai, auth)
    admin = admin_headers(token_for)
    resp = await client.put("/api/admin/users/alice/limit", json={"limit": 12}, headers=admin)
    assert resp.status == 200, await resp.text()
    store = client.app[STORE]
    store.take_lease = held_until(fake_openai.reached_gate, store.take_lease)
    fake_openai.default = Script(chunks=["never"], gate_after=0)
    refused = await client.post("/v1/chat/completions", json=BODY, headers=h)
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "insufficient_quota"
    assert len(fake_openai.requests) == 2
    await asyncio.wait_for(fake_openai.disconnected.wait(), HOLD_S)
    await settled(store.db)
    usage = await usage_doc(client)
    assert usage["used"] == 12 and usage["reserved"] == 0


async def test_a_client_gone_mid_admission_makes_the_next_turn_ask_only_once_admitted(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """The second turn is reserved and asks its upstream early, but its client goes while its
    chat's authorization runs: the upstream request is dropped, and the user's next turn asks
    its upstream only once admitted (as after a refusal), so the requests nobody is billed for
    never outnumber the admissions. Before, each such send could ask once more."""
    client = await aiohttp_client(
        create_app(stream_settings()), server_kwargs={"handler_cancellation": True}
    )
    h = auth("leaving")
    chat_id = await new_chat(client, h)
    await collect(await send(client, chat_id, h, "q1"))  # admitted here, the chat predicted
    store = client.app[STORE]
    begin, reserve, release = store.begin_chat_turn, store.reserve, asyncio.Event()

    async def held_begin(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await begin(*args, **kwargs)

    store.begin_chat_turn = held_begin
    fake_openai.default = Script(chunks=["lost"], gate_after=0)
    sending = asyncio.ensure_future(send(client, chat_id, h, "q2"))
    await asyncio.wait_for(fake_openai.reached_gate.wait(), HOLD_S)  # asked early
    sending.cancel()  # the client goes while the chat's authorization is held
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    await asyncio.wait_for(fake_openai.disconnected.wait(), HOLD_S)  # dropped
    release.set()
    store.begin_chat_turn = begin
    await gap_passed(client, "leaving")
    asked_during_reservation: list[bool] = []
    fake_openai.reached_gate.clear()

    async def watched_reserve(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(TimeoutError):  # an early ask arrives within a second
            await asyncio.wait_for(fake_openai.reached_gate.wait(), 1.0)
        asked_during_reservation.append(fake_openai.reached_gate.is_set())
        return await reserve(*args, **kwargs)

    store.reserve = watched_reserve
    fake_openai.default = Script(chunks=["kept"], gate_after=0)
    fake_openai.gate.set()
    seen = await collect(await send(client, chat_id, h, "q3"))
    assert seen[-1]["event"] == "done"
    assert asked_during_reservation == [False]
    assert len(fake_openai.requests) == 3  # q1, q2's early request, q3 once admitted


async def test_a_burst_of_program_turns_asks_early_once_not_once_a_turn(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Eight sends at once as the lease must grow, two turns at once allowed: one asks its
    upstream beside the growth, the others once admitted. Before, every one asked early, and
    the upstream had a request for each turn refused (429, nobody billed for it)."""
    client, h = await after_a_lease(
        aiohttp_client, stream_settings, fake_openai, auth, max_concurrent_turns_per_user=2
    )
    fake_openai.gate.clear()
    fake_openai.default = Script(chunks=["x ", "y"], usage=(10, 2), gate_after=0)
    asked_before = len(fake_openai.requests)
    sends = [
        asyncio.ensure_future(client.post("/v1/chat/completions", json=BODY, headers=h))
        for _ in range(8)
    ]
    await asyncio.wait_for(fake_openai.reached_gate.wait(), HOLD_S)
    refused = []
    for done in asyncio.as_completed(sends):  # the refused answer while the others stream
        resp = await done
        if resp.status == 429:
            refused.append((await resp.json())["error"]["code"])
        else:
            assert resp.status == 200
            fake_openai.gate.set()
            await resp.read()
    admitted = 8 - len(refused)
    assert admitted >= 2 and set(refused) <= {"rate_limit_exceeded"}, refused
    assert len(fake_openai.requests) - asked_before <= admitted + 1, (
        len(fake_openai.requests) - asked_before,
        admitted,
    )
    await settled(client.app[STORE].db)


async def test_a_refused_early_turn_leaves_the_users_later_turns_free_to_ask_early(
    aiohttp_client, stream_settings, fake_openai, auth, token_for
):
    """A turn that asked early and was refused (429) has its admission's answer: the user's
    turns that follow it ask early again once one is admitted. Had the refusal left the user
    marked as asking, none of them would ever again (and the set would only grow)."""
    client, h = await after_a_lease(aiohttp_client, stream_settings, fake_openai, auth)
    admin = admin_headers(token_for)
    limit = "/api/admin/users/alice/limit"
    assert (await client.put(limit, json={"limit": 12}, headers=admin)).status == 200
    store = client.app[STORE]
    take = store.take_lease
    store.take_lease = held_until(fake_openai.reached_gate, take)
    fake_openai.default = Script(chunks=["never"], gate_after=0)
    refused = await client.post("/v1/chat/completions", json=BODY, headers=h)
    assert refused.status == 429 and len(fake_openai.requests) == 2  # it asked early
    store.take_lease = take
    assert (await client.put(limit, json={"limit": 10**6}, headers=admin)).status == 200
    fake_openai.default = Script(chunks=["a ", "b"], usage=(10, 2))
    fake_openai.reached_gate.clear()
    ok = await client.post("/v1/chat/completions", json=BODY, headers=h)  # asks once admitted
    assert ok.status == 200
    await ok.read()
    await lease_given_back(client)
    store.take_lease = held_until(fake_openai.reached_gate, take)
    fake_openai.gate.clear()
    fake_openai.default = Script(chunks=["c ", "d"], usage=(10, 2), gate_after=0)
    asked = len(fake_openai.requests)
    sending = asyncio.ensure_future(client.post("/v1/chat/completions", json=BODY, headers=h))
    await asyncio.wait_for(fake_openai.reached_gate.wait(), HOLD_S)
    assert len(fake_openai.requests) == asked + 1 and not sending.done()  # early again
    fake_openai.gate.set()
    resp = await sending
    assert resp.status == 200
    await resp.read()
    await settled(store.db)

"""A turn's live answer and its followers: text by offset (exact, in few pieces, multi-byte
characters counted as characters), what a follower that was busy gets when it comes back (all
that is new, in one event), several followers, keep-alives; and the registry: leaving never
stops a chat turn, the last follower of a stateless one stops it, and its wait for final writes
(a timeout gives up waiting, never the work)."""

from __future__ import annotations

import asyncio

from service.stream.events import PING, Delta, Done, Error, Final, Started
from service.stream.live import MAX_DELTA_CHARS, TEXT_BLOCK, LiveStream
from service.stream.registry import StreamRegistry

FINAL = Final("m", "complete", "finished", "stop", 1, 2, "upstream", 100, 97)


def live_stream(**kw) -> LiveStream:
    return LiveStream("m", kw.pop("chat_id", "c"), "u", "sse", "demo", **kw)


async def test_wait_idle_timing_out_leaves_final_writes_running():
    registry = StreamRegistry()
    release = asyncio.Event()

    async def finalize() -> str:
        await release.wait()  # a final record still being written
        return "written"

    task = asyncio.ensure_future(finalize())
    registry.track(task)
    assert await registry.wait_idle(timeout_s=0.05) is False
    assert not task.cancelled() and not task.done()
    release.set()
    assert await registry.wait_idle(timeout_s=5) is True
    assert task.result() == "written"


def test_a_live_stream_keeps_its_text_exactly_in_few_pieces():
    live = live_stream()
    deltas = [f"t{i} " for i in range(10 * TEXT_BLOCK + 3)]
    for n, text in enumerate(deltas, 1):
        live.add(text)
        assert live.text() == "".join(deltas[:n])
        assert live.length == len("".join(deltas[:n]))
    assert len(live.parts) == 10 + 3  # a block per TEXT_BLOCK deltas, the rest as they came


def test_text_since_any_offset_is_exact_with_multibyte_characters():
    live = live_stream()
    pieces = ["héllo ", "wörld ", "😀 ", "日本語 "] * 40 + ["x" * 5000, "end ✓"]
    for p in pieces:
        live.add(p)
    whole = "".join(pieces)
    assert live.length == len(whole)  # characters (code points), not bytes
    for offset in (0, 1, 5, 7, 100, len(whole) - 5000, len(whole) - 3, len(whole)):
        got, at = "", offset
        while at < live.length:  # a follower catching up, MAX_DELTA_CHARS at a time
            part = live.text_since(at)
            assert 0 < len(part) <= MAX_DELTA_CHARS
            got, at = got + part, at + len(part)
        assert got == whole[offset:]
    assert live.text() == whole  # catching up from far behind joins the pieces, same text


def test_grown_is_what_the_last_checkpoint_has_not_saved():
    live = live_stream()
    assert not live.grown()
    for _ in range(TEXT_BLOCK):  # the last one joins the pieces: fewer pieces, not less text
        live.add("ab")
    assert live.grown()
    live.saved = live.length  # what the watcher records after a checkpoint
    assert not live.grown()
    live.add("c")
    assert live.grown()


async def test_a_follower_gets_everything_new_in_one_event_then_the_end():
    registry = StreamRegistry()
    live = live_stream()
    follower = registry.follow(live, 0, "sse")
    assert await anext(follower) == Started("m", "c", "demo", 0)
    for text in ("a", "b", "c"):  # written while the follower was busy
        live.add(text)
    assert await anext(follower) == Delta("abc", 3)
    waiting = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing new: it waits for the notify
    live.add("d")
    assert await asyncio.wait_for(waiting, 1) == Delta("d", 4)
    live.end(FINAL)
    assert await anext(follower) == Done(FINAL, 4)
    assert [e async for e in follower] == []


async def test_publish_writes_from_the_turn_for_a_waiting_follower_or_wakes_it():
    registry = StreamRegistry()
    live = live_stream()
    taking, busy = registry.follow(live, 0, "sse"), registry.follow(live, 0, "ws")
    pushed: list[Delta] = []

    async def take(delta: Delta) -> bool:
        pushed.append(delta)
        return True

    async def refuse(delta: Delta) -> bool:
        return False  # its transport would have to wait: the client's own task writes

    taking.push, busy.push = take, refuse
    await anext(taking), await anext(busy)
    waiting = [asyncio.ensure_future(anext(f)) for f in (taking, busy)]
    await asyncio.sleep(0)
    live.append("ab")
    live.append("c")
    assert not any(w.done() for w in waiting)  # appended, not yet published
    await live.publish()
    assert pushed == [Delta("abc", 3)]  # written by the turn; that follower goes on waiting
    assert not waiting[0].done() and taking.offset == 3
    assert await asyncio.wait_for(waiting[1], 1) == Delta("abc", 3)
    waiting[1] = asyncio.ensure_future(anext(busy))
    await asyncio.sleep(0)
    await live.publish()  # a read that brought no text (a role or usage frame): nothing due
    assert not any(w.done() for w in waiting) and len(pushed) == 1
    live.append("d")
    await live.publish()  # both still wait for it
    assert pushed == [Delta("abc", 3), Delta("d", 4)]
    assert await asyncio.wait_for(waiting[1], 1) == Delta("d", 4)
    live.append("x" * (MAX_DELTA_CHARS + 1))
    await live.publish()  # more than a push carries: one written, then its own task catches up
    assert pushed[-1] == Delta("x" * MAX_DELTA_CHARS, 4 + MAX_DELTA_CHARS)
    assert await asyncio.wait_for(waiting[0], 1) == Delta("x", 5 + MAX_DELTA_CHARS)
    live.end(FINAL)
    assert await anext(taking) == Done(FINAL, 5 + MAX_DELTA_CHARS)


async def test_followers_from_different_offsets_see_the_same_text():
    registry = StreamRegistry()
    live = live_stream()
    live.add("0123456789")
    late = registry.follow(live, 4, "sse")
    early = registry.follow(live, 0, "ws")
    assert (await anext(late)).offset == 4 and (await anext(early)).offset == 0

    async def read(follower) -> str:
        return "".join([e.text async for e in follower if isinstance(e, Delta)])

    tasks = [asyncio.ensure_future(read(f)) for f in (late, early)]
    for text in ("ab", "cd"):
        await asyncio.sleep(0)
        live.add(text)
    live.end(FINAL)
    assert await asyncio.gather(*tasks) == ["456789abcd", "0123456789abcd"]


async def test_a_keepalive_is_asked_for_only_of_idle_followers_that_want_one():
    registry = StreamRegistry()
    live = live_stream()
    sse = registry.follow(live, 0, "sse", keepalive=True)
    ws = registry.follow(live, 0, "ws")
    await anext(sse), await anext(ws)
    waiting = [asyncio.ensure_future(anext(f)) for f in (sse, ws)]
    await asyncio.sleep(0)
    registry.ping()
    assert await asyncio.wait_for(waiting[0], 1) is PING
    assert not waiting[1].done()
    live.end(FINAL)
    assert isinstance(await asyncio.wait_for(waiting[1], 1), Done)


async def test_an_ended_failed_turn_ends_with_error():
    registry = StreamRegistry()
    live = live_stream()
    failed = Final("m", "failed", "upstream_error", "failed", 1, 0, "tokenizer", 9, 8, "x", "y")
    live.end(failed)
    follower = registry.follow(live, 0, "sse")
    assert [type(e) async for e in follower] == [Started, Error]


def test_leaving_never_stops_a_chat_turn_and_the_last_leaving_stops_a_stateless_one():
    registry = StreamRegistry()
    chat = live_stream()
    registry.add(chat)
    a, b = registry.follow(chat, 0, "sse"), registry.follow(chat, 0, "sse")
    registry.leave(a, "client_disconnect")
    registry.leave(b, "client_disconnect")
    assert chat.reason is None and chat.followers == 0  # detached: it goes on

    stateless = LiveStream("s", None, "u", "openai", "demo", cancel_when_alone=True)
    registry.add(stateless)
    a, b = registry.follow(stateless, 0, "openai"), registry.follow(stateless, 0, "openai")
    registry.leave(a, "client_disconnect")
    assert stateless.reason is None  # one still follows
    b.reason = "slow_client"
    registry.leave(b, "client_disconnect")
    assert stateless.reason == "slow_client"

    done = LiveStream("d", None, "u", "openai", "demo", cancel_when_alone=True)
    registry.add(done)
    done.finish_seen = True  # the answer is complete, only its usage is to come
    registry.leave(registry.follow(done, 0, "openai"), "client_disconnect")
    assert done.reason is None  # read on, so it is billed exactly

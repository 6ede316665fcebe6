"""The stream registry: its wait for finalizations (a timeout gives up waiting, never the work),
and a live stream's text (exact, in few pieces, and what a checkpoint has not saved yet)."""

from __future__ import annotations

import asyncio

from service.stream.registry import TEXT_BLOCK, LiveStream, StreamRegistry


async def test_wait_idle_timing_out_leaves_finalizations_running():
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
    live = LiveStream("m", None, "u", "sse")
    deltas = [f"t{i} " for i in range(10 * TEXT_BLOCK + 3)]
    for n, text in enumerate(deltas, 1):
        live.add(text)
        assert "".join(live.parts) == "".join(deltas[:n])
        assert live.length == len("".join(deltas[:n]))
    assert len(live.parts) == 10 + 3  # a block per TEXT_BLOCK deltas, the rest as they came


def test_grown_is_what_the_last_checkpoint_has_not_saved():
    live = LiveStream("m", None, "u", "sse")
    assert not live.grown()
    for _ in range(TEXT_BLOCK):  # the last one joins the pieces: fewer pieces, not less text
        live.add("ab")
    assert live.grown()
    live.saved = live.length  # what the watcher records after a checkpoint
    assert not live.grown()
    live.add("c")
    assert live.grown()

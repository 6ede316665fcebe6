"""The stream registry's wait for finalizations: a timeout gives up waiting, never the work."""

from __future__ import annotations

import asyncio

from service.stream.registry import StreamRegistry


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

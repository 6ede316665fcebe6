"""The shared write loop (service/transports/pump.py) at its edges: coalescing, a write that
stalls or fails while the producer waits on its upstream, cancels arriving meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from service.stream.events import Delta, Done, Final, Started
from service.stream.registry import LiveStream
from service.transports.pump import pump

FINAL = Final("m", "complete", "finished", "stop", 1, 1, "upstream", 10, 5)


class FakeResp:
    def __init__(self):
        self.writes = []
        self.block = None  # a future: writes wait for it
        self.fail = None  # an exception to raise

    async def write(self, data):
        if self.fail:
            raise self.fail
        self.writes.append(data)
        if self.block is not None:
            await self.block


class FakeTurn:
    """Like the producer: Started, batches from a queue (reading=True), our cancels absorbed."""

    def __init__(self, batches):
        self.live = LiveStream("m", None, "u", "sse")
        self.queue = asyncio.Queue()
        for b in batches:
            self.queue.put_nowait(b)
        self.log = []

    async def events(self):
        live = self.live
        live.task = asyncio.current_task()
        yield Started("m", None, "x")
        try:
            while live.reason is None:
                live.reading = True
                try:
                    batch = await self.queue.get()
                finally:
                    live.reading = False
                if batch is None:
                    break
                for t in batch:
                    yield Delta(t)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if live.reason is None or task.cancelling() > 1:
                self.log.append("finalized-cancel-propagate")
                raise
            task.uncancel()
            self.log.append(f"absorbed:{live.reason}")
        except GeneratorExit:
            await asyncio.sleep(0.01)  # finalization awaits
            self.log.append(f"closed:{live.reason}")
            raise
        await asyncio.sleep(0)  # finalization
        self.log.append("finalized")
        yield Done(FINAL)


def enc(ev):
    return (ev.name + (":" + ev.text if isinstance(ev, Delta) else "") + "|").encode()


async def test_coalesces_what_is_already_read():
    turn = FakeTurn([])
    resp = FakeResp()
    task = asyncio.ensure_future(pump(resp, turn, enc, 1))
    for batch in (["a", "b", "c"], ["d"], None):
        await asyncio.sleep(0.02)
        turn.queue.put_nowait(batch)
    await task
    assert resp.writes == [b"started|", b"delta:a|delta:b|delta:c|", b"delta:d|", b"done|"]
    assert turn.log == ["finalized"]


async def test_never_waits_to_batch():
    turn = FakeTurn([])
    turn.queue.put_nowait(["a"])
    resp = FakeResp()
    task = asyncio.ensure_future(pump(resp, turn, enc, 1))
    await asyncio.sleep(0.05)  # the producer now waits for the next read
    assert resp.writes == [b"started|delta:a|"]
    turn.queue.put_nowait(None)
    await task
    assert resp.writes[-1] == b"done|"


async def test_slow_client_while_producer_reads():
    turn = FakeTurn([["a"]])
    resp = FakeResp()
    resp.block = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(pump(resp, turn, enc, 0.1), 2)
    assert turn.live.reason == "slow_client"
    assert turn.log == ["absorbed:slow_client", "finalized"]  # stopped like a cancel


async def test_reset_while_producer_reads():
    turn = FakeTurn([["a"]])
    resp = FakeResp()
    resp.fail = ConnectionResetError()
    await pump(resp, turn, enc, 1)
    assert turn.live.reason == "client_disconnect"
    assert turn.log == ["absorbed:client_disconnect", "finalized"]


async def test_handler_cancelled_during_a_waiting_write():
    turn = FakeTurn([["a"]])
    resp = FakeResp()
    resp.block = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(pump(resp, turn, enc, 5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert turn.log == ["finalized-cancel-propagate"]  # finalized, the cancel goes on


async def test_cancel_aimed_at_the_read_waits_for_the_write():
    turn = FakeTurn([["a"]])
    resp = FakeResp()
    block = resp.block = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(pump(resp, turn, enc, 5))
    await asyncio.sleep(0.05)
    assert resp.writes == [b"started|delta:a|"]  # its write waits for the client
    turn.live.cancel("user_cancel")  # the producer is reading meanwhile
    await asyncio.sleep(0.05)
    assert not task.done()
    resp.block = None
    block.set_result(None)
    await asyncio.wait_for(task, 2)
    assert turn.log == ["absorbed:user_cancel", "finalized"]
    assert resp.writes[-1] == b"done|"

"""What every fault test checks once the fault is over: nothing lost, nothing leaked.

- no message left ``streaming`` (every turn got its final record);
- the month's ``reserved`` back to 0 and no open reservation;
- no live stream left in the registry, and the ``gateway_active_streams`` gauge back to where
  it was before the test;
- no ``Task exception was never retrieved`` (an exception that escaped a task nobody awaited).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.metrics import ACTIVE_STREAMS, MONGODB_SECONDS, TRANSPORTS
from service.store import utcnow
from service.stream.producer import period_of
from service.stream.registry import StreamRegistry

POLL_S = 0.02


def active_streams() -> float:
    return sum(ACTIVE_STREAMS.labels(t)._value.get() for t in TRANSPORTS)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def unretrieved_task_exceptions() -> Iterator[list[str]]:
    """Messages asyncio logged for task exceptions nobody retrieved (checked after a gc)."""
    handler = _Collect()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    found: list[str] = []
    try:
        yield found
    finally:
        gc.collect()
        logger.removeHandler(handler)
        found.extend(r.getMessage() for r in handler.records if "never retrieved" in r.getMessage())


async def settled(
    db: Any,
    *,
    registry: StreamRegistry | None = None,
    gauge_before: float | None = None,
    users: tuple[str, ...] = ("alice",),
    deadline_s: float = 15.0,
) -> None:
    """Wait (polling, with a deadline) until every turn of the database is final and every
    reservation released; then check the registry and the gauge."""
    end = time.monotonic() + deadline_s
    period = period_of(utcnow())
    while True:
        streaming = await db["messages"].count_documents({"status": "streaming"})
        usage = (
            await db["usage"]
            .find({"user_id": {"$in": list(users)}, "period": period})
            .to_list(None)
        )
        reserved = sum(int(u.get("reserved", 0)) for u in usage)
        open_ = sum(len(u.get("open", [])) for u in usage)
        live = len(registry.streams) if registry is not None else 0
        gauge_ok = gauge_before is None or active_streams() == gauge_before
        if not streaming and not reserved and not open_ and not live and gauge_ok:
            return
        if time.monotonic() > end:
            raise AssertionError(
                f"not settled after {deadline_s} s: {streaming} streaming, reserved {reserved}, "
                f"{open_} open reservations, {live} live streams, gauge {active_streams()} "
                f"(before {gauge_before})"
            )
        await asyncio.sleep(POLL_S)


def stalled_client(host: str, port: int, request: bytes) -> socket.socket:
    """A client that sends ``request`` and then never reads: a tiny receive buffer, so the
    server's writes fill it (and the kernel's send buffer) quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(request)
    return sock


def post_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def calls(operation: str) -> float:
    """How many times the store ran ``operation`` (its latency histogram's count)."""
    for metric in MONGODB_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels == {
                "operation": operation,
                "result": "ok",
            }:
                return sample.value
    return 0.0


async def rolled_up(db: Any, *, deadline_s: float = 15.0) -> None:
    """Wait (polling, with a deadline) until the rollup counts every ended answer: the replica
    writes the rollup's increments with its checkpoint round, not with each final write."""
    end = time.monotonic() + deadline_s
    while True:
        ended = await db["messages"].count_documents(
            {"role": "assistant", "status": {"$ne": "streaming"}}
        )
        counted = 0
        async for doc in db["usage_rollup"].find({"user_id": None}):
            counted += sum(int(c.get("turns", 0)) for c in (doc.get("lines") or {}).values())
        if counted == ended:
            return
        if time.monotonic() > end:
            raise AssertionError(f"rollup counts {counted} of {ended} ended answers")
        await asyncio.sleep(POLL_S)


def answers_lost(monkeypatch: Any, store: Any, method: str, asked: list[Any] | None = None) -> Any:
    """``store.<method>`` is applied, but its answer is lost on the way (a deadline passed,
    MongoDB went away): it raises ``StoreUnavailable`` after it took effect. What it is asked
    goes to ``asked``; the real method is returned (to put back with ``monkeypatch``)."""
    from service.errors import StoreUnavailable

    real = getattr(store, method)

    async def lost(req: Any) -> None:
        if asked is not None:
            asked.append(req)
        await real(req)
        raise StoreUnavailable("the database is unavailable; try again shortly")

    monkeypatch.setattr(store, method, lost)
    return real


async def cancelled_while_running(
    monkeypatch: Any, store: Any, method: str, start: Any
) -> asyncio.Future[Any]:
    """Run ``start()`` (a coroutine function) until it is inside ``store.<method>``, cancel it
    there (its client left), then let the command go on and take effect: the cancelled task."""
    real = getattr(store, method)
    release, running = asyncio.Event(), asyncio.Event()

    async def held(req: Any) -> Any:
        running.set()
        await release.wait()
        return await real(req)

    monkeypatch.setattr(store, method, held)
    task = asyncio.ensure_future(start())
    await running.wait()
    task.cancel()
    release.set()
    return task

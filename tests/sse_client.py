"""A small SSE reader for tests: yields events as they arrive, comments (heartbeats) included."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


async def events(resp: Any) -> AsyncIterator[dict[str, Any]]:
    buf = b""
    async for data in resp.content.iter_any():
        buf = (buf + data).replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            event: dict[str, Any] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    event["comment"] = line[1:].strip()
                    continue
                name, _, value = line.partition(": ")
                if name == "data":
                    event["data"] = json.loads(value)
                elif name in ("id", "event"):
                    event[name] = value
            yield event


async def collect(resp: Any) -> list[dict[str, Any]]:
    return [e async for e in events(resp) if "event" in e]


def text_of(evs: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in evs if e["event"] == "delta")


async def read_until(resp: Any, text: str) -> list[dict[str, Any]]:
    """The named events of ``resp`` up to the one whose text makes the answer ``text``."""
    seen: list[dict[str, Any]] = []
    async for ev in events(resp):
        seen += [ev] if "event" in ev else []
        if text_of(seen) == text:
            break
    return seen

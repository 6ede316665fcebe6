"""HTTP/1.1 over a bare socket, for requests no HTTP client will send (raw bytes in headers,
broken chunking, oversized lines) and for reading exactly what the server wrote back."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

READ_LIMIT_S = 5.0


@dataclass
class RawResponse:
    status: int
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names, last one wins
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def build(
    method: str,
    target: str | bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> bytes:
    """One request, ``Connection: close`` so the server ends the response by closing."""
    path = target if isinstance(target, bytes) else target.encode()
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers or []]
    if method in ("POST", "PUT", "PATCH") or body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send(host: str, port: int, data: bytes) -> RawResponse:
    """Write ``data``, read until the server closes, parse the one response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), READ_LIMIT_S)
    finally:
        writer.close()
    return parse(raw)


async def answer_without_close(host: str, port: int, data: bytes) -> RawResponse:
    """Write ``data`` (a request the server answers before it has read all of it) and read the
    one response by its Content-Length, without waiting for the server to close: it may go on
    reading what it will discard for a while first (aiohttp's lingering close)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_LIMIT_S)
        resp = parse(head)
        length = int(resp.headers.get("content-length", "0"))
        resp.body = await asyncio.wait_for(reader.readexactly(length), READ_LIMIT_S)
    finally:
        writer.close()
    return resp


def parse(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(status=int(status), version=version, headers=headers, body=body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)

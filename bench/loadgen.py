"""The bench's load generator: C concurrent streams over raw asyncio, one process of its own.

It speaks just enough HTTP/1.1 (keep-alive, chunked) and SSE to time each request: time to the
first delta (the first non-empty content chunk, or the first ``event: delta``), total time, the
number of deltas, and the error if any. The runner drives it through stdin/stdout:

    -> {"event": "ready"}        setup and warm-up are done (connections, chats, usage docs)
    <- go
    -> {"event": "all_live"}     (capacity mode) every stream has its first delta
    -> {"event": "results", ...} the per-request records, then it exits

    python -m bench.loadgen SPEC.json

The spec names the targets (``url``, ``kind``: ``openai`` | ``sse``, ``auth``), the model, the
concurrency, the schedule (``[[target, requests_per_worker], ...]``, with a barrier between
steps, so targets can be interleaved in one run), and the time limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

PROMPT = "Benchmark turn: answer with a few words about streaming gateways, please."
MARKERS = {  # (a delta, the normal end, an error) in a complete event
    "openai": (b'"delta":{"content":', b"data: [DONE]", b'data: {"error"'),
    "sse": (b"event: delta\n", b"event: done\n", b"event: error\n"),
}
HEAD, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, BODY, DONE = range(7)


class Response:
    """Parses one HTTP/1.1 response incrementally and times its SSE events."""

    __slots__ = (
        "body",
        "buf",
        "chunked",
        "chunks",
        "end",
        "error",
        "fut",
        "keep",
        "kind",
        "on_first",
        "remaining",
        "state",
        "status",
        "tail",
        "ttft_at",
    )

    def __init__(self, kind: str | None, fut: asyncio.Future[None]) -> None:
        self.kind = kind  # None: keep the body (a JSON answer)
        self.fut = fut
        self.buf = b""
        self.state = HEAD
        self.status = 0
        self.chunked = False
        self.remaining = 0
        self.body: list[bytes] = []
        self.tail = b""
        self.chunks = 0
        self.ttft_at = 0.0
        self.end = False
        self.error: str | None = None
        self.keep = True
        self.on_first: Any = None  # called once, at the first delta

    def feed(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        while pos < n or self.state == DONE:
            state = self.state
            if state == CHUNK_DATA:
                take = min(self.remaining, n - pos)
                self._body(buf[pos : pos + take], now)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = CHUNK_END
            elif state == CHUNK_SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(buf[pos:i].split(b";", 1)[0], 16)
                pos = i + 2
                self.remaining = size
                self.state = CHUNK_DATA if size else TRAILER
            elif state == CHUNK_END:
                if n - pos < 2:
                    break
                pos += 2
                self.state = CHUNK_SIZE
            elif state == TRAILER:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                self.state = DONE if i == pos else TRAILER
                pos = i + 2
            elif state == BODY:
                take = min(self.remaining, n - pos)
                self._body(buf[pos : pos + take], now)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = DONE
            elif state == HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                self._head(buf[pos:i])
                pos = i + 4
            else:  # DONE
                self._finish()
                break
        self.buf = buf[pos:]

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                self.keep = False
        if self.chunked:
            self.state = CHUNK_SIZE
        elif length:
            self.state, self.remaining = BODY, length
        elif length == 0:
            self.state = DONE
        else:
            self.state, self.keep = BODY, False  # until the connection closes
            self.remaining = 1 << 62
        if self.status >= 300:
            self.error = f"http_{self.status}"

    def _body(self, data: bytes, now: float) -> None:
        if self.kind is None or self.status >= 300:
            self.body.append(data)
            return
        data = self.tail + data if self.tail else data
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.tail = data
            return
        events, self.tail = data[:cut], data[cut + 2 :]
        delta, end, error = MARKERS[self.kind]
        found = events.count(delta)
        if found:
            if not self.chunks:
                self.ttft_at = now
                if self.on_first is not None:
                    self.on_first()
            self.chunks += found
        if end in events:
            self.end = True
        if error in events:
            self.error = "stream_error"

    def _finish(self) -> None:
        if self.kind is not None and not self.end and self.error is None:
            self.error = "truncated"
        if not self.fut.done():
            self.fut.set_result(None)

    def lost(self, exc: BaseException | None) -> None:
        if self.state == BODY and not self.keep:
            self._finish()
            return
        if self.error is None:
            self.error = "disconnected"
        if not self.fut.done():
            self.fut.set_result(None)


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.resp is not None:
            self.resp.feed(data, time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            self.resp.lost(exc)


@dataclass
class Target:
    name: str
    host: str
    port: int
    kind: str  # openai | sse
    auth: bool

    @classmethod
    def of(cls, name: str, spec: dict[str, Any]) -> Target:
        url = urlsplit(spec["url"])
        return cls(name, url.hostname or "127.0.0.1", url.port or 80, spec["kind"], spec["auth"])


@dataclass
class Worker:
    index: int
    token: str | None
    conns: dict[str, Conn] = field(default_factory=dict)
    chats: dict[str, str] = field(default_factory=dict)


class LoadGen:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.targets = {n: Target.of(n, t) for n, t in spec["targets"].items()}
        self.model: str = spec["model"]
        self.timeout_s: float = spec.get("request_timeout_s", 120)
        self.records: dict[str, list[list[Any]]] = {n: [] for n in self.targets}
        self.steps: list[dict[str, Any]] = []
        secret = spec.get("jwt_secret")
        prefix = spec.get("user_prefix", "bench")
        users = spec.get("users") or spec["concurrency"]  # workers share users round-robin
        tokens = [_token(secret, f"{prefix}-u{i}") if secret else None for i in range(users)]
        self.workers = [Worker(i, tokens[i % users]) for i in range(spec["concurrency"])]
        self.chats: dict[tuple[str | None, str], str] = {}  # (token, target): a user's chat

    async def connect(self, worker: Worker, target: Target) -> Conn:
        conn = worker.conns.get(target.name)
        if conn is None or conn.closed:
            _, conn = await self.loop.create_connection(Conn, target.host, target.port)
            worker.conns[target.name] = conn
        return conn

    async def request(
        self,
        worker: Worker,
        target: Target,
        path: str,
        body: bytes,
        kind: str | None,
        on_first: Any = None,
    ) -> tuple[Response, float]:
        conn = await self.connect(worker, target)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        )
        if target.auth and worker.token:
            head += f"Authorization: Bearer {worker.token}\r\n"
        if kind is not None:
            head += "Accept: text/event-stream\r\n"
        fut = self.loop.create_future()
        resp = conn.resp = Response(kind, fut)
        resp.on_first = on_first
        assert conn.transport is not None
        started = time.perf_counter()
        conn.transport.write(head.encode() + b"\r\n" + body)
        try:
            async with asyncio.timeout(self.timeout_s):
                await fut
        except TimeoutError:
            resp.error = "timeout"
            conn.transport.abort()
        conn.resp = None
        if not resp.keep and conn.transport is not None:
            conn.transport.close()
        return resp, started

    async def chat(self, worker: Worker, target: Target, model: str) -> None:
        """An SSE target's turns go to a stored chat: one per user (workers may share users)."""
        if target.kind != "sse" or target.name in worker.chats:
            return
        key = (worker.token, target.name)
        if key not in self.chats:
            body = orjson.dumps({"title": "bench", "model": model})
            resp, _ = await self.request(worker, target, "/api/chat", body, None)
            if resp.error:
                raise RuntimeError(f"creating a chat failed: {resp.error} {b''.join(resp.body)!r}")
            self.chats[key] = orjson.loads(b"".join(resp.body))["chat_id"]
        worker.chats[target.name] = self.chats[key]

    async def turn(
        self, worker: Worker, target: Target, model: str, on_first: Any = None
    ) -> list[Any]:
        if target.kind == "sse":
            path = f"/api/chat/{worker.chats[target.name]}/message"
            body = orjson.dumps({"message": PROMPT, "model": model})
        else:
            path = "/v1/chat/completions"
            body = orjson.dumps(
                {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
        try:
            resp, started = await self.request(worker, target, path, body, target.kind, on_first)
        except OSError as exc:
            return [None, 0.0, 0, f"connect: {type(exc).__name__}"]
        total = (time.perf_counter() - started) * 1000
        ttft = (resp.ttft_at - started) * 1000 if resp.chunks else None
        return [ttft, total, resp.chunks, resp.error]

    # ---------------------------------------------------------------- phases
    async def setup(self) -> None:
        names = [name for name, _ in self.spec["schedule"]]
        probe = self.spec.get("probe")
        sem = asyncio.Semaphore(64)  # setup must not be its own load test

        async def one(worker: Worker) -> None:
            async with sem:
                for name in dict.fromkeys(names):
                    target = self.targets[name]
                    await self.chat(worker, target, self.model)
                    for _ in range(self.spec.get("warmup", 1)):
                        await self.turn(worker, target, self.model)
                if self.spec.get("capacity"):  # streams open their connection when measured
                    for conn in worker.conns.values():
                        if conn.transport is not None:
                            conn.transport.close()
                    worker.conns.clear()

        await asyncio.gather(*(one(w) for w in self.workers))
        if probe:
            self.prober = Worker(-1, self.workers[0].token)
            target = self.targets[probe["target"]]
            await self.chat(self.prober, target, probe["model"])
            await self.turn(self.prober, target, probe["model"])

    async def run_schedule(self) -> None:
        stagger = self.spec.get("stagger_s", 0.0)  # spread the starts: steady concurrency
        for name, per_worker in self.spec["schedule"]:
            target = self.targets[name]
            started = time.perf_counter()

            async def work(worker: Worker, target: Target = target, n: int = per_worker) -> None:
                await asyncio.sleep(stagger * worker.index / len(self.workers))
                for _ in range(n):
                    self.records[target.name].append(await self.turn(worker, target, self.model))

            await asyncio.gather(*(work(w) for w in self.workers))
            wall = time.perf_counter() - started
            self.steps.append({"target": name, "wall_s": wall, "requests": per_worker})

    async def run_capacity(self) -> dict[str, Any]:
        """Every worker opens one long stream; once all are live, probe TTFT under that load."""
        (name, _), probe = self.spec["schedule"][0], self.spec.get("probe")
        target = self.targets[name]
        live = asyncio.Event()
        first = [0]
        count = len(self.workers)
        records = self.records[name]
        started = time.perf_counter()

        def arrived() -> None:
            first[0] += 1
            if first[0] == count:
                live.set()

        stagger = self.spec.get("stagger_s", 0.0)

        async def stream(worker: Worker) -> None:
            await asyncio.sleep(stagger * worker.index / count)
            record = await self.turn(worker, target, self.model, arrived)
            if record[0] is None:  # failed before its first delta: it will never be live
                arrived()
            records.append(record)

        tasks = [asyncio.ensure_future(stream(w)) for w in self.workers]
        probes: list[list[Any]] = []
        ramp_s = None
        try:
            async with asyncio.timeout(self.spec.get("ramp_limit_s", 60)):
                await live.wait()
            ramp_s = time.perf_counter() - started
        except TimeoutError:
            pass
        _emit({"event": "all_live", "ramp_s": ramp_s, "live": first[0]})
        if probe:
            ptarget = self.targets[probe["target"]]
            for _ in range(probe["count"]):
                probes.append(await self.turn(self.prober, ptarget, probe["model"]))
        await asyncio.gather(*tasks)
        self.steps.append({"target": name, "wall_s": time.perf_counter() - started})
        return {"probes": probes, "ramp_s": ramp_s}


def _token(secret: str, user: str) -> str:
    from service.auth import mint_token
    from service.settings import load_settings

    return mint_token(load_settings(jwt_secret=secret, environment="production"), user, ttl_s=3600)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.flush()


async def main_async(spec: dict[str, Any]) -> None:
    gen = LoadGen(spec)
    async with asyncio.timeout(spec.get("setup_limit_s", 120)):
        await gen.setup()
    _emit({"event": "ready"})
    line = await gen.loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    extra: dict[str, Any] = {}
    try:
        async with asyncio.timeout(spec.get("time_limit_s", 300)):
            if spec.get("capacity"):
                extra = await gen.run_capacity()
            else:
                await gen.run_schedule()
    except TimeoutError:  # bounded in time: report what finished, the rest as time_limit
        extra["timed_out"] = True
        if spec.get("capacity"):
            name = spec["schedule"][0][0]
            missing = len(gen.workers) - len(gen.records[name])
            gen.records[name] += [[None, 0.0, 0, "time_limit"]] * missing
    for worker in gen.workers:
        for conn in worker.conns.values():
            if conn.transport is not None:
                conn.transport.close()
    _emit({"event": "results", "records": gen.records, "steps": gen.steps, **extra})


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        spec = orjson.loads(f.read())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(spec))


if __name__ == "__main__":
    main()

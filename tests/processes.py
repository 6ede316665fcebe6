"""Real service processes for tests: ``python -m service serve`` as a subprocess.

What only a real process shows: its own signal handling (SIGTERM, SIGINT, a second signal), its
exit code, what it does when it is killed (SIGKILL leaves a stream ``streaming``), and that two
processes sharing one database agree on every rule. Each process gets the session SecantusDB,
the test's database, a fake upstream running in the test's event loop, short intervals, and
writes its JSON log lines (stdout and stderr) to a file the test can wait on and assert against.
``ServiceProcesses.close`` kills whatever is still running, so no test leaves a process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from service.settings import Settings
from tests.conftest import TEST_MODELS, TEST_SECRET
from tests.mongo_server import free_port
from tests.sse_client import events as sse_events
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[1]
START_DEADLINE_S = 30.0
POLL_S = 0.02


def service_env(
    *, mongodb_uri: str, mongodb_db: str, upstream_url: str, port: int, **overrides: Any
) -> dict[str, str]:
    """The process environment: ours, without any of the service's own settings inherited from
    the caller's shell, plus test defaults (fast intervals, no page rate limit); ``overrides`` use
    setting names in any case (``drain_timeout_s=2`` or ``DRAIN_TIMEOUT_S="2"``)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    values: dict[str, Any] = {
        "HOST": "127.0.0.1",
        "PORT": port,
        "ENVIRONMENT": "production",
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DB": mongodb_db,
        "MONGODB_TIMEOUT_MS": 1500,
        "JWT_SECRET": TEST_SECRET,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "MODELS": json.dumps(TEST_MODELS),
        "DEFAULT_MODEL": "gpt-test",
        "OPENAI_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "sk-upstream-secret",
        "UPSTREAM_RETRY_BASE_S": 0.01,
        "UPSTREAM_RETRY_MAX_S": 0.05,
        "MESSAGE_RATE_LIMIT_MS": 0,
        "WATCH_INTERVAL_S": 0.1,
        "LEASE_IDLE_S": 0.1,
        "LEASE_KEEP_S": 0.1,
        "CHECKPOINT_INTERVAL_S": 0.1,
        "STALE_STREAM_S": 1.5,
        "REAPER_INTERVAL_S": 0.5,
        "DRAIN_TIMEOUT_S": 3,
    }
    values.update({k.upper(): v for k, v in overrides.items()})
    env.update({k: str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they are written
    return env


class ServiceProcess:
    """One ``python -m service serve``; its output goes to ``log_path``."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    def spawn(self) -> None:
        with self.log_path.open("ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                env=self.env,
                cwd=self.log_path.parent,  # no stray .env from the repository
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def wait_healthy(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Poll /healthz until it answers 200; fail at once if the process exits."""
        end = time.monotonic() + deadline_s
        async with aiohttp.ClientSession() as http:
            while True:
                if self.returncode is not None:
                    raise AssertionError(f"{self.name} exited ({self.returncode}):\n{self.tail()}")
                try:
                    async with http.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > end:
                    raise AssertionError(
                        f"{self.name} not healthy in {deadline_s} s:\n{self.tail()}"
                    )
                await asyncio.sleep(POLL_S)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send(self, sig: signal.Signals) -> float:
        """Send a signal; returns the monotonic time it was sent."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(sig)
        return time.monotonic()

    async def wait_exit(self, deadline_s: float) -> int:
        """Wait (off the loop, so fake upstreams keep serving) for the exit code."""
        assert self.proc is not None
        try:
            return await asyncio.to_thread(self.proc.wait, deadline_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {deadline_s} s later:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL if still running, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    # ------------------------------------------------------------------ logs
    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def lines(self) -> list[dict[str, Any]]:
        """Every complete JSON log line so far (anything else, e.g. a traceback, is skipped)."""
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line still being written
        return out

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.lines()
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_for_log(
        self, event: str, deadline_s: float = 10.0, **match: Any
    ) -> dict[str, Any]:
        """The first log line ``event`` with the ``match``ed fields, polling with a deadline."""
        end = time.monotonic() + deadline_s
        while not (found := self.events(event, **match)):
            if time.monotonic() > end:
                raise AssertionError(f"no {event} {match} from {self.name}:\n{self.tail()}")
            await asyncio.sleep(POLL_S)
        return found[0]


class ServiceProcesses:
    """Starts service processes for one test and kills the leftovers in ``close``."""

    def __init__(self, *, mongodb_uri: str, mongodb_db: str, upstream_url: str, workdir: Path):
        self.mongodb_uri = mongodb_uri
        self.mongodb_db = mongodb_db
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.procs: list[ServiceProcess] = []

    async def start(self, *names: str, **overrides: Any) -> list[ServiceProcess]:
        """Start one process per name (in parallel, same settings, own port); wait for all."""
        started = []
        for name in names:
            port = free_port()
            while port in {p.port for p in self.procs}:
                port = free_port()
            env = service_env(
                mongodb_uri=self.mongodb_uri,
                mongodb_db=self.mongodb_db,
                upstream_url=self.upstream_url,
                port=port,
                **overrides,
            )
            proc = ServiceProcess(name, env, self.workdir / f"{name}.log")
            self.procs.append(proc)
            proc.spawn()
            started.append(proc)
        await asyncio.gather(*(p.wait_healthy() for p in started))
        return started

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


async def wait_until(
    predicate: Callable[[], object], deadline_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true, failing after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline_s} s")
        await asyncio.sleep(POLL_S)


async def eventually(
    probe: Callable[[], Awaitable[bool]], deadline_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll an async ``probe`` (an HTTP call, a query) until it is true, with a deadline."""
    end = time.monotonic() + deadline_s
    while not await probe():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline_s} s")
        await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------------------- clients
class SseTurn:
    """An SSE answer read in the background, so the test can act while it streams."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None  # the connection broke (a killed server)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in sse_events(self.resp):
                if "event" in event:
                    self.events.append(event)
        except (aiohttp.ClientError, ConnectionError) as exc:
            self.error = exc
        finally:
            self.resp.release()

    @property
    def message_id(self) -> str:
        return str(self.events[0]["data"]["message_id"])

    @property
    def text(self) -> str:
        return "".join(e["data"]["text"] for e in self.events if e["event"] == "delta")

    @property
    def terminal(self) -> dict[str, Any] | None:
        last = self.events[-1] if self.events else None
        return last if last is not None and last["event"] in ("done", "error") else None

    async def wait_text(self, text: str, deadline_s: float = 10.0) -> None:
        """Until the answer so far is ``text`` (deltas come as the client reads, so several
        upstream chunks may arrive as one)."""
        await wait_until(lambda: len(self.text) >= len(text), deadline_s, f"text {text!r}")
        assert self.text == text, (self.text, text)

    async def finished(self, deadline_s: float = 10.0) -> dict[str, Any] | None:
        """Wait for the end of the response; its terminal event (None if the connection broke)."""
        await asyncio.wait_for(asyncio.shield(self.task), deadline_s)
        return self.terminal


async def open_sse(http: aiohttp.ClientSession, chat_id: str, message: str = "Hi") -> SseTurn:
    resp = await http.post(f"/api/chat/{chat_id}/message", json={"message": message})
    if resp.status != 200:
        body = await resp.text()
        resp.release()
        raise AssertionError(f"turn refused: {resp.status} {body}")
    return SseTurn(resp)


class WsClient:
    """A WebSocket read in the background: every frame, and the close code at the end."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(msg.data))

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def of(self, turn_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("id") == turn_id]

    def text(self, turn_id: str) -> str:
        return "".join(f["text"] for f in self.of(turn_id) if f["type"] == "delta")

    def terminal(self, turn_id: str) -> dict[str, Any] | None:
        mine = [f for f in self.of(turn_id) if f["type"] in ("done", "error")]
        return mine[-1] if mine else None

    async def send(self, turn_id: str, chat_id: str, message: str = "Hi") -> None:
        await self.ws.send_json(
            {"type": "send", "id": turn_id, "chat_id": chat_id, "message": message}
        )

    async def wait_text(self, turn_id: str, text: str, deadline_s: float = 10.0) -> None:
        """Until turn ``turn_id``'s answer so far is ``text``."""
        await wait_until(
            lambda: len(self.text(turn_id)) >= len(text), deadline_s, f"text {text!r} of {turn_id}"
        )
        assert self.text(turn_id) == text, (self.text(turn_id), text)

    async def wait_terminal(self, turn_id: str, deadline_s: float = 10.0) -> dict[str, Any]:
        await wait_until(lambda: self.terminal(turn_id), deadline_s, f"end of {turn_id}")
        frame = self.terminal(turn_id)
        assert frame is not None
        return frame

    async def closed(self, deadline_s: float = 10.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self.task), deadline_s)
        return self.close_code


async def open_ws(http: aiohttp.ClientSession) -> WsClient:
    client = WsClient(await http.ws_connect("/api/ws"))
    await wait_until(lambda: client.frames, 5.0, "the ready frame")
    assert client.frames[0]["type"] == "ready"
    return client


def session(svc: ServiceProcess, token: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=svc.url, headers={"Authorization": f"Bearer {token}"})


async def new_chat(http: aiohttp.ClientSession) -> str:
    async with http.post("/api/chat", json={}) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["chat_id"])


async def start_behind_proxy(
    services: Any, mongo_port: int, name: str, **overrides: Any
) -> tuple[Any, TcpProxy]:
    """Start replica ``name`` reaching MongoDB (on ``mongo_port``) only through a proxy that
    can cut it off (``proxy.cut()``), while the replicas started after it reach it directly;
    the caller closes the proxy."""
    proxy = TcpProxy("127.0.0.1", mongo_port)
    await proxy.start()
    shared = services.mongodb_uri
    services.mongodb_uri = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
    try:
        (replica,) = await services.start(name, **overrides)
    except BaseException:
        await proxy.close()
        raise
    finally:
        services.mongodb_uri = shared
    return replica, proxy

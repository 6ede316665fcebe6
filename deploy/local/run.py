#!/usr/bin/env python3
"""`make run`: SecantusDB on loopback plus the service; no keys, no network.

- Unless MONGODB_URI is set, starts ``secantusd-py`` as a separate process on a free loopback
  port with its data under ``.data/mongo`` (``DATA_DIR``; git-ignored), so chats survive a
  restart.
- Starts ``python -m service serve`` with ENVIRONMENT=local (a development JWT key is created in
  ``.data`` and kept) and the offline demo model, on HOST:PORT (127.0.0.1:8080 unless set:
  ``make run PORT=8081``). A port already taken stops it before anything starts, with the
  advice to set PORT. Its console log is coloured only on a terminal (``make run > file``: none).
- A data folder another ``make run`` uses (its SecantusDB holds ``mongo``) is said as such, with
  the advice to stop that one or set DATA_DIR.
- Ctrl-C (or SIGTERM) stops the service first, then the database, and waits for both.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from service.listen import AddressInUse, check_listen_address
from service.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What WiredTiger says when another process holds the data directory (its lock file).
HELD_BY_ANOTHER = "already being managed by another process"


class DataDirInUse(Exception):
    """Another SecantusDB (another ``make run``'s) holds the data directory."""


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], log: Path, since: int = 0, deadline_s: float = 30.0
) -> None:
    """Until SecantusDB listens on ``port``; its early exit is said, and why when it is the
    data directory another process holds (what it wrote to ``log`` from offset ``since``)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            with log.open("rb") as f:
                f.seek(since)
                if HELD_BY_ANOTHER in f.read().decode(errors="replace"):
                    raise DataDirInUse
            raise SystemExit(f"SecantusDB exited early (code {proc.returncode}); see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"SecantusDB did not start listening within 30 s; see {log}")


def start_mongo(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (data / "mongo").mkdir(parents=True, exist_ok=True)
    with (data / "mongo.log").open("ab") as log:
        since = log.tell()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "deploy" / "local" / "secantusd.py"),  # secantusd-py, with a fix
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--storage-path",
                str(data / "mongo"),
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_port(port, proc, data / "mongo.log", since)
    return proc, f"mongodb://127.0.0.1:{port}/"


def stop(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def listen_problem(host: str, port: str) -> str | None:
    """The service's own check (``service/listen.py``), before the banner and the database."""
    if not port.isdigit():
        return None  # not a port: the service names PORT itself
    try:
        check_listen_address(host, int(port))
    except AddressInUse:
        return (
            f"port {port} is in use on {host}; set PORT to a free one "
            f"(e.g. make run PORT={free_port_after(host, int(port))})"
        )
    except SettingsError as exc:
        return f"chat-gateway: {exc}"
    return None


def free_port_after(host: str, port: int) -> int:
    for candidate in range(port + 1, min(port + 100, 65536)):
        try:
            check_listen_address(host, candidate)
        except SettingsError:
            continue
        return candidate
    return free_port()


def data_dir_in_use(env: dict[str, str]) -> str:
    data = env["DATA_DIR"]
    return (
        f"{data}/mongo is in use by another `make run` (its SecantusDB holds the folder): stop "
        f"that one, or give this one a data folder of its own (its own chats and development "
        f"key): make run PORT={env['PORT']} DATA_DIR={data.rstrip('/')}/2"
    )


def banner(env: dict[str, str]) -> None:
    url = f"http://{env.get('HOST', '127.0.0.1')}:{env.get('PORT', '8080')}"
    print(
        f"\n  chat-gateway (local mode) on {url}  (open it in a browser: the chat page)\n"
        f"  MongoDB: {env['MONGODB_URI']}  (data in {env['DATA_DIR']})\n"
        "  get a token:  make token user=alice\n"
        "  try:         TOKEN=$(make -s token user=alice)\n"
        f'               curl -s -X POST -H "Authorization: Bearer $TOKEN" {url}/api/chat\n'
        "  Ctrl-C stops the service and the database.\n",
        flush=True,
    )


def main() -> int:
    env = dict(os.environ)
    env.setdefault("ENVIRONMENT", "local")
    env.setdefault("HOST", "127.0.0.1")
    env.setdefault("PORT", "8080")
    env.setdefault("DATA_DIR", ".data")  # relative to the repository, where the service runs
    env.setdefault("DEV_TOKEN_ENDPOINT", "true")  # the page at / gets a local token by itself
    env.setdefault("LOG_FORMAT", "console")  # readable; coloured only on a terminal
    problem = listen_problem(env["HOST"], env["PORT"])
    if problem:
        print(problem, file=sys.stderr)
        return 2
    mongo = None
    if not env.get("MONGODB_URI"):
        try:
            mongo, env["MONGODB_URI"] = start_mongo(ROOT / env["DATA_DIR"])
        except DataDirInUse:
            print(data_dir_in_use(env), file=sys.stderr)
            return 2
    service = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        banner(env)
        # Own session: a terminal's Ctrl-C reaches us only, and we stop the children in order.
        service = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], env=env, cwd=ROOT, start_new_session=True
        )
        while service.poll() is None:
            try:
                service.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
        return 0 if stopping else (service.returncode or 0)
    finally:
        stop(service, signal.SIGINT)
        stop(mongo)


if __name__ == "__main__":
    raise SystemExit(main())

"""`make run`: PORT passes through make, a taken port is said before anything starts, and its
console log written to a file carries no colour codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp

from tests.mongo_server import free_port
from tests.processes import ROOT, eventually

# The test's interpreter instead of .venv's, and no `install` step: the suite runs installed.
MAKE_RUN = ["make", "-s", "-o", "install", "run", f"PY={sys.executable}"]


def run_until_it_exits(port: int, data_dir: object) -> subprocess.CompletedProcess[str]:
    """`make run PORT=port` with ``data_dir`` as its DATA_DIR, expected to stop by itself."""
    return subprocess.run(
        [*MAKE_RUN, f"PORT={port}"],
        cwd=ROOT,
        env=local_env(DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def local_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "MONGODB_URI")}
    return {**keep, "PYTHONUNBUFFERED": "1", **extra}


def test_a_taken_port_is_said_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_until_it_exits(port, tmp_path)
    assert out.returncode != 0
    assert out.stdout == ""  # no banner for a port it cannot have, no database started
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"port {port} is in use on 127.0.0.1; set PORT to a free one")
    assert "(e.g. make run PORT=" in first
    assert not (tmp_path / "mongo").exists()


async def test_make_run_port_serves_there_and_writes_no_colour_to_a_file(
    mongo_server, db_name, tmp_path
):
    port = free_port()
    log_path = tmp_path / "run.log"
    env = local_env(MONGODB_URI=mongo_server.uri, MONGODB_DB=db_name, DATA_DIR=str(tmp_path))
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *MAKE_RUN,
            f"PORT={port}",
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C's process group: make, run.py
        )
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                assert proc.returncode is None, log_path.read_text()
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(healthy, 30, "the service on PORT")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: make itself then ends by SIGINT too
        assert await asyncio.wait_for(proc.wait(), 30) in (0, -signal.SIGINT)
    text = log_path.read_text()
    assert f"on http://127.0.0.1:{port}" in text  # the banner
    assert "service.listening" in text and "service.stopped" in text
    assert "\x1b[" not in text


def test_a_data_folder_another_make_run_holds_is_said_as_such(tmp_path):
    """A second `make run` on the same DATA_DIR: its SecantusDB cannot have the folder another
    one holds. Said plainly, with what to do, not only 'exited early; see mongo.log'."""
    from tests.mongo_server import MongoServer

    other = MongoServer(storage=tmp_path / "mongo")  # the first make run's database
    other.start()
    try:
        port = free_port()
        out = run_until_it_exits(port, tmp_path)
    finally:
        other.close()
    assert out.returncode != 0
    assert out.stdout == ""  # no banner: the service was never started
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"{tmp_path}/mongo is in use by another `make run`"), out.stderr
    assert f"make run PORT={port} DATA_DIR={tmp_path}/2" in first
    assert "Traceback" not in out.stderr

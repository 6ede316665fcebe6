"""A throwaway SecantusDB process on a free loopback port (the service never imports it)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# secantusd-py, with the fix in deploy/local/secantusd.py (its findAndModify scans otherwise)
SECANTUSD = [sys.executable, str(Path(__file__).resolve().parents[1] / "deploy/local/secantusd.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MongoServer:
    """Start/stop/restart a SecantusDB server; ``uri`` stays the same across restarts."""

    def __init__(self, *, durable: bool = False, storage: Path | None = None) -> None:
        # durable: every commit synced, so a SIGKILL loses no acknowledged write (as a real
        # replica set with w: majority would not); slower, for the tests that stop or kill it.
        self.durable = durable
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="secantus-"))
        self.storage = storage or self.dir / "data"  # its data (a make run's own, to hold it)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        with (self.dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *SECANTUSD,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--storage-path",
                    str(self.storage),
                    "--log-level",
                    "WARNING",
                    *(["--sync-on-commit"] if self.durable else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"SecantusDB exited: {(self.dir / 'server.log').read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("SecantusDB did not start in 30 s")

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it is not gone in 5 s (SecantusDB sometimes ignores a SIGTERM
        that comes just after its start for 15 s; a durable server loses nothing either way)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def hang(self) -> None:
        """SIGSTOP, returning once every thread of it has stopped (state ``T``): the signal is
        delivered a moment after it is sent, and a command sent meanwhile could be answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rpartition(")")[2].split()[0] != "T":
            if time.monotonic() > deadline:
                raise RuntimeError("SecantusDB did not stop in 10 s")
            time.sleep(0.001)

    def unhang(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the database dies mid-operation (same port and data path on ``start``)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Gone with its data: killed, not stopped (SecantusDB takes ~2 s over a SIGTERM, and
        nothing of a throwaway server's is kept)."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

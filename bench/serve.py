"""``python -m service serve``, plus what the bench needs to see inside the process.

- pymongo command monitoring: every command the service sends is counted by name and
  collection; ``SIGUSR1`` writes the counts (with a sequence number) to ``BENCH_MONGO_COUNTS``;
- ``BENCH_UVLOOP=1`` installs uvloop's event-loop policy first (the loop experiment only);
- ``BENCH_TRACEMALLOC=1``: ``SIGUSR2`` writes the allocation sites grown since start-up.

The service's own code runs unchanged: this calls ``service.cli.main(["serve"])``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from pymongo import monitoring

from service.store import REPLICA_WORK


class CommandCounter(monitoring.CommandListener):
    """Commands by ``name:collection``, and the time they took (round trip, microseconds)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.micros: Counter[str] = Counter()
        self.keys: dict[int, str] = {}
        self.failures = 0
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        target = event.command.get(name)
        key = f"{name}:{target}" if isinstance(target, str) else name
        if event.command.get("comment") == REPLICA_WORK:
            key += " (replica)"  # the watcher's, not a turn's: see bench.run.ops_per_turn
        with self._lock:
            self.counts[key] += 1
            self.keys[event.request_id] = key

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self._lock:
            key = self.keys.pop(event.request_id, event.command_name)
            self.micros[key] += event.duration_micros

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        with self._lock:
            self.keys.pop(event.request_id, None)
            self.failures += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "counts": dict(self.counts),
                "micros": dict(self.micros),
                "failed": self.failures,
            }


def main() -> int:
    counter = CommandCounter()
    monitoring.register(counter)  # before the service creates its client
    out = os.environ.get("BENCH_MONGO_COUNTS")
    seq = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal seq
        if not out:
            return
        seq += 1
        tmp = Path(out + ".tmp")
        tmp.write_bytes(orjson.dumps({"seq": seq, **counter.snapshot()}))
        tmp.replace(out)

    signal.signal(signal.SIGUSR1, dump)
    if os.environ.get("BENCH_TRACEMALLOC") == "1":  # --tracemalloc: where live memory is
        import tracemalloc

        tracemalloc.start(1)
        baseline = [tracemalloc.take_snapshot()]

        def memory(_signum: int, _frame: FrameType | None) -> None:
            """What was allocated since the previous signal (or since start), by line."""
            snapshot = tracemalloc.take_snapshot()
            lines = snapshot.compare_to(baseline[0], "lineno")
            files = snapshot.compare_to(baseline[0], "filename")
            baseline[0] = snapshot

            def top(stats: list[tracemalloc.StatisticDiff], n: int) -> list[dict[str, Any]]:
                return [
                    {"where": str(s.traceback), "kb": s.size_diff / 1024, "count": s.count_diff}
                    for s in stats[:n]
                ]

            tasks = Counter(
                getattr(t.get_coro(), "__qualname__", "?") for t in list(asyncio.tasks._all_tasks)
            )
            summary = {
                "tasks": dict(tasks.most_common(20)),
                "total_kb": sum(s.size_diff for s in files) / 1024,
                "blocks": sum(s.count_diff for s in files),
                "files": top(files, 40),
                "lines": top(lines, 200),
            }
            Path(out + ".memory.json").write_bytes(orjson.dumps(summary))

        signal.signal(signal.SIGUSR2, memory)
    if os.environ.get("BENCH_UVLOOP") == "1":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from service.cli import main as service_main

    return service_main(["serve"])


if __name__ == "__main__":
    sys.exit(main())

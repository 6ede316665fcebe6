"""The bench runner: starts every process, runs the scenarios, prints the table, writes the JSON.

    python -m bench            # make bench: all four scenarios (~8.5 minutes on 2 cores)
    python -m bench --quick    # make bench-quick: a reduced set (under a minute)

Processes (all on 127.0.0.1, each in its own session, all stopped in a ``finally``):
SecantusDB (in memory; or a MongoDB of yours, ``--mongodb-uri``), the fake upstream, the thin
relay, the service (``bench.serve``:
``python -m service serve`` with command monitoring) and one load generator per measured phase.
Every figure is measured in the same run, so each can be a ratio: the service against going
direct to the upstream and against the thin relay. Scenarios interleave the targets (request by
request at C=1, burst by burst above it, run by run where CPU time is measured), so the noise of a
shared 2-core machine lands on all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.analytics import scenario_analytics
from bench.report import ROUTES, TARGETS, derive, table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"
PY = sys.executable
SECRET = "bench-secret-" + "x" * 48


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_port(self, deadline_s: float = 30) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited early ({self.popen.returncode}); see logs")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {self.port} within {deadline_s} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: it and its children
            self.popen.wait()


def cpu_s(pid: int) -> float:
    """CPU time of a process (all its threads), in seconds, with nanosecond resolution."""
    total = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except OSError:  # no schedstat: utime + stime, in clock ticks
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_s(pid: int) -> float:
    """CPU time of the main thread alone: the event loop's (the MongoDB driver's work included
    since PyMongo's asyncio client, finding 38)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    import aiohttp

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def database(uri: str | None) -> dict[str, Any]:
    """What the service's database is: the bench's own SecantusDB, or the server ``uri`` names
    (its version; never the URI, which may hold a password)."""
    if not uri:
        return {"server": "SecantusDB", "own": True}
    from pymongo import MongoClient

    with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        info = client.server_info()
    if "secantusVersion" in info:  # SecantusDB says MongoDB's version it speaks, and its own
        return {"server": f"SecantusDB {info['secantusVersion']}", "own": False}
    return {"server": f"MongoDB {info.get('version', '?')}", "own": False}


# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    quick: bool
    latency_c: tuple[int, ...]
    latency_rounds: dict[int, int]  # C -> rounds of (one burst per target)
    latency_requests: dict[int, int]  # C -> requests per worker per burst
    cost_rounds: int
    cost_requests: int  # per worker, C=50, N=200
    turn_rounds: int
    turn_requests: int  # per worker, C=50, N=1
    capacity: list[tuple[str, int]]  # (target, C)
    hold_s: float  # capacity: how long every stream stays live once all are
    latency_stagger_s: float  # C > 1: spread the starts, for steady concurrency (not one burst)
    budget_s: float

    @classmethod
    def ramp_s(self, target: str, c: int) -> float:
        """Starts spread over this long: what MongoDB (SecantusDB here) can take, see the docs."""
        return max(1.0, c / RAMP_PER_S[target])

    def stream_n(self, target: str, c: int) -> int:
        """Chunks (1 s apart) per capacity stream: live through the whole ramp, then hold_s."""
        return int(self.ramp_s(target, c) + self.hold_s) + 2

    def slow_models(self) -> list[str]:
        return sorted({model(self.stream_n(t, c), 1000) for t, c in self.capacity})

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                quick=True,
                latency_c=(1, 50),
                latency_rounds={1: 2, 50: 1},
                latency_requests={1: 1, 50: 1},
                cost_rounds=1,
                cost_requests=1,
                turn_rounds=1,
                turn_requests=1,
                capacity=[("openai", 200)],
                hold_s=3,
                latency_stagger_s=0.5,
                budget_s=58,
            )
        return cls(
            quick=False,
            latency_c=(1, 50, 200),
            latency_rounds={1: 15, 50: 2, 200: 1},
            latency_requests={1: 1, 50: 3, 200: 2},
            cost_rounds=2,
            cost_requests=3,
            turn_rounds=1,
            turn_requests=6,
            capacity=[("relay", 5000), ("openai", 5000), ("sse", 2000)],
            hold_s=15,
            latency_stagger_s=1.0,
            budget_s=600,
        )


RAMP_PER_S = {"direct": 500, "relay": 500, "openai": 80, "sse": 50}  # stream starts per second


def model(n: int, d_ms: int, first_ms: int = 0) -> str:
    return f"n{n}-d{d_ms}-f{first_ms}" if first_ms else f"n{n}-d{d_ms}"


LATENCY_MODEL = model(50, 20)
# The same with 20 ms to the first token (any real model takes longer): what runs beside the
# upstream's opening (the records' insert) is hidden, as it is in use (``C=1+f20``, no target).
FIRST_TOKEN_MODEL = model(50, 20, 20)
COST_MODEL = model(200, 0)
TURN_MODEL = model(1, 0)
PROBE_MODEL = model(2, 0)


# --------------------------------------------------------------------------- the bench
@dataclass
class Bench:
    plan: Plan
    uvloop: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))
    procs: dict[str, Proc] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    phase_no: int = 0
    profile_dir: Path | None = None  # --profile: py-spy the relaying process in each CPU phase
    lookup_index: bool = False
    mongo_uri: str = ""
    db: str = "bench"
    tracemalloc: bool = False
    phase_tag: str = ""
    db_rtt_ms: float = 0.0  # --db-rtt-ms: the service reaches SecantusDB through bench.netdelay
    external_mongo: str = ""  # --mongodb-uri: that server, not a SecantusDB of the bench's own

    def logfile(self, name: str) -> Any:
        return (self.workdir / f"{name}.log").open("ab")

    def spawn(
        self, name: str, args: list[str], port: int, env: dict[str, str] | None = None
    ) -> Proc:
        with self.logfile(name) as log:
            popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.procs[name] = Proc(name, popen, port)
        proc.wait_port()
        return proc

    def start_mongo(self) -> None:
        if self.external_mongo:
            return
        port = free_port()
        args = [
            PY,
            str(ROOT / "deploy" / "local" / "secantusd.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            ":memory:",
        ]
        self.spawn("mongo", [*args, "--log-level", "WARNING"], port)

    def fresh_database(self, db: str = "bench", **extra: str) -> None:
        """A new SecantusDB and a new service process: SecantusDB slows down as it accumulates
        writes, so each scenario (and each capacity run) starts from an empty one. On a server
        of the operator's (``--mongodb-uri``), the database the last phase used is dropped."""
        service = self.procs.pop("service", None)
        if service is not None:
            service.stop(signal.SIGINT)
        if self.external_mongo:
            self.drop_database()
        else:
            self.procs.pop("mongo").stop()
            self.start_mongo()
        self.start_service(db, **extra)

    def drop_database(self) -> None:
        """``--mongodb-uri``: drop the database the bench used (named ``bench*``: its own)."""
        from pymongo import MongoClient

        if self.mongo_uri and self.db.startswith("bench"):
            with MongoClient(self.mongo_uri, serverSelectionTimeoutMS=5000) as client:
                client.drop_database(self.db)

    def start(self) -> None:
        self.start_mongo()
        models = ",".join(self.models())
        up = free_port()
        self.spawn(
            "upstream", [PY, "-m", "bench.upstream", "--port", str(up), "--models", models], up
        )
        relay = free_port()
        upstream_url = f"http://127.0.0.1:{up}"
        self.spawn(
            "relay",
            [PY, "-m", "bench.relay", "--port", str(relay), "--upstream", upstream_url],
            relay,
        )
        self.start_service()

    def models(self) -> list[str]:
        return [
            LATENCY_MODEL,
            FIRST_TOKEN_MODEL,
            COST_MODEL,
            TURN_MODEL,
            PROBE_MODEL,
            *self.plan.slow_models(),
        ]

    def start_service(self, db: str = "bench", **extra: str) -> None:
        old = self.procs.pop("service", None)
        if old is not None:
            old.stop(signal.SIGINT)
        port = free_port()
        direct = self.external_mongo or f"mongodb://127.0.0.1:{self.procs['mongo'].port}/"
        uri = self.network(direct) if self.db_rtt_ms else direct
        models = [
            {"name": m, "provider": "openai", "upstream_id": m, "encoding": "o200k_base",
             "context_window": 128000, "max_output_tokens": 4096}
            for m in self.models()
        ]  # fmt: skip
        env = {
            **os.environ,
            "ENVIRONMENT": "production",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "MONGODB_URI": uri,
            "MONGODB_DB": db,
            "JWT_SECRET": SECRET,
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "json",
            "MESSAGE_RATE_LIMIT_MS": "0",
            "V1_REQUESTS_PER_MINUTE": "0",
            "MAX_CONCURRENT_TURNS_PER_USER": "0",
            "DEFAULT_TOKEN_LIMIT": str(10**12),
            "MAX_CHATS_PER_USER": str(10**6),
            "MODELS": json.dumps(models),
            "DEFAULT_MODEL": LATENCY_MODEL,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.procs['upstream'].port}/v1",
            "OPENAI_API_KEY": "bench",
            "UPSTREAM_POOL_SIZE": "20000",  # the default (1000) would queue capacity's streams
            "DRAIN_TIMEOUT_S": "2",
            "BENCH_MONGO_COUNTS": str(self.workdir / "mongo-counts.json"),
            "BENCH_UVLOOP": "1" if self.uvloop else "0",
            "BENCH_TRACEMALLOC": "1" if self.tracemalloc else "0",
            **extra,
        }
        self.mongo_uri, self.db = direct, db  # the bench's own reads: not through the delay
        if self.external_mongo:
            self.drop_database()  # what a run stopped before its end left in it
        (self.workdir / "mongo-counts.json").unlink(missing_ok=True)  # a new process counts anew
        if self.lookup_index:
            self.add_lookup_index(env["MONGODB_URI"], db)
        self.spawn("service", [PY, "-m", "bench.serve"], port, env)

    def network(self, direct: str) -> str:
        """A delaying relay to the current SecantusDB (``bench.netdelay``); its URI."""
        old = self.procs.pop("mongo-net", None)
        if old is not None:
            old.stop()
        port = free_port()
        target = f"127.0.0.1:{self.procs['mongo'].port}"
        args = [PY, "-m", "bench.netdelay", "--port", str(port), "--target", target]
        self.spawn("mongo-net", [*args, "--rtt-ms", str(self.db_rtt_ms)], port)
        return f"mongodb://127.0.0.1:{port}/?directConnection=true"  # not the member it names

    def clear_messages(self) -> None:
        """Every phase starts with no messages stored, so that no figure depends on what ran
        before it: the SSE route's context query scans the collection (see docs/performance.md).
        """
        from pymongo import MongoClient

        with MongoClient(self.mongo_uri, serverSelectionTimeoutMS=5000) as client:
            client[self.db]["messages"].delete_many({})

    @staticmethod
    def add_lookup_index(uri: str, db: str) -> None:
        """--lookup-index: the experiment for store.py's context query (see docs/performance.md).

        ``chat_seq`` is partial (stateless turns have no chat), so the planner cannot use it for
        ``{chat_id, seq}`` lookups and scans the collection; a plain index next to it can be.
        """
        from pymongo import ASCENDING, DESCENDING, MongoClient

        with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
            client[db]["messages"].create_index(
                [("chat_id", ASCENDING), ("seq", DESCENDING)], name="bench_chat_seq_lookup"
            )

    def stop_all(self) -> None:
        if self.external_mongo:
            service = self.procs.pop("service", None)
            if service is not None:
                service.stop(signal.SIGINT)
            with contextlib.suppress(Exception):  # the run's figures matter more than the tidy-up
                self.drop_database()
        for name in ("service", "relay", "upstream", "mongo-net", "mongo"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop(signal.SIGINT if name == "service" else signal.SIGTERM)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.procs[name].port}"

    def targets(self) -> dict[str, dict[str, Any]]:
        return {
            "direct": {"url": self.url("upstream"), "kind": "openai", "auth": False},
            "relay": {"url": self.url("relay"), "kind": "openai", "auth": False},
            "sse": {"url": self.url("service"), "kind": "sse", "auth": True},
            "openai": {"url": self.url("service"), "kind": "openai", "auth": True},
        }

    def left_s(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def memory_top(self) -> dict[str, Any]:
        """The service's allocations since the previous call (tracemalloc): total, by file, by
        line."""
        path = self.workdir / "mongo-counts.json.memory.json"
        path.unlink(missing_ok=True)
        os.kill(self.procs["service"].pid, signal.SIGUSR2)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError):
                return dict(orjson.loads(path.read_bytes()))
            time.sleep(0.2)
        return {}

    def mongo_counts(self) -> dict[str, dict[str, int]]:
        path = self.workdir / "mongo-counts.json"
        before = orjson.loads(path.read_bytes())["seq"] if path.exists() else 0
        os.kill(self.procs["service"].pid, signal.SIGUSR1)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError):
                data = orjson.loads(path.read_bytes())
                if data["seq"] > before:
                    return {"counts": data["counts"], "micros": data["micros"]}
            time.sleep(0.005)
        raise RuntimeError("the service did not dump its MongoDB command counts")

    def profilers(self, watch: str | None) -> list[subprocess.Popen[bytes]]:
        """py-spy the relaying process (and, for the service, the database) during a phase."""
        if self.profile_dir is None or watch not in ("service", "relay"):
            return []
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy", path=str(Path(PY).parent)) or "py-spy"
        procs = []
        watched = (watch, "mongo") if watch == "service" else (watch,)
        for name in (n for n in watched if n in self.procs):  # no "mongo": --mongodb-uri
            out = self.profile_dir / f"{self.phase_tag}-{self.phase_no}-{name}.txt"
            args = [spy, "record", "-p", str(self.procs[name].pid), "-r", "250", "--gil"]
            with self.logfile("py-spy") as log:
                procs.append(
                    subprocess.Popen(
                        [*args, "-f", "raw", "-o", str(out)], stdout=log, stderr=subprocess.STDOUT
                    )
                )
        time.sleep(0.3)  # attached before the load starts
        return procs

    # ------------------------------------------------------------------ one measured phase
    def phase(
        self,
        *,
        schedule: list[list[Any]],
        concurrency: int,
        model_name: str,
        watch: str | None = None,
        warmup: int = 1,
        capacity: bool = False,
        users: int | None = None,
        stagger_s: float = 0.0,
        probe: dict[str, Any] | None = None,
        time_limit_s: float = 240,
        request_timeout_s: float = 120,
    ) -> dict[str, Any]:
        """Run one load generator; measure ``watch``'s CPU (and RSS) between go and results."""
        self.phase_no += 1
        if any(t in ROUTES for t, _ in schedule):
            self.clear_messages()
        spec = {
            "targets": self.targets(),
            "model": model_name,
            "concurrency": concurrency,
            "schedule": schedule,
            "warmup": warmup,
            "capacity": capacity,
            "users": users or concurrency,
            "stagger_s": stagger_s,
            "probe": probe,
            "jwt_secret": SECRET,
            "user_prefix": f"p{self.phase_no}",
            "time_limit_s": time_limit_s,
            "request_timeout_s": request_timeout_s,
            "ramp_limit_s": time_limit_s,
        }
        spec_path = self.workdir / f"spec-{self.phase_no}.json"
        spec_path.write_bytes(orjson.dumps(spec))
        service = "service" in self.procs and any(t in ROUTES for t, _ in schedule)
        pid = self.procs[watch].pid if watch else None
        with self.logfile("loadgen") as log:
            gen = subprocess.Popen(
                [PY, "-m", "bench.loadgen", str(spec_path)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        out: dict[str, Any] = {}
        samples: list[tuple[float, int]] = []
        stop_sampling = threading.Event()
        killer = threading.Timer(time_limit_s + 150, gen.kill)  # setup limit + run limit + slack
        killer.start()
        try:
            assert gen.stdin is not None and gen.stdout is not None
            line = gen.stdout.readline()
            if not line:
                raise RuntimeError(f"loadgen failed during setup; see {self.workdir}/loadgen.log")
            assert orjson.loads(line)["event"] == "ready"
            counts0 = self.mongo_counts() if service else {}
            cpu0 = cpu_s(pid) if pid else 0.0
            main0 = main_thread_cpu_s(pid) if pid else 0.0
            all0 = {n: cpu_s(p.pid) for n, p in self.procs.items()}
            rss0 = rss_kb(pid) if pid else 0
            if self.tracemalloc and watch == "service":
                self.memory_top()  # the next one: what the load allocated, not the startup
            if pid and capacity:

                def sample() -> None:
                    while not stop_sampling.wait(0.25):
                        with contextlib.suppress(OSError):
                            samples.append((time.monotonic(), rss_kb(pid)))

                threading.Thread(target=sample, daemon=True).start()
            spies = self.profilers(watch)
            t0 = time.monotonic()
            gen.stdin.write(b"go\n")
            gen.stdin.flush()
            while True:
                line = gen.stdout.readline()
                if not line:
                    raise RuntimeError(f"loadgen died; see {self.workdir}/loadgen.log")
                msg = orjson.loads(line)
                if msg["event"] == "all_live":
                    out["all_live"] = msg
                    if pid:
                        time.sleep(0.5)  # let the last streams' first writes settle
                        out["rss_live_kb"] = rss_kb(pid)
                    if self.tracemalloc and watch == "service":
                        out["memory_top"] = self.memory_top()
                elif msg["event"] == "results":
                    break
            wall = time.monotonic() - t0
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait(30)
            out.update(msg)
            out["wall_s"] = wall
            out["cpu_all_s"] = {n: cpu_s(p.pid) - all0.get(n, 0) for n, p in self.procs.items()}
            if pid:
                out["cpu_s"] = cpu_s(pid) - cpu0
                out["cpu_main_thread_s"] = main_thread_cpu_s(pid) - main0
                out["rss0_kb"] = rss0
                out["rss_peak_kb"] = max([rss0, *(r for _, r in samples)])
            if service:
                counts1 = self.mongo_counts()
                for key, name in (("counts", "mongo"), ("micros", "mongo_us")):
                    a, b = counts0.get(key, {}), counts1[key]
                    out[name] = {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0)}
            gen.wait(10)
        finally:
            stop_sampling.set()
            killer.cancel()
            if gen.poll() is None:
                gen.kill()
                gen.wait()
        return out


# --------------------------------------------------------------------------- scenarios
def ok(records: list[list[Any]]) -> list[list[Any]]:
    return [r for r in records if r[3] is None]


def errors(records: list[list[Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r[3] is not None:
            out[r[3]] = out.get(r[3], 0) + 1
    return out


def _sum_errors(parts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def ttft_stats(records: list[list[Any]]) -> dict[str, Any]:
    ttfts = [r[0] for r in records if r[0] is not None]
    return {
        "n": len(records),
        "errors": errors(records),
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p99_ms": pct(ttfts, 99),
        "total_p50_ms": pct([r[1] for r in ok(records)], 50),
        "chunks_p50": pct([float(r[2]) for r in ok(records)], 50),
    }


REPLICA_MARK = " (replica)"  # bench.serve's suffix for the replica's own commands


def ops_per_turn(
    mongo: dict[str, int],
    turns: int,
    micros: dict[str, int] | None = None,
    wall_s: float | None = None,
) -> dict[str, Any]:
    """A turn's MongoDB commands, apart from the replica's own (the watcher's cancel polls,
    heartbeats, checkpoints and reaper queries: ``comment`` ``gateway:replica``), which do not
    grow with the turns; those are given per second of the phase."""
    micros = micros or {}
    own = {k: v for k, v in mongo.items() if not k.endswith(REPLICA_MARK)}
    replica = {k[: -len(REPLICA_MARK)]: v for k, v in mongo.items() if k.endswith(REPLICA_MARK)}
    return {
        "ops_per_turn": round(sum(own.values()) / turns, 2) if turns else None,
        "by_command": {k: round(v / turns, 3) for k, v in sorted(own.items())} if turns else {},
        "replica_ops": dict(sorted(replica.items())),
        "replica_ops_per_s": round(sum(replica.values()) / wall_s, 2) if wall_s else None,
        "ms_per_op": {k: round(micros.get(k, 0) / v / 1000, 3) for k, v in sorted(mongo.items())},
        "mongo_ms_per_turn": (
            round(sum(micros.get(k, 0) for k in own) / turns / 1000, 2) if turns else None
        ),
    }


def scenario_latency(bench: Bench) -> dict[str, Any]:
    """1. N=50, D=20 ms at C = 1, 50, 200: TTFT p50/p99 and the overhead over direct; and
    at C=1 again with 20 ms to the first token (``C=1+f20``)."""
    plan, out = bench.plan, {}
    runs = [(f"C={c}", c, LATENCY_MODEL) for c in plan.latency_c]
    runs.insert(1, ("C=1+f20", 1, FIRST_TOKEN_MODEL))
    for name, c, model_name in runs:
        reqs = plan.latency_requests[c]
        schedule = [[t, reqs] for _ in range(plan.latency_rounds[c]) for t in TARGETS]
        res = bench.phase(
            schedule=schedule,
            concurrency=c,
            model_name=model_name,
            stagger_s=0 if c == 1 else plan.latency_stagger_s,
        )
        stats = {t: ttft_stats(res["records"][t]) for t in TARGETS}
        direct = stats["direct"]
        for t in TARGETS:
            s = stats[t]
            for p in ("p50", "p99"):
                if s[f"ttft_{p}_ms"] is not None and direct[f"ttft_{p}_ms"] is not None:
                    s[f"overhead_{p}_ms"] = s[f"ttft_{p}_ms"] - direct[f"ttft_{p}_ms"]
        relay_over = stats["relay"].get("overhead_p50_ms")
        for t in ROUTES:
            over = stats[t].get("overhead_p50_ms")
            if over is not None and relay_over:
                stats[t]["overhead_vs_relay"] = over / relay_over if relay_over > 0 else None
        turns = sum(len(res["records"][t]) for t in ROUTES)
        mongo = ops_per_turn(res.get("mongo", {}), turns, res.get("mongo_us"), res["wall_s"])
        out[name] = {"targets": stats, "mongo": mongo}
        print(f"  latency {name}: done ({res['wall_s']:.1f} s)", flush=True)
    return out


def _cpu_runs(
    bench: Bench, model_name: str, rounds: int, reqs: int, n_chunks: int
) -> dict[str, Any]:
    """One run per target and round (interleaved), each with its own CPU window."""
    watch = {"direct": "upstream", "relay": "relay", "sse": "service", "openai": "service"}
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
    for _ in range(rounds):
        for t in TARGETS:
            res = bench.phase(
                schedule=[[t, reqs]], concurrency=50, model_name=model_name, watch=watch[t]
            )
            records = res["records"][t]
            runs[t].append(
                {
                    "requests": len(records),
                    "ok": len(ok(records)),
                    "errors": errors(records),
                    "chunks": sum(r[2] for r in records),
                    "cpu_s": res["cpu_s"],
                    "wall_s": res["wall_s"],
                    "mongo": res.get("mongo", {}),
                    "mongo_us": res.get("mongo_us", {}),
                    "cpu_all_s": res["cpu_all_s"],
                    "cpu_main_thread_s": res["cpu_main_thread_s"],
                }
            )
    out: dict[str, Any] = {}
    for t in TARGETS:
        rs = runs[t]
        requests = sum(r["ok"] for r in rs)
        cpu = sum(r["cpu_s"] for r in rs)
        chunks = sum(r["chunks"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        per_run = [r["cpu_s"] * 1e6 / max(1, r["ok"] * n_chunks) for r in rs]
        mongo: dict[str, int] = {}
        mongo_us: dict[str, int] = {}
        for r in rs:
            for k, v in r["mongo"].items():
                mongo[k] = mongo.get(k, 0) + v
            for k, v in r["mongo_us"].items():
                mongo_us[k] = mongo_us.get(k, 0) + v
        out[t] = {
            "measured_process": watch[t],
            "requests": sum(r["requests"] for r in rs),
            "errors": _sum_errors([r["errors"] for r in rs]),
            "cpu_us_per_chunk": cpu * 1e6 / max(1, requests * n_chunks),
            "cpu_us_per_chunk_runs": per_run,
            "cpu_ms_per_request": cpu * 1e3 / max(1, requests),
            "main_thread_share": sum(r["cpu_main_thread_s"] for r in rs) / cpu if cpu else None,
            "requests_per_cpu_s": requests / cpu if cpu else None,
            # upstream chunks relayed: the service coalesces what one client write can carry,
            # so the deltas a client counts are fewer than the chunks relayed
            "chunks_per_s": requests * n_chunks / wall if wall else None,
            "deltas_per_s": chunks / wall if wall else None,
            "requests_per_s": requests / wall if wall else None,
            "cpu_all_ms_per_request": {
                n: sum(r["cpu_all_s"].get(n, 0) for r in rs) * 1e3 / max(1, requests)
                for n in rs[0]["cpu_all_s"]
            },
            **(ops_per_turn(mongo, requests, mongo_us, wall) if t in ROUTES else {}),
        }  # fmt: skip
    return out


def scenario_relay_cost(bench: Bench) -> dict[str, Any]:
    """2. N=200, D=0 at C=50: CPU-us per relayed chunk and chunks/s, against the thin relay."""
    plan = bench.plan
    out = _cpu_runs(bench, COST_MODEL, plan.cost_rounds, plan.cost_requests, 200)
    for t in ROUTES:
        out[t]["ratio_to_relay"] = out[t]["cpu_us_per_chunk"] / out["relay"]["cpu_us_per_chunk"]
    print("  relay cost: done", flush=True)
    return out


def scenario_turn_cost(bench: Bench) -> dict[str, Any]:
    """3. N=1 at C=50: turns/s per core, CPU per turn, MongoDB operations per turn."""
    plan = bench.plan
    out = _cpu_runs(bench, TURN_MODEL, plan.turn_rounds, plan.turn_requests, 1)
    print("  per-turn cost: done", flush=True)
    return out


# Capacity runs measure the gateway process, so the one database cost that must grow with the
# number of live streams is taken out: checkpoints (one bulk write per second of every stream
# whose text grew; SecantusDB takes ~0.8 ms per document of it, 4 s a second at 5,000 streams).
# No checkpoint within a stream's life; the watcher otherwise runs with its defaults.
CAPACITY_ENV = {"CHECKPOINT_INTERVAL_S": "600"}


def scenario_capacity(bench: Bench) -> dict[str, Any]:
    """4. C long, slow streams (D=1 s): RSS per live stream, errors, TTFT while loaded."""
    plan, out = bench.plan, {}
    watch = {"direct": "upstream", "relay": "relay", "sse": "service", "openai": "service"}
    for target, c in plan.capacity:
        ramp, n = plan.ramp_s(target, c), plan.stream_n(target, c)
        if bench.left_s() < n + (8 if plan.quick else 40):
            out[f"{target}@{c}"] = {"skipped": "time budget"}
            continue
        if target in ROUTES:  # a fresh process (its RSS growth is these streams' alone), and db
            bench.fresh_database(f"bench_capacity_{target}_{c}", **CAPACITY_ENV)
        elif target == "relay":
            relay = bench.procs.pop("relay")
            relay.stop()
            port = free_port()
            url = f"http://127.0.0.1:{bench.procs['upstream'].port}"
            args = [PY, "-m", "bench.relay", "--port", str(port), "--upstream", url]
            bench.spawn("relay", args, port)
        res = bench.phase(
            schedule=[[target, 1]],
            concurrency=c,
            users=max(1, c // 10),
            model_name=model(n, 1000),
            watch=watch[target],
            warmup=0,
            capacity=True,
            stagger_s=ramp,
            probe={"target": target, "model": PROBE_MODEL, "count": 10},
            time_limit_s=ramp + n + 90,  # the last stream starts at ramp and lasts n s
            request_timeout_s=n + 60,  # a stream lasts n s (past 120 s from ~8,000 streams)
        )
        records = res["records"][target]
        live = res["rss_live_kb"] - res["rss0_kb"] if "rss_live_kb" in res else None
        peak = res["rss_peak_kb"] - res["rss0_kb"]
        probes = [r[0] for r in res.get("probes", []) if r[0] is not None]
        out[f"{target}@{c}"] = {
            "target": target,
            "concurrency": c,
            "measured_process": watch[target],
            "streams": len(records),
            "errors": errors(records),
            "all_live": bool(res.get("all_live", {}).get("ramp_s")),
            "ramp_s": res.get("all_live", {}).get("ramp_s"),
            "rss_idle_mib": res["rss0_kb"] / 1024,
            "rss_live_mib": res.get("rss_live_kb", 0) / 1024,
            "rss_kb_per_stream": live / c if live is not None else None,
            "rss_peak_kb_per_stream": peak / c,
            "ttft_p50_ms": pct([r[0] for r in records if r[0] is not None], 50),
            "ttft_p99_ms": pct([r[0] for r in records if r[0] is not None], 99),
            "probe_ttft_p50_ms": pct(probes, 50),
            "probe_ttft_max_ms": max(probes) if probes else None,
            "chunks_p50": pct([float(r[2]) for r in records], 50),
            "memory_top": res.get("memory_top"),
            "cpu_s": res.get("cpu_s"),
            "cpu_all_s": res.get("cpu_all_s"),
            "wall_s": res["wall_s"],
            **(
                ops_per_turn(res.get("mongo", {}), c, res.get("mongo_us"), res["wall_s"])
                if target in ROUTES
                else {}
            ),
        }
        print(f"  capacity {target}@{c}: done ({res['wall_s']:.1f} s)", flush=True)
    return out


# --------------------------------------------------------------------------- main
def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by every child


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set (under a minute)")
    parser.add_argument(
        "--only",
        default="latency,relay_cost,turn_cost,capacity",
        help="comma-separated scenarios (latency, relay_cost, turn_cost, capacity; analytics:"
        " GET /api/admin/usage over a month of 1M messages' rollup, not run by default)",
    )
    parser.add_argument("--uvloop", action="store_true", help="run the service on uvloop")
    parser.add_argument(
        "--lookup-index",
        action="store_true",
        help="experiment: add a plain (chat_id, seq) index for the SSE route's context query",
    )
    parser.add_argument("--capacity", help="override the capacity runs, e.g. sse@5000,relay@5000")
    parser.add_argument(
        "--db-rtt-ms",
        type=float,
        default=0.0,
        help="experiment: the service reaches the database through a relay adding this round"
        " trip (a network; SecantusDB is on this machine)",
    )
    parser.add_argument(
        "--mongodb-uri",
        help="run against this MongoDB (one you started: the figures SecantusDB cannot show),"
        " not a SecantusDB of the bench's own; it uses databases named bench* and drops them",
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="capacity: where the service's memory goes"
    )
    parser.add_argument("--out", type=Path, help="JSON file (default: bench-results/...)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the service and the relay during CPU phases; collapsed stacks go here",
    )
    args = parser.parse_args(argv)
    if args.mongodb_uri and args.db_rtt_ms:
        parser.error("--db-rtt-ms delays the bench's own SecantusDB; not with --mongodb-uri")
    raise_open_files()
    for sig in (signal.SIGINT, signal.SIGTERM):  # either one stops every child (``finally``)
        signal.signal(sig, _interrupted)
    plan = Plan.make(args.quick)
    if args.capacity:
        runs = [item.split("@") for item in args.capacity.split(",")]
        plan.capacity = [(target, int(c)) for target, c in runs]
    bench = Bench(plan, uvloop=args.uvloop, profile_dir=args.profile)
    bench.lookup_index, bench.tracemalloc = args.lookup_index, args.tracemalloc
    bench.db_rtt_ms = args.db_rtt_ms
    bench.external_mongo = args.mongodb_uri or ""
    only = set(args.only.split(","))
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": plan.quick,
        "loop": "uvloop" if args.uvloop else "asyncio",
        "lookup_index": args.lookup_index,
        "db_rtt_ms": args.db_rtt_ms,
        "database": database(args.mongodb_uri),
        "machine": machine(),
    }
    print(f"bench: {'quick' if plan.quick else 'full'} run; logs in {bench.workdir}", flush=True)
    scenarios = [
        ("latency", scenario_latency),
        ("relay_cost", scenario_relay_cost),
        ("turn_cost", scenario_turn_cost),
        ("capacity", scenario_capacity),
        ("analytics", scenario_analytics),
    ]
    try:
        bench.start()
        first = True
        for name, fn in scenarios:
            if name in only:
                if not first and name != "capacity" and not plan.quick:
                    bench.fresh_database()
                first = False
                bench.phase_tag = name
                result[name] = fn(bench)
    finally:
        bench.stop_all()
    result["duration_s"] = round(time.monotonic() - bench.started, 1)
    derive(result)
    text = table(result)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    out = (
        args.out
        or RESULTS / f"bench-{'quick-' if plan.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (RESULTS / ("latest-quick.json" if plan.quick else "latest.json")).write_bytes(out.read_bytes())
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"\nJSON: {shown}  ({result['duration_s']} s)")
    logs = RESULTS / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    shutil.move(bench.workdir, logs)  # the processes' logs of the latest run
    return 0

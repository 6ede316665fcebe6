"""The SecantusDB launcher's fixes (deploy/local/secantusd.py) apply to the installed SecantusDB,
so a version whose internals moved is noticed here rather than as a slow bench. The routing fix
only narrows candidates: the rules that depend on a filter with operators still hold on the
server every test runs against (the budget and rate-limit refusals in test_stream_sse and
test_replicas, the chat cap in test_chats). The retryable-write records keep what SecantusDB
keeps: the last 30 minutes' records, at most the newest 10,000."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.mongo_server import SECANTUSD

LAUNCHER = Path(__file__).resolve().parents[1] / "deploy" / "local" / "secantusd.py"


def load_launcher():
    spec = importlib.util.spec_from_file_location("secantusd_launcher", LAUNCHER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def unpatched():
    """SecantusDB's own methods back after the test (the fixes patch classes in place)."""
    from secantus.storage import Storage
    from secantus.transactions import TransactionRegistry

    saved = [
        (Storage, "_try_index_id_keys"),
        (TransactionRegistry, "record_retryable"),
        (TransactionRegistry, "_prune_retryable_locked"),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name in saved]
    yield
    for cls, name, method in originals:
        setattr(cls, name, method)


def test_fixes_apply_to_the_installed_secantusdb_once(unpatched):
    launcher = load_launcher()
    assert launcher.fix_routing(), "SecantusDB's internals changed: see the launcher"
    assert launcher.fix_retryable_records(), "SecantusDB's internals changed: see the launcher"
    assert launcher.fix_routing() is False  # never wrapped twice
    assert launcher.fix_retryable_records() is False
    assert launcher.apply_fix() is False


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def ok(n: int) -> dict:
    return {"ok": 1.0, "n": n}


def test_retryable_records_expire_after_their_lifetime_oldest_first(unpatched):
    from secantus import transactions as tx

    load_launcher().fix_retryable_records()
    clock = Clock()
    registry = tx.TransactionRegistry(time_func=clock)
    registry.record_retryable(b"s1", 1, b"w1", ok(1))
    clock.now += 60
    registry.record_retryable(b"s1", 2, b"w2", ok(2))
    registry.record_retryable(b"s2", 1, b"w3", {"ok": 0.0, "errmsg": "failed"})  # not recorded
    assert registry.retryable_reply(b"s1", 1, b"w1") == ok(1)  # a retry gets the reply
    assert registry.retryable_reply(b"s1", 1, b"other") is None  # another write: runs
    assert registry.retryable_reply(b"s2", 1, b"w3") is None

    clock.now += tx._RETRYABLE_RECORD_LIFETIME_SECONDS - 30  # the first is past its lifetime
    assert registry.retryable_reply(b"s1", 1, b"w1") is None
    assert registry.retryable_reply(b"s1", 2, b"w2") == ok(2)

    registry.record_retryable(b"s1", 2, b"w2", ok(2))  # stored again: now the newest
    clock.now += 45  # past the first storing, not the second
    assert registry.retryable_reply(b"s1", 2, b"w2") == ok(2)


def test_retryable_records_keep_the_newest_up_to_the_cap(unpatched, monkeypatch):
    from secantus import transactions as tx

    load_launcher().fix_retryable_records()
    monkeypatch.setattr(tx, "_RETRYABLE_RECORD_MAX", 5)
    registry = tx.TransactionRegistry(time_func=Clock())
    for n in range(8):
        registry.record_retryable(b"s", n, b"w", ok(n))
    assert [n for (_, n) in registry._retryable] == [3, 4, 5, 6, 7]
    assert registry.retryable_reply(b"s", 2, b"w") is None
    assert registry.retryable_reply(b"s", 3, b"w") == ok(3)


def test_fix_routes_by_plain_fields_and_passes_the_rest_through(unpatched):
    from secantus.storage import Storage

    seen: list[dict] = []
    Storage._try_index_id_keys = lambda self, db, coll, f, **kw: seen.append(f)
    load_launcher().fix_routing()
    route = Storage._try_index_id_keys
    route(None, "db", "c", {"_id": "x", "$and": [{"n": 1}]})
    route(None, "db", "c", {"user_id": "u", "period": "p", "$expr": {"$gt": ["$a", 1]}})
    route(None, "db", "c", {"$or": [{"a": 1}, {"b": 2}]})  # nothing plain: unchanged
    route(None, "db", "c", {"a": 1})
    route(None, "db", "c", {"_id": "m", "status": "streaming"})  # its own document, no index
    assert seen == [
        {"_id": "x"},
        {"_id": "x"},  # the lookup by _id found nothing to narrow to: by the plain fields
        {"user_id": "u", "period": "p"},
        {"$or": [{"a": 1}, {"b": 2}]},
        {"a": 1},
        {"_id": "m"},
        {"_id": "m", "status": "streaming"},
    ]


def test_a_filter_on_id_and_more_is_served_by_the_id_alone(unpatched):
    from secantus.storage import Storage

    seen: list[dict] = []

    def original(self, db, coll, f, **kw):
        seen.append(f)
        return [b"rid"] if list(f) == ["_id"] else None

    Storage._try_index_id_keys = original
    load_launcher().fix_routing()
    route = Storage._try_index_id_keys
    assert route(None, "db", "c", {"_id": "m", "status": "streaming"}) == [b"rid"]
    assert seen == [{"_id": "m"}]  # never the index of streaming records


def test_every_starter_uses_the_launcher():
    root = LAUNCHER.parents[2]
    assert SECANTUSD[-1] == str(LAUNCHER)
    for starter in ("deploy/local/run.py", "bench/run.py"):
        text = (root / starter).read_text()
        assert '"secantusd.py"' in text and 'which("secantusd-py"' not in text, starter

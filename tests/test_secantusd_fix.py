"""The SecantusDB launcher's routing fix (deploy/local/secantusd.py) applies to the installed
SecantusDB, so a version whose internals moved is noticed here rather than as a slow bench; and
it only narrows candidates: the rules that depend on a filter with operators still hold on the
server every test runs against (the budget and rate-limit refusals in test_stream_sse and
test_replicas, the chat cap in test_chats)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.mongo_server import SECANTUSD

LAUNCHER = Path(__file__).resolve().parents[1] / "deploy" / "local" / "secantusd.py"


def load_launcher():
    spec = importlib.util.spec_from_file_location("secantusd_launcher", LAUNCHER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fix_applies_to_the_installed_secantusdb_once():
    from secantus.storage import Storage

    launcher = load_launcher()
    before = Storage._try_index_id_keys
    try:
        applied = launcher.apply_fix() or getattr(Storage._try_index_id_keys, "_gateway_fix", False)
        assert applied, "SecantusDB's internals changed: see deploy/local/secantusd.py"
        assert launcher.apply_fix() is False  # never wrapped twice
    finally:
        Storage._try_index_id_keys = before


def test_fix_routes_by_plain_fields_and_passes_the_rest_through():
    from secantus.storage import Storage

    launcher = load_launcher()
    seen: list[dict] = []
    before = Storage._try_index_id_keys
    Storage._try_index_id_keys = lambda self, db, coll, f, **kw: seen.append(f)
    try:
        launcher.apply_fix()
        route = Storage._try_index_id_keys
        route(None, "db", "c", {"_id": "x", "$and": [{"n": 1}]})
        route(None, "db", "c", {"user_id": "u", "period": "p", "$expr": {"$gt": ["$a", 1]}})
        route(None, "db", "c", {"$or": [{"a": 1}, {"b": 2}]})  # nothing plain: unchanged
        route(None, "db", "c", {"a": 1})
    finally:
        Storage._try_index_id_keys = before
    assert seen == [
        {"_id": "x"},
        {"user_id": "u", "period": "p"},
        {"$or": [{"a": 1}, {"b": 2}]},
        {"a": 1},
    ]


def test_every_starter_uses_the_launcher():
    root = LAUNCHER.parents[2]
    assert SECANTUSD[-1] == str(LAUNCHER)
    for starter in ("deploy/local/run.py", "bench/run.py"):
        text = (root / starter).read_text()
        assert '"secantusd.py"' in text and 'which("secantusd-py"' not in text, starter

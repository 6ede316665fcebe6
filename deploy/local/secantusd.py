#!/usr/bin/env python
"""SecantusDB's server (``secantusd-py``), with two fixes for its cost per write; same arguments.

1. **Query routing.** SecantusDB 0.7 routes a filter to an index (or to its ``_id`` point
   lookup) only when no top-level key of the filter starts with ``$``. So a filter such as
   ``{"user_id": u, "period": p, "$expr": ...}`` scans the whole collection, and so does every
   ``findAndModify``: it finds the document, then writes with ``{"_id": <matched id>, "$and":
   [<the query>]}`` (the query re-asserted, as mongod re-evaluates it). Each such operation costs
   O(documents in the collection): 20 ms at 3,000 documents here, against 0.9 ms for an
   ``update_one`` by ``_id``. The gateway's per-turn operations (authorize the chat, reserve and
   settle the budget) are of that kind; against MongoDB they are index lookups.

   The fix: such a filter is routed by its plain fields (the top-level operators are ANDed with
   them, so the documents matching the plain fields are a superset of the matches). It only
   narrows the candidates: every caller still checks each candidate against the whole filter,
   so what matches is unchanged. Likewise a filter on ``_id`` and more (``{"_id": m, "status":
   "streaming"}``, every checkpoint and final write) is routed by its ``_id`` alone: SecantusDB
   takes its point lookup only for a filter that is ``_id`` and nothing else, and otherwise
   picks a secondary index (here ``status_checkpoint``: every live stream a candidate) or
   scans; a checkpoint round of 200 streams took ~0.6 s instead of ~0.2 s.

2. **Retryable-write records.** Drivers send every write as a retryable write, and SecantusDB
   records each one's reply (kept 30 minutes, at most 10,000), as mongod does. But it prunes the
   records on every write and every lookup by scanning all of them, and once there are 10,000 by
   *sorting* all of them: O(n log n) per write, ~5 ms each at the cap, so a server that has taken
   10,000 writes in half an hour serves ~200 writes a second at most, whatever they are.

   The fix: the records are kept in the order they were stored (a record stored again moves to
   the end), so the oldest is always first, and pruning drops from the front while the first is
   past its lifetime or there are too many: O(1) per write, amortized. Which records are kept
   is unchanged: those of the last 30 minutes, at most the newest 10,000.

When SecantusDB's internals differ from what a fix expects, that fix is not applied and the
server runs unchanged. Used by ``make run``, the tests and the bench; to be reported upstream.
"""

from __future__ import annotations

import sys
from typing import Any


def apply_fix() -> bool:
    """Apply both fixes; False when either was not applied (already, or internals moved)."""
    routing = fix_routing()
    records = fix_retryable_records()
    return routing and records


def fix_routing() -> bool:
    """Route filters with top-level operators by their plain fields; False when not applied."""
    try:
        from secantus.storage import Storage
    except ImportError:
        return False
    original = getattr(Storage, "_try_index_id_keys", None)
    if original is None or getattr(original, "_gateway_fix", False):
        return False

    def _try_index_id_keys(
        self: Any, db: str, coll: str, filter: dict[str, Any], **kwargs: Any
    ) -> Any:
        if filter and len(filter) > 1 and "_id" in filter:  # at most one document: its own
            by_id = original(self, db, coll, {"_id": filter["_id"]}, **kwargs)
            if by_id is not None:
                return by_id
        if filter and any(k.startswith("$") for k in filter):
            plain = {k: v for k, v in filter.items() if not k.startswith("$")}
            if plain:
                return original(self, db, coll, plain, **kwargs)
        return original(self, db, coll, filter, **kwargs)

    _try_index_id_keys._gateway_fix = True  # type: ignore[attr-defined]
    Storage._try_index_id_keys = _try_index_id_keys
    return True


def fix_retryable_records() -> bool:
    """Prune retryable-write records from the oldest end; False when not applied."""
    try:
        from secantus import transactions as tx
    except ImportError:
        return False
    registry = getattr(tx, "TransactionRegistry", None)
    needed = (
        "_RETRYABLE_RECORD_LIFETIME_SECONDS",
        "_RETRYABLE_RECORD_MAX",
        "_is_recordable_reply",
        "_strip_per_attempt_fields",
    )
    if registry is None or not all(hasattr(tx, name) for name in needed):
        return False
    for name in ("record_retryable", "_prune_retryable_locked"):
        method = getattr(registry, name, None)
        if method is None or getattr(method, "_gateway_fix", False):
            return False

    def record_retryable(
        self: Any, lsid_bytes: bytes, txn_number: int, identity: bytes, reply: dict[str, Any]
    ) -> None:
        if not tx._is_recordable_reply(reply):
            return
        key = (lsid_bytes, txn_number)
        with self._lock:
            self._retryable.pop(key, None)  # stored again: it is now the newest
            self._retryable[key] = (tx._strip_per_attempt_fields(reply), self._time(), identity)
            self._prune_retryable_locked()

    def _prune_retryable_locked(self: Any) -> None:
        records = self._retryable
        cutoff = self._time() - tx._RETRYABLE_RECORD_LIFETIME_SECONDS
        cap = tx._RETRYABLE_RECORD_MAX
        while records:
            oldest = next(iter(records))
            if len(records) <= cap and records[oldest][1] >= cutoff:
                break
            del records[oldest]

    record_retryable._gateway_fix = True  # type: ignore[attr-defined]
    _prune_retryable_locked._gateway_fix = True  # type: ignore[attr-defined]
    registry.record_retryable = record_retryable
    registry._prune_retryable_locked = _prune_retryable_locked
    return True


def main() -> int:
    apply_fix()
    from secantus.cli import main as secantus_main

    sys.argv[0] = "secantusd-py"
    return int(secantus_main() or 0)


if __name__ == "__main__":
    sys.exit(main())

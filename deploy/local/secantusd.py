#!/usr/bin/env python
"""SecantusDB's server (``secantusd-py``), with one fix for its query routing; same arguments.

SecantusDB 0.7 routes a filter to an index (or to its ``_id`` point lookup) only when no
top-level key of the filter starts with ``$``. So a filter such as ``{"user_id": u, "period": p,
"$expr": ...}`` scans the whole collection, and so does every ``findAndModify``: it finds the
document, then writes with ``{"_id": <matched id>, "$and": [<the query>]}`` (the query
re-asserted, as mongod re-evaluates it). Each such operation costs O(documents in the
collection): 20 ms at 3,000 documents here, against 0.9 ms for an ``update_one`` by ``_id``. The
gateway's per-turn operations (authorize the chat, reserve and settle the budget) are of that
kind; against MongoDB they are index lookups.

The fix: such a filter is routed by its plain fields (the top-level operators are ANDed with
them, so the documents matching the plain fields are a superset of the matches). It only
narrows the candidates: every caller still checks each candidate against the whole filter, so
what matches is unchanged. When SecantusDB's internals differ from what the fix expects, the
server runs unchanged. Used by ``make run``, the tests and the bench; to be reported upstream.
"""

from __future__ import annotations

import sys
from typing import Any


def apply_fix() -> bool:
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
        if filter and any(k.startswith("$") for k in filter):
            plain = {k: v for k, v in filter.items() if not k.startswith("$")}
            if plain:
                return original(self, db, coll, plain, **kwargs)
        return original(self, db, coll, filter, **kwargs)

    _try_index_id_keys._gateway_fix = True  # type: ignore[attr-defined]
    Storage._try_index_id_keys = _try_index_id_keys
    return True


def main() -> int:
    apply_fix()
    from secantus.cli import main as secantus_main

    sys.argv[0] = "secantusd-py"
    return int(secantus_main() or 0)


if __name__ == "__main__":
    sys.exit(main())

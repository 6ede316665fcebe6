"""A message record's vocabulary in one place: its statuses, and the fields its end writes.

An assistant record is inserted ``streaming`` before its first delta reaches anyone
(docs/architecture.md, "A turn"); its end is written once, by the replica that ran it
(``stream/producer.py``) or, for a turn whose replica died, by the reaper
(``stream/watcher.py``): both through ``final_fields``, so the two cannot drift apart. A
``Status`` is a ``str`` (what MongoDB stores and returns, and what the wire says), so a record
read back compares equal to it; a misspelt member is mypy's error, not a query that matches
nothing.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    STREAMING = "streaming"  # inserted so, until the turn ends
    COMPLETE = "complete"  # the answer ended as the model ended it
    CANCELLED = "cancelled"  # stopped: by its user, a shutdown, a chat deleted
    FAILED = "failed"  # the upstream failed or took too long
    INTERRUPTED = "interrupted"  # its replica died; ended by the reaper


# An answer that ended before the model did: what it has is partial.
PARTIAL = frozenset({Status.CANCELLED, Status.FAILED, Status.INTERRUPTED})


def tokens_doc(
    prompt: int,
    completion: int,
    source: str,
    *,
    cached: int = 0,
    reasoning: int = 0,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A record's tokens; the cached (of the prompt) and reasoning (of the completion) ones,
    and the upstream's usage details as it sent them, only when it reported some."""
    doc: dict[str, Any] = {"prompt": prompt, "completion": completion, "total": prompt + completion}
    if cached:
        doc["cached"] = cached
    if reasoning:
        doc["reasoning"] = reasoning
    if details:
        doc["details"] = details
    doc["source"] = source
    return doc


def finish_reason_of(status: Status, finish_reason: str | None) -> str | None:
    """The model's finish reason for a completed answer; an answer that did not complete has
    its status as its finish reason."""
    return finish_reason if status == Status.COMPLETE else str(status)


def final_fields(
    status: Status,
    reason: str,
    *,
    finish_reason: str | None,
    error: tuple[str, str] | None,
    tokens: dict[str, Any],
    cost: int | None,
    completed_at: datetime,
) -> dict[str, Any]:
    """What a record's end sets (on a record still ``streaming``: ``Store.finish_message``).
    ``error``: the code and message of what ended it; ``cost`` only for a priced model."""
    return {
        "status": status,
        "finish_reason": finish_reason_of(status, finish_reason),
        "reason": reason,
        "error": {"code": error[0], "message": error[1]} if error else None,
        "tokens": tokens,
        **({"cost": cost} if cost is not None else {}),
        "completed_at": completed_at,
    }

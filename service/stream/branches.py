"""Regenerate an answer, edit a question: a turn that gives the chat's latest exchange a new
version, keeping the one it replaces.

Such a turn is a send like any other (the same producer: budget, rate limit, billing, resume,
cancel) with new seqs at the end of the chat. Its records point back: a regenerated answer has
``replaces`` (the answer it replaces), an edited question ``edits`` (the question it edits); both
have ``version_of`` (the first version's id) and ``version`` (1 for the first, which has neither
field). The records it replaces are never deleted: they get ``superseded_by`` (the id of the new
turn's answer), and the chat's history (``GET /api/chat/{id}``, the context of the next turn)
shows only the records that are not superseded, in seq order. Since a regenerate or an edit
applies to the chat's latest exchange only, the new records take the place of the old ones in
that order, and the next turn's context follows the chosen branch.

What a turn may replace is checked after the producer allocated its seqs (``begin_chat_turn``,
one update that orders every turn of a chat) and taken by one conditional update of the record
(chosen and ended), so two regenerates of one answer cannot both win: the second is 409.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from service.errors import Conflict
from service.http import not_found
from service.store import Doc, Store

Kind = Literal["regenerate", "edit"]


@dataclass(frozen=True, slots=True)
class Branch:
    """What a turn replaces: ``target`` is the answer to regenerate or the question to edit.
    The other fields are filled in once the turn has taken it (``take``)."""

    kind: Kind
    target: str
    question: str = ""  # the question's text (a regenerate asks it again)
    question_seq: int = 0  # the context of the turn is the chosen records before it
    root: str = ""  # the first version of the target
    version: int = 0  # the new record's version


def root_of(doc: Doc) -> str:
    return str(doc.get("version_of") or doc["_id"])


async def take(
    store: Store, branch: Branch, *, user_id: str, chat_id: str, message_id: str, seq: int
) -> Branch:
    """Check that ``branch.target`` is the chat's latest answer (regenerate) or question (edit)
    and mark what the turn replaces superseded by ``message_id``; 404 when the chat has no such
    message, 409 when it is not the latest, or still streaming."""
    target = await store.chat_message(user_id, chat_id, branch.target)
    if target is None:
        raise not_found("message")
    question, answer = await _latest_exchange(store, chat_id, seq)
    latest = answer if branch.kind == "regenerate" else question
    if latest is None or latest["_id"] != target["_id"]:
        what = "answer" if branch.kind == "regenerate" else "question"
        raise Conflict(
            f"only the chat's latest {what} can be "
            + ("regenerated" if branch.kind == "regenerate" else "edited"),
            code="not_latest",
        )
    assert question is not None and answer is not None
    if answer.get("status") == "streaming":
        raise Conflict(
            "the latest answer is still being written; stop it or wait for it to end",
            code="answer_streaming",
        )
    if not await store.supersede(chat_id, target["_id"], by=message_id):
        raise Conflict("this message was replaced meanwhile", code="not_latest")
    if branch.kind == "edit":  # the answer (and anything else after the question) goes too
        await store.supersede_after(chat_id, int(question["seq"]), before_seq=seq, by=message_id)
    return dataclasses.replace(
        branch,
        question=str(question.get("content") or ""),
        question_seq=int(question["seq"]),
        root=root_of(target),
        version=int(target.get("version", 1)) + 1,
    )


async def _latest_exchange(store: Store, chat_id: str, seq: int) -> tuple[Doc | None, Doc | None]:
    """The chat's latest question and its answer, as the history shows them (before ``seq``,
    the new turn's); Nones when the chat does not end with a question and its answer."""
    tail = await store.chosen_tail(chat_id, before_seq=seq)
    if len(tail) < 2 or tail[0]["role"] != "user" or tail[1]["role"] != "assistant":
        return None, None
    return tail[0], tail[1]


async def release(store: Store, chat_id: str, message_id: str) -> None:
    """The turn was refused before its records existed: what it superseded is chosen again."""
    await store.unsupersede(chat_id, message_id)


def shape(branch: Branch, user: Doc, assistant: Doc) -> list[Doc]:
    """The turn's records: a regenerate's new answer only (the question stays); an edit's new
    question and its answer."""
    version = {"version_of": branch.root, "version": branch.version}
    if branch.kind == "regenerate":
        return [{**assistant, "replaces": branch.target, **version}]
    return [{**user, "edits": branch.target, **version}, assistant]

"""Regenerate an answer, edit a question: a turn that gives a message of the chat's history a
new version, keeping the one it replaces.

Any answer or question the history shows may be given a new version; what the history shows
after it is superseded with it (that branch is left, not deleted). Such a turn is a send like
any other (the same producer: budget, rate limit, billing, resume, cancel) with new seqs at the
end of the chat. Its records point back: a regenerated answer has ``replaces`` (the answer it
replaces), an edited question ``edits`` (the question it edits); both have ``version_of`` (the
first version's id) and ``version`` (1 for the first, which has neither field). The records it
replaces are never deleted: they get ``superseded_by`` (the id of the new turn's answer). The
chat's history (``GET /api/chat/{id}``, the context of the next turn, search) shows only the
records that are not superseded, in seq order; since everything after the replaced record is
superseded too, the new records (at the end) take the old ones' place in that order, and the
next turn's context follows the chosen branch. An attempt the upstream refused before it
answered replaced nothing: its records get the id of the message it meant to replace, which the
history shows again.

What a turn replaces is checked after the producer allocated its seqs (``begin_chat_turn``),
and taken by one conditional update of the record (still chosen, ended), so two turns replacing
one record cannot both win: the second is 409 ``superseded``.
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
    """Check that ``branch.target`` is an answer (regenerate) or a question (edit) the chat's
    history shows, and mark it and every record the history shows after it superseded by
    ``message_id``; 404 when the chat has no such message, 409 when it is superseded, of the
    other role, or it or a later answer is still streaming."""
    target = await store.chat_message(user_id, chat_id, branch.target)
    if target is None:
        raise not_found("message")
    regenerate = branch.kind == "regenerate"
    if "superseded_by" in target:
        raise Conflict(
            "this message was replaced by a later version; use the chat's current one",
            code="superseded",
        )
    if target["role"] != ("assistant" if regenerate else "user"):
        what = "an answer" if regenerate else "a question"
        raise Conflict(f"this message is not {what}", code="wrong_role")
    question = target
    if regenerate:
        before = await store.chosen_tail(chat_id, before_seq=int(target["seq"]), limit=1)
        if not before or before[0]["role"] != "user":
            raise Conflict("this answer does not follow a question", code="wrong_role")
        question = before[0]
    if await store.streaming_after(chat_id, int(question["seq"]), before_seq=seq):
        raise Conflict(
            "an answer of this exchange or after it is still being written; stop it or wait",
            code="answer_running",
        )
    if not await store.supersede(chat_id, target["_id"], by=message_id):
        raise Conflict("this message was replaced meanwhile", code="superseded")
    await store.supersede_after(chat_id, int(target["seq"]), before_seq=seq, by=message_id)
    return dataclasses.replace(
        branch,
        question=str(question.get("content") or ""),
        question_seq=int(question["seq"]),
        root=root_of(target),
        version=int(target.get("version", 1)) + 1,
    )


async def release(store: Store, chat_id: str, message_id: str) -> None:
    """The turn was refused before its records existed: what it superseded is chosen again."""
    await store.unsupersede(chat_id, message_id)


async def abandon(store: Store, branch: Branch, chat_id: str, message_id: str, seq: int) -> None:
    """The upstream refused the turn before it answered (its records are written, failed): the
    history shows again what it showed, and the attempt is kept as a version that lost to it."""
    await store.supersede_seqs(chat_id, [seq, seq + 1], by=branch.target)
    await store.unsupersede(chat_id, message_id)


def shape(branch: Branch, user: Doc, assistant: Doc) -> list[Doc]:
    """The turn's records: a regenerate's new answer only (the question stays); an edit's new
    question and its answer."""
    version = {"version_of": branch.root, "version": branch.version}
    if branch.kind == "regenerate":
        return [{**assistant, "replaces": branch.target, **version}]
    return [{**user, "edits": branch.target, **version}, assistant]

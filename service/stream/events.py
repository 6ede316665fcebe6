"""The closed set of events a follower of a turn receives. Every transport encodes these.

    Started  -> (Delta | Extra)* -> (Done | Error)

Every event carries an **offset**: the number of characters (Unicode code points) of the answer
before the end of that event's text. ``Started`` carries the offset the follower starts from (0
on a send, the client's offset on a resume), a ``Delta`` the offset its text ends at, the
terminal event the length of the whole answer. A client that reconnects with the last offset it
saw gets exactly the text after it.

A client may have more than the answer has: a replica sends text before it checkpoints it, and
one that dies leaves the answer settled from its last checkpoint. A follower that resumed past
the end of such an answer gets the terminal event at the answer's length with ``unsaved``, the
``[start, end)`` offsets of its text that the stored answer does not have.

``Extra`` is a step of the answer that is more than choice 0's text (tool call deltas, reasoning,
a refusal, logprobs, another choice of ``n``), in OpenAI's chunk shape without the ids; the /v1
route relays it as a frame, the chat routes show its reasoning (``event: reasoning``) and text.

``Done`` ends a turn that completed or that the user cancelled; ``Error`` ends one that failed,
was stopped by the server (shutdown, timeout) or whose process died (``interrupted``). Both
carry the saved message's id, its status and the tokens billed, and the budget left.

``Ping`` is not the turn's: a keep-alive a transport asked its follower for (``: ping`` on SSE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.costs import format_cost
from service.records import Status


@dataclass(frozen=True, slots=True)
class Started:
    message_id: str
    chat_id: str | None
    model: str
    offset: int = 0
    name = "started"

    def data(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "chat_id": self.chat_id, "model": self.model}


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    offset: int  # characters before the end of ``text``
    name = "delta"

    def data(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class Extra:
    frame: dict[str, Any]  # {"choices": [...]} as the upstream sent it, without the ids
    text: str  # choice 0's content in it (counted in the offsets like a delta's)
    offset: int
    name = "extra"

    def reasoning(self) -> str:
        """Choice 0's reasoning text in this step (``reasoning_content`` or ``reasoning``)."""
        return "".join(
            part
            for choice in self.frame["choices"]
            if choice.get("index", 0) == 0 and isinstance(choice.get("delta"), dict)
            for part in _reasoning_texts(choice["delta"])
        )

    def data(self) -> dict[str, Any]:
        return {"text": self.text}


def _reasoning_texts(delta: dict[str, Any]) -> list[str]:
    return [v for k in ("reasoning_content", "reasoning") if isinstance(v := delta.get(k), str)]


@dataclass(frozen=True, slots=True)
class Final:
    """What finalization settled; the body of ``Done`` and ``Error``."""

    message_id: str
    status: Status  # never STREAMING: what the turn ended as
    reason: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_source: str
    budget_limit: int
    budget_remaining: int
    error_code: str | None = None
    error_message: str | None = None
    cached_tokens: int = 0  # of the prompt's, when the upstream said
    reasoning_tokens: int = 0  # of the completion's, when the upstream said
    usage_details: dict[str, Any] | None = None  # the upstream's usage fields beyond the counts
    cost: int | None = None  # nano-units of ``currency`` (None: the model has no price)
    currency: str = "USD"
    budget_unit: str = "tokens"  # what the budget counts: tokens, or the currency's code

    @property
    def tokens_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def ok(self) -> bool:
        """Ends with ``done`` (completed, or stopped by its user) rather than ``error``."""
        return self.status == Status.COMPLETE or self.reason == "user_cancel"

    def _amount(self, amount: int) -> int | str:
        return amount if self.budget_unit == "tokens" else format_cost(amount)

    def data(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message_id": self.message_id,
            "status": self.status,
            "reason": self.reason,
            "finish_reason": self.finish_reason,
            "tokens_used": self.tokens_used,
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "total": self.tokens_used,
                "source": self.token_source,
            },
            "budget": {
                "limit": self._amount(self.budget_limit),
                "remaining": self._amount(self.budget_remaining),
                "unit": self.budget_unit,
            },
        }
        if self.cost is not None:
            body["cost"] = format_cost(self.cost)
            body["currency"] = self.currency
        if self.cached_tokens:
            body["tokens"]["cached"] = self.cached_tokens
        if self.reasoning_tokens:
            body["tokens"]["reasoning"] = self.reasoning_tokens
        if self.error_code:
            body["code"] = self.error_code
            body["message"] = self.error_message
        return body


@dataclass(frozen=True, slots=True)
class Done:
    final: Final
    offset: int  # the whole answer's length
    unsaved: tuple[int, int] | None = None  # the follower's text past it: [start, end)
    name = "done"

    def data(self) -> dict[str, Any]:
        return _terminal_data(self.final, self.unsaved)


@dataclass(frozen=True, slots=True)
class Error:
    final: Final
    offset: int  # the whole answer's length
    unsaved: tuple[int, int] | None = None  # the follower's text past it: [start, end)
    name = "error"

    def data(self) -> dict[str, Any]:
        return _terminal_data(self.final, self.unsaved)


def _terminal_data(final: Final, unsaved: tuple[int, int] | None) -> dict[str, Any]:
    body = final.data()
    if unsaved is not None:
        body["unsaved"] = list(unsaved)
    return body


@dataclass(frozen=True, slots=True)
class Ping:
    name = "ping"


PING = Ping()

Event = Started | Delta | Extra | Done | Error


def terminal(final: Final, length: int, offset: int) -> Done | Error:
    """The end of an answer of ``length`` characters, for a follower at ``offset``: past the
    end when it had text the stored answer does not have (``unsaved``)."""
    unsaved = (length, offset) if offset > length else None
    return Done(final, length, unsaved) if final.ok else Error(final, length, unsaved)

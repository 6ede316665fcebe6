"""The closed set of events a turn yields. Every transport encodes these and nothing else.

    Started  -> Delta* -> (Done | Error)

``Done`` ends a turn that completed or that the user cancelled; ``Error`` ends one that failed
or was stopped by the server (shutdown, timeout). Both carry the saved message's id, its status
and the tokens billed, and the budget left for the period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Started:
    message_id: str
    chat_id: str | None
    model: str
    name = "started"

    def data(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "chat_id": self.chat_id, "model": self.model}


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    name = "delta"

    def data(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class Final:
    """What finalization settled; the body of ``Done`` and ``Error``."""

    message_id: str
    status: str  # complete | cancelled | failed
    reason: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_source: str
    budget_limit: int
    budget_remaining: int
    error_code: str | None = None
    error_message: str | None = None

    @property
    def tokens_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens

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
            "budget": {"limit": self.budget_limit, "remaining": self.budget_remaining},
        }
        if self.error_code:
            body["code"] = self.error_code
            body["message"] = self.error_message
        return body


@dataclass(frozen=True, slots=True)
class Done:
    final: Final
    name = "done"

    def data(self) -> dict[str, Any]:
        return self.final.data()


@dataclass(frozen=True, slots=True)
class Error:
    final: Final
    name = "error"

    def data(self) -> dict[str, Any]:
        return self.final.data()


Event = Started | Delta | Done | Error

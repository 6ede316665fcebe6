"""The OpenAI transport: a turn as ``chat.completion.chunk`` frames, or as one ``chat.completion``.

Streamed, the frames are exactly OpenAI's::

    data: {"id":"chatcmpl-…","object":"chat.completion.chunk",…,"delta":{"role":"assistant",…}}
    data: {… "delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}     (one per Delta)
    data: {… "delta":{},"logprobs":null,"finish_reason":"stop"}]}
    data: {… "choices":[],"usage":{"prompt_tokens":…}}       (with stream_options.include_usage)
    data: [DONE]

A step that is more than choice 0's text (tool call deltas, reasoning, a refusal, logprobs,
another choice of ``n``: an ``Extra``) goes out as its own frame with the upstream's
``choices`` as sent; choice 0's finish reason is always the gateway's closing frame. The
upstream's ``system_fingerprint`` and ``service_tier`` are carried on every frame from the one
they first appear in, and its usage details (cached and reasoning tokens) in the usage.

A turn that fails after it started ends with ``data: {"error": {...}}`` (the SDKs raise it as an
``APIError``). The constant parts of every frame are built once per turn; a delta costs one
``orjson.dumps`` of its text. Frames are written by ``sse.respond`` (shared with the chat SSE
route): everything new since the client's last write goes out in one frame. A stateless turn
(no ``X-Chat-Id``) stops when its client goes, as OpenAI clients expect; one whose answer is
complete still reads its usage, so it is billed exactly.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.errors import ServiceError, ServiceUnavailable, UpstreamError
from service.http import openai_error_parts
from service.stream.assembly import Assembly
from service.stream.events import Delta, Done, Error, Event, Extra, Final, Started
from service.stream.live import Follower, LiveStream

DONE = b"data: [DONE]\n\n"
FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})


def finish_reason_of(final: Final) -> str:
    """OpenAI's finish reasons only: a cancelled turn (or an unknown upstream reason) is a stop."""
    reason = final.finish_reason
    return reason if reason in FINISH_REASONS else "stop"


def usage_of(final: Final) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.tokens_used,
    }
    if final.usage_details:
        usage.update(final.usage_details)
    return usage


def completion_id(message_id: str) -> str:
    return "chatcmpl-" + message_id


def error_of(final: Final) -> ServiceError:
    """The error that ended a started turn, as the exception it would have been before it."""
    code = final.error_code or final.reason
    message = final.error_message or f"the answer was stopped ({final.reason})"
    if code.startswith("upstream_"):
        return UpstreamError(code, message)
    return ServiceUnavailable(message, code=code)


_DELTA_OPEN = b'[{"index":0,"delta":{"content":'
_DELTA_CLOSE = b'},"logprobs":null,"finish_reason":null}]'
_ENDS = {True: b',"usage":null}\n\n', False: b"}\n\n"}  # by include_usage
_DELTA_TAILS = {usage: _DELTA_CLOSE + end for usage, end in _ENDS.items()}


class ChunkEncoder:
    """Frames for one completion: one bytes prefix per turn (id, created, model, and the
    upstream's fingerprint once known), the rest shared, so a live stream holds a single short
    buffer for its frames."""

    __slots__ = (
        "_created",
        "_delta_head",
        "_delta_tail",
        "_end",
        "_include_usage",
        "_live",
        "_meta",
        "_opened",
    )

    def __init__(self, live: LiveStream, created: int, *, include_usage: bool) -> None:
        self._created = created
        self._live = live
        self._meta: dict[str, Any] | None = None
        self._opened = False  # the assistant's role went out (ours, or the upstream's)
        self._delta_head = self._head_for(None)
        self._include_usage = include_usage
        self._delta_tail = _DELTA_TAILS[include_usage]  # shared constants
        self._end = _ENDS[include_usage]

    def _head_for(self, meta: dict[str, Any] | None) -> bytes:
        live = self._live
        ids = {
            "id": completion_id(live.message_id),
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": live.model,
        }
        common = orjson.dumps({**ids, "system_fingerprint": None, **(meta or {})})
        return b"data: " + common[:-1] + b',"choices":' + _DELTA_OPEN

    @property
    def _head(self) -> bytes:
        return self._delta_head[: -len(_DELTA_OPEN)]

    def role(self) -> bytes:
        choice = b'[{"index":0,"delta":{"role":"assistant","content":""},'
        return self._head + choice + b'"logprobs":null,"finish_reason":null}]' + self._end

    def encode(self, event: Event) -> bytes:
        """An event's frame(s): a delta; the role chunk; finish (+ usage) + ``[DONE]``; an
        error."""
        if self._live.meta is not self._meta:  # the upstream's fingerprint arrived (changed)
            self._meta = self._live.meta
            self._delta_head = self._head_for(self._meta)
        if isinstance(event, Delta):
            frame = self._delta_head + orjson.dumps(event.text) + self._delta_tail
            return frame if self._opened else self._first(frame)
        if isinstance(event, Extra):
            frame = self._head + orjson.dumps(event.frame["choices"]) + self._end
            if self._opened or _opens(event.frame):
                self._opened = True
                return frame  # the upstream's own first frame says the role
            return self._first(frame)
        if isinstance(event, Started):
            return b""  # the role goes out with the first step, when its shape is known
        if isinstance(event, Done):
            frame = self.finish(finish_reason_of(event.final))
            if self._include_usage:
                frame += self.usage(event.final)
            return (frame if self._opened else self._first(frame)) + DONE
        return self.error(event.final)

    def _first(self, frame: bytes) -> bytes:
        """The assistant's role frame, then ``frame``: what a plain stream opens with."""
        self._opened = True
        return self.role() + frame

    def finish(self, reason: str) -> bytes:
        choice = b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":' + orjson.dumps(reason)
        return self._head + choice + b"}]" + self._end

    def usage(self, final: Final) -> bytes:
        return self._head + b'[],"usage":' + orjson.dumps(usage_of(final)) + b"}\n\n"

    @staticmethod
    def error(final: Final) -> bytes:
        _, body, _ = openai_error_parts(error_of(final))
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _opens(frame: dict[str, Any]) -> bool:
    """Whether an upstream step opens choice 0 itself (its delta has the role)."""
    return any(
        c.get("index", 0) == 0 and isinstance(c.get("delta"), dict) and "role" in c["delta"]
        for c in frame["choices"]
    )


async def complete(follower: Follower, *, created: int) -> dict[str, Any]:
    """Follow the turn to its end and return one ``chat.completion`` (raise if it failed):
    every choice put together as the SDKs put a stream together."""
    assembly = Assembly()
    final: Final | None = None
    async for event in follower:
        if isinstance(event, Delta):
            assembly.text(event.text)
        elif isinstance(event, Extra):
            assembly.frame(event.frame)
        elif isinstance(event, Done):
            final = event.final
        elif isinstance(event, Error):
            raise error_of(event.final)
    assert final is not None
    live = follower.live
    return {
        "id": completion_id(live.message_id),
        "object": "chat.completion",
        "created": created,
        "model": live.model,
        "system_fingerprint": None,
        **(live.meta or {}),
        "choices": assembly.choices(finish_reason_of(final)),
        "usage": usage_of(final),
    }

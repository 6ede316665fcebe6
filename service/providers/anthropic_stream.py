"""An Anthropic Messages stream (``event:`` + ``data:`` SSE) as the turn's ``Chunk``s.

Events: ``message_start`` (the input usage), ``content_block_start`` / ``_delta`` / ``_stop``
per content block, ``message_delta`` (the stop reason and the cumulative usage),
``message_stop`` (the end: nothing after it is read), ``ping`` (ignored), ``error`` (the
turn fails: ``overloaded_error`` is ``upstream_unavailable``, ``rate_limit_error``
``upstream_rate_limited``, ...; the vendor's words go to the log only, redacted). Event types
and blocks this reader does not know are skipped, as Anthropic asks of clients.

A ``text_delta`` is choice 0's text (``Chunk.text``, nothing else built; one shaped as the
last is not parsed again, ``service.providers.templates``). Other steps are
frames in OpenAI's chunk shape: a ``thinking_delta`` is ``reasoning_content``; a ``tool_use``
block is a tool call (``index`` counting the answer's tool calls from 0, Anthropic's id and the
name with empty arguments at its start, then each ``input_json_delta``'s ``partial_json``;
a block that streamed no input closes with ``{}``, so the arguments always parse).

A signed thinking block and a ``redacted_thinking`` block are also a delta's
``thinking_blocks`` (LiteLLM's name), one entry per block, whole: ``{"index", "type":
"thinking", "thinking", "signature"}`` when its ``signature_delta`` comes (its text again,
so that the entry is the block as Anthropic wants it back), ``{"index", "type":
"redacted_thinking", "data"}`` when it starts. ``index`` counts the answer's thinking blocks
from 0, as tool calls are counted: the OpenAI SDKs merge a list delta's entries by it. The
``/v1/messages`` route relays them as Anthropic's own blocks; an OpenAI-shaped client may send
them back on the assistant message (``anthropic_request``), which keeps thinking on a tool
loop's next step.

Stop reasons: ``end_turn``/``stop_sequence`` -> ``stop`` (the sequence that stopped the answer
is choice 0's ``stop_reason`` in a step of its own, vLLM's name for it); ``max_tokens`` and
``model_context_window_exceeded`` -> ``length``; ``tool_use`` -> ``tool_calls``; ``refusal``
-> ``content_filter`` (the text so far is kept); ``pause_turn`` stays ``pause_turn`` (a server
tool's long turn, to be continued by sending the answer back; the OpenAI route reports it as
``stop``); a reason added later -> ``other``.

Usage is exact: ``message_start``'s counts, overlaid by each ``message_delta``'s (cumulative)
ones. ``message_start``'s prompt counts are also a chunk of their own (``Usage.partial``): a
turn cut before ``message_delta`` bills its prompt by them and counts its answer locally.
``prompt_tokens`` = ``input_tokens`` + ``cache_creation_input_tokens`` +
``cache_read_input_tokens`` (OpenAI counts cached tokens in the prompt), cached =
``cache_read_input_tokens``, ``completion_tokens`` = ``output_tokens`` (thinking included, as
Anthropic bills it), reasoning = ``output_tokens_details.thinking_tokens`` when reported. The
details are OpenAI's (``prompt_tokens_details.cached_tokens``,
``completion_tokens_details.reasoning_tokens``) plus Anthropic's own counts under
``anthropic``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import structlog

from service.errors import UpstreamError
from service.providers.base import Chunk, Usage, is_count, log_upstream_body
from service.providers.sse import SSEDecoder, SSEEvent
from service.providers.templates import TextEvents, read_stream

log = structlog.get_logger("service.providers")

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "pause_turn",
}
ERRORS = {
    "overloaded_error": "upstream_unavailable",
    "api_error": "upstream_unavailable",
    "rate_limit_error": "upstream_rate_limited",
    "timeout_error": "upstream_timeout",
    "authentication_error": "upstream_auth",
    "permission_error": "upstream_auth",
    "billing_error": "upstream_billing",
    "invalid_request_error": "upstream_bad_request",
    "request_too_large": "upstream_bad_request",
    "not_found_error": "upstream_bad_request",
}
PROMPT_COUNTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
ORIGINALS = (
    *PROMPT_COUNTS,
    "output_tokens",
    "output_tokens_details",
    "cache_creation",
    "server_tool_use",
    "service_tier",
)


def chunks(resp: aiohttp.ClientResponse, secrets: tuple[str, ...]) -> AsyncIterator[Chunk]:
    """The chunks of one stream; those one network read brought, together (``Chunk.more`` on
    all but the last of them). Closing the iterator closes the connection."""
    reader = Reader(SSEDecoder(), secrets)
    return read_stream(resp, reader, "the Anthropic stream ended before its end")


class Reader(TextEvents):
    """One stream's events: its usage so far, its tool blocks, whether it has finished. A
    ``text_delta`` shaped as the stream's last one is read as its text alone (its template
    spans the padding Anthropic puts before an object's last brace)."""

    __slots__ = ("_secrets", "_thinking", "_thoughts", "_tools", "finished", "usage")
    key = re.compile(rb'"text"\s*:\s*')

    def __init__(self, decoder: SSEDecoder, secrets: tuple[str, ...] = ()) -> None:
        super().__init__(decoder)
        self._secrets = secrets
        self._tools: dict[int, _Tool] = {}  # by content block index
        self._thinking: dict[int, list[str]] = {}  # an open thinking block's text, by index
        self._thoughts = 0  # thinking blocks relayed whole (``thinking_blocks``) so far
        self.usage: dict[str, Any] = {}
        self.finished = False  # the stop reason came (message_delta); ``ended``: message_stop

    def complete(self) -> bool:
        return self.finished  # a close after the stop reason is complete; otherwise a cut

    def probe(self, event: SSEEvent) -> Chunk | None:
        return Reader(self.decoder).whole(event)  # a text event's reading has no state

    def whole(self, event: SSEEvent) -> Chunk | None:
        if event.event == "ping":
            return None
        frame = self._load(event.data)
        kind = frame.get("type")
        if kind == "content_block_delta":
            return self._delta(frame)
        if kind == "content_block_start":
            return self._start(frame)
        if kind == "content_block_stop":
            return self._stop(frame)
        if kind == "message_delta":
            return self._message_delta(frame)
        if kind == "message_start":
            message = frame.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.usage = dict(usage)
                return self._prompt_usage()
        elif kind == "message_stop":
            self.ended = True
        elif kind == "error":
            raise self._error(frame, event.data)
        return None

    def _load(self, data: str) -> dict[str, Any]:
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _malformed("not JSON") from exc
        if not isinstance(frame, dict):
            raise _malformed("not an object")
        return frame

    # ------------------------------------------------------------------ blocks
    def _delta(self, frame: dict[str, Any]) -> Chunk | None:
        delta = frame.get("delta")
        if not isinstance(delta, dict):
            raise _malformed("delta")
        kind = delta.get("type")
        if kind == "text_delta":
            return Chunk(_string(delta, "text"))
        if kind == "thinking_delta":
            thinking = _string(delta, "thinking")
            if not thinking:
                return None
            self._thinking.setdefault(_index(frame), []).append(thinking)
            return Chunk(frame=_step({"reasoning_content": thinking}))
        if kind == "signature_delta":
            signature = _string(delta, "signature")
            text = "".join(self._thinking.pop(_index(frame), ()))
            if not signature:
                return None
            block = {"type": "thinking", "thinking": text, "signature": signature}
            return self._whole(block)
        if kind == "input_json_delta":
            tool = self._tools.get(_index(frame))
            partial = _string(delta, "partial_json")
            if tool is None or not partial:
                return None
            tool.streamed = True
            return Chunk(frame=_call({"index": tool.index, "function": {"arguments": partial}}))
        return None  # citations_delta, kinds added later

    def _start(self, frame: dict[str, Any]) -> Chunk | None:
        block = frame.get("content_block")
        if not isinstance(block, dict):
            raise _malformed("content_block")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text") or ""
            return Chunk(text) if isinstance(text, str) and text else None
        if kind == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._thinking[_index(frame)] = [thinking]
                return Chunk(frame=_step({"reasoning_content": thinking}))
            return None
        if kind == "redacted_thinking":
            data = block.get("data")
            if not isinstance(data, str):
                raise _malformed("redacted_thinking")
            return self._whole({"type": "redacted_thinking", "data": data})
        if kind != "tool_use":
            return None  # server tools' blocks, kinds added later
        call_id, name = block.get("id"), block.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise _malformed("tool_use")
        tool = self._tools[_index(frame)] = _Tool(len(self._tools), block.get("input"))
        function = {"name": name, "arguments": ""}
        return Chunk(
            frame=_call(
                {"index": tool.index, "id": call_id, "type": "function", "function": function}
            )
        )

    def _whole(self, block: dict[str, Any]) -> Chunk:
        """A thinking block as Anthropic wants it back, as the answer's next thinking block."""
        entry = {"index": self._thoughts, **block}
        self._thoughts += 1
        return Chunk(frame=_step({"thinking_blocks": [entry]}))

    def _stop(self, frame: dict[str, Any]) -> Chunk | None:
        self._thinking.pop(_index(frame), None)  # an unsigned block's text is not kept
        tool = self._tools.get(_index(frame))
        if tool is None or tool.streamed:
            return None
        tool.streamed = True
        arguments = orjson.dumps(tool.input if isinstance(tool.input, dict) else {}).decode()
        return Chunk(frame=_call({"index": tool.index, "function": {"arguments": arguments}}))

    # ------------------------------------------------------------------ message
    def _prompt_usage(self) -> Chunk | None:
        """``message_start``'s prompt counts, exact (the cache's reads and writes included),
        as a partial usage: what a turn cut before ``message_delta`` is billed for its prompt
        (its answer counted locally: ``output_tokens`` here is not its bill)."""
        usage = self.usage
        counts = [0 if usage.get(k) is None else usage[k] for k in PROMPT_COUNTS]
        if "input_tokens" not in usage or not all(map(is_count, counts)):
            return None
        prompt = {k: v for k, v in usage.items() if k in (*PROMPT_COUNTS, "cache_creation")}
        return Chunk(usage=dataclasses.replace(_usage(counts, 0, prompt), partial=True))

    def _message_delta(self, frame: dict[str, Any]) -> Chunk:
        usage = frame.get("usage")
        if isinstance(usage, dict):
            self.usage.update((k, v) for k, v in usage.items() if v is not None)
        delta = frame.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if reason is not None and not isinstance(reason, str):
            raise _malformed("stop_reason")
        chunk = Chunk(usage=usage_of(self.usage))
        if reason is not None:
            self.finished = True
            chunk.finish_reason = FINISH.get(reason, "other")
            sequence = delta.get("stop_sequence") if isinstance(delta, dict) else None
            if reason == "stop_sequence" and isinstance(sequence, str):
                step = _step({})
                step["choices"][0]["stop_reason"] = sequence  # which one stopped it
                chunk.frame = step
        return chunk

    def _error(self, frame: dict[str, Any], data: str) -> UpstreamError:
        log_upstream_body("anthropic", None, data, self._secrets)
        error = frame.get("error")
        kind = error.get("type") if isinstance(error, dict) else None
        kind = kind if isinstance(kind, str) else "unknown"
        code = ERRORS.get(kind, "upstream_bad_response")
        return UpstreamError(code, f"the upstream reported an error mid-stream ({kind[:64]})")


class _Tool:
    __slots__ = ("index", "input", "streamed")

    def __init__(self, index: int, input_: Any) -> None:
        self.index = index  # among the answer's tool calls
        self.input = input_  # what content_block_start said (``{}`` for a streamed input)
        self.streamed = False  # some input went out


def usage_of(usage: dict[str, Any]) -> Usage | None:
    """Anthropic's usage in OpenAI's terms (see the module's doc); None when a count is missing
    or malformed (the answer is then counted locally)."""
    counts = [0 if usage.get(k) is None else usage[k] for k in PROMPT_COUNTS]
    output = usage.get("output_tokens")
    if "input_tokens" in usage and is_count(output) and all(map(is_count, counts)):
        return _usage(counts, output, usage)
    log.warning("upstream.malformed_usage", provider="anthropic")
    return None


def _usage(counts: list[int], output: int, usage: dict[str, Any]) -> Usage:
    details = usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens", 0) if isinstance(details, dict) else 0
    thinking = thinking if is_count(thinking) else 0
    cached = counts[2]
    openai: dict[str, Any] = {"prompt_tokens_details": {"cached_tokens": cached}}
    if isinstance(details, dict):
        openai["completion_tokens_details"] = {"reasoning_tokens": thinking}
    openai["anthropic"] = {k: usage[k] for k in ORIGINALS if usage.get(k) is not None}
    return Usage(sum(counts), output, cached, thinking, openai)


def _step(delta: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def _call(call: dict[str, Any]) -> dict[str, Any]:
    return _step({"tool_calls": [call]})


def _index(frame: dict[str, Any]) -> int:
    index = frame.get("index")
    if not isinstance(index, int):
        raise _malformed("index")
    return index


def _string(delta: dict[str, Any], key: str) -> str:
    value = delta.get(key)
    if not isinstance(value, str):
        raise _malformed(key)
    return value


def _malformed(where: str) -> UpstreamError:
    return UpstreamError("upstream_bad_response", f"malformed upstream event ({where})")

"""The Anthropic transport: a turn as Anthropic's Messages stream events, or as one ``message``.

Streamed, the events are Anthropic's::

    event: message_start        {"message": {"id": "msg_…", "content": [], "usage": …}}
    event: ping
    event: content_block_start  {"index": 0, "content_block": {"type": "thinking", …}}
    event: content_block_delta  {"index": 0, "delta": {"type": "thinking_delta", …}}   (many)
    event: content_block_stop   {"index": 0}
    …  a text block (text_delta), tool_use blocks (input_json_delta), in the order they came
    event: message_delta        {"delta": {"stop_reason": …}, "usage": {…}}
    event: message_stop

The turn's steps are OpenAI-shaped (``Delta``: choice 0's text; ``Extra``: a chunk's
``choices``), the one internal representation every provider produces. ``Blocks`` turns them into
content blocks: ``reasoning_content`` / ``reasoning`` text is a ``thinking`` block, content (and a
``refusal``) a ``text`` block, each tool call (its first delta has its id and name, the others
pieces of its arguments) a ``tool_use`` block. A provider that speaks Anthropic natively adds,
in a delta's ``thinking_blocks`` (LiteLLM's name for them), what OpenAI's shape has no place for:
a thinking block's ``signature`` (a ``signature_delta``, which ends that block: the next
reasoning is another block) and ``redacted_thinking`` blocks (their ``data``); their thinking
text comes in ``reasoning_content`` as for any provider (an entry's own ``thinking`` is not read
again).

The stop reason is OpenAI's finish reason in Anthropic's words (``stop`` → ``end_turn``,
``length`` → ``max_tokens``, ``tool_calls`` → ``tool_use``, ``content_filter`` → ``refusal``; an
answer with a refusal is a ``refusal``; Anthropic's own reasons pass as they are); a ``stop``
whose provider said which stop sequence ended it (choice 0's ``stop_reason``, as an Anthropic
model's does) is ``stop_sequence``, with that ``stop_sequence``; a turn its user stopped ends
as ``end_turn``. Usage as Anthropic counts it: ``input_tokens`` the prompt less
the cached tokens (``cache_read_input_tokens``) and the ones written to the cache
(``cache_creation_input_tokens``, when the provider reports them in the usage details: the
Anthropic provider's under ``anthropic``), and ``output_tokens`` (reasoning included;
``output_tokens_details.thinking_tokens`` when known); for an Anthropic model, exactly
Anthropic's figures. ``message_start`` carries the prompt as the turn was admitted with it
(``input_tokens``; the cache's share is not known yet) and no output; the counts billed come
at the end, in ``message_delta`` (whose figures the SDKs take for the message's).

A turn that fails after it started ends with ``event: error`` and Anthropic's error body. The
keep-alives while the model thinks are ``sse.respond``'s ``: ping`` comments (ignored by every SSE
client); ``event: ping`` is sent once after ``message_start``, as Anthropic does.

``complete`` applies the same block steps to a content list, as the SDKs accumulate a stream: a
non-streamed answer is exactly what the stream adds up to.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.http import anthropic_error_parts
from service.providers.base import cache_writes
from service.stream.assembly import REASONING_KEYS
from service.stream.events import Delta, Done, Error, Event, Extra, Final, Started
from service.stream.live import Follower
from service.transports.openai_chunks import error_of

Step = tuple[str, dict[str, Any]]  # an event's name and its data

# Anthropic's stop reasons, passed through when a provider uses them.
STOP_REASONS = frozenset(
    {
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "tool_use",
        "pause_turn",
        "refusal",
        "model_context_window_exceeded",
    }
)
_FROM_OPENAI = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
PING = b'event: ping\ndata: {"type":"ping"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def message_id(turn_id: str) -> str:
    return "msg_" + turn_id.replace("-", "")


def stop_reason_of(final: Final, *, refused: bool) -> str:
    reason = final.finish_reason or "stop"
    if reason in STOP_REASONS:
        return reason
    if refused:
        return "refusal"
    return _FROM_OPENAI.get(reason, "end_turn")


def usage_of(final: Final) -> dict[str, Any]:
    creation, _ = cache_writes(final.usage_details)
    usage: dict[str, Any] = {
        "input_tokens": max(0, final.prompt_tokens - final.cached_tokens - creation),
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": final.cached_tokens,
        "output_tokens": final.completion_tokens,
    }
    if final.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": final.reasoning_tokens}
    return usage


def message_shell(mid: str, model: str, input_tokens: int = 0) -> dict[str, Any]:
    """The message as ``message_start`` announces it (and ``complete`` fills in)."""
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        },
    }


class Blocks:
    """A turn's steps as content-block steps, in order: each block started, its deltas, stopped
    before the next starts."""

    __slots__ = ("index", "kind", "refused", "stop_sequence", "tools")

    def __init__(self) -> None:
        self.index = -1  # the last block started
        self.kind: str | None = None  # the open block's type
        self.tools: dict[int, tuple[int, str]] = {}  # a call's index -> its block's, its id
        self.refused = False  # the answer has a refusal
        self.stop_sequence: str | None = None  # the stop sequence that ended it, when told

    def text(self, text: str) -> list[Step]:
        if not text:
            return []
        out = self._open("text", {"type": "text", "text": ""}) if self.kind != "text" else []
        out.append(self._delta(self.index, {"type": "text_delta", "text": text}))
        return out

    def frame(self, frame: dict[str, Any], text: str) -> list[Step]:
        """One ``Extra`` step: choice 0's reasoning, text, refusal and tool calls, in that
        order (other choices are not asked for on this route)."""
        out: list[Step] = []
        for choice in frame.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if isinstance(sequence := choice.get("stop_reason"), str):
                self.stop_sequence = sequence
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for key in REASONING_KEYS:
                if isinstance(piece := delta.get(key), str) and piece:
                    out += self._thinking(piece)
            for block in _dicts(delta.get("thinking_blocks")):
                out += self._native_thinking(block)
            out += self.text(text)
            text = ""
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self.refused = True
                out += self.text(refusal)
            for call in _dicts(delta.get("tool_calls")):
                out += self._tool(call)
        return out + self.text(text)

    def close(self) -> list[Step]:
        if self.kind is None:
            return []
        self.kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _open(self, kind: str, block: dict[str, Any]) -> list[Step]:
        out = self.close()
        self.index += 1
        self.kind = kind
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            )
        )
        return out

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> Step:
        return (
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": delta},
        )

    def _thinking(self, text: str) -> list[Step]:
        out = self._open_thinking()
        out.append(self._delta(self.index, {"type": "thinking_delta", "thinking": text}))
        return out

    def _open_thinking(self) -> list[Step]:
        if self.kind == "thinking":
            return []
        return self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})

    def _native_thinking(self, block: dict[str, Any]) -> list[Step]:
        if block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
            out = self._open(
                "redacted_thinking", {"type": "redacted_thinking", "data": block["data"]}
            )
            return out + self.close()
        signature = block.get("signature")
        if not isinstance(signature, str) or not signature:
            return []
        out = self._open_thinking()
        out.append(self._delta(self.index, {"type": "signature_delta", "signature": signature}))
        return out + self.close()  # a signature is a thinking block's last word

    def _tool(self, call: dict[str, Any]) -> list[Step]:
        out: list[Step] = []
        position = call.get("index", 0)
        position = position if isinstance(position, int) else 0
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(function, dict)
        known = self.tools.get(position)
        call_id = call.get("id")
        # A new call: its first delta (some servers repeat the id on every delta of a call).
        if known is None or (call_id is not None and call_id != known[1]):
            call_id = str(call_id or f"call_{position}")
            block = {
                "type": "tool_use",
                "id": call_id,
                "name": str(function.get("name") or ""),
                "input": {},
            }
            out += self._open("tool_use", block)
            known = self.tools[position] = (self.index, call_id)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(self._delta(known[0], delta))
        return out

    def stop(self, final: Final) -> dict[str, Any]:
        """``stop_reason`` and ``stop_sequence``: ``stop_sequence`` when the provider said which
        sequence stopped the answer (choice 0's ``stop_reason``, vLLM's name for it)."""
        reason = stop_reason_of(final, refused=self.refused)
        if reason == "end_turn" and final.finish_reason == "stop" and self.stop_sequence:
            return {"stop_reason": "stop_sequence", "stop_sequence": self.stop_sequence}
        return {"stop_reason": reason, "stop_sequence": None}

    def finish(self, final: Final) -> list[Step]:
        """The last open block's stop and the ``message_delta``."""
        delta = {"type": "message_delta", "delta": self.stop(final), "usage": usage_of(final)}
        return [*self.close(), ("message_delta", delta)]


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def sse(step: Step) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (step[0].encode(), orjson.dumps(step[1]))


def error_event(final: Final) -> bytes:
    _, body, _ = anthropic_error_parts(error_of(final))
    return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


class EventEncoder:
    """Anthropic's stream events for one message (``sse.respond``'s encoder: bytes per event,
    ``b""`` for none). A text delta into the open text block, the common step, costs one
    ``orjson.dumps`` of its text."""

    __slots__ = ("_blocks", "_id", "_model", "_prompt", "_text_head")

    def __init__(self, mid: str, model: str, prompt_tokens: int = 0) -> None:
        self._id = mid
        self._model = model
        self._prompt = prompt_tokens  # as the turn was admitted with it, for message_start
        self._blocks = Blocks()
        self._text_head = b""

    def encode(self, event: Event) -> bytes:
        blocks = self._blocks
        if isinstance(event, Delta):
            if blocks.kind == "text" and event.text:
                return self._text_head + orjson.dumps(event.text) + b"}}\n\n"
            return self._steps(blocks.text(event.text))
        if isinstance(event, Extra):
            return self._steps(blocks.frame(event.frame, event.text))
        if isinstance(event, Started):
            shell = message_shell(self._id, self._model, self._prompt)
            start = {"type": "message_start", "message": shell}
            return sse(("message_start", start)) + PING
        if isinstance(event, Done):
            return self._steps(blocks.finish(event.final)) + MESSAGE_STOP
        return error_event(event.final)

    def _steps(self, steps: list[Step]) -> bytes:
        if self._blocks.kind == "text":
            self._text_head = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                b'"delta":{"type":"text_delta","text":' % self._blocks.index
            )
        return b"".join(sse(step) for step in steps)


class Accumulator:
    """Block steps applied to a message's content, as the SDKs accumulate a stream."""

    __slots__ = ("content", "json")

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.json: dict[int, str] = {}  # a tool_use block's arguments so far

    def apply(self, steps: list[Step]) -> None:
        for name, data in steps:
            if name == "content_block_start":
                self.content.append(dict(data["content_block"]))
            elif name == "content_block_delta":
                self._delta(data["index"], data["delta"])

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self.content[index]
        kind = delta["type"]
        if kind == "text_delta":
            block["text"] += delta["text"]
        elif kind == "thinking_delta":
            block["thinking"] += delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = delta["signature"]
        elif kind == "input_json_delta":
            self.json[index] = self.json.get(index, "") + delta["partial_json"]

    def blocks(self) -> list[dict[str, Any]]:
        for index, raw in self.json.items():
            self.content[index]["input"] = tool_input(raw)
        return self.content


def tool_input(raw: str) -> dict[str, Any]:
    """A tool call's arguments as Anthropic's ``input`` object. Arguments that are not a JSON
    object (a model's mistake) are kept whole, as ``{"_arguments": "<as sent>"}``, rather than
    lost."""
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"_arguments": raw}


async def complete(follower: Follower, mid: str, model: str) -> dict[str, Any]:
    """Follow the turn to its end and return one ``message`` (raise if it failed)."""
    blocks = Blocks()
    acc = Accumulator()
    final: Final | None = None
    async for event in follower:
        if isinstance(event, Delta):
            acc.apply(blocks.text(event.text))
        elif isinstance(event, Extra):
            acc.apply(blocks.frame(event.frame, event.text))
        elif isinstance(event, Done):
            final = event.final
        elif isinstance(event, Error):
            raise error_of(event.final)
    assert final is not None
    message = message_shell(mid, model)
    message["content"] = acc.blocks()
    message.update(blocks.stop(final))
    message["usage"] = usage_of(final)
    return message

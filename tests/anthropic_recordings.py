"""Anthropic Messages API event streams, byte for byte as the API writes them.

Written in the framing of real captures of ``POST /v1/messages`` with ``stream: true``: each
event an ``event:`` line, one ``data:`` line and a blank line (LF only); the JSON as Anthropic
serialises it, including its quirks: whitespace padding before an object's last brace on many
events, ``{"type": "ping"}`` with spaces, ``message_start`` carrying the input usage (cache
counts and their per-TTL breakdown, ``service_tier``) with ``output_tokens`` of a few,
``message_delta`` carrying the stop reason and the cumulative usage (input counts repeated),
a tool's input as ``partial_json`` pieces that split keys and values anywhere (the first one
empty), a thinking block closed by one ``signature_delta``, a ``redacted_thinking`` block whole
in its ``content_block_start``, and an error as ``event: error`` after an HTTP 200. Texts, ids,
signatures and redacted data are our own.
"""

from __future__ import annotations

import json
from typing import Any

SIGNATURE = (
    "EqQBCkgIChABGAIiQHs1dLmJ0l9qbp0pQw2HtVh7M8bJXg3b4x6f+0XaZ5mW1x0zS6bN0lR2k8pY3Gv8W4c"
    "9kQ5Y7nV2oP0eR1tA0SDDX7yHc2lQk1dUf5xBoMqZ3bN9xw1mR8vT2tIjC1gK6sL0dF4hJ7pQ3aE5uN8bV2xZ"
    "9yW4cR7tY1oP3kM6nB0vC5xZ8aS2dF=="
)


def event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def usage(
    input_tokens: int,
    output_tokens: int,
    *,
    cache_write: int = 0,
    cache_read: int = 0,
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def start(message_id: str, model: str, start_usage: dict[str, Any]) -> bytes:
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    body = json.dumps({"type": "message_start", "message": message}, separators=(",", ":"))
    return event("message_start", body[:-1] + "        }")


def block_start(index: int, block: dict[str, Any], pad: int = 12) -> bytes:
    body = json.dumps(
        {"type": "content_block_start", "index": index, "content_block": block},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return event("content_block_start", body[:-1] + " " * pad + "}")


def delta(index: int, kind: str, key: str, value: str, pad: int = 0) -> bytes:
    body = json.dumps(
        {"type": "content_block_delta", "index": index, "delta": {"type": kind, key: value}},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return event("content_block_delta", body[:-1] + " " * pad + "}")


def text(index: int, value: str, pad: int = 0) -> bytes:
    return delta(index, "text_delta", "text", value, pad)


def block_stop(index: int, pad: int = 6) -> bytes:
    padding = " " * pad
    return event("content_block_stop", f'{{"type":"content_block_stop","index":{index}{padding}}}')


def message_delta(
    reason: str, final_usage: dict[str, Any], stop_sequence: str | None = None, **extra: Any
) -> bytes:
    counts = {k: v for k, v in final_usage.items() if k not in ("cache_creation", "service_tier")}
    counts.update(extra)
    body = json.dumps(
        {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
            "usage": counts,
        },
        separators=(",", ":"),
    )
    return event("message_delta", body[:-1] + " }")


PING = event("ping", '{"type": "ping"}')
STOP = event("message_stop", '{"type":"message_stop"              }')
MODEL = "claude-sonnet-4-5-20250929"

# "Hi there" -> plain text, a ping after the first block opens.
TEXT = [
    start("msg_01TextK8vGq3mZ2xW7yR4aB", MODEL, usage(21, 1)),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text(0, "Hello", 10),
    text(0, "! How can I"),
    text(0, " help you today?", 8),
    block_stop(0),
    message_delta("end_turn", usage(21, 12)),
    STOP,
]
TEXT_ANSWER = "Hello! How can I help you today?"

# Thinking first (three deltas, then its signature), then the answer.
THINKING = [
    start("msg_01ThinkQ7c2Lm8Pz4Vb6Nx", MODEL, usage(46, 6)),
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    delta(0, "thinking_delta", "thinking", "The user asks for 6 times 7."),
    PING,
    delta(0, "thinking_delta", "thinking", " That is 42; a short", 10),
    delta(0, "thinking_delta", "thinking", " answer will do.", 12),
    delta(0, "signature_delta", "signature", SIGNATURE, 8),
    block_stop(0),
    block_start(1, {"type": "text", "text": ""}, 14),
    text(1, "Six times seven", 10),
    text(1, " is 42."),
    block_stop(1, 7),
    message_delta("end_turn", usage(46, 88), output_tokens_details={"thinking_tokens": 71}),
    STOP,
]
THINKING_TEXT = "The user asks for 6 times 7. That is 42; a short answer will do."
THINKING_ANSWER = "Six times seven is 42."

# Thinking, then a tool call: the signed block must come back on the loop's next step.
LOOP_SIGNATURE = (
    "ErcBCkYIBRgCKkDq0WmC5bX3xT9uN2pVhK7sL4yR8dF1gJ6aZ0cM3eQ5tB9wU2iO7nH4vS1kP8rA6zX3yG0fE5jD"
    "2lC9mT7oW4bEgxsQ2v8K1pR5nY3dF7aGgyH9kL2mN4pQ6rS8tUiMJx7Vb3Nc5Rf1Tg9Yh2Kj4Lm6Pq8Sv0Wx=="
)
THINKING_TOOL_USE = [
    start("msg_01LoopA5tK8vN2qW7mR4xP", MODEL, usage(540, 4)),
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    delta(0, "thinking_delta", "thinking", "The user wants the weather in Paris;"),
    delta(0, "thinking_delta", "thinking", " get_weather will tell.", 9),
    delta(0, "signature_delta", "signature", LOOP_SIGNATURE, 8),
    block_stop(0),
    block_start(
        1,
        {"type": "tool_use", "id": "toolu_01LoopW7cX2", "name": "get_weather", "input": {}},
        11,
    ),
    PING,
    delta(1, "input_json_delta", "partial_json", ""),
    delta(1, "input_json_delta", "partial_json", '{"city": ', 13),
    delta(1, "input_json_delta", "partial_json", '"Paris"}'),
    block_stop(1, 4),
    message_delta("tool_use", usage(540, 96), output_tokens_details={"thinking_tokens": 52}),
    STOP,
]
LOOP_THINKING = "The user wants the weather in Paris; get_weather will tell."
LOOP_CALL = {
    "id": "toolu_01LoopW7cX2",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}

# Thinking, a block the safety systems redacted, then the answer.
REDACTED_DATA = (
    "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB1"
)
REDACTED = [
    start("msg_01RedactG3mW8pL5vQ2nK", MODEL, usage(38, 3)),
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    delta(0, "thinking_delta", "thinking", "Let me think this through."),
    delta(0, "signature_delta", "signature", SIGNATURE, 8),
    block_stop(0),
    block_start(1, {"type": "redacted_thinking", "data": REDACTED_DATA}),
    block_stop(1),
    block_start(2, {"type": "text", "text": ""}, 14),
    text(2, "Done thinking."),
    block_stop(2, 7),
    message_delta("end_turn", usage(38, 61), output_tokens_details={"thinking_tokens": 44}),
    STOP,
]
REDACTED_THINKING = "Let me think this through."
REDACTED_ANSWER = "Done thinking."

# Some text, then two tool calls whose inputs arrive in pieces.
TOOL_USE = [
    start("msg_01ToolsR3nD5kW9qL2cV7h", MODEL, usage(612, 2)),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text(0, "I'll check", 10),
    text(0, " both for you."),
    block_stop(0),
    block_start(
        1,
        {"type": "tool_use", "id": "toolu_01Weather4Kp8Xz", "name": "get_weather", "input": {}},
        11,
    ),
    delta(1, "input_json_delta", "partial_json", ""),
    delta(1, "input_json_delta", "partial_json", '{"ci', 13),
    delta(1, "input_json_delta", "partial_json", 'ty": "Pa', 15),
    delta(1, "input_json_delta", "partial_json", 'ris"}', 10),
    block_stop(1, 4),
    block_start(
        2, {"type": "tool_use", "id": "toolu_01Time9Qm3Vw", "name": "get_time", "input": {}}, 9
    ),
    delta(2, "input_json_delta", "partial_json", ""),
    delta(2, "input_json_delta", "partial_json", '{"city": "Paris"', 12),
    delta(2, "input_json_delta", "partial_json", "}"),
    block_stop(2, 4),
    message_delta("tool_use", usage(612, 121)),
    STOP,
]
TOOL_TEXT = "I'll check both for you."
TOOL_CALLS = [
    {
        "id": "toolu_01Weather4Kp8Xz",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {
        "id": "toolu_01Time9Qm3Vw",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"city": "Paris"}'},
    },
]

# The tool loop's second step: the answer from the results.
TOOL_FOLLOW_UP = [
    start("msg_01AfterT6vB2nM8sK4dF1", MODEL, usage(731, 1)),
    block_start(0, {"type": "text", "text": ""}),
    text(0, "Sunny, 21 °C", 6),
    text(0, "; it is 14:05 in Paris."),
    block_stop(0),
    message_delta("end_turn", usage(731, 19)),
    STOP,
]
TOOL_FOLLOW_UP_ANSWER = "Sunny, 21 °C; it is 14:05 in Paris."

# A prompt mostly read from the cache, some of it written to it.
CACHED = [
    start("msg_01CacheZ5xP1qJ7tN3wE8", MODEL, usage(14, 1, cache_write=256, cache_read=1792)),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text(0, "From the cache,", 8),
    text(0, " quickly."),
    block_stop(0),
    message_delta("end_turn", usage(14, 9, cache_write=256, cache_read=1792)),
    STOP,
]
CACHED_ANSWER = "From the cache, quickly."

# Overloaded after the answer began: the stream carries the error, the HTTP status was 200.
OVERLOADED_EVENT = event(
    "error", '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
)
MID_ERROR = [
    start("msg_01ErrorB8mK2pL6vX4cQ9", MODEL, usage(21, 1)),
    block_start(0, {"type": "text", "text": ""}),
    text(0, "Partial", 10),
    text(0, " answer"),
    OVERLOADED_EVENT,
]
MID_ERROR_TEXT = "Partial answer"

# A refusal: what was written stays; the stop reason says why it ended.
REFUSAL = [
    start("msg_01RefuseH4tW9kP2nB6mZ", MODEL, usage(30, 1)),
    block_start(0, {"type": "text", "text": ""}),
    text(0, "I can't", 4),
    block_stop(0),
    message_delta("refusal", usage(30, 3)),
    STOP,
]

# The answer's limit reached.
MAX_TOKENS = [
    start("msg_01LengthN7qV3xK9cW2pR", MODEL, usage(21, 1)),
    block_start(0, {"type": "text", "text": ""}),
    text(0, "Once upon a time", 10),
    block_stop(0),
    message_delta("max_tokens", usage(21, 4)),
    STOP,
]


# One of the request's stop sequences reached.
STOP_SEQUENCE = [
    start("msg_01StopSeqB5nK2wQ8xL4vT", MODEL, usage(21, 1)),
    block_start(0, {"type": "text", "text": ""}),
    text(0, "One, two", 10),
    block_stop(0),
    message_delta("stop_sequence", usage(21, 3), stop_sequence="three"),
    STOP,
]


def body(recording: list[bytes]) -> bytes:
    return b"".join(recording)

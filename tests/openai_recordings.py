"""Streams as OpenAI-compatible upstreams send them (chunk bodies of real responses, ids and
timestamps replaced), each with the non-streamed answer the same upstream gives for it.

Covered: a tool call split across chunks, parallel tool calls, reasoning deltas
(``reasoning_content``, as DeepSeek and vLLM stream them), a refusal, logprobs, ``n=2``, and
usage with cached and reasoning tokens. Every frame carries ``system_fingerprint``,
``service_tier`` and OpenAI's ``obfuscation`` padding, as the real ones do.
"""

from __future__ import annotations

import copy
from typing import Any

FP = "fp_7b1f3a9c2e"


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1764500000,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": FP,
        "choices": choices,
        "usage": None,
        "obfuscation": "Xq9",
        **extra,
    }


def _choice(delta: dict[str, Any], *, index: int = 0, finish: str | None = None, **rest: Any):
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish, **rest}


def _usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    return {**_chunk([]), "usage": usage}


def _completion(choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1764500000,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": FP,
        "choices": choices,
        "usage": usage,
    }


def _message(content: str | None = None, **rest: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "refusal": None, "annotations": [], **rest}


# ---------------------------------------------------------------- parallel tool calls
_CALL = {"type": "function"}
TOOLS_USAGE = _usage(82, 51, cached=64)
TOOL_CALLS = [
    _chunk(
        [
            _choice(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_W1",
                            **_CALL,
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ],
                    "refusal": None,
                }
            )
        ]
    ),
    _chunk([_choice({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]})]),
    _chunk([_choice({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]})]),
    _chunk([_choice({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]})]),
    _chunk(
        [
            _choice(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_T2",
                            **_CALL,
                            "function": {"name": "get_time", "arguments": ""},
                        }
                    ]
                }
            )
        ]
    ),
    _chunk([_choice({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": '}}]})]),
    _chunk([_choice({"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]})]),
    _chunk([_choice({}, finish="tool_calls")]),
    _usage_chunk(TOOLS_USAGE),
]
TOOL_CALLS_COMPLETION = _completion(
    [
        {
            "index": 0,
            "message": _message(
                None,
                tool_calls=[
                    {
                        "id": "call_W1",
                        **_CALL,
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_T2",
                        **_CALL,
                        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                    },
                ],
            ),
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    TOOLS_USAGE,
)

# ---------------------------------------------------------------- reasoning, then the answer
REASONING_USAGE = _usage(20, 40, reasoning=28)
REASONING = [
    _chunk([_choice({"role": "assistant", "content": None, "reasoning_content": ""})]),
    _chunk([_choice({"content": None, "reasoning_content": "The user wants "})]),
    _chunk([_choice({"content": None, "reasoning_content": "a number; 6 times 7 "})]),
    _chunk([_choice({"content": None, "reasoning_content": "is 42."})]),
    _chunk([_choice({"content": "It is ", "reasoning_content": None})]),
    _chunk([_choice({"content": "42.", "reasoning_content": None})]),
    _chunk([_choice({}, finish="stop")]),
    _usage_chunk(REASONING_USAGE),
]
REASONING_COMPLETION = _completion(
    [
        {
            "index": 0,
            "message": _message(
                "It is 42.", reasoning_content="The user wants a number; 6 times 7 is 42."
            ),
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    REASONING_USAGE,
)

# ---------------------------------------------------------------- a refusal
REFUSAL_USAGE = _usage(15, 9)
REFUSAL = [
    _chunk([_choice({"role": "assistant", "content": None, "refusal": ""})]),
    _chunk([_choice({"refusal": "I'm sorry, "})]),
    _chunk([_choice({"refusal": "I can't help with that."})]),
    _chunk([_choice({}, finish="stop")]),
    _usage_chunk(REFUSAL_USAGE),
]
REFUSAL_COMPLETION = _completion(
    [
        {
            "index": 0,
            "message": {**_message(None), "refusal": "I'm sorry, I can't help with that."},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    REFUSAL_USAGE,
)


# ---------------------------------------------------------------- logprobs
def _lp(token: str, logprob: float, alt: str) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": token, "logprob": logprob, "bytes": list(token.encode())},
            {"token": alt, "logprob": logprob - 2.5, "bytes": list(alt.encode())},
        ],
    }


LOGPROBS_USAGE = _usage(11, 2)
_LP = [_lp("Hello", -0.0031, "Hi"), _lp("!", -0.12, ".")]
LOGPROBS = [
    _chunk([_choice({"role": "assistant", "content": "", "refusal": None})]),
    _chunk([_choice({"content": "Hello"}, logprobs={"content": [_LP[0]], "refusal": None})]),
    _chunk([_choice({"content": "!"}, logprobs={"content": [_LP[1]], "refusal": None})]),
    _chunk([_choice({}, finish="stop")]),
    _usage_chunk(LOGPROBS_USAGE),
]
LOGPROBS_COMPLETION = _completion(
    [
        {
            "index": 0,
            "message": _message("Hello!"),
            "logprobs": {"content": _LP, "refusal": None},
            "finish_reason": "stop",
        }
    ],
    LOGPROBS_USAGE,
)

# ---------------------------------------------------------------- n=2
N2_USAGE = _usage(10, 6)
N2 = [
    _chunk([_choice({"role": "assistant", "content": "", "refusal": None}, index=0)]),
    _chunk([_choice({"role": "assistant", "content": "", "refusal": None}, index=1)]),
    _chunk([_choice({"content": "Red"}, index=0)]),
    _chunk([_choice({"content": "Blue"}, index=1)]),
    _chunk([_choice({"content": " apple."}, index=0)]),
    _chunk([_choice({"content": " sky."}, index=1)]),
    _chunk([_choice({}, index=0, finish="stop")]),
    _chunk([_choice({}, index=1, finish="stop")]),
    _usage_chunk(N2_USAGE),
]
N2_COMPLETION = _completion(
    [
        {"index": 0, "message": _message("Red apple."), "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "message": _message("Blue sky."), "logprobs": None, "finish_reason": "stop"},
    ],
    N2_USAGE,
)

# ---------------------------------------------------------------- an error mid-stream
MID_ERROR = [
    _chunk([_choice({"role": "assistant", "content": "", "refusal": None})]),
    _chunk([_choice({"content": "Partial "})]),
    {
        "error": {
            "message": "The server had an error processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    },
]

RECORDINGS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "tool_calls": (TOOL_CALLS, TOOL_CALLS_COMPLETION),
    "reasoning": (REASONING, REASONING_COMPLETION),
    "refusal": (REFUSAL, REFUSAL_COMPLETION),
    "logprobs": (LOGPROBS, LOGPROBS_COMPLETION),
    "n2": (N2, N2_COMPLETION),
}


def recording(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    frames, completion = RECORDINGS[name]
    return copy.deepcopy(frames), copy.deepcopy(completion)

"""OpenAI choices put together from a stream's steps, the way the official SDKs accumulate them.

What a non-streamed ``chat.completion`` answers (every choice of ``n``), and what a turn's
record keeps of choice 0 besides its text (reasoning, tool calls, a refusal). The merge rule is
the SDKs' (``openai.lib.streaming.chat._completions.accumulate_delta``): strings are
concatenated, ``index``, ``type`` (and ``role``: always the assistant) replaced, dicts merged,
lists of indexed dicts merged by their ``index``; ``logprobs`` lists are extended.
"""

from __future__ import annotations

from typing import Any

REASONING_KEYS = ("reasoning_content", "reasoning")


class Assembly:
    __slots__ = ("_choices",)

    def __init__(self) -> None:
        self._choices: dict[int, dict[str, Any]] = {}

    def _choice(self, index: int) -> dict[str, Any]:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = {
                # OpenAI's non-streamed message has these even when the stream never said them
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": None,
            }
        return choice

    def text(self, text: str) -> None:
        """Plain text of choice 0."""
        message = self._choice(0)["message"]
        message["content"] = (message["content"] or "") + text

    def frame(self, frame: dict[str, Any]) -> None:
        """One step in OpenAI's chunk shape (``Chunk.frame``)."""
        for raw in frame.get("choices") or ():
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = self._choice(index if isinstance(index, int) else 0)
            delta = raw.get("delta")
            if isinstance(delta, dict):
                merge(choice["message"], {k: v for k, v in delta.items() if v is not None})
            logprobs = raw.get("logprobs")
            if isinstance(logprobs, dict):
                acc = choice["logprobs"] = choice["logprobs"] or {}
                for key, value in logprobs.items():
                    if isinstance(value, list):
                        acc[key] = [*(acc.get(key) or []), *value]
                    elif key not in acc:
                        acc[key] = value
            if raw.get("finish_reason") is not None:
                choice["finish_reason"] = raw["finish_reason"]

    def choices(self, finish_reason: str) -> list[dict[str, Any]]:
        """Every choice, choice 0 ending with ``finish_reason`` (the turn's own)."""
        self._choice(0)["finish_reason"] = finish_reason
        out = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            message = choice["message"]
            _unindex(message)
            if message["content"] is None and not (message["refusal"] or message.get("tool_calls")):
                message["content"] = ""  # an empty answer
            out.append({"index": index, **choice})
        return out

    def extras(self) -> dict[str, Any]:
        """What a record keeps of choice 0 besides its text: reasoning, tool calls, refusal."""
        message: dict[str, Any] = _unindex(self._choice(0)["message"])
        out: dict[str, Any] = {}
        reasoning = "".join(v for k in REASONING_KEYS if isinstance(v := message.get(k), str))
        if reasoning:
            out["reasoning"] = reasoning
        if message.get("tool_calls"):
            out["tool_calls"] = message["tool_calls"]
        if message.get("refusal"):
            out["refusal"] = message["refusal"]
        return out

    def generated(self) -> list[str]:
        """What the model wrote besides choice 0's text (which the turn keeps itself): each
        choice's reasoning, tool calls (names and arguments, a custom tool's input) and refusal,
        and the other choices' text. What a turn with no usage is billed for beyond its text."""
        out: list[str] = []
        for index, choice in self._choices.items():
            message = choice["message"]
            parts = [message.get(k) for k in (*REASONING_KEYS, "refusal")]
            if index != 0:
                parts.append(message.get("content"))
            for call in message.get("tool_calls") or ():
                if not isinstance(call, dict):
                    continue
                function, custom = call.get("function"), call.get("custom")
                if isinstance(function, dict):
                    parts += [function.get("name"), function.get("arguments")]
                if isinstance(custom, dict):  # OpenAI's custom tools: free-form input
                    parts += [custom.get("name"), custom.get("input")]
            out += [p for p in parts if isinstance(p, str) and p]
        return out


def merge(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The SDKs' ``accumulate_delta``."""
    for key, value in delta.items():
        current = acc.get(key)
        if current is None or key in ("index", "type", "role"):
            acc[key] = _copy(value)
        elif isinstance(current, str) and isinstance(value, str):
            acc[key] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            merge(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            if all(isinstance(x, str | int | float) for x in current):
                current.extend(value)
                continue
            for entry in value:
                index = entry.get("index") if isinstance(entry, dict) else None
                if not isinstance(index, int):
                    current.append(_copy(entry))
                elif index < len(current):
                    merge(current[index], entry)
                else:
                    current.insert(index, _copy(entry))
        else:
            acc[key] = _copy(value)
    return acc


def _unindex(message: dict[str, Any]) -> dict[str, Any]:
    """A whole message's tool calls have no ``index`` (only their deltas do)."""
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict):
            call.pop("index", None)
    return message


def _copy(value: Any) -> Any:
    """Merging must never change a frame the live stream still hands out."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value

"""A turn's request (``CompletionRequest``, OpenAI's terms) as an Anthropic Messages API body.

Messages: every ``system``/``developer`` message goes to ``system`` (text blocks; Anthropic has
no system role); ``user`` content parts become ``text`` and ``image`` blocks (a ``data:`` URL a
base64 source, an ``https``/``http`` URL a url source; OpenAI's ``detail`` hint has no
equivalent and is not sent); an assistant's ``tool_calls`` become ``tool_use`` blocks (their
``arguments`` parsed: a string that is not a JSON object is 400 ``invalid_value`` naming it);
consecutive ``tool`` messages become one user message of ``tool_result`` blocks; an answer
handed back as an assistant message keeps its text and tool calls (its ``reasoning_content``
and ``annotations`` are not sent: the thinking Anthropic can take back is the signed block).
Consecutive messages of one role are merged (Anthropic wants the roles to alternate), empty text
is dropped (Anthropic refuses empty text blocks), and a conversation opening with the assistant
loses those leading turns (and their tool results): Anthropic wants the user to speak first. A
last assistant message is sent as it is: Anthropic continues it (a prefill).

Anthropic's own fields, as the ``/v1/messages`` front door keeps them (and as an OpenAI-shaped
client may send them, LiteLLM's names), are sent as they were written: an assistant message's
``thinking_blocks`` (thinking blocks with their signatures, ``redacted_thinking`` blocks; first
in that message, as Anthropic wants them; an ``index`` an OpenAI SDK's accumulation left on
them is not sent); a ``tool`` message's ``is_error`` on its ``tool_result``; ``cache_control`` on
a content part, a tool call, a tool (beside its ``function``), or a message (on the last block
that message becomes: a tool message's ``tool_result``); a tool's fields the front door does not
know (a ``NativeFields`` beside its ``function``); options ``thinking``, ``top_k``,
``stop_sequences``, ``metadata.user_id``; and the fields the front door does not know, as
``NATIVE_FIELDS`` (a ``NativeFields``: only the front door makes one, so an OpenAI-shaped
request's unknown field is still refused by name), never over what this module writes itself
(``model``, ``messages``, ``system``, ``max_tokens``, ``stream``).

Options: ``tools`` -> ``tools`` (``parameters`` as ``input_schema``, ``strict`` kept),
``tool_choice`` none/auto/required/a function -> ``none``/``auto``/``any``/``tool``,
``parallel_tool_calls: false`` -> ``disable_parallel_tool_use``, ``reasoning_effort`` ->
``thinking`` with ``EFFORT_BUDGETS`` (``none``: no thinking), ``response_format`` json_schema ->
``output_config.format`` (Anthropic's structured outputs), ``user`` -> ``metadata.user_id``,
``service_tier`` auto/default -> auto/standard_only, ``stop`` -> ``stop_sequences``.
``metadata``'s other keys label OpenAI's stored completions, which Anthropic has none of: they
are not sent. Everything else (``n`` > 1, ``logprobs``, ``logit_bias``, ``seed``, penalties,
``json_object``, other service tiers, fields this service does not know) is refused by name,
and so are OpenAI's custom tools (a tool, a tool call or a tool choice that is not a function)
and its ``allowed_tools`` choice.

Thinking needs room: its budget must stay below ``max_tokens``. A budget the answer's limit
(the model's ``max_output_tokens``, the client's ``max_tokens``, the budget grant) does not
leave room above becomes half that limit (at least ``MIN_THINKING``); a limit of
``MIN_THINKING`` or less runs the turn without thinking. On a tool loop's next step (the last
assistant message called tools) Anthropic requires that message to open with the signed
thinking block it came with: with its ``thinking_blocks`` the step thinks; without them (an
OpenAI-shaped client that kept only the text and the calls) it runs without thinking. Thinking
excludes forced tool use, ``top_k`` and a ``temperature`` other than 1 (and ``top_p`` below
0.95): those are refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import orjson

from service.errors import BadRequest
from service.providers.base import (
    CompletionRequest,
    Message,
    first_non_function,
    first_unsupported,
)

# reasoning_effort -> thinking budget_tokens (Anthropic's minimum budget is 1,024)
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
MIN_THINKING = 1024
# The front door's fields this service does not know, sent on as written (``NativeFields``).
NATIVE_FIELDS = "anthropic_fields"
OPTIONS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "response_format",
        "user",
        "metadata",
        "service_tier",
        # Anthropic's own, from the /v1/messages front door
        "thinking",
        "top_k",
        "stop_sequences",
        NATIVE_FIELDS,
    }
)
# What this module writes itself: never taken from ``NATIVE_FIELDS``.
OWN_FIELDS = frozenset({"model", "messages", "system", "max_tokens", "stream"})
# What a message may carry besides its role and content, and on which roles.
MESSAGE_FIELDS = {
    "tool_calls": frozenset({"assistant"}),
    "tool_call_id": frozenset({"tool"}),
    "thinking_blocks": frozenset({"assistant"}),
    "is_error": frozenset({"tool"}),
    "cache_control": frozenset({"system", "developer", "user", "assistant", "tool"}),
}
# Values that ask for nothing, beyond those every provider takes (``base.NEUTRAL``).
NEUTRAL: dict[str, Any] = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
# What an answer handed back as the next request's assistant message carries besides content.
ANSWER_NOTES = frozenset({"reasoning_content", "reasoning", "annotations"})
SERVICE_TIERS = {"auto": "auto", "default": "standard_only", "standard_only": "standard_only"}
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"^data:(image/[a-z]+);base64,(.*)$", re.S)
_MISSING = object()

Block = dict[str, Any]


class NativeFields(dict[str, Any]):
    """Fields of Anthropic's request the ``/v1/messages`` front door does not know, as the
    client wrote them, for the options' ``NATIVE_FIELDS``. A type of its own: a value parsed
    from JSON never is one, so only the front door can pass fields on unchecked."""


# ---------------------------------------------------------------------- refusals
def unsupported(request: CompletionRequest) -> str | None:
    """The first thing in ``request`` Anthropic cannot honour, or None; a tool call whose
    arguments are not a JSON object raises 400 ``invalid_value`` naming it."""
    options = {k: v for k, v in request.options.items() if NEUTRAL.get(k, _MISSING) != v}
    messages = [_without_answer_notes(m) for m in request.messages]
    param = first_unsupported(
        dataclasses.replace(request, options=options, messages=messages),
        OPTIONS,
        parts=frozenset({"text", "image_url"}),
        roles=frozenset({"system", "developer", "user", "assistant", "tool"}),
        message_fields=frozenset(MESSAGE_FIELDS),
    )
    if param is not None:
        return param
    for check in (first_non_function, _unsupported_option, _unsupported_field, _unsupported_part):
        param = check(request)
        if param is not None:
            return param
    to_messages(request.messages)  # raises on a tool call's arguments
    return None


def _without_answer_notes(message: Message) -> Message:
    """An assistant message as the SDKs hand an answer back (``messages.append(message)``):
    its earlier thinking (Anthropic drops a finished turn's thinking from the context itself)
    and its ``annotations`` (citations of the answer) are not content, and are not sent."""
    if message.get("role") != "assistant" or not ANSWER_NOTES & message.keys():
        return message
    return {k: v for k, v in message.items() if k not in ANSWER_NOTES}


def _unsupported_option(request: CompletionRequest) -> str | None:
    options = request.options
    fmt = options.get("response_format")
    text = isinstance(fmt, dict) and fmt.get("type") == "text"
    if fmt is not None and not text and _schema_format(fmt) is None:
        return "response_format"
    if options.get("service_tier") not in (None, *SERVICE_TIERS):
        return "service_tier"
    native = options.get(NATIVE_FIELDS)
    if native is not None and not isinstance(native, NativeFields):
        return NATIVE_FIELDS
    try:
        thinking = requested_thinking(options)
    except ValueError as exc:
        return str(exc)
    if thinking is not None and thinking.get("type") != "disabled" and thinks(request):
        if options.get("top_k") is not None:
            return "top_k"
        if options.get("tool_choice") not in (None, "auto", "none"):
            return "tool_choice"
    return None


def _unsupported_field(request: CompletionRequest) -> str | None:
    """Anthropic's message fields on the roles they belong to, in the shape Anthropic takes."""
    for i, message in enumerate(request.messages):
        role = message.get("role")
        for key, roles in MESSAGE_FIELDS.items():
            value = message.get(key)
            if value is None or value == [] or (role in roles and _well_formed(key, value)):
                continue
            return f"messages[{i}].{key}"
    return None


def _well_formed(key: str, value: Any) -> bool:
    if key == "is_error":
        return isinstance(value, bool)
    if key == "cache_control":
        return isinstance(value, dict)
    if key == "thinking_blocks":
        return isinstance(value, list) and all(map(_thinking_block, value))
    return True


def _thinking_block(block: Any) -> bool:
    if not isinstance(block, dict):
        return False
    if block.get("type") == "redacted_thinking":
        return isinstance(block.get("data"), str)
    signature = block.get("signature")
    return (
        block.get("type") == "thinking"
        and isinstance(block.get("thinking"), str)
        and (signature is None or isinstance(signature, str))
    )


def _unsupported_part(request: CompletionRequest) -> str | None:
    """Pictures go where Anthropic takes them (a user's message, a tool's result), as a
    base64 data URL of a type it reads or an http(s) URL."""
    for i, message in enumerate(request.messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if part.get("type") != "image_url":
                continue
            if message.get("role") not in ("user", "tool") or _image(part) is None:
                return f"messages[{i}].content[{j}]"
    return None


def sampling_conflict(request: CompletionRequest, thinking: bool) -> BadRequest | None:
    """Sampling Anthropic cannot take: a temperature above its range, or sampling changed
    while the model thinks. Checked before the turn is admitted (``unsupported``) and when it
    opens."""
    temperature, top_p = request.temperature, request.top_p
    if temperature is not None and temperature > 1:
        return _refused(request, "temperature", "Anthropic takes 0 to 1")
    if thinking and temperature is not None and temperature != 1:
        return _refused(request, "temperature", "only 1 while the model thinks")
    if thinking and top_p is not None and top_p < 0.95:
        return _refused(request, "top_p", "0.95 to 1 while the model thinks")
    return None


def _refused(request: CompletionRequest, param: str, why: str) -> BadRequest:
    return BadRequest(
        f"'{param}' is not supported with model '{request.model}' (provider anthropic): {why}",
        code="unsupported_parameter",
        details={"param": param, "model": request.model, "provider": "anthropic", "why": why},
    )


# ---------------------------------------------------------------------- thinking
def requested_thinking(options: dict[str, Any]) -> dict[str, Any] | None:
    """Anthropic's ``thinking`` as asked (natively, or as OpenAI's ``reasoning_effort``), or
    None; ``ValueError(param)`` when what was asked has no Anthropic meaning."""
    native = options.get("thinking")
    if native is not None:
        if not isinstance(native, dict) or native.get("type") not in (
            "enabled",
            "disabled",
            "adaptive",
        ):
            raise ValueError("thinking")
        if native["type"] == "enabled":
            budget = native.get("budget_tokens")
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < MIN_THINKING:
                raise ValueError("thinking")
        return dict(native)
    effort = options.get("reasoning_effort")
    if effort is None or effort == "none":
        return None
    budget = EFFORT_BUDGETS.get(effort)
    if budget is None:
        raise ValueError("reasoning_effort")
    return {"type": "enabled", "budget_tokens": budget}


def thinks(request: CompletionRequest) -> bool:
    """False when the last assistant message called tools (a tool loop's next step) without
    the thinking blocks it came with."""
    for message in reversed(request.messages):
        if message.get("role") == "assistant":
            return not message.get("tool_calls") or bool(message.get("thinking_blocks"))
    return True


def thinking_for(request: CompletionRequest) -> dict[str, Any] | None:
    """The ``thinking`` to send with ``request``'s ``max_tokens`` (see the module's doc)."""
    try:
        thinking = requested_thinking(request.options)
    except ValueError:
        return None  # refused before the turn was admitted
    if thinking is None or thinking["type"] == "disabled":
        return thinking
    if not thinks(request):
        return None
    if thinking["type"] == "enabled":
        limit = request.max_tokens
        if limit <= MIN_THINKING:
            return None
        if thinking["budget_tokens"] >= limit:
            thinking["budget_tokens"] = max(MIN_THINKING, limit // 2)
    return thinking


# ---------------------------------------------------------------------- body
def build_body(request: CompletionRequest) -> dict[str, Any]:
    """The Messages API body (``stream`` and ``max_tokens`` always sent)."""
    options = request.options
    system, messages = to_messages(request.messages)
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": messages,
        "stream": True,
    }
    if system:
        body["system"] = system
    thinking = thinking_for(request)
    if thinking is not None:
        body["thinking"] = thinking
    for key, value in (
        ("temperature", request.temperature),
        ("top_p", request.top_p),
        ("top_k", options.get("top_k")),
    ):
        if value is not None:
            body[key] = value
    stops = [*(request.stop or ()), *(options.get("stop_sequences") or ())]
    if stops:
        body["stop_sequences"] = stops
    body.update(tool_fields(options))
    user_id = user_of(options)
    if user_id is not None:
        body["metadata"] = {"user_id": user_id}
    tier = options.get("service_tier")
    if tier is not None:
        body["service_tier"] = SERVICE_TIERS[tier]
    fmt = _schema_format(options.get("response_format"))
    if fmt is not None:
        body["output_config"] = {"format": fmt}
    native = options.get(NATIVE_FIELDS)
    if isinstance(native, NativeFields):
        body.update((k, v) for k, v in native.items() if k not in OWN_FIELDS)
    return body


def tool_fields(options: dict[str, Any]) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` in Anthropic's shape (also what ``count_tokens`` takes)."""
    out: dict[str, Any] = {}
    tools = options.get("tools")
    if tools:
        out["tools"] = [_native(_cached(_tool(t["function"]), t), t) for t in tools]
    choice = _tool_choice(options.get("tool_choice"))
    # One call at most: a flag of the tool choice (auto by default), where a tool may be called.
    serial = options.get("parallel_tool_calls") is False and tools
    if serial and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _native(block: Block, item: dict[str, Any]) -> Block:
    """``block`` with the fields the ``/v1/messages`` front door kept on the tool it was made
    of, as written (``NativeFields``), never over what this module wrote."""
    native = item.get(NATIVE_FIELDS)
    if isinstance(native, NativeFields):
        block.update((k, v) for k, v in native.items() if k not in block)
    return block


def _tool(function: dict[str, Any]) -> Block:
    tool: Block = {"name": function["name"]}
    if function.get("description") is not None:
        tool["description"] = function["description"]
    tool["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    if function.get("strict") is not None:
        tool["strict"] = function["strict"]
    return tool


def _tool_choice(choice: Any) -> Block | None:
    if choice is None:
        return None
    if isinstance(choice, dict):
        return {"type": "tool", "name": choice["function"]["name"]}
    return {"type": {"required": "any"}.get(choice, choice)}


def user_of(options: dict[str, Any]) -> str | None:
    metadata = options.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        return str(metadata["user_id"])
    user = options.get("user")
    return user if isinstance(user, str) else None


def _schema_format(fmt: Any) -> Block | None:
    """OpenAI's ``json_schema`` response format as Anthropic's ``output_config.format``."""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        return None
    return {"type": "json_schema", "schema": schema}


# ---------------------------------------------------------------------- messages
def to_messages(messages: list[Message]) -> tuple[list[Block], list[dict[str, Any]]]:
    """OpenAI chat messages as Anthropic's ``system`` blocks and alternating ``messages``."""
    system: list[Block] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_marked(_text_blocks(message.get("content")), message))
            continue
        if role == "assistant":
            blocks = [
                *_thinking_blocks(message),
                *_text_blocks(message.get("content")),
                *_tool_uses(message, i),
            ]
        elif role == "tool":
            blocks = [_tool_result(message)]
        else:
            blocks = _user_blocks(message.get("content"))
        if not blocks:
            continue
        blocks = _marked(blocks, message)
        kind = "assistant" if role == "assistant" else "user"
        if out and out[-1]["role"] == kind:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": kind, "content": blocks})
    return system, [_compact(m) for m in _from_the_user(out)]


def _from_the_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without leading assistant turns, nor the results of their tool calls."""
    start = 0
    while start < len(messages):
        message = messages[start]
        if message["role"] == "user":
            kept = [b for b in message["content"] if b["type"] != "tool_result"]
            if kept:
                if len(kept) < len(message["content"]):
                    messages[start] = {"role": "user", "content": kept}
                break
        start += 1
    return messages[start:]


def _compact(message: dict[str, Any]) -> dict[str, Any]:
    """One text block is sent as a plain string (the common case, and the shorter body)."""
    content = message["content"]
    if len(content) == 1 and content[0].keys() == {"type", "text"}:
        return {"role": message["role"], "content": content[0]["text"]}
    return message


def _cached(block: Block, item: dict[str, Any]) -> Block:
    """``block`` with the ``cache_control`` of the part, call or tool it was made of."""
    if item.get("cache_control") is not None:
        block["cache_control"] = item["cache_control"]
    return block


def _marked(blocks: list[Block], message: Message) -> list[Block]:
    """A message's ``cache_control`` on the last block it became (a cache breakpoint covers
    everything before it)."""
    if blocks and message.get("cache_control") is not None:
        blocks[-1] = {**blocks[-1], "cache_control": message["cache_control"]}
    return blocks


def _thinking_blocks(message: Message) -> list[Block]:
    """The assistant's thinking blocks as Anthropic gave them (without an SDK's ``index``)."""
    return [
        {k: v for k, v in block.items() if k != "index"}
        for block in message.get("thinking_blocks") or ()
    ]


def _text_blocks(content: Any) -> list[Block]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        return []
    return [
        _cached({"type": "text", "text": p["text"]}, p)
        for p in content
        if isinstance(p, dict) and p.get("type") == "text" and p.get("text")
    ]


def _user_blocks(content: Any) -> list[Block]:
    if not isinstance(content, list):
        return _text_blocks(content)
    blocks: list[Block] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "image_url":
            image = _image(part)
            if image is not None:
                blocks.append(_cached(image, part))
        else:
            blocks.extend(_text_blocks([part]))
    return blocks


def _image(part: dict[str, Any]) -> Block | None:
    url = (part.get("image_url") or {}).get("url")
    if not isinstance(url, str):
        return None
    data = _DATA_URL.match(url)
    if data is not None:
        if data.group(1) not in IMAGE_TYPES:
            return None
        source = {"type": "base64", "media_type": data.group(1), "data": data.group(2)}
        return {"type": "image", "source": source}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    return None


def _tool_uses(message: Message, index: int) -> list[Block]:
    blocks = []
    for j, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        block = {
            "type": "tool_use",
            "id": call["id"],
            "name": function["name"],
            "input": _arguments(function.get("arguments"), index, j),
        }
        blocks.append(_cached(block, call))
    return blocks


def _arguments(raw: Any, index: int, call: int) -> dict[str, Any]:
    param = f"messages[{index}].tool_calls[{call}].function.arguments"
    try:
        value = orjson.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadRequest(
            f"Invalid value for '{param}': a tool call's arguments must be a JSON object.",
            code="invalid_value",
            details={"param": param},
        )
    return value


def _tool_result(message: Message) -> Block:
    block: Block = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif isinstance(content, list):
        blocks = _user_blocks(content)
        if blocks:
            block["content"] = blocks
    if message.get("is_error") is not None:
        block["is_error"] = message["is_error"]
    return block

"""An OpenAI chat request in the Gemini API's terms (``generateContent``, v1beta), or the first
part of it Gemini cannot honour: nothing is dropped on the way.

Messages. ``system``/``developer`` -> ``systemInstruction`` (text only); ``user`` -> a user
content: text parts, and ``image_url`` parts whose URL is a base64 ``data:`` URL ->
``inlineData`` (an http(s) URL is refused: the Gemini API fetches no arbitrary URL into a part,
and ``fileData`` takes only the URIs of files uploaded to it); ``assistant`` -> a model content:
its text, then one ``functionCall`` part per tool call (``args`` parsed from the JSON string;
the call's thought signature, handed to the client as
``tool_calls[i].extra_content.google.thought_signature`` the way Google's own OpenAI endpoint
does, goes back as the part's ``thoughtSignature``); ``tool`` -> a user content with a
``functionResponse`` (its name looked up from the ``tool_call_id`` in an earlier assistant
message; ``response``: the tool's content when it is a JSON object, else
``{"output": <text>}``, the key Gemini documents for a function's output). An assistant's
``reasoning_content`` (a thinking answer passed back) is accepted and not sent: Gemini takes no
thoughts as input, the thought signature carries them. Consecutive messages of one role are
merged into one content, because Gemini wants the roles to alternate (so consecutive tool
results are one content); a conversation opening with the model loses those leading model
turns, because Gemini wants the user to speak first; empty text is dropped (Gemini refuses
empty text parts).

Gemini 3 refuses a model turn whose function calls come back without their thought signature.
A call the client sends without one (a transcript built by hand, a client that keeps only the
standard fields) gets the marker Google documents for calls the model did not produce,
``skip_thought_signature_validator``, on the first call of its turn.

Options. ``tools`` -> ``tools[0].functionDeclarations`` with each function's JSON schema as
``parametersJsonSchema`` (full JSON Schema, v1beta; rather than the OpenAPI subset of
``parameters``); a ``strict`` function asks for schema adherence: mode ``VALIDATED`` where
``tool_choice`` is auto. ``tool_choice`` none/auto/required/named -> ``toolConfig.
functionCallingConfig`` mode ``NONE``/``AUTO``/``ANY``/``ANY`` + ``allowedFunctionNames``.
``response_format`` json_object -> ``responseMimeType: application/json``, json_schema -> that
and ``responseJsonSchema``. ``seed``, ``frequency_penalty``, ``presence_penalty`` -> their
``generationConfig`` fields; ``logprobs``/``top_logprobs`` -> ``responseLogprobs``/``logprobs``.
``reasoning_effort`` -> ``thinkingConfig`` with ``includeThoughts`` (the client asked for
reasoning): ``thinkingLevel`` on Gemini 3 and later, ``thinkingBudget`` on the others (which
Gemini 3 accepts too). An image part's ``detail`` -> ``generationConfig.mediaResolution``
(one for the whole request). ``user`` and ``metadata`` are labels: the provider logs them,
Gemini has no such fields. Anything else — ``n`` above 1, ``logit_bias``,
``parallel_tool_calls: false``, ``service_tier``, OpenAI's custom tools and ``allowed_tools``
choice, fields unknown here — is ``Unsupported``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.errors import BadRequest
from service.providers.base import (
    CompletionRequest,
    Message,
    first_non_function,
    first_unsupported,
)

Content = dict[str, Any]
Part = dict[str, Any]

OPTIONS = frozenset(
    {
        "tools",
        "tool_choice",
        "response_format",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "reasoning_effort",
        "user",
        "metadata",
    }
)
LABELS = ("user", "metadata")  # logged by the provider, not sent: Gemini has no such fields
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MESSAGE_FIELDS = frozenset({"tool_calls", "tool_call_id", "reasoning_content"})
PARTS = frozenset({"text", "image_url"})
SKIP_SIGNATURE = "skip_thought_signature_validator"
MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}
# reasoning_effort as Gemini 2.x thinking budgets (tokens) and Gemini 3 thinking levels, as
# Google's own OpenAI-compatible endpoint maps them. Gemini 3 cannot switch thinking off.
BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}
LEVELS = {"minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH"}
RESOLUTIONS = {"low": "MEDIA_RESOLUTION_LOW", "high": "MEDIA_RESOLUTION_HIGH"}
_GENERATION = re.compile(r"(?:models/)?gemini-(\d+)")


class Unsupported(Exception):
    """A part of the request Gemini cannot honour, named as OpenAI names it."""

    def __init__(self, param: str) -> None:
        super().__init__(param)
        self.param = param


@dataclass(slots=True)
class Translation:
    system: list[str]
    contents: list[Content]
    config: dict[str, Any]  # generationConfig
    tools: list[dict[str, Any]] | None = None
    tool_config: dict[str, Any] | None = None
    labels: dict[str, Any] = field(default_factory=dict)

    def request(self, safety: list[dict[str, str]]) -> dict[str, Any]:
        """The ``generateContent`` body."""
        body: dict[str, Any] = {"contents": self.contents, "generationConfig": self.config}
        if self.system:
            body["systemInstruction"] = {"parts": [{"text": t} for t in self.system]}
        if self.tools:
            body["tools"] = self.tools
        if self.tool_config:
            body["toolConfig"] = self.tool_config
        if safety:
            body["safetySettings"] = safety
        return body

    @property
    def plain(self) -> bool:
        """Contents alone say what the prompt is (no tools, no response schema)."""
        return not self.tools and "responseJsonSchema" not in self.config


def unsupported(request: CompletionRequest) -> str | None:
    """The first part of ``request`` Gemini cannot honour, or None. A value that cannot be
    translated because it is wrong (a tool call's arguments that are not JSON, a tool result
    for no earlier call) raises ``BadRequest`` (``invalid_value``) instead."""
    param = first_unsupported(
        request, OPTIONS, parts=PARTS, roles=ROLES, message_fields=MESSAGE_FIELDS
    ) or first_non_function(request)
    if param is not None:
        return param
    try:
        translate(request)
    except Unsupported as exc:
        return exc.param
    return None


def translate(request: CompletionRequest) -> Translation:
    """``request`` as Gemini's; raises ``Unsupported`` or ``BadRequest``."""
    options = request.options
    messages = _Messages()
    for i, message in enumerate(request.messages):
        messages.add(i, message)
    config = _generation_config(request, messages.resolution)
    tools, strict = _tools(options.get("tools"))
    return Translation(
        system=messages.system,
        contents=messages.contents,
        config=config,
        tools=tools,
        tool_config=_tool_config(options.get("tool_choice"), tools, strict),
        labels={k: options[k] for k in LABELS if options.get(k) is not None},
    )


def _invalid(message: str, param: str) -> BadRequest:
    return BadRequest(message, code="invalid_value", details={"param": param})


# ---------------------------------------------------------------------- messages
class _Messages:
    """The conversation as Gemini's contents, built one message at a time."""

    def __init__(self) -> None:
        self.system: list[str] = []
        self.contents: list[Content] = []
        self.names: dict[str, str] = {}  # tool_call_id -> the function it called
        self.resolution: str | None = None  # the images' detail, one for the request

    def add(self, i: int, message: Message) -> None:
        role = message["role"]
        for key, owner in (("reasoning_content", "assistant"), ("tool_call_id", "tool")):
            if message.get(key) is not None and role != owner:
                raise Unsupported(f"messages[{i}].{key}")
        if role in ("system", "developer"):
            text = "".join(_texts(message.get("content"), i))
            if text:
                self.system.append(text)
            return
        if role == "assistant":
            self._append("model", self._model_parts(i, message))
        elif role == "tool":
            self._append("user", [self._function_response(i, message)])
        else:
            self._append("user", self._user_parts(i, message.get("content")))

    def _append(self, role: str, parts: list[Part]) -> None:
        if not parts:
            return
        contents = self.contents
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        elif contents or role == "user":
            contents.append({"role": role, "parts": parts})

    def _user_parts(self, i: int, content: Any) -> list[Part]:
        if not isinstance(content, list):
            return [{"text": content}] if isinstance(content, str) and content else []
        parts: list[Part] = []
        for j, part in enumerate(content):
            if part["type"] == "image_url":
                parts.append(self._image(i, j, part["image_url"]))
            elif part["text"]:
                parts.append({"text": part["text"]})
        return parts

    def _image(self, i: int, j: int, image: dict[str, Any]) -> Part:
        param = f"messages[{i}].content[{j}]"
        url: str = image["url"]
        if not url.startswith("data:"):
            raise Unsupported(param)  # Gemini fetches no URL into a part
        header, comma, data = url[5:].partition(",")
        mime, *params = header.split(";")
        if not comma or not mime or not params or params[-1] != "base64" or not data:
            raise _invalid(
                f"'{param}.image_url.url' must be a base64 data URL "
                "(data:<media type>;base64,<data>).",
                f"{param}.image_url.url",
            )
        self._detail(image.get("detail"), param)
        return {"inlineData": {"mimeType": mime, "data": data}}

    def _detail(self, detail: str | None, param: str) -> None:
        resolution = RESOLUTIONS.get(detail or "auto")
        if resolution is None:
            return
        if self.resolution not in (None, resolution):
            raise Unsupported(param)  # Gemini's resolution is one for the whole request
        self.resolution = resolution

    def _model_parts(self, i: int, message: Message) -> list[Part]:
        parts: list[Part] = [{"text": t} for t in _texts(message.get("content"), i) if t]
        calls = [
            self._function_call(i, k, call)
            for k, call in enumerate(message.get("tool_calls") or ())
        ]
        if calls and not any("thoughtSignature" in c for c in calls):
            calls[0]["thoughtSignature"] = SKIP_SIGNATURE
        return parts + calls

    def _function_call(self, i: int, k: int, call: dict[str, Any]) -> Part:
        function = call["function"]
        self.names[call["id"]] = function["name"]
        raw = function["arguments"]
        try:
            args = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            param = f"messages[{i}].tool_calls[{k}].function.arguments"
            raise _invalid(f"'{param}' must be a JSON object.", param)
        part: Part = {"functionCall": {"name": function["name"], "args": args}}
        signature = _signature(call)
        if signature:
            part["thoughtSignature"] = signature
        return part

    def _function_response(self, i: int, message: Message) -> Part:
        call_id = message["tool_call_id"]
        name = self.names.get(call_id)
        if name is None:
            param = f"messages[{i}].tool_call_id"
            raise _invalid(f"'{param}' names no tool call of an earlier assistant message.", param)
        text = "".join(_texts(message.get("content"), i))
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = None
        response = value if isinstance(value, dict) else {"output": text}
        return {"functionResponse": {"name": name, "response": response}}


def _texts(content: Any, i: int) -> list[str]:
    """A message's text (a string, or text parts); any other part is ``Unsupported``."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    texts = []
    for j, part in enumerate(content):
        if part["type"] != "text":
            raise Unsupported(f"messages[{i}].content[{j}]")
        texts.append(part["text"])
    return texts


def _signature(call: dict[str, Any]) -> str | None:
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


# ---------------------------------------------------------------------- options
def _generation_config(request: CompletionRequest, resolution: str | None) -> dict[str, Any]:
    options = request.options
    config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
    for key, value in (
        ("temperature", request.temperature),
        ("topP", request.top_p),
        ("stopSequences", request.stop),
        ("seed", options.get("seed")),
        ("frequencyPenalty", options.get("frequency_penalty")),
        ("presencePenalty", options.get("presence_penalty")),
        ("mediaResolution", resolution),
    ):
        if value is not None:
            config[key] = value
    if options.get("logprobs"):
        config["responseLogprobs"] = True
        if options.get("top_logprobs"):
            config["logprobs"] = options["top_logprobs"]
    config.update(_response_format(options.get("response_format")))
    effort = options.get("reasoning_effort")
    if effort is not None:
        config["thinkingConfig"] = _thinking(effort, request.model)
    return config


def _response_format(value: dict[str, Any] | None) -> dict[str, Any]:
    kind = value.get("type") if value else "text"
    if kind == "text":
        return {}
    out: dict[str, Any] = {"responseMimeType": "application/json"}
    assert value is not None
    schema = (value.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if schema is not None:
        out["responseJsonSchema"] = schema
    return out


def _thinking(effort: str, model: str) -> dict[str, Any]:
    """Gemini 3 and later take a level; earlier models (and names that say no generation) a
    token budget, which Gemini 3 also accepts."""
    match = _GENERATION.match(model)
    if match and int(match.group(1)) >= 3:
        level = LEVELS.get(effort)
        if level is None:
            raise Unsupported("reasoning_effort")
        return {"thinkingLevel": level, "includeThoughts": True}
    budget = BUDGETS.get(effort)
    if budget is None:
        raise Unsupported("reasoning_effort")
    return {"thinkingBudget": budget, "includeThoughts": budget > 0}


def _tools(tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]] | None, bool]:
    """Gemini's tools, and whether any function asked for strict schema adherence."""
    if not tools:
        return None, False
    declarations = []
    strict = False
    for tool in tools:
        function = tool["function"]
        declaration: dict[str, Any] = {"name": function["name"]}
        if function.get("description") is not None:
            declaration["description"] = function["description"]
        if function.get("parameters") is not None:
            declaration["parametersJsonSchema"] = function["parameters"]
        strict = strict or bool(function.get("strict"))
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}], strict


def _tool_config(
    choice: str | dict[str, Any] | None, tools: list[dict[str, Any]] | None, strict: bool
) -> dict[str, Any] | None:
    if choice is None or choice == "auto":  # a strict function asks for schema adherence
        mode = "VALIDATED" if strict else "AUTO" if choice else None
        return {"functionCallingConfig": {"mode": mode}} if mode and tools else None
    if isinstance(choice, str):
        if choice != "none" and not tools:
            raise _invalid(f"tool_choice '{choice}' needs 'tools'.", "tool_choice")
        return {"functionCallingConfig": {"mode": MODES[choice]}} if tools else None
    name = choice["function"]["name"]
    declared = {d["name"] for d in tools[0]["functionDeclarations"]} if tools else set()
    if name not in declared:
        param = "tool_choice.function.name"
        raise _invalid(f"'{param}' names no function of 'tools'.", param)
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}

"""Anthropic's Messages request: validated with Anthropic's field names and limits, and
translated into the turn's one internal representation (OpenAI-shaped messages and options).

What goes where (``translate``):

- ``system`` (a string or text blocks) is a ``system`` message first;
- a user message's ``tool_result`` blocks are ``tool`` messages (``tool_call_id``: the block's
  ``tool_use_id``), before the rest of its content; ``image`` blocks are ``image_url`` parts
  (base64 as a ``data:`` URL);
- an assistant message's ``tool_use`` blocks are its ``tool_calls`` (``arguments``: the JSON of
  ``input``), its ``thinking`` blocks its ``reasoning_content`` (the text; the reasoning a
  provider streams is read from the same key);
- ``stop_sequences`` → ``stop``, ``metadata.user_id`` → ``user``, ``tools`` → OpenAI's function
  tools (``strict`` the function's), ``tool_choice`` → OpenAI's (``any`` → ``required``,
  ``tool`` → the named function; ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``);
- ``thinking`` enabled → ``reasoning_effort`` (``budget_tokens`` up to 1024: ``low``, up to
  2048: ``medium``, more: ``high``; the reverse of LiteLLM's mapping); ``disabled`` and
  ``adaptive`` ask for nothing a model without the switch could honour otherwise, so they add
  nothing.

For a model whose provider speaks Anthropic natively (``NATIVE_PROVIDERS``), what OpenAI's shape
has no place for is kept under Anthropic's names, for that provider to send as it was written:
options ``thinking`` (as sent, ``display`` included, instead of ``reasoning_effort``) and
``top_k``; the fields this module does not know, under the option ``anthropic_fields`` as a
``NativeFields`` (a type a JSON value never is: only this route passes fields on unchecked),
and a tool's likewise, on that tool; ``cache_control`` on the part, tool or message it was on;
an assistant message's ``thinking_blocks`` (its thinking and redacted-thinking blocks as sent,
signatures included); a tool message's ``is_error``; a last assistant message (a prefill).

Every other provider sends the OpenAI-shaped request as it is (the OpenAI provider sends every
option on), so for them this module refuses, with 400 ``unsupported_parameter`` naming the field,
what they cannot express: ``top_k``, fields it does not know, ``thinking.display``,
``redacted_thinking`` blocks, images in a tool result, a prefill, more than 4 stop sequences.
It drops, as documented in the README, what changes nothing in the answer: ``cache_control`` (a
caching hint; OpenAI-compatible upstreams cache prompt prefixes by themselves), thinking signatures
(Anthropic's proof of its own thinking), a tool result's ``is_error`` (its content says what
failed). The provider's own ``unsupported`` then refuses the rest (the demo model: tools, images,
reasoning), named by ``anthropic_param``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import BadRequest
from service.http import problem
from service.providers.anthropic_request import NATIVE_FIELDS, NativeFields
from service.providers.base import Message

NATIVE_PROVIDERS = frozenset({"anthropic"})
MAX_MESSAGES = 10_000
MAX_TOOLS = 1000
MAX_STOP_SEQUENCES = 64
MAX_OPENAI_STOPS = 4
MAX_DATA = 20_000_000  # characters of an image's base64 data or URL
MIN_THINKING_BUDGET = 1024  # Anthropic's minimum budget_tokens
EFFORTS = ((1024, "low"), (2048, "medium"))  # budget_tokens up to -> reasoning_effort
KNOWN_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
    }
)
# OpenAI's names of what this module sends, as the client named it (for a provider's refusal).
OPTION_NAMES = {
    "tools": "tools",
    "tool_choice": "tool_choice",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "user": "metadata.user_id",
    "reasoning_effort": "thinking",
    "stop": "stop_sequences",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


CacheControl = dict[str, Any]


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1, max_length=MAX_DATA)


class URLSource(_Strict):
    type: Literal["url"]
    url: str = Field(min_length=1, max_length=MAX_DATA)


class ImageBlock(_Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


ResultPart = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]
USER_BLOCKS = frozenset({"text", "image", "tool_result"})
ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks(self) -> InputMessage:
        allowed = USER_BLOCKS if self.role == "user" else ASSISTANT_BLOCKS
        for block in self.content if isinstance(self.content, list) else ():
            if block.type not in allowed:
                raise ValueError(f"a {self.role} message cannot hold a '{block.type}' block")
        return self


class Tool(_Strict):
    # Fields beyond these (``input_examples``, ``eager_input_streaming``, ...) are kept, for a
    # native provider to send as written (``Translation._tool``); other providers refuse them.
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _custom(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(
                f"tool type '{kind}' (a server tool) is not supported: only custom tools"
            )
        return data


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1, max_length=128)
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("'name' goes with type 'tool', and only with it")
        return self


class Thinking(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=MIN_THINKING_BUDGET)
    display: Literal["summarized", "omitted"] | None = None  # how the thinking comes back

    @model_validator(mode="after")
    def _budget(self) -> Thinking:
        if (self.type == "enabled") != (self.budget_tokens is not None):
            raise ValueError("'budget_tokens' goes with type 'enabled', and only with it")
        return self


class Metadata(_Strict):
    user_id: str | None = Field(None, max_length=256)


class CountTokensRequest(BaseModel):
    # Fields this module does not know are kept (a native provider may honour them).
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    model: str = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = None
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _budget(self) -> MessagesRequest:
        budget = self.thinking.budget_tokens if self.thinking else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError("'thinking.budget_tokens' must be less than 'max_tokens'")
        return self


# --------------------------------------------------------------------------- validation
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as Anthropic names a field: ``messages.0.content.1.text``."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    return ".".join(parts)


def parse(model: type[CountTokensRequest], data: dict[str, Any]) -> Any:
    """``data`` validated as ``model``; the first problem a 400 naming its field."""
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        # The deepest problem: a union's other members (``content`` as a string, when a list
        # with a bad block was sent) fail at the union itself, which says less.
        errors = exc.errors(include_url=False, include_input=False)
        err = max(errors, key=lambda e: len(e["loc"]))
        param = _param(err["loc"])
        if err["type"] == "missing":
            message = f"{param}: Field required"
        else:
            message = f"{param}: {problem(err)}" if param else problem(err)
        raise BadRequest(message, code="invalid_request", details={"param": param}) from exc
    last = len(body.messages) - 1
    for i, turn in enumerate(body.messages):  # as Anthropic's API refuses them
        if not turn.content and not (i == last and turn.role == "assistant"):
            raise BadRequest(
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message",
                code="invalid_request",
                details={"param": f"messages.{i}"},
            )
    return body


# --------------------------------------------------------------------------- translation
def unsupported(param: str, model: str) -> BadRequest:
    return BadRequest(
        f"'{param}' is not supported with model '{model}'",
        code="unsupported_parameter",
        details={"param": param, "model": model},
    )


class Translation:
    """One request in OpenAI's shape, and where each message and part came from (to name a
    provider's refusal in the client's terms)."""

    def __init__(self, body: CountTokensRequest, data: dict[str, Any], *, native: bool) -> None:
        self.body = body
        self.native = native
        self.messages: list[Message] = []
        self.origins: list[tuple[str, list[str]]] = []  # per message: its place, its parts'
        self.options: dict[str, Any] = {}
        self._system()
        for i, message in enumerate(body.messages):
            if message.role == "user":
                self._user(message, f"messages.{i}")
            else:
                self._assistant(message, f"messages.{i}")
        self._options(data)

    # ------------------------------------------------------------------ messages
    def _add(self, message: Message, origin: str, parts: list[str] | None = None) -> None:
        self.messages.append(message)
        self.origins.append((origin, parts or []))

    def _system(self) -> None:
        system = self.body.system
        if system is None:
            return
        if isinstance(system, str):
            self._add({"role": "system", "content": system}, "system")
            return
        places = [f"system.{j}" for j in range(len(system))]
        self._add({"role": "system", "content": self._texts(system)}, "system", places)

    def _texts(self, blocks: list[TextBlock]) -> str | list[dict[str, Any]]:
        """Text blocks as one string, or as parts when there are several or a native provider
        needs their ``cache_control``."""
        if len(blocks) == 1 and not (self.native and blocks[0].cache_control):
            return blocks[0].text
        return [self._text_part(b) for b in blocks]

    def _text_part(self, block: TextBlock) -> dict[str, Any]:
        return self._cached({"type": "text", "text": block.text}, block.cache_control)

    def _cached(self, item: dict[str, Any], cache_control: CacheControl | None) -> dict[str, Any]:
        if self.native and cache_control is not None:
            item["cache_control"] = cache_control
        return item

    def _image_part(self, block: ImageBlock) -> dict[str, Any]:
        source = block.source
        if isinstance(source, Base64Source):
            url = f"data:{source.media_type};base64,{source.data}"
        else:
            url = source.url
        return self._cached({"type": "image_url", "image_url": {"url": url}}, block.cache_control)

    def _user(self, message: InputMessage, where: str) -> None:
        if isinstance(message.content, str):
            self._add({"role": "user", "content": message.content}, where)
            return
        parts: list[dict[str, Any]] = []
        places: list[str] = []
        for j, block in enumerate(message.content):
            place = f"{where}.content.{j}"
            if isinstance(block, ToolResultBlock):
                self._tool_result(block, place)
            elif isinstance(block, TextBlock):
                parts.append(self._text_part(block))
                places.append(place)
            elif isinstance(block, ImageBlock):
                parts.append(self._image_part(block))
                places.append(place)
        if parts:
            single = len(parts) == 1 and set(parts[0]) == {"type", "text"}
            content = parts[0]["text"] if single else parts
            self._add({"role": "user", "content": content}, where, places)

    def _tool_result(self, block: ToolResultBlock, place: str) -> None:
        content: str | list[dict[str, Any]] = ""
        if isinstance(block.content, str):
            content = block.content
        elif block.content:
            for k, part in enumerate(block.content):
                if isinstance(part, ImageBlock) and not self.native:
                    raise unsupported(f"{place}.content.{k}", self.body.model)
            texts = [p for p in block.content if isinstance(p, TextBlock)]
            if len(texts) == len(block.content):
                content = self._texts(texts)
            else:
                content = [
                    self._text_part(p) if isinstance(p, TextBlock) else self._image_part(p)
                    for p in block.content
                ]
        message: Message = {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}
        if self.native and block.is_error:
            message["is_error"] = True
        self._add(self._cached(message, block.cache_control), place)

    def _assistant(self, message: InputMessage, where: str) -> None:
        if isinstance(message.content, str):
            self._add({"role": "assistant", "content": message.content}, where)
            return
        texts: list[TextBlock] = []
        calls: list[dict[str, Any]] = []
        thinking: list[dict[str, Any]] = []
        reasoning = ""
        for j, block in enumerate(message.content):
            if isinstance(block, TextBlock):
                texts.append(block)
            elif isinstance(block, ToolUseBlock):
                calls.append(self._call(block))
            elif isinstance(block, ThinkingBlock):
                reasoning += block.thinking
                thinking.append(block.model_dump(exclude_none=True))
            elif isinstance(block, RedactedThinkingBlock):
                if not self.native:
                    raise unsupported(f"{where}.content.{j}", self.body.model)
                thinking.append(block.model_dump())
        out: Message = {"role": "assistant", "content": self._texts(texts) if texts else None}
        if calls:
            out["tool_calls"] = calls
        if self.native and thinking:
            out["thinking_blocks"] = thinking
        elif reasoning:
            out["reasoning_content"] = reasoning
        if out["content"] is None and not calls:
            out["content"] = ""
        self._add(out, where)

    def _call(self, block: ToolUseBlock) -> dict[str, Any]:
        call = {
            "id": block.id,
            "type": "function",
            "function": {"name": block.name, "arguments": orjson.dumps(block.input).decode()},
        }
        return self._cached(call, block.cache_control)

    # ------------------------------------------------------------------ options
    def _options(self, data: dict[str, Any]) -> None:
        body = self.body
        options = self.options
        if body.tools:
            options["tools"] = [self._tool(t, f"tools.{i}") for i, t in enumerate(body.tools)]
        if body.tool_choice is not None:
            self._tool_choice(body.tool_choice)
        if body.thinking is not None:
            self._thinking(body.thinking, data["thinking"])
        if isinstance(body, MessagesRequest):
            if body.metadata is not None and body.metadata.user_id is not None:
                options["user"] = body.metadata.user_id
            if body.top_k is not None:
                if not self.native:
                    raise unsupported("top_k", body.model)
                options["top_k"] = body.top_k
        unknown = NativeFields((k, v) for k, v in data.items() if k not in KNOWN_FIELDS)
        if unknown and not self.native:
            raise unsupported(next(iter(unknown)), body.model)
        if unknown:
            options[NATIVE_FIELDS] = unknown

    def _tool(self, tool: Tool, where: str) -> dict[str, Any]:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.strict is not None:
            function["strict"] = tool.strict
        out = self._cached({"type": "function", "function": function}, tool.cache_control)
        unknown = tool.model_extra
        if unknown and not self.native:
            raise unsupported(f"{where}.{next(iter(unknown))}", self.body.model)
        if unknown:
            out[NATIVE_FIELDS] = NativeFields(unknown)
        return out

    def _tool_choice(self, choice: ToolChoice) -> None:
        if choice.type == "tool":
            self.options["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            self.options["tool_choice"] = {"any": "required"}.get(choice.type, choice.type)
        if choice.disable_parallel_tool_use:
            self.options["parallel_tool_calls"] = False

    def _thinking(self, thinking: Thinking, raw: Any) -> None:
        if self.native:
            self.options["thinking"] = raw
        elif thinking.display is not None:  # the thinking comes back as the provider gives it
            raise unsupported("thinking.display", self.body.model)
        elif thinking.budget_tokens is not None:
            self.options["reasoning_effort"] = effort(thinking.budget_tokens)

    # ------------------------------------------------------------------ the turn's fields
    def stop(self) -> list[str] | None:
        body = self.body
        stops = body.stop_sequences if isinstance(body, MessagesRequest) else None
        if stops and len(stops) > MAX_OPENAI_STOPS and not self.native:
            raise unsupported("stop_sequences", body.model)
        return stops or None

    def check_prefill(self) -> None:
        """A last assistant message is a prefill, which only Anthropic continues from."""
        last = len(self.body.messages) - 1
        if self.body.messages[last].role == "assistant" and not self.native:
            raise unsupported(f"messages.{last}", self.body.model)

    def anthropic_param(self, param: str) -> str:
        """A provider's refusal (OpenAI's name: ``messages[2].content[0]``, ``user``) as the
        client named it (``messages.1.content.3``, ``metadata.user_id``)."""
        if not param.startswith("messages["):
            return OPTION_NAMES.get(param, param)
        index_text, _, rest = param[len("messages[") :].partition("]")
        if not index_text.isdigit() or int(index_text) >= len(self.origins):
            return param
        origin, parts = self.origins[int(index_text)]
        if rest.startswith(".content["):
            j_text = rest[len(".content[") :].partition("]")[0]
            if j_text.isdigit() and int(j_text) < len(parts):
                return parts[int(j_text)]
        return origin


def effort(budget_tokens: int) -> str:
    """Anthropic's thinking budget as OpenAI's ``reasoning_effort``."""
    return next((name for limit, name in EFFORTS if budget_tokens <= limit), "high")

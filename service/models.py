"""The model catalogue: which public model name is served by which provider and upstream id.

Configured with ``MODELS`` (a JSON list) or ``MODELS_FILE`` (a JSON file with the same list);
without either, the catalogue is the offline demo model alone. Validated at start-up: a bad
entry stops it with a message naming the entry.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.auth import KeyScope
from service.costs import Price
from service.errors import NotFound
from service.settings import Settings, SettingsError

ProviderName = Literal["demo", "openai", "gemini", "anthropic"]


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100)
    provider: ProviderName
    upstream_id: str | None = None
    context_window: int = Field(128_000, ge=256)
    max_output_tokens: int = Field(4096, ge=1)
    encoding: str | None = "o200k_base"  # None: no local tokenizer, use the estimate
    enabled: bool = True
    price: Price | None = None  # in CURRENCY per million tokens; without it a turn costs nothing

    @model_validator(mode="before")
    @classmethod
    def _no_local_tokenizer(cls, data: Any) -> Any:
        """An Anthropic model's prompts are counted by Anthropic's count_tokens (OpenAI's
        tokenizer would miscount Claude's tokens): its ``encoding`` defaults to null."""
        if isinstance(data, dict) and data.get("provider") == "anthropic":
            data = {"encoding": None, **data}
        return data

    @field_validator("encoding")
    @classmethod
    def _counted_upstream(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("provider") == "anthropic":
            raise ValueError(
                "an Anthropic model is counted by Anthropic's count_tokens: "
                "leave 'encoding' out or set it to null"
            )
        return value

    @property
    def upstream(self) -> str:
        return self.upstream_id or self.name


DEMO_MODEL = ModelSpec(name="demo", provider="demo", context_window=32_000, max_output_tokens=1024)


class Catalogue:
    def __init__(self, models: list[ModelSpec], default: str) -> None:
        self._models = {m.name: m for m in models if m.enabled}
        self.default = default

    def default_for(self, key: KeyScope | None) -> str:
        """The model a turn that names none uses: the configured default, or for an API key
        that may not use it, the first model of the catalogue the key may use (none: the
        default still, and such a turn is refused as one naming it would be)."""
        if key is None or key.may_use(self.default):
            return self.default
        return next((name for name in self._models if key.may_use(name)), self.default)

    def resolve(self, name: str | None, key: KeyScope | None = None) -> ModelSpec:
        wanted = name or self.default_for(key)
        spec = self._models.get(wanted)
        if spec is None:
            raise NotFound(f"model '{wanted}' is not available", code="model_not_found")
        return spec

    def all(self) -> list[ModelSpec]:
        return list(self._models.values())


def load_catalogue(settings: Settings) -> Catalogue:
    raw: object
    if settings.models:
        source, raw = "MODELS", _json(settings.models, "MODELS")
    elif settings.models_file:
        source, raw = "MODELS_FILE", _json(settings.models_file.read_text(), "MODELS_FILE")
    else:
        _check_default(settings, [DEMO_MODEL], " (without MODELS or MODELS_FILE, only 'demo')")
        return Catalogue([DEMO_MODEL], settings.default_model)
    if not isinstance(raw, list):
        raise SettingsError(f"invalid setting {source}: expected a JSON list of model entries")
    models = []
    for i, entry in enumerate(raw):
        try:
            models.append(ModelSpec.model_validate(entry))
        except ValidationError as exc:
            name = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise SettingsError(f"invalid setting {source}: model '{name}': {problems}") from exc
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            raise SettingsError(f"invalid setting {source}: duplicate model name '{m.name}'")
        seen.add(m.name)
    _check_default(settings, models)
    if settings.budget_unit == "currency":
        unpriced = [
            m.name for m in models if m.enabled and m.price is None and m.provider != "demo"
        ]
        if unpriced:
            raise SettingsError(
                f"invalid setting {source}: BUDGET_UNIT=currency needs a price for every model; "
                f"none for {', '.join(repr(n) for n in unpriced)}"
            )
    return Catalogue(models, settings.default_model)


def _check_default(settings: Settings, models: list[ModelSpec], hint: str = "") -> None:
    """DEFAULT_MODEL must be one of the catalogue's enabled models: otherwise every turn that
    names no model would be refused."""
    if settings.default_model not in {m.name for m in models if m.enabled}:
        raise SettingsError(
            f"invalid setting DEFAULT_MODEL: '{settings.default_model}' is not an enabled "
            f"model{hint}"
        )


def _json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"invalid setting {source}: not valid JSON ({exc.msg})") from exc

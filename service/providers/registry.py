"""Build the configured providers and per-encoding token counters from settings."""

from __future__ import annotations

import aiohttp

from service.models import Catalogue, ModelSpec
from service.providers.anthropic import AnthropicProvider
from service.providers.base import Provider, RetryPolicy
from service.providers.demo import DemoProvider
from service.providers.gemini import GeminiProvider
from service.providers.openai import OpenAIProvider
from service.settings import Settings
from service.tokens import TokenCounter


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.upstream_max_attempts,
        base_s=settings.upstream_retry_base_s,
        max_s=settings.upstream_retry_max_s,
    )


def upstream_timeout(settings: Settings) -> aiohttp.ClientTimeout:
    # No total: a long answer is not a timeout. No sock_read either: the stream watcher bounds
    # the first token, the gaps between chunks and the answer (``Turn._active``); a socket read
    # timeout would re-arm a timer on every network read of every live stream.
    return aiohttp.ClientTimeout(
        total=None,
        connect=settings.upstream_connect_timeout_s,
        sock_connect=settings.upstream_connect_timeout_s,
    )


def build_providers(
    settings: Settings, session: aiohttp.ClientSession, catalogue: Catalogue
) -> dict[str, Provider]:
    providers: dict[str, Provider] = {
        "demo": DemoProvider(TokenCounter(), delay_s=settings.demo_token_delay_ms / 1000)
    }
    if any(m.provider == "openai" for m in catalogue.all()):
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        providers["openai"] = OpenAIProvider(
            session,
            base_url=settings.openai_base_url,
            api_key=key,
            retry=retry_policy(settings),
            timeout=upstream_timeout(settings),
        )
    if any(m.provider == "gemini" for m in catalogue.all()):
        key = settings.gemini_api_key.get_secret_value() if settings.gemini_api_key else None
        providers["gemini"] = GeminiProvider(  # raises SettingsError on GEMINI_SAFETY_SETTINGS
            session,
            base_url=settings.gemini_base_url,
            api_key=key,
            safety_settings=settings.gemini_safety_settings,
            retry=retry_policy(settings),
            timeout=upstream_timeout(settings),
        )
    if any(m.provider == "anthropic" for m in catalogue.all()):
        key = settings.anthropic_api_key.get_secret_value() if settings.anthropic_api_key else None
        providers["anthropic"] = AnthropicProvider(
            session,
            base_url=settings.anthropic_base_url,
            api_key=key,
            retry=retry_policy(settings),
            timeout=upstream_timeout(settings),
        )
    return providers


class Counters:
    """One ``TokenCounter`` per encoding, shared by every turn."""

    def __init__(self) -> None:
        self._by_encoding: dict[str | None, TokenCounter] = {}

    def __call__(self, spec: ModelSpec) -> TokenCounter:
        counter = self._by_encoding.get(spec.encoding)
        if counter is None:
            counter = self._by_encoding[spec.encoding] = TokenCounter(spec.encoding)
        return counter

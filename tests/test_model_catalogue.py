"""The model catalogue: validated at start-up, and filtered by each upstream's live model list."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.app import create_app
from service.models import load_catalogue
from service.settings import SettingsError
from tests.conftest import TEST_MODELS
from tests.fake_gemini import FakeGemini
from tests.test_cli import run
from tests.test_gemini import MODELS as GEMINI_MODELS


async def model_names(client, headers) -> set[str]:
    resp = await client.get("/api/models", headers=headers)
    assert resp.status == 200
    return {m["name"] for m in (await resp.json())["models"]}


async def v1_model_ids(client, headers) -> set[str]:
    resp = await client.get("/v1/models", headers=headers)
    assert resp.status == 200
    return {m["id"] for m in (await resp.json())["data"]}


async def until(predicate, timeout_s: float = 10.0):
    """Poll an async predicate until it is true (or fail after the deadline)."""
    end = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < end, "condition not met before the deadline"
        await asyncio.sleep(0.05)


async def new_chat(client, headers) -> str:
    resp = await client.post("/api/chat", headers=headers)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def test_a_model_the_upstream_stops_listing_is_hidden_and_refused_until_it_returns(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    client = await aiohttp_client(create_app(stream_settings(model_list_ttl_s=1)))
    h = auth()
    assert await model_names(client, h) == {"gpt-test", "demo"}
    assert fake_openai.models_headers[0]["Authorization"] == "Bearer sk-upstream-secret"

    fake_openai.listed = {"some-other-model"}  # the vendor retired gpt-4o-mini
    await until(lambda: _lacks(client, h, "gpt-test"))
    assert "gpt-test" not in await v1_model_ids(client, h)
    assert "demo" in await v1_model_ids(client, h)  # the demo model is always live

    # Refused on every route with 404 model_not_found; nothing reaches the upstream.
    sent_before = len(fake_openai.requests)
    chat_id = await new_chat(client, h)
    resp = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "hi", "model": "gpt-test"}, headers=h
    )
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        headers=h,
    )
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.get("/v1/models/gpt-test", headers=h)
    assert resp.status == 404
    assert len(fake_openai.requests) == sent_before
    assert any(e["event"] == "models.hidden" and e["models"] == ["gpt-4o-mini"] for e in logs)

    fake_openai.listed = {"gpt-4o-mini"}  # back again
    await until(lambda: _has(client, h, "gpt-test"))
    resp = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "hi", "model": "gpt-test"}, headers=h
    )
    assert resp.status == 200
    await resp.read()
    assert len(fake_openai.requests) == sent_before + 1


async def _lacks(client, headers, name: str) -> bool:
    return name not in await model_names(client, headers)


async def _has(client, headers, name: str) -> bool:
    return name in await model_names(client, headers)


async def test_a_gemini_model_dropped_from_models_list_is_hidden_after_the_ttl(
    aiohttp_client, make_settings, auth
):
    fake = FakeGemini()
    await fake.start()
    try:
        settings = make_settings(
            models=json.dumps(GEMINI_MODELS),
            gemini_base_url=fake.url,
            gemini_api_key="AIza-key",
            model_list_ttl_s=1,
        )
        client = await aiohttp_client(create_app(settings))
        h = auth()
        assert await model_names(client, h) == {"gemini-test", "demo"}
        fake.models = [m for m in fake.models if m["name"] != "models/gemini-2.0-flash"]
        await until(lambda: _lacks(client, h, "gemini-test"))
        chat_id = await new_chat(client, h)
        resp = await client.post(
            f"/api/chat/{chat_id}/message",
            json={"message": "hi", "model": "gemini-test"},
            headers=h,
        )
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
        assert fake.calls("streamGenerateContent") == []
    finally:
        await fake.close()


async def test_a_configured_model_never_listed_is_hidden_from_the_first_request(
    aiohttp_client, stream_settings, fake_openai, auth
):
    fake_openai.listed = {"gpt-4.1"}
    client = await aiohttp_client(create_app(stream_settings()))
    assert await model_names(client, auth()) == {"demo"}


async def test_the_list_is_cached_for_the_ttl(aiohttp_client, stream_settings, fake_openai, auth):
    client = await aiohttp_client(create_app(stream_settings(model_list_ttl_s=3600)))
    for _ in range(5):
        assert await model_names(client, auth()) == {"gpt-test", "demo"}
    assert fake_openai.models_requests == 1


async def test_an_unreadable_list_keeps_models_offered(
    aiohttp_client, stream_settings, fake_openai, auth, logs
):
    """A failing model list is not an outage of the models: they stay offered, and it is logged."""
    fake_openai.models_status = 500
    client = await aiohttp_client(create_app(stream_settings(upstream_max_attempts=1)))
    assert await model_names(client, auth()) == {"gpt-test", "demo"}
    failed = [e for e in logs if e["event"] == "models.list_failed"]
    assert failed and failed[0]["provider"] == "openai"
    assert failed[0]["code"] == "upstream_unavailable"
    assert failed[0]["error"] == "UpstreamError: the upstream is unavailable (HTTP 500)"


async def test_an_unreachable_list_logs_what_the_client_met(
    aiohttp_client, stream_settings, auth, logs
):
    """``models.list_failed`` names the HTTP client's own error (which host, refused), not only
    the code every connection failure shares."""
    from tests.mongo_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = stream_settings(openai_base_url=url, upstream_max_attempts=1)
    client = await aiohttp_client(create_app(settings))
    assert await model_names(client, auth()) == {"gpt-test", "demo"}
    failed = [e for e in logs if e["event"] == "models.list_failed"]
    assert failed and failed[0]["code"] == "upstream_unavailable"
    assert failed[0]["error"].startswith("ClientConnectorError: "), failed[0]
    assert "127.0.0.1:" in failed[0]["error"]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "big", "provider": "vertex"}, "model 'big': provider"),
        ({"name": "tiny", "provider": "openai", "context_window": 10}, "model 'tiny': context"),
        ({"name": "x", "provider": "openai", "colour": "red"}, "model 'x': colour"),
        ({"provider": "openai"}, "model '#1': name"),
    ],
)
def test_a_bad_catalogue_entry_is_named(make_settings, entry, expected):
    models = [TEST_MODELS[1], entry]
    with pytest.raises(SettingsError) as info:
        load_catalogue(make_settings(models=json.dumps(models), default_model="demo"))
    assert str(info.value).startswith("invalid setting MODELS: ")
    assert expected in str(info.value)


def test_catalogue_level_mistakes_are_named(make_settings):
    with pytest.raises(SettingsError, match="MODELS: duplicate model name 'demo'"):
        load_catalogue(make_settings(models=json.dumps([TEST_MODELS[1], TEST_MODELS[1]])))
    disabled = {**TEST_MODELS[0], "enabled": False}
    with pytest.raises(SettingsError, match="DEFAULT_MODEL: 'gpt-test' is not an enabled model"):
        load_catalogue(
            make_settings(models=json.dumps([disabled, TEST_MODELS[1]]), default_model="gpt-test")
        )
    with pytest.raises(SettingsError, match="MODELS: not valid JSON"):
        load_catalogue(make_settings(models="[{"))


def test_a_default_model_outside_the_demo_catalogue_stops_start_up(make_settings, tmp_path):
    """Without MODELS the catalogue is the demo model alone: DEFAULT_MODEL=gpt-4 started, and
    every send that named no model was then refused. It stops start-up as with MODELS set."""
    with pytest.raises(SettingsError, match="DEFAULT_MODEL: 'gpt-4' is not an enabled model"):
        load_catalogue(make_settings(default_model="gpt-4"))
    assert load_catalogue(make_settings()).resolve(None).name == "demo"
    out = run(
        "serve",
        MONGODB_URI="mongodb://127.0.0.1:1",
        JWT_SECRET="s" * 40,
        MODELS="",
        DEFAULT_MODEL="gpt-4",
        DATA_DIR=str(tmp_path),
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "chat-gateway: invalid setting DEFAULT_MODEL: 'gpt-4' is not an enabled model "
        "(without MODELS or MODELS_FILE, only 'demo')"
    )


def test_a_model_not_served_is_named_even_when_it_is_the_default():
    """The refusal names the model a turn would have used, not the ``None`` it named."""
    from service.errors import NotFound
    from service.models import DEMO_MODEL, Catalogue

    with pytest.raises(NotFound, match="model 'gone' is not available"):
        Catalogue([DEMO_MODEL], "gone").resolve(None)
    with pytest.raises(NotFound, match="model 'gpt-9' is not available"):
        Catalogue([DEMO_MODEL], "demo").resolve("gpt-9")


def test_serve_stops_at_start_up_naming_the_bad_entry(tmp_path):
    bad = [{"name": "demo", "provider": "demo"}, {"name": "gpt-x", "provider": "openai", "x": 1}]
    out = run(
        "serve",
        MONGODB_URI="mongodb://127.0.0.1:1",
        JWT_SECRET="s" * 40,
        MODELS=json.dumps(bad),
        DATA_DIR=str(tmp_path),
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "chat-gateway: invalid setting MODELS: model 'gpt-x': x: Extra inputs are not permitted"
    )

"""GET /metrics: Prometheus text that follows real turns, rejections, upstream and MongoDB work.

The metrics are process-wide (several apps run in one test process), so every check compares
a value before and after the action it is about.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests import raw_http
from tests.fake_openai import Script
from tests.sse_client import collect, events
from tests.test_stream_sse import new_chat, send


async def scrape(client) -> dict[tuple[str, frozenset], float]:
    resp = await client.get("/metrics")  # no token: scraped by Prometheus inside the cluster
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_a_turn_is_counted_by_outcome_tokens_ttft_duration_and_store_latency(
    stream_client, fake_openai, auth
):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    fake_openai.default = Script(chunks=["a", "b", "c"], usage=(30, 5), gate_after=1)
    before = await scrape(client)
    resp = await send(client, chat_id, h)
    stream = events(resp)
    async for ev in stream:
        if ev.get("event") == "delta":
            break
    during = await scrape(client)  # the upstream is held at its gate: one live SSE stream
    assert value(during, "gateway_active_streams", transport="sse") == (
        value(before, "gateway_active_streams", transport="sse") + 1
    )
    fake_openai.gate.set()
    assert [e["event"] async for e in stream if "event" in e][-1] == "done"
    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "gateway_active_streams", transport="sse") == value(
        before, "gateway_active_streams", transport="sse"
    )
    assert grew("gateway_turns_total", transport="sse", outcome="completed", reason="finished") == 1
    tokens = "gateway_tokens_total"
    assert grew(tokens, model="gpt-test", kind="prompt", source="upstream") == 30
    assert grew(tokens, model="gpt-test", kind="completion", source="upstream") == 5
    assert grew("gateway_time_to_first_token_seconds_count", model="gpt-test") == 1
    assert grew("gateway_stream_duration_seconds_count", transport="sse", outcome="completed") == 1
    store_ops = "gateway_mongodb_operation_seconds_count"
    for operation in ("begin_chat_turn", "reserve", "insert_messages", "finish_many"):
        assert grew(store_ops, operation=operation, result="ok") == 1, operation
    assert value(after, "process_resident_memory_bytes") > 0


async def test_rejections_by_rule(aiohttp_client, stream_settings, auth):
    client = await aiohttp_client(
        create_app(stream_settings(message_rate_limit_ms=60_000, default_model="demo"))
    )
    chat_id = await new_chat(client, auth())
    before = await scrape(client)
    await collect(await send(client, chat_id, auth()))
    assert (await send(client, chat_id, auth())).status == 429
    poor = await aiohttp_client(create_app(stream_settings(default_token_limit=10)))
    poor_chat = await new_chat(poor, auth("bob"))
    assert (await send(poor, poor_chat, auth("bob"))).status == 403
    after = await scrape(client)
    rejected = "gateway_turn_rejections_total"
    assert (
        value(after, rejected, reason="rate_limited")
        - value(before, rejected, reason="rate_limited")
        == 1
    )
    assert (
        value(after, rejected, reason="budget_exceeded")
        - value(before, rejected, reason="budget_exceeded")
        == 1
    )


async def test_a_key_outside_its_models_is_a_turn_rejection_and_a_count_is_none(
    stream_client, auth
):
    """A turn sent with a key outside its models is refused by a rule, counted once as
    ``model_not_allowed`` (README's list); a count of tokens refused the same way is no turn."""
    client = stream_client
    resp = await client.post("/api/keys", json={"name": "ci", "models": ["demo"]}, headers=auth())
    secret = (await resp.json())["key"]
    rejected = "gateway_turn_rejections_total"
    before = await scrape(client)
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}
    resp = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    assert resp.status == 403
    counted = value(await scrape(client), rejected, reason="model_not_allowed")
    assert counted - value(before, rejected, reason="model_not_allowed") == 1
    resp = await client.post(
        "/v1/messages/count_tokens",
        json={**body, "max_tokens": 16},
        headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
    )
    assert resp.status == 403
    assert value(await scrape(client), rejected, reason="model_not_allowed") == counted


async def test_upstream_errors_by_code_and_stage(stream_client, fake_openai, auth):
    client, h = stream_client, auth()
    chat_id = await new_chat(client, h)
    errors = "gateway_upstream_errors_total"
    before = await scrape(client)
    fake_openai.scripts = [
        Script(status=429, retry_after="0"),  # retried, then the turn completes
        Script(),
        Script(status=500),  # three attempts: two retried, then the turn fails before a token
        Script(status=500),
        Script(status=500),
        Script(chunks=["x", "y"], reset_after=1),  # fails after its stream began
    ]
    await collect(await send(client, chat_id, h))
    assert (await send(client, chat_id, h, "again")).status == 503
    evs = await collect(await send(client, chat_id, h, "third"))
    assert evs[-1]["event"] == "error"
    after = await scrape(client)

    def grew(code: str, stage: str) -> float:
        labels = {"provider": "openai", "code": code, "stage": stage}
        return value(after, errors, **labels) - value(before, errors, **labels)

    assert grew("upstream_rate_limited", "retried") == 1
    assert grew("upstream_unavailable", "retried") == 2
    assert grew("upstream_unavailable", "connect") == 1
    assert grew("upstream_unavailable", "stream") == 1


async def test_labels_carry_no_user_chat_or_message_ids(stream_client, auth):
    client, h = stream_client, auth("user-with-a-distinct-id")
    chat_id = await new_chat(client, h)
    evs = await collect(await send(client, chat_id, h, model="demo"))
    message_id = evs[0]["data"]["message_id"]
    text = await (await client.get("/metrics")).text()
    for needle in ("user-with-a-distinct-id", chat_id, message_id):
        assert needle not in text
    # Every label value is from a small fixed set: no UUIDs anywhere.
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", text)


@pytest.mark.parametrize(
    "target", ["/%6detrics", "/%6Detrics", "/%2Fmetrics", "http://127.0.0.1/metrics", "/metrics#x"]
)
async def test_metrics_answers_only_its_exact_path_as_sent(client, target):
    """The manifests keep /metrics off the public route by its path as sent: a spelling that
    aiohttp would decode or resolve to /metrics is the router's 404, in the service's shape."""
    host, port = client.server.host, client.server.port
    exact = await raw_http.send(host, port, raw_http.build("GET", "/metrics?name[]=x"))
    assert exact.status == 200 and b"gateway_turns_total" in exact.body
    resp = await raw_http.send(host, port, raw_http.build("GET", target))
    unknown = await raw_http.send(host, port, raw_http.build("GET", "/no/such/path"))
    assert resp.status == unknown.status == 404
    assert resp.headers["content-type"] == unknown.headers["content-type"] == "application/json"
    assert resp.json() == unknown.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert b"gateway_" not in resp.body and resp.headers["server"] == "chat-gateway"

"""Prices and cost: every answer records what it cost at the price in force, the month sums it
exactly (integer nano-units, never a float), the final event, the usage endpoint and a chat's
messages show it, a budget may count money, and the daily rollup equals the messages."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from service.analytics import lines_of
from service.app import create_app
from service.costs import NANOS, Budget, Price, cost_nanos, format_cost, parse_cost
from service.keys import STORE
from service.metrics import COST
from service.settings import SettingsError, load_settings
from tests import openai_recordings as rec
from tests.conftest import TEST_MODELS
from tests.fake_openai import Script
from tests.faults import rolled_up, settled
from tests.sse_client import collect

GPT_PRICE = {"input": "0.15", "cached_input": "0.075", "output": "0.6", "reasoning": "0.9"}
DEMO_PRICE = {"input": "0.0375", "output": "0.15"}  # below a nano-unit per token: still exact
PRICED = [
    {**TEST_MODELS[0], "price": GPT_PRICE},
    {**TEST_MODELS[1], "price": DEMO_PRICE},
]
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


def exact(price: dict[str, str], prompt: int, completion: int, cached: int = 0, reasoning: int = 0):
    """The cost by hand, in Decimal: what ``cost_nanos`` must give, rounded half-up once."""
    p = {k: Decimal(v) for k, v in price.items()}
    total = (
        (prompt - cached) * p["input"]
        + cached * p.get("cached_input", p["input"])
        + (completion - reasoning) * p["output"]
        + reasoning * p.get("reasoning", p["output"])
    ) / Decimal(1_000_000)
    return int((total * NANOS).quantize(Decimal(1), rounding="ROUND_HALF_UP"))


def test_cost_is_exact_decimal_arithmetic():
    price = Price.model_validate(GPT_PRICE)
    for prompt, completion, cached, reasoning in [(1, 1, 0, 0), (82, 51, 64, 0), (20, 40, 0, 28)]:
        got = cost_nanos(
            price, prompt=prompt, completion=completion, cached=cached, reasoning=reasoning
        )
        assert got == exact(GPT_PRICE, prompt, completion, cached, reasoning)
    # a million turns of one token each sum exactly (no float drift): integers
    one = cost_nanos(Price.model_validate(DEMO_PRICE), prompt=1, completion=0)
    assert one == 38  # 37.5 nano-units rounded half-up
    assert sum([one] * 1_000_000) == 38_000_000
    assert format_cost(1_234_500) == "0.0012345" and format_cost(0) == "0.00"
    assert format_cost(12 * NANOS) == "12.00" and parse_cost("0.0012345") == 1_234_500
    for bad in ("-1", "abc", "0.0000000001", "NaN"):
        with pytest.raises(ValueError):
            parse_cost(bad)


def test_cache_writes_have_their_own_prices_and_a_currency_budget_asks_for_the_dearest():
    claude = Price.model_validate(
        {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75", "output": "15"}
    )
    # a 1-hour write defaults to the 5-minute write's price, a write to the input price
    assert cost_nanos(claude, prompt=100, completion=0, written=100, written_1h=40) == 375_000
    plain = Price.model_validate({"input": "3", "output": "15"})
    assert cost_nanos(plain, prompt=100, completion=0, written=100) == 300_000
    # counts past the prompt are clamped: cached first, then written, then the hour's
    assert cost_nanos(claude, prompt=10, completion=0, cached=8, written=50) == 8 * 300 + 2 * 3750
    budget = Budget("currency", parse_cost("1"), "USD")
    ask = budget.ask(claude, 1000, 100)  # any prompt token may be written: 3.75 each
    assert ask == 1000 * 3_750 + 100 * 15_000
    assert budget.completion_within(claude, ask, 1000) == 100


def test_a_currency_budget_asks_and_grants_in_money():
    price = Price.model_validate(GPT_PRICE)
    budget = Budget("currency", parse_cost("1"), "EUR")
    ask = budget.ask(price, 1000, 100)  # the dearest completion token: reasoning's 0.9
    assert ask == exact(GPT_PRICE, 1000, 0) + 100 * 900
    assert budget.completion_within(price, ask, 1000) == 100
    assert budget.show(ask) == format_cost(ask) and budget.label == "EUR"
    tokens = Budget("tokens", 500, "EUR")
    assert tokens.ask(price, 1000, 100) == 1100 and tokens.billed(3, 4, 99) == 7


def test_currency_budget_needs_every_model_priced(make_settings):
    from service.models import load_catalogue

    unpriced = json.dumps(TEST_MODELS)
    with pytest.raises(SettingsError, match=r"needs a price for every model.*gpt-test"):
        load_catalogue(make_settings(models=unpriced, budget_unit="currency"))
    load_catalogue(make_settings(models=json.dumps(PRICED), budget_unit="currency"))
    with pytest.raises(SettingsError, match="DEFAULT_BUDGET"):
        load_settings(default_budget="ten")


async def test_answers_record_their_cost_and_the_month_sums_it(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings(models=json.dumps(PRICED))))
    db = client.app[STORE].db
    before = COST.labels("gpt-test")._value.get()
    fake_openai.scripts = [
        Script(usage=(21, 4)),
        Script(frames=rec.TOOL_CALLS),  # 82 prompt (64 cached), 51 completion
        Script(frames=rec.REASONING),  # 20 prompt, 40 completion (28 reasoning)
    ]
    r = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert r.status == 200
    await r.read()
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=BODY, headers=auth())
        await r.read()
    # the chat route: the final event shows the cost and the budget's unit
    chat = await (await client.post("/api/chat", headers=auth())).json()
    resp = await client.post(
        f"/api/chat/{chat['chat_id']}/message",
        json={"message": "Hello", "model": "demo"},
        headers=auth(),
    )
    done = next(e for e in await collect(resp) if e["event"] == "done")["data"]
    await settled(db)
    records = await db.messages.find({"role": "assistant"}).sort("created_at", 1).to_list(None)
    expected = {
        21: exact(GPT_PRICE, 21, 4),
        82: exact(GPT_PRICE, 82, 51, cached=64),
        20: exact(GPT_PRICE, 20, 40, reasoning=28),
    }
    for record in records:
        tokens = record["tokens"]
        price = GPT_PRICE if record["model"] == "gpt-test" else DEMO_PRICE
        assert record["price"] == Price.model_validate(price).record()
        assert record["currency"] == "USD"
        want = exact(
            price,
            tokens["prompt"],
            tokens["completion"],
            tokens.get("cached", 0),
            tokens.get("reasoning", 0),
        )
        assert record["cost"] == want
        if record["model"] == "gpt-test":
            assert want == expected[tokens["prompt"]]
    usage = await db.usage.find_one({"user_id": "alice"})
    assert usage["cost"] == sum(r["cost"] for r in records)
    assert usage["used"] == sum(r["tokens"]["total"] for r in records)  # the budget: tokens
    demo = records[-1]
    assert done["cost"] == format_cost(demo["cost"]) and done["currency"] == "USD"
    assert done["budget"]["unit"] == "tokens"
    body = await (await client.get("/api/usage", headers=auth())).json()
    assert body["cost"] == format_cost(usage["cost"]) and body["currency"] == "USD"
    assert body["unit"] == "tokens" and body["used"] == usage["used"]
    page = await (await client.get(f"/api/chat/{chat['chat_id']}", headers=auth())).json()
    answer = next(m for m in page["messages"] if m["role"] == "assistant")
    assert answer["cost"] == format_cost(demo["cost"]) and answer["currency"] == "USD"
    gpt = sum(r["cost"] for r in records if r["model"] == "gpt-test")
    assert COST.labels("gpt-test")._value.get() - before == pytest.approx(gpt / NANOS)


async def test_a_currency_budget_is_spent_in_money_and_never_overspent(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Concurrent turns against a budget worth a few of them: the month never spends more
    than its limit plus one turn's grant, and each answer's max_tokens is what the money left
    pays for (the 30 concurrent turns of the issue's acceptance are a key's, test_key_limits)."""
    settings = stream_settings(
        models=json.dumps(PRICED),
        budget_unit="currency",
        currency="EUR",
        default_budget="0.0005",
        max_concurrent_turns_per_user=0,
        v1_requests_per_minute=0,
    )
    client = await aiohttp_client(create_app(settings))
    db = client.app[STORE].db
    fake_openai.default = Script(chunks=["x"] * 3, usage=(100, 250))
    limit = parse_cost("0.0005")
    one = exact(GPT_PRICE, 100, 250)
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=BODY, headers=auth()) for _ in range(12))
    )
    for r in responses:
        await r.read()
    statuses = Counter(r.status for r in responses)
    assert statuses[200] >= 1 and statuses[429] >= 1  # /v1 names a spent budget 429 quota
    await settled(db)
    usage = await db.usage.find_one({"user_id": "alice"})
    records = await db.messages.find({"role": "assistant"}).to_list(None)
    assert usage["used"] == usage["cost"] == sum(r["cost"] for r in records)
    assert usage["used"] == statuses[200] * one
    grant = Budget("currency", limit, "EUR").ask(Price.model_validate(GPT_PRICE), 100, 256)
    assert usage["used"] <= limit + grant
    # the answer's max_tokens: what the money left pays for, never more than the model's
    asked = [r.get("max_completion_tokens") or r.get("max_tokens") for r in fake_openai.requests]
    assert all(0 < m <= 256 for m in asked)
    body = await (await client.get("/api/usage", headers=auth())).json()
    assert body["unit"] == "EUR" and body["limit"] == "0.0005"
    assert body["used"] == format_cost(usage["used"])
    # the token headers are left out (the budget is money); the request ones stay
    r = await client.post("/v1/chat/completions", json=BODY, headers=auth())
    assert "x-ratelimit-limit-tokens" not in r.headers
    # the chat route's refusal names the amounts in money
    chat = await (await client.post("/api/chat", headers=auth())).json()
    resp = await client.post(
        f"/api/chat/{chat['chat_id']}/message",
        json={"message": "Hello", "model": "gpt-test"},
        headers=auth(),
    )
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "budget_exceeded" and error["message"] == "monthly budget exhausted"
    details = error["details"]
    assert details["unit"] == "EUR" and details["limit"] == "0.0005"
    assert parse_cost(details["remaining"]) < parse_cost(details["needed"])


async def rollup_rows(db: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rollup's lines, the (day, model) totals (user None) included."""
    rows = lines_of(await db.usage_rollup.find({}).to_list(None))
    return {(r["day"], r["user_id"], r["model"], r["key_id"]): r for r in rows}


def with_totals(rows: dict[tuple[Any, ...], dict[str, Any]]) -> dict[tuple[Any, ...], Any]:
    """``rows`` and their (day, model) totals, as settlement writes them."""
    out = dict(rows)
    for (day, _, model, _), row in rows.items():
        total = out.setdefault((day, None, model, None), {"outcomes": {}})
        for field in ("turns", "prompt", "completion", "cached", "reasoning", "cost"):
            total[field] = total.get(field, 0) + row[field]
        for name, n in row["outcomes"].items():
            total["outcomes"][name] = total["outcomes"].get(name, 0) + n
    return out


async def brute_force(db: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rollup computed from the messages themselves."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    outcome = {"complete": "completed"}
    async for m in db.messages.find({"role": "assistant"}):
        key = (m["created_at"].date().isoformat(), m["user_id"], m["model"], m.get("key_id"))
        row = out.setdefault(
            key,
            {
                "turns": 0,
                "outcomes": {},
                "prompt": 0,
                "completion": 0,
                "cached": 0,
                "reasoning": 0,
                "cost": 0,
            },
        )
        t = m["tokens"]
        row["turns"] += 1
        name = outcome.get(m["status"], m["status"])
        row["outcomes"][name] = row["outcomes"].get(name, 0) + 1
        row["prompt"] += t["prompt"]
        row["completion"] += t["completion"]
        row["cached"] += t.get("cached", 0)
        row["reasoning"] += t.get("reasoning", 0)
        row["cost"] += m.get("cost", 0)
    return out


async def test_the_daily_rollup_equals_the_messages(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings(models=json.dumps(PRICED))))
    db = client.app[STORE].db
    fake_openai.scripts = [Script(frames=rec.TOOL_CALLS), Script(status=500), Script(status=500)]
    fake_openai.scripts.append(Script(status=500))
    fake_openai.default = Script(usage=(30, 5))
    users = ["alice", "bob", "carol"]
    for i, user in enumerate(users * 3):
        body = {**BODY, "model": "demo" if i % 2 else "gpt-test"}
        r = await client.post("/v1/chat/completions", json=body, headers=auth(user))
        await r.read()
    # a cancelled turn: the client goes away from a stateless stream
    fake_openai.default = Script(chunks=["x"] * 5, gate_after=1, usage=(30, 5))
    r = await client.post("/v1/chat/completions", json=BODY, headers=auth("bob"))
    await r.content.readany()
    r.close()
    await asyncio.wait_for(fake_openai.disconnected.wait(), 10)  # the turn was cancelled
    await settled(db, users=tuple(users))
    await rolled_up(db)
    statuses = {m["status"] async for m in db.messages.find({"role": "assistant"})}
    assert {"complete", "failed", "cancelled"} <= statuses
    want = with_totals(await brute_force(db))
    got = await rollup_rows(db)
    assert got.keys() == want.keys()
    for key, row in want.items():
        for field in ("turns", "prompt", "completion", "cached", "reasoning", "cost"):
            assert got[key][field] == row[field], (key, field)
        assert got[key]["outcomes"] == row["outcomes"], key


async def test_the_rollup_keeps_any_model_name_and_key_exactly(client):
    """Model names hold dots (gpt-4.1), and a field name may not: a line's name encodes them,
    and the analytics read back the names as they were, summed exactly."""
    from service.analytics import UsageQuery, line_key, parse_line_key
    from service.store import Rollup, utcnow

    odd = "gpt-4.1 $x|%2E."
    assert parse_line_key(line_key("2026-11-30", odd, "k.1|$")) == ("2026-11-30", odd, "k.1|$")
    store = client.app[STORE]
    day = utcnow().date().isoformat()

    def turn(model: str, key: str | None, cost: int) -> Rollup:
        return Rollup(day, "alice", model, key, "completed", 10, 2, 0, 0, cost)

    await store.roll_up([turn(odd, None, 5), turn(odd, "k.1", 7), turn("demo", None, 1)])
    await store.roll_up([turn(odd, None, 11)])
    query = UsageQuery.parse({"by": "model,key"}, utcnow().date())
    rows = query.group(await store.rollup_docs(query.selections()))
    got = {(r["model"], r["key_id"]): (r["turns"], r["cost"]) for r in rows}
    assert got == {("demo", None): (1, 1), (odd, None): (2, 16), (odd, "k.1"): (1, 7)}
    totals = UsageQuery.parse({"by": "model"}, utcnow().date())
    assert all(s["user_id"] is None for s in totals.selections())  # the month's totals
    rows = totals.group(await store.rollup_docs(totals.selections()))
    assert [(r["model"], r["turns"], r["cost"]) for r in rows] == [
        ("demo", 1, 1),
        (odd, 3, 23),
    ]

"""The chat page shows what answers cost (issue 20), in a real headless Chromium: a priced
model's answer shows its cost beside its tokens, live and after a reload; the header shows the
month's spend as ``GET /api/usage`` has it; an unpriced model's answer shows no cost; and with
``BUDGET_UNIT=currency`` the header's budget is money. Fixtures: tests/browser/conftest.py."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal

import pytest

from tests.browser.test_page_browser import LAST_ASSISTANT, open_page, send
from tests.conftest import TEST_MODELS
from tests.fake_openai import Script

pytestmark = pytest.mark.browser

# The demo model priced high enough that one short answer costs a visible fraction of a cent.
DEMO_PRICE = {"input": "2.5", "output": "10"}
PRICED_DEMO = [TEST_MODELS[0], {**TEST_MODELS[1], "price": DEMO_PRICE}]  # gpt-test: no price
ALL_PRICED = [{**m, "price": DEMO_PRICE} for m in TEST_MODELS]


def usd(amount: str) -> str:
    """What the page shows for an amount in en-US: cents from a dollar on, else up to six
    decimals (rounded half away from zero, as Intl does), never fewer than two."""
    value = Decimal(amount)
    digits = 2 if value >= 1 else 6
    text = f"{value.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP):,}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"${whole}.{frac}"


def test_usd_formats_like_the_page():
    assert usd("0.0012345") == "$0.001235" and usd("0.5") == "$0.50"
    assert usd("12.3456") == "$12.35" and usd("1234.5") == "$1,234.50"


async def api_get(client, page, path):
    token = await page.evaluate("sessionStorage.getItem('chat-gateway.token')")
    resp = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def chat_history(client, page):
    chat_id = (await page.evaluate("location.hash")).rsplit("/", 1)[1]
    return (await api_get(client, page, f"/api/chat/{chat_id}"))["messages"]


async def test_an_answer_shows_its_cost_and_the_header_the_months_spend(
    browser, serve, fake_openai
):
    client = await serve(models=json.dumps(PRICED_DEMO), default_model="demo")
    page = await open_page(browser, client, locale="en-US")
    await send(page, "What does this cost?")
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()

    answer = (await chat_history(client, page))[-1]
    assert Decimal(answer["cost"]) > 0 and answer["currency"] == "USD"
    meta = done.locator(".msg-meta")
    assert await meta.get_attribute("data-cost") == answer["cost"]
    total = answer["tokens"]["total"]
    assert await meta.text_content() == f"{total:,} tokens · {usd(answer['cost'])}"

    # The header's usage: refreshed after the turn, the spend exactly GET /api/usage's.
    usage = await api_get(client, page, "/api/usage")
    assert usage["cost"] == answer["cost"] and usage["unit"] == "tokens"
    header = page.locator("#usage")
    await page.locator(f"#usage[data-cost='{usage['cost']}']").wait_for()
    text = await page.locator("#usage-text").text_content()
    assert text == f"{usage['used']:,} / {usage['limit']:,} tokens · {usd(usage['cost'])}"
    assert f"Spent this month: {usd(usage['cost'])}" in await header.get_attribute("title")

    # An unpriced model's answer: its tokens, no cost (nothing invented); the spend stays.
    await page.select_option("#model", "gpt-test")
    fake_openai.default = Script(chunks=["Free ", "answer."], usage=(12, 3))
    await send(page, "And this one?")
    await page.locator("#messages > .msg.assistant[data-status=complete] >> nth=1").wait_for()
    free = page.locator(LAST_ASSISTANT)
    assert await free.locator(".msg-meta").text_content() == "15 tokens"
    assert await free.locator(".msg-meta").get_attribute("data-cost") is None
    await page.locator(f"#usage[data-used='{usage['used'] + 15}']").wait_for()
    assert (await api_get(client, page, "/api/usage"))["cost"] == usage["cost"]
    assert usd(usage["cost"]) in await page.locator("#usage-text").text_content()

    # After a reload the history shows the same: the cost on the priced answer only.
    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    metas = await page.locator("#messages .msg.assistant .msg-meta").all_text_contents()
    assert metas == [f"{total:,} tokens · {usd(answer['cost'])}", "15 tokens"]
    assert "NaN" not in await page.locator("#usage").text_content()
    assert page.uncaught == []


async def test_a_money_budget_shows_in_money_in_the_header(browser, serve):
    client = await serve(
        models=json.dumps(ALL_PRICED), budget_unit="currency", currency="EUR", default_budget="2"
    )
    page = await open_page(browser, client, locale="en-US")
    await page.locator("#usage[data-unit=EUR]").wait_for()
    assert await page.locator("#usage-text").text_content() == "€0.00 / €2.00"
    await send(page, "Spend some money")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").wait_for()

    usage = await api_get(client, page, "/api/usage")
    assert Decimal(usage["used"]) > 0 and usage["used"] == usage["cost"]
    await page.locator(f"#usage[data-used='{usage['used']}']").wait_for()
    shown = await page.locator("#usage-text").text_content()
    assert shown == f"{usd(usage['used']).replace('$', '€')} / €2.00"
    title = await page.locator("#usage").get_attribute("title")
    assert f"{usd(usage['remaining']).replace('$', '€')} left" in title
    assert "tokens" not in shown + title
    meta = await page.locator(f"{LAST_ASSISTANT} .msg-meta").text_content()
    assert meta.endswith(usd(usage["cost"]).replace("$", "€"))
    assert page.uncaught == []

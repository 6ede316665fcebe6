"""Regenerate an answer and edit a question on the chat page (issue 19), end to end in a real
headless Chromium: the new version streams in, the page and its history after a reload show the
chosen version ("2 of 2", the earlier one listed), and the upstream got the chosen branch.
Fixtures: tests/browser/conftest.py; helpers: test_page_browser.py."""

from __future__ import annotations

import pytest

from tests.browser.test_page_browser import LAST_ASSISTANT, open_page, send, use_transport
from tests.fake_openai import Script

pytestmark = pytest.mark.browser

LAST_USER = "#messages > .msg.user >> nth=-1"


def prompt(fake_openai) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in fake_openai.requests[-1]["messages"][1:]]


async def answered(page, text):
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text=text)
    await done.wait_for()
    return done


async def shown(page):
    return await page.evaluate(
        """() => [...document.querySelectorAll('#messages > .msg')]
            .map((li) => [li.dataset.role, li.querySelector('.msg-body').textContent])"""
    )


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_regenerate_streams_a_new_version_and_keeps_the_old_one(
    browser, serve, fake_openai, db, transport
):
    fake_openai.scripts = [Script(chunks=["first ", "answer"]), Script(chunks=["second answer"])]
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await use_transport(page, transport)
    await send(page, "q1")
    await answered(page, "first answer")

    await page.locator(f"{LAST_ASSISTANT} [data-action=regenerate]").click()
    done = await answered(page, "second answer")
    assert await shown(page) == [["user", "q1"], ["assistant", "second answer"]]
    assert prompt(fake_openai) == [("user", "q1")]
    regenerated = await db.messages.find_one({"role": "assistant", "replaces": {"$exists": True}})
    assert regenerated["transport"] == transport  # over the socket when it is switched on
    version = done.locator(".msg-version")
    await version.wait_for()
    assert await version.text_content() == "2 of 2"
    await version.click()
    earlier = done.locator(".msg-versions .msg-version-item")
    await earlier.first.wait_for()
    assert await earlier.all_text_contents() == ["Version 1 of 2first answer"]
    assert await version.get_attribute("aria-expanded") == "true"

    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    assert await shown(page) == [["user", "q1"], ["assistant", "second answer"]]
    assert await page.locator(f"{LAST_ASSISTANT} .msg-version").text_content() == "2 of 2"
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_edit_a_question_in_place_and_the_next_turn_follows_it(
    browser, serve, fake_openai, db, transport
):
    fake_openai.scripts = [
        Script(chunks=["a1"]),
        Script(chunks=["a2"]),
        Script(chunks=["a2 for the edit"]),
        Script(chunks=["a3"]),
    ]
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await use_transport(page, transport)
    await send(page, "q1")
    await answered(page, "a1")
    await send(page, "q2")
    await answered(page, "a2")

    # Escape leaves the question as it was.
    question = page.locator(LAST_USER)
    await question.locator("[data-action=edit]").click()
    box = question.locator(".msg-edit textarea")
    assert await box.input_value() == "q2"
    await box.press("Escape")
    assert await question.locator(".msg-edit").count() == 0
    assert await question.locator(".msg-body").is_visible()

    await question.locator("[data-action=edit]").click()
    await box.fill("q2, edited")
    await question.locator(".msg-edit button[type=submit]", has_text="Save").click()
    await answered(page, "a2 for the edit")
    assert await shown(page) == [
        ["user", "q1"],
        ["assistant", "a1"],
        ["user", "q2, edited"],
        ["assistant", "a2 for the edit"],
    ]
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "a1"), ("user", "q2, edited")]
    edited = await db.messages.find_one({"role": "user", "edits": {"$exists": True}})
    its_answer = await db.messages.find_one(
        {"chat_id": edited["chat_id"], "seq": edited["seq"] + 1}
    )
    assert its_answer["transport"] == transport  # over the socket when it is switched on
    await page.locator(LAST_USER).locator(".msg-version", has_text="2 of 2").wait_for()

    await send(page, "q3")
    await answered(page, "a3")
    assert prompt(fake_openai)[-3:] == [
        ("user", "q2, edited"),
        ("assistant", "a2 for the edit"),
        ("user", "q3"),
    ]
    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    assert [text for _, text in await shown(page)] == [
        "q1",
        "a1",
        "q2, edited",
        "a2 for the edit",
        "q3",
        "a3",
    ]
    assert page.uncaught == []


async def test_a_refused_regenerate_puts_the_page_back(browser, serve, fake_openai):
    fake_openai.scripts = [Script(chunks=["the answer"])]
    client = await serve(default_model="gpt-test", message_rate_limit_ms=60_000)
    page = await open_page(browser, client)
    await send(page, "q1")
    await answered(page, "the answer")
    await page.locator(f"{LAST_ASSISTANT} [data-action=regenerate]").click()
    await page.locator("#error:not([hidden])").wait_for()
    assert await shown(page) == [["user", "q1"], ["assistant", "the answer"]]
    assert await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").count() == 1
    assert len(fake_openai.requests) == 1
    assert page.uncaught == []

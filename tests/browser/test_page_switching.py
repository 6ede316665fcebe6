"""Switching chats while a send is on its way, in Chromium: what the user typed is never lost or
hidden (two refusals out of sight both come back, an edit refused away keeps its text, an edit
being typed survives the answer starting), a chat beyond the list's pages stays in the list once
left mid-answer, a send to a chat deleted meanwhile is no error, and a text given back is said.
Found by a review of the page's chat switch; fixtures and helpers from test_page_browser.py and
test_page_daily.py. One transport: the logic under test is the page's, not the transport's."""

from __future__ import annotations

import asyncio

import pytest

from tests.browser.test_page_browser import LAST_ASSISTANT, open_page, send, use_transport
from tests.browser.test_page_daily import chat_named, holding, shown_roles, until
from tests.fake_openai import Script

pytestmark = pytest.mark.browser

USER = "#messages > .msg.user"


async def a_first_chat(page, question="One", answer="First."):
    await send(page, question)
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text=answer).wait_for()
    return await page.evaluate("location.hash")


@pytest.mark.parametrize("transport", ["sse"])
async def test_two_sends_refused_out_of_sight_in_one_chat_keep_both_texts(
    browser, serve, fake_openai, transport
):
    """Two questions sent in one chat, each left at once (the network slow), are both refused:
    opened again, the chat gives back the text of both (the second refusal replaced the first
    in state.unsent: the first question's text was gone for good)."""
    fake_openai.scripts = [Script(chunks=["First."])]
    client = await serve(default_model="gpt-test", max_message_chars=40)
    page = await open_page(browser, client)
    held, release = await holding(page, "LONG")
    await use_transport(page, transport)
    first = await a_first_chat(page)
    one = "LONG one: a question far too long to be sent here"
    two = "LONG two: another question far too long to be sent"

    await send(page, one)
    await until(lambda: len(held) == 1)
    await page.click("#new-chat")
    await chat_named(page, "One").click()
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="First.").wait_for()
    await send(page, two)
    await until(lambda: len(held) == 2)
    await page.click("#new-chat")
    release.set()
    await page.locator("#error-text", has_text="was not sent").wait_for()
    await page.wait_for_function("() => document.querySelector('#stop').hidden")

    await chat_named(page, "One").click()
    await page.wait_for_function(f"() => location.hash === {first!r}")
    await page.locator(f"{USER}[data-status=not_sent]").first.wait_for()
    box = await page.locator("#input").input_value()
    assert one in box and two in box, box  # one is gone: a chat kept only its last refusal
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse"])
async def test_an_edit_refused_after_its_chat_was_left_keeps_its_text(
    browser, serve, fake_openai, transport
):
    """A question edited (Save), its chat left at once, and the edit refused (too long): the
    new text is given back when the chat is opened again, as a refused send's is (only an
    error banner said so, and the rewritten text was gone; refused on the page, it stays in
    its edit box)."""
    fake_openai.scripts = [Script(chunks=["First."])]
    client = await serve(default_model="gpt-test", max_message_chars=40)
    page = await open_page(browser, client)
    held, release = await holding(page, "LONG", "**/api/chat/*/messages/*/edit")
    await use_transport(page, transport)
    first = await a_first_chat(page)
    new_text = "LONG: the question as I rewrote it, with care"

    await page.locator(f"{USER} [data-action=edit]").click()
    await page.locator("#messages .msg-edit textarea").fill(new_text)
    await page.keyboard.press("Control+Enter")
    await until(lambda: len(held) == 1)
    await page.click("#new-chat")
    release.set()
    await page.locator("#error-text", has_text="was not asked again").wait_for()

    await chat_named(page, "One").click()
    await page.wait_for_function(f"() => location.hash === {first!r}")
    await page.locator("#messages > .msg.assistant", has_text="First.").wait_for()
    await page.wait_for_function("() => document.querySelector('#messages').ariaBusy === 'false'")
    shown = await page.locator("#input").input_value() + (
        await page.locator("#messages").text_content()
    )
    assert new_text in shown  # the rewritten question is nowhere on the page
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse"])
async def test_an_edit_in_progress_survives_the_answer_starting_out_of_sight(
    browser, serve_gated, fake_openai, transport
):
    """Back in the chat whose send was still on its way, the user edits an earlier question;
    the send's answer then starts: the page shows it (and follows it) without throwing away
    the edit being typed (the chat was redrawn from its history: the edit box, its text and
    the focus were gone)."""
    fake_openai.scripts = [Script(chunks=["Hi ", "there."])]
    client = await serve_gated()
    page = await open_page(browser, client)
    held, release = await holding(page, "Say hello in many scripts")
    await use_transport(page, transport)
    first = await a_first_chat(page, "Hello", "Hi there.")
    await send(page, "Say hello in many scripts")
    await until(lambda: len(held) == 1)
    await page.click("#new-chat")
    await chat_named(page, "Hello").click()
    await page.wait_for_function(f"() => location.hash === {first!r}")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Hi there.").wait_for()

    await page.locator(f"{USER} [data-action=edit]").click()
    edit = page.locator("#messages .msg-edit textarea")
    await edit.fill("Hello, with the words I am still choosing")
    # the send arrives, its answer starts, and the page lets it go (reading the usage after)
    async with page.expect_response(lambda r: r.url.endswith("/api/usage")):
        release.set()
        await asyncio.wait_for(fake_openai.reached_gate.wait(), 15)
    assert await edit.count() == 1, await shown_roles(page)  # the chat was redrawn
    assert await edit.input_value() == "Hello, with the words I am still choosing"
    assert await edit.evaluate("(box) => box === document.activeElement")
    fake_openai.gate.set()
    assert page.uncaught == []


async def test_a_chat_beyond_the_list_left_mid_answer_stays_in_the_list(
    browser, serve_gated, fake_openai
):
    """A chat beyond the list's first page, opened from a search and sent to, is left while its
    answer is written: it goes to the top of the list all the same (it went nowhere: the server
    moved it out of the later pages, and "More chats" never showed it again until a reload)."""
    client = await serve_gated(max_chats_per_user=150)
    token = (await (await client.get("/api/dev/token?user=alice")).json())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    for i in range(101):
        title = "The oldest chat" if i == 0 else f"Chat {i}"
        resp = await client.post("/api/chat", json={"title": title}, headers=headers)
        assert resp.status == 201
    page = await open_page(browser, client)
    assert await chat_named(page, "The oldest chat").count() == 0

    await page.fill("#search", "oldest")
    await page.locator(".search-open", has_text="The oldest chat").click()
    await page.locator("#chat-title", has_text="The oldest chat").wait_for()
    await page.fill("#search", "")
    await send(page, "Say hello in many scripts")
    await page.locator(f"{LAST_ASSISTANT}[data-status=streaming]").wait_for()
    await chat_named(page, "Chat 100").click()
    await page.locator("#chat-title", has_text="Chat 100").wait_for()
    await page.wait_for_function("() => document.querySelector('#stop').hidden")

    more = page.locator("#chat-list .chat-more button")
    if await more.count():
        await more.click()
        await more.wait_for(state="detached")
    assert await chat_named(page, "The oldest chat").count() == 1  # in no page of the list
    fake_openai.gate.set()
    assert page.uncaught == []


async def test_a_hidden_send_to_a_chat_deleted_meanwhile_is_not_an_error(
    browser, serve, fake_openai
):
    """Sent, left at once, and its chat deleted by the user before the send arrived: the page
    does not say "not sent ... This chat no longer exists (was it deleted elsewhere?)" of a chat
    the user deleted here."""
    fake_openai.scripts = [Script(chunks=["First."]), Script(chunks=["Second."])]
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    first = await a_first_chat(page)
    await page.click("#new-chat")
    await a_first_chat(page, "Two", "Second.")
    await chat_named(page, "One").click()
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="First.").wait_for()
    held, release = await holding(page, "Gone with its chat")
    await send(page, "Gone with its chat")
    await until(lambda: len(held) == 1)
    await chat_named(page, "Two").click()
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Second.").wait_for()
    one = page.locator(f".chat-item[data-chat-id={first.removeprefix('#/chat/')!r}]")
    await one.locator(".chat-delete").click()
    await one.locator(".confirm-yes").click()
    await one.wait_for(state="detached")
    # released: refused (its chat is gone), and taken in by the page (it reads the usage after)
    async with page.expect_response(lambda r: r.url.endswith("/api/usage")):
        async with page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith("/message")
        ) as refused:
            release.set()
        assert (await refused.value).status == 404
    said = await page.locator("#error-text").text_content()
    assert await page.locator("#error").is_hidden(), said
    assert page.uncaught == []


async def test_a_refused_send_given_back_on_opening_its_chat_is_announced(
    browser, serve, fake_openai
):
    """A send refused after its chat was left comes back when the chat is opened: its bubble
    "not sent" and its text in the message box. A screen reader is told (the page said nothing:
    the alert had gone with the chat switch, and the box's text changed silently)."""
    fake_openai.scripts = [Script(chunks=["First."])]
    client = await serve(default_model="gpt-test", max_message_chars=40)
    page = await open_page(browser, client)
    first = await a_first_chat(page)
    held, release = await holding(page, "LONG")
    await send(page, "LONG: a question far too long to be sent here")
    await until(lambda: len(held) == 1)
    await page.click("#new-chat")
    release.set()
    await page.locator("#error-text", has_text="was not sent").wait_for()

    await chat_named(page, "One").click()
    await page.wait_for_function(f"() => location.hash === {first!r}")
    await page.locator(f"{USER}[data-status=not_sent]").wait_for()
    said = [
        await page.locator("#announce").text_content(),
        await page.locator("#error-text").text_content(),
    ]
    assert any("not sent" in s for s in said), said
    assert page.uncaught == []

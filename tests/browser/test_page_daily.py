"""The chat page as a person uses it every day, in a real headless Chromium against the app:
another chat opened while an answer is written or right after a send, a send stopped while the
network is down, a refused send (its reason, its text back, gone with the next send; Edit after
it; one refused in a new chat leaves no empty chat), more chats than a page of the list, wide
tables and the rate limit's sentence. Fixtures and helpers: test_page_browser.py; fixtures:
conftest.py."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.browser import test_page_browser as page_browser
from tests.browser.test_page_browser import (
    ANSWER,
    HEAD,
    LAST_ASSISTANT,
    answer_held_at_gate,
    completes_exactly,
    open_page,
    send,
    use_transport,
)
from tests.fake_openai import Script

pytestmark = pytest.mark.browser


def chat_named(page, title):
    return page.locator(".chat-item .chat-name", has_text=re.compile(f"^{re.escape(title)}$"))


async def shown_roles(page):
    return await page.evaluate(
        """() => [...document.querySelectorAll('#messages > .msg')]
            .map((li) => `${li.dataset.role}:${li.dataset.status}`)"""
    )


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_another_chat_opens_mid_answer_and_the_answer_goes_on(
    browser, serve_gated, fake_openai, transport
):
    """A click on another chat while an answer is written opens that chat at once, with the
    composer free; the answer is not stopped, and opened again its chat follows it to the end."""
    fake_openai.scripts = [Script(chunks=["Hi ", "there."])]  # the first chat's turn, ungated
    client = await serve_gated()
    page = await open_page(browser, client)
    await use_transport(page, transport)
    await send(page, "Hello")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").wait_for()
    first = await page.evaluate("location.hash")
    await page.click("#new-chat")
    records = await answer_held_at_gate(page, client, fake_openai)

    await chat_named(page, "Hello").click()
    await page.wait_for_function(f"() => location.hash === {first!r}")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Hi there.").wait_for()
    assert await shown_roles(page) == ["user:complete", "assistant:complete"]
    assert await page.locator("#send").is_visible()
    assert await page.locator("#stop").is_hidden()
    assert await page.locator("#error").is_hidden()
    assert (await records.answer())["status"] == "streaming"  # left, not stopped

    await chat_named(page, "Say hello in many scripts").click()
    following = page.locator(f"{LAST_ASSISTANT}[data-status=streaming]")
    await following.wait_for()
    assert await following.locator(".msg-body").text_content() == "".join(HEAD)
    assert await page.locator("#stop").is_visible()
    fake_openai.gate.set()
    await completes_exactly(page, records)
    assert await page.locator(f"{LAST_ASSISTANT} .msg-body").text_content() == ANSWER
    assert page.uncaught == []


async def holding(page, marker, url="**/api/chat/*/message"):
    """Hold every request of the page carrying ``marker`` (a POST to ``url``, or a WebSocket
    frame) on its way to the service until the returned ``release`` is set: (held, release);
    ``held`` counts them."""
    held, release = [], asyncio.Event()
    later = set()

    async def post(route):
        if marker in (route.request.post_data or ""):
            held.append(route.request.url)
            await release.wait()
        await route.continue_()

    async def forward_when_released(server, message):
        await release.wait()
        server.send(message)

    def socket(ws):
        server = ws.connect_to_server()

        def from_page(message):
            if isinstance(message, str) and marker in message and not release.is_set():
                held.append(message)
                task = asyncio.create_task(forward_when_released(server, message))
                later.add(task)
                task.add_done_callback(later.discard)
            else:
                server.send(message)

        ws.on_message(from_page)

    await page.route(url, post)
    await page.route_web_socket(re.compile(r"/api/ws\?"), socket)
    return held, release


async def until(check, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_another_chat_opens_before_the_answer_starts(
    browser, serve_gated, fake_openai, transport
):
    """A click on another chat in the instant after a send, before its answer started (the
    send still on its way), opens that chat at once (the click did nothing until the answer
    started). The send is not cut off: its answer is written, never shown in the chat opened,
    and is there when its own chat is opened again."""
    fake_openai.scripts = [Script(chunks=["Hi ", "there."]), Script(chunks=["Fine."])]
    client = await serve_gated()
    page = await open_page(browser, client)
    held, release = await holding(page, "Say hello in many scripts")
    await use_transport(page, transport)
    await send(page, "Hello")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Hi there.").wait_for()
    first = await page.evaluate("location.hash")
    await page.click("#new-chat")
    await send(page, "Other")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Fine.").wait_for()
    other = await page.evaluate("location.hash")
    await chat_named(page, "Hello").click()
    await page.wait_for_function(f"() => location.hash === {first!r}")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Hi there.").wait_for()

    await send(page, "Say hello in many scripts")
    await until(lambda: len(held) == 1, 15)
    records = await page_browser.Records.of(page, client)
    assert await page.locator(LAST_ASSISTANT).get_attribute("data-status") == "pending"
    await chat_named(page, "Other").click()
    await page.wait_for_function(f"() => location.hash === {other!r}")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Fine.").wait_for()
    assert await page.locator("#send").is_visible()
    assert await page.locator("#stop").is_hidden()

    release.set()  # the send arrives, its answer starts (and is let go by the page)
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 15)
    fake_openai.gate.set()
    await records.wait(lambda r: r["status"] == "complete" and r["content"] == ANSWER)
    assert await shown_roles(page) == ["user:complete", "assistant:complete"]
    assert "Say hello" not in await page.locator("#messages").text_content()
    assert await page.locator("#error").is_hidden()

    await chat_named(page, "Hello").click()
    await completes_exactly(page, records)
    assert await shown_roles(page) == ["user:complete", "assistant:complete"] * 2
    assert len(fake_openai.requests) == 3  # Hello, Other, and this one, once
    assert page.uncaught == []


async def test_deleting_the_open_chat_mid_answer_leaves_a_new_chat_that_sends(
    browser, serve_gated, fake_openai
):
    """The chat whose answer is being written is deleted: the page goes to a new chat (not the
    deleted one, where every send was refused as chat_not_found), and a send there works."""
    client = await serve_gated()
    page = await open_page(browser, client)
    await answer_held_at_gate(page, client, fake_openai)

    await page.click(".chat-item .chat-delete")
    await page.click(".chat-item .confirm-yes")
    await page.locator(".chat-item").wait_for(state="detached")
    await page.wait_for_function("() => location.hash === ''")
    assert await page.locator("#chat-title").text_content() == "New chat"
    assert await page.locator("#messages .msg").count() == 0
    assert await page.locator("#send").is_visible()

    fake_openai.default = Script(chunks=["Fresh ", "start."])
    await send(page, "Again")
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Fresh start.")
    await done.wait_for()
    await chat_named(page, "Again").wait_for()
    assert await page.locator("#error").is_hidden()
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_send_stopped_while_the_network_is_down_keeps_its_text(
    browser, network, fake_openai, transport
):
    """The network is down as a message is sent: the page tries again ("reconnecting…"), and
    the user presses Stop before it went out. The message is marked not sent and its text is
    back in the box (over the WebSocket it was gone: the question looked sent, and was not)."""
    _client, proxy, page = await page_browser.after_a_first_turn(
        browser, network, fake_openai, transport
    )

    proxy.cut()
    text = "A long question\nI took a while to write"
    await send(page, text)
    await page.locator(f"{LAST_ASSISTANT}[data-status=reconnecting]").wait_for()
    await page.click("#stop")

    await page.locator("#send").wait_for()
    assert await page.locator("#input").input_value() == text
    assert await shown_roles(page) == ["user:complete", "assistant:complete", "user:not_sent"]
    assert len(fake_openai.requests) == 1
    assert page.uncaught == []


async def test_a_refused_send_says_why_and_goes_with_the_next_send(browser, serve, fake_openai):
    """A refused send's question stays on the page marked "not sent" with the reason, its text
    back in the box and focus there; it offers Dismiss, not Edit (it is not in the history).
    Dismissed, or when the next message is sent, it leaves the page (it stayed until a reload,
    one more for each try). Edit works with one on the page (the page matches the history to
    the bubbles without it: counted, Edit did nothing)."""
    fake_openai.scripts = [Script(chunks=["First."]), Script(chunks=["Second."])]
    fake_openai.default = Script(chunks=["Edited."])
    client = await serve(default_model="gpt-test", max_message_chars=40)
    page = await open_page(browser, client)
    await send(page, "One")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="First.").wait_for()
    too_long = "This question is far too long to be sent here"
    not_sent = page.locator("#messages > .msg.user[data-status=not_sent]")

    async def refused():
        await send(page, too_long)
        await not_sent.wait_for()
        assert await not_sent.count() == 1
        why = await not_sent.locator(".msg-error").text_content()
        assert why.startswith("The message cannot be sent as it is (message must be 1 to 40"), why
        assert why.endswith("Your text is back in the message box."), why
        assert why.startswith(await page.locator("#error-text").text_content())
        assert await page.locator("#input").input_value() == too_long
        await page.wait_for_function("() => document.activeElement?.id === 'input'")

    await refused()
    assert await not_sent.locator("[data-action=edit]").is_hidden()
    # named apart from the error banner's own Dismiss
    await not_sent.get_by_role("button", name="Dismiss the message not sent").click()
    await not_sent.wait_for(state="detached")
    assert await page.locator("#error").is_hidden()
    assert await page.locator("#input").input_value() == too_long  # still there to edit
    await page.wait_for_function("() => document.activeElement?.id === 'input'")

    await page.press("#input", "Enter")  # the same again: one bubble, not two
    # Its refusal back (the text in the box again) before the next send's fill: a fill racing
    # the text given back would type into it.
    await not_sent.wait_for()
    await page.wait_for_function("() => document.getElementById('input').value !== ''")
    await refused()
    await page.fill("#input", "Two")
    await page.press("#input", "Enter")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Second.").wait_for()
    complete = ["user:complete", "assistant:complete"]
    assert await shown_roles(page) == complete * 2
    assert await page.locator("#error").is_hidden()

    await refused()
    await (
        page.locator("#messages > .msg.user[data-status=complete] >> nth=-1")
        .locator("[data-action=edit]")
        .click()
    )
    edit = page.locator("#messages .msg-edit textarea")
    await edit.wait_for()
    assert await edit.input_value() == "Two"
    await edit.fill("Two, again")
    await page.keyboard.press("Control+Enter")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Edited.").wait_for()
    assert fake_openai.requests[-1]["messages"][-1]["content"] == "Two, again"
    assert await shown_roles(page) == complete * 2  # what followed "Two" went, the refused one too
    assert page.uncaught == []


async def test_a_refused_first_send_leaves_no_empty_chat(browser, serve):
    """A fresh page's first send creates its chat, and is refused (the month's budget is used
    up): the chat goes again. It stayed, titled with the question and holding no message, in
    the list and after a reload. The page is a new chat again, the question "not sent" and its
    text back in the box: the next send makes a chat of its own (not one deleted)."""
    client = await serve(default_token_limit=1)
    page = await open_page(browser, client)
    assert await page.locator(".chat-item").count() == 0
    token = await page.evaluate("sessionStorage.getItem('chat-gateway.token')")
    headers = {"Authorization": f"Bearer {token}"}
    not_sent = page.locator("#messages > .msg.user[data-status=not_sent]")
    no_chat = """() => location.hash === '' && !document.querySelector('#chat-list .chat-item')
        && document.querySelector('#chat-title').textContent === 'New chat'"""

    def a_delete(response):
        return response.request.method == "DELETE" and "/api/chat/" in response.url

    async def refused_and_gone(question):
        async with page.expect_response(a_delete) as gone:
            await send(page, question)
            await not_sent.wait_for()
        assert (await gone.value).ok
        await page.wait_for_function(no_chat)
        assert "budget is not enough" in await page.locator("#error-text").text_content()
        assert await not_sent.count() == 1
        assert await not_sent.locator(".msg-body").text_content() == question
        assert await page.locator("#input").input_value() == question  # kept for a retry
        resp = await client.get("/api/chat", headers=headers)
        assert (await resp.json())["chats"] == []
        return (await gone.value).url

    first = await refused_and_gone("Hello?")
    second = await refused_and_gone("Hello again?")  # a new chat, refused for the budget too
    assert first != second

    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    await page.wait_for_function(no_chat)
    assert await page.locator("#chat-list-empty").is_visible()
    assert await page.locator("#messages .msg").count() == 0
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_send_the_upstream_refused_is_shown_as_saved(
    browser, serve, fake_openai, transport
):
    """The model's provider refuses a send before its answer started (400): the service has
    saved the question and its failed answer by then. The page shows them so (the question
    sent, the answer failed with its reason and Regenerate), not the question "not sent" with
    its text back in the box, which a reload contradicted and a send again made twice in the
    chat. A fresh page's first send keeps its chat; in a chat after a good turn, the same."""
    refusal = {"error": {"message": "no such field: tone", "type": "invalid_request_error"}}
    fake_openai.scripts = [
        Script(status=400, error_body=refusal),  # a fresh page's first send
        Script(chunks=["Hi ", "there."]),  # a new chat's good turn
        Script(status=400, error_body=refusal),  # then its second send
    ]
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await use_transport(page, transport)
    token = await page.evaluate("sessionStorage.getItem('chat-gateway.token')")
    headers = {"Authorization": f"Bearer {token}"}
    ended = "#messages > .msg.assistant[data-status=failed], #messages > .msg[data-status=not_sent]"

    async def shown_as_saved(question, roles):
        failed = page.locator(f"{LAST_ASSISTANT}[data-status=failed]")
        assert await shown_roles(page) == roles
        asked = page.locator("#messages > .msg.user >> nth=-1")
        assert await asked.locator(".msg-body").text_content() == question
        assert (
            "model provider refused the request"
            in await failed.locator(".msg-error").text_content()
        )
        assert await failed.locator("[data-action=regenerate]").is_visible()
        assert await page.locator("#chat-title").text_content() != "New chat"
        assert await page.locator(".chat-item[data-chat-id]").count() >= 1
        chat_id = (await page.evaluate("location.hash")).removeprefix("#/chat/")
        resp = await client.get(f"/api/chat/{chat_id}", headers=headers)
        saved = (await resp.json())["messages"]
        assert [m["content"] for m in saved if m["role"] == "user"].count(question) == 1
        assert [f"{m['role']}:{m['status']}" for m in saved] == roles
        return chat_id

    async def refused(question, roles):
        await send(page, question)
        await page.locator(ended).first.wait_for()
        await page.wait_for_selector("#app[data-busy=false]")
        chat_id = await shown_as_saved(question, roles)
        assert (
            "model provider refused the request" in await page.locator("#error-text").text_content()
        )
        assert await page.locator("#input").input_value() == ""  # the question is in the chat
        await page.reload()
        await page.wait_for_selector("#app[data-state=ready]")
        assert await page.evaluate("location.hash") == f"#/chat/{chat_id}"
        await page.locator(f"{LAST_ASSISTANT}[data-status=failed]").wait_for()
        assert await shown_as_saved(question, roles) == chat_id
        return chat_id

    first = await refused("Hello?", ["user:complete", "assistant:failed"])

    await page.click("#new-chat")
    await send(page, "Hi")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Hi there.").wait_for()
    roles = ["user:complete", "assistant:complete", "user:complete", "assistant:failed"]
    second = await refused("And now?", roles)
    assert first != second
    assert len(fake_openai.requests) == 3  # nothing was sent again
    assert page.uncaught == []


async def test_the_rate_limit_is_said_in_sentences(browser, serve, fake_openai):
    """A send refused by the page's rate limit (SSE sends: one a MESSAGE_RATE_LIMIT_MS) says
    so, and when to try again, in two sentences (it read "You are sending messages too quickly
    Try again in 60 s.")."""
    client = await serve(default_model="gpt-test", message_rate_limit_ms=60_000)
    page = await open_page(browser, client)
    await send(page, "One")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").wait_for()
    await send(page, "Two")
    await page.locator("#error").wait_for()
    said = await page.locator("#error-text").text_content()
    assert re.fullmatch(r"You are sending messages too quickly\. Try again in \d+ s\.", said), said
    assert await page.locator("#input").input_value() == "Two"
    assert page.uncaught == []


async def test_a_wide_table_scrolls_on_a_phone_instead_of_breaking_its_words(
    browser, serve, fake_openai
):
    """A table wider than a phone scrolls sideways in its answer; its words stay whole (they
    were broken a letter or two a line: "col/um/n1"), and the page itself does not scroll."""
    columns = [f"column{i}" for i in range(10)]
    table = (
        f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
        f"| {' | '.join('value' for _ in columns)} |\n"
    )
    fake_openai.default = Script(chunks=["Here:\n\n", table])
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client, viewport=(390, 844))
    await send(page, "A table, please")
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.locator(".msg-md table").wait_for()
    layout = await page.evaluate(
        f"""() => {{
          const table = document.querySelector({LAST_ASSISTANT + " .msg-md table"!r});
          const lines = (cell) => {{
            const range = document.createRange();
            range.selectNodeContents(cell);
            return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
          }};
          return {{
            lines: [...table.querySelectorAll("th, td")].map(lines),
            scrolls: table.scrollWidth > table.clientWidth,
            page: document.documentElement.scrollWidth - window.innerWidth,
          }};
        }}"""
    )
    assert set(layout["lines"]) == {1}, layout
    assert layout["scrolls"]
    assert layout["page"] <= 0
    assert page.uncaught == []


async def test_a_send_scrolled_up_brings_the_new_answer_into_view(browser, serve, fake_openai):
    """Scrolled up to read an earlier answer, the user sends a follow-up: the page goes down to
    it and keeps the new answer in view as it grows (it streamed in out of sight)."""
    long = "".join(f"Line {i} of a long answer.\n\n" for i in range(60))
    fake_openai.scripts = [Script(chunks=[long])]
    fake_openai.default = Script(chunks=[f"Part {i} of the follow-up.\n\n" for i in range(30)])
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client, viewport=(1000, 600))
    await send(page, "Something long")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").wait_for()
    await page.evaluate("() => { document.querySelector('#messages').scrollTop = 0; }")
    await page.wait_for_function("() => document.querySelector('#messages').scrollTop === 0")

    await send(page, "And then?")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Part 29").wait_for()
    at_bottom = """() => {
      const m = document.querySelector('#messages');
      return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
    }"""
    await page.wait_for_function(at_bottom, timeout=5_000)
    assert page.uncaught == []


async def test_focus_is_kept_after_a_regenerate_from_the_keyboard(browser, serve, fake_openai):
    """Regenerate pressed from the keyboard removes its own button with the old answer: focus
    goes to the message box when the new answer ends, as after a send (it was lost to the
    page's body, Tab starting over from the top)."""
    fake_openai.scripts = [Script(chunks=["First."])]
    fake_openai.default = Script(chunks=["Second."])
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await send(page, "Hello")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="First.").wait_for()
    await page.locator(f"{LAST_ASSISTANT} [data-action=regenerate]").focus()
    await page.keyboard.press("Enter")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]", has_text="Second.").wait_for()
    await page.wait_for_function("() => document.activeElement?.id === 'input'", timeout=5_000)
    assert page.uncaught == []


async def test_more_chats_pages_through_every_chat(browser, serve, fake_openai):
    """Past the list's first page (100 chats, with MAX_CHATS_PER_USER raised) every chat can be
    reached (the older ones were never shown). One beyond the list, opened from a search, can
    be renamed (Rename did nothing) and, sent to, goes to the top of the list (it was in none of
    its pages); "More chats" shows the rest, that one not twice, focus on the first added."""
    fake_openai.default = Script(chunks=["Welcome back."])
    client = await serve(default_model="gpt-test", max_chats_per_user=150)
    token = (await (await client.get("/api/dev/token?user=alice")).json())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    ids = []
    for i in range(102):
        title = "The oldest chat" if i == 0 else f"Chat {i}"
        resp = await client.post("/api/chat", json={"title": title}, headers=headers)
        assert resp.status == 201
        ids.append((await resp.json())["chat_id"])
    page = await open_page(browser, client)
    items = page.locator("#chat-list .chat-item")
    assert await items.count() == 100
    assert await chat_named(page, "Chat 1").count() == 0

    await page.fill("#search", "oldest")
    await page.locator(".search-open", has_text="The oldest chat").click()
    await page.wait_for_function(f"() => location.hash === '#/chat/{ids[0]}'")
    await page.locator("#chat-title", has_text="The oldest chat").wait_for()
    await page.click("#rename")
    await page.fill("#rename-input", "Found again")
    await page.press("#rename-input", "Enter")
    await page.locator("#chat-title", has_text="Found again").wait_for()
    await page.fill("#search", "")
    await send(page, "Hello again")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").wait_for()
    assert await items.first.locator(".chat-name").text_content() == "Found again"
    assert await items.count() == 101

    await page.click("#chat-list .chat-more button")
    await chat_named(page, "Chat 1").wait_for()
    assert await items.count() == 102
    assert await chat_named(page, "Found again").count() == 1
    assert await page.locator("#chat-list .chat-more").count() == 0
    focused = "() => document.activeElement?.closest('.chat-item')?.dataset.chatId"
    assert await page.evaluate(focused) == ids[1]
    assert page.uncaught == []

"""The chat page end to end in a real headless Chromium, against the app on a real port.

Needs Python Playwright (no browser download: Debian's ``chromium`` package is used). Without
them the tests skip locally and fail in CI (``CI=true``). ``UPDATE_SCREENSHOT=1`` also refreshes
``docs/screenshot.png``; a mid-stream screenshot always goes to ``test-artifacts/``. Network
drops are real: the page talks to the app through a relay that resets its connections
(``tests/tcp_proxy.py``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.fake_openai import Script
from tests.processes import eventually

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 15_000

# Records the assistant bubble's text length at every DOM change while it streams.
SAMPLE_GROWTH = """() => {
  window.__samples = [];
  const root = document.querySelector("#messages");
  new MutationObserver(() => {
    const bubbles = root.querySelectorAll(".msg.assistant");
    const bubble = bubbles[bubbles.length - 1];
    if (!bubble || bubble.dataset.status !== "streaming") return;
    const n = bubble.querySelector(".msg-body").textContent.length;
    if (n && n !== window.__samples[window.__samples.length - 1]) window.__samples.push(n);
  }).observe(root, { childList: true, subtree: true, characterData: true });
}"""

LAST_ASSISTANT = "#messages > .msg.assistant:last-child"


async def open_page(browser, client, *, user="alice", viewport=(1200, 800), port=None, locale=None):
    context = await browser.new_context(
        viewport={"width": viewport[0], "height": viewport[1]}, locale=locale
    )
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.uncaught = []
    page.on("pageerror", lambda exc: page.uncaught.append(str(exc)))
    base = f"http://127.0.0.1:{port}" if port else str(client.make_url("")).rstrip("/")
    await page.goto(f"{base}/?user={user}")
    await page.wait_for_selector("#app[data-state=ready]")
    return page


async def send(page, text):
    await page.fill("#input", text)
    await page.press("#input", "Enter")


async def after_a_first_turn(browser, network, fake_openai, transport):
    """A page on ``transport`` behind a network that can drop (``proxy.cut()``), whose chat's
    first turn has ended, nothing else in flight (the chat exists; for ws, its socket is
    open): (client, proxy, page)."""
    client, proxy = await network()
    fake_openai.scripts = [Script(chunks=["Hi ", "there."])]  # the chat's first turn, ungated
    page = await open_page(browser, client, port=proxy.port)
    await use_transport(page, transport)
    await send(page, "Hello")
    await page.locator(f"{LAST_ASSISTANT}[data-status=complete]").wait_for()
    await page.wait_for_function("() => Number(document.querySelector('#usage').dataset.used) > 0")
    return client, proxy, page


async def use_transport(page, transport):
    if transport == "ws":
        await page.check("#use-ws")


async def sends_carried_keys(db, count):
    """The service saw an Idempotency-Key (a WebSocket ``key``) on each of the page's ``count``
    sends: one claim per send, each its own key, each the id of the answer it started."""
    claims = await db["idempotency_keys"].find({}).to_list(None)
    answers = await db["messages"].find({"role": "assistant"}).to_list(None)
    assert len({c["key"] for c in claims}) == len(claims) == count
    assert {c["_id"] for c in claims} == {m["_id"] for m in answers}
    return claims


async def test_answer_streams_in_then_history_survives_reload_and_delete(browser, serve, db):
    client = await serve()
    page = await open_page(browser, client)
    assert await page.locator("#model").input_value() == "demo"

    # Shift+Enter is a new line, not a send.
    await page.fill("#input", "first line")
    await page.press("#input", "Shift+Enter")
    await page.type("#input", "second line")
    assert await page.locator("#input").input_value() == "first line\nsecond line"
    assert await page.locator(".msg").count() == 0

    await page.evaluate(SAMPLE_GROWTH)
    await send(page, "How should I plan a project?")
    await page.wait_for_function("() => window.__samples.length >= 8")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "page-midstream.png"))
    if os.environ.get("UPDATE_SCREENSHOT") == "1":  # the README's picture: further into the answer
        await page.wait_for_function("() => window.__samples.length >= 58")
        await page.screenshot(path=str(ROOT / "docs" / "screenshot.png"))
    assert await page.locator("#stop").is_visible()

    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()
    samples = await page.evaluate("window.__samples")
    assert len(samples) >= 8, samples
    assert samples == sorted(samples)  # text only ever grew while streaming
    answer = await done.locator(".msg-body").text_content()
    assert answer.startswith("(demo model) You asked")
    assert len(answer) > samples[0]
    assert await page.locator("#send").is_visible()
    # Usage is refreshed after the turn.
    await page.wait_for_function("() => Number(document.querySelector('#usage').dataset.used) > 0")
    # The chat got a title from the first message and is in the list.
    await page.locator(".chat-item .chat-name", has_text="How should I plan").wait_for()
    await sends_carried_keys(db, 1)

    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    msgs = page.locator("#messages .msg")
    assert await msgs.count() == 2
    assert await msgs.nth(0).get_attribute("data-role") == "user"
    assert await msgs.nth(0).locator(".msg-body").text_content() == "How should I plan a project?"
    assert await msgs.nth(1).get_attribute("data-status") == "complete"
    assert await msgs.nth(1).locator(".msg-body").text_content() == answer

    # Delete asks for confirmation first.
    await page.click(".chat-item .chat-delete")
    await page.click(".chat-item .confirm-no")
    assert await page.locator(".chat-item .chat-open").count() == 1
    await page.click(".chat-item .chat-delete")
    await page.click(".chat-item .confirm-yes")
    await page.locator(".chat-item").wait_for(state="detached")
    assert await page.locator("#messages .msg").count() == 0
    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    assert await page.locator(".chat-item").count() == 0
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_stop_keeps_the_partial_answer_marked_cancelled(browser, serve, db, transport):
    client = await serve(demo_token_delay_ms=150)  # ~60 words: about 9 s if not stopped
    page = await open_page(browser, client)
    await use_transport(page, transport)
    await page.evaluate(SAMPLE_GROWTH)
    await send(page, "Tell me something long")
    await page.wait_for_function("() => window.__samples.length >= 3")
    await page.click("#stop")

    stopped = page.locator(f"{LAST_ASSISTANT}[data-status=cancelled]")
    await stopped.wait_for(timeout=8_000)
    assert "stopped" in (await stopped.locator(".msg-status").text_content())
    partial = await stopped.locator(".msg-body").text_content()
    assert partial.startswith("(demo model)")
    assert await page.locator("#send").is_visible()
    assert await page.locator("#error").is_hidden()
    record = await db["messages"].find_one({"role": "assistant"})
    assert (record["status"], record["reason"]) == ("cancelled", "user_cancel")
    assert record["content"] == partial

    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    saved = page.locator(LAST_ASSISTANT)
    assert await saved.get_attribute("data-status") == "cancelled"
    assert "stopped" in (await saved.locator(".msg-status").text_content())
    assert await saved.locator(".msg-body").text_content() == partial
    assert page.uncaught == []


async def test_exhausted_budget_shows_the_error_at_phone_width(browser, serve):
    client = await serve(default_token_limit=1)
    page = await open_page(browser, client, viewport=(390, 844))
    assert await page.locator("#toggle-sidebar").is_visible()  # the chat list folds away
    assert await page.locator("#sidebar").is_hidden()
    await page.locator("#usage-text", has_text="0 / 1 tokens").wait_for()

    await send(page, "Hello?")
    error = page.locator("#error")
    await error.wait_for()
    # Refused as it cannot hold the prompt and a minimum answer: one token is left, not none.
    said = "is not enough for this message (1 of 1 tokens left). It renews"
    assert said in await error.text_content()
    user = page.locator(".msg.user >> nth=-1")
    assert await user.get_attribute("data-status") == "not_sent"
    assert await page.locator(".msg.assistant").count() == 0
    assert await page.locator("#input").input_value() == "Hello?"  # kept for a retry
    assert await page.locator("#send").is_visible()
    assert page.uncaught == []


async def test_websocket_switch_streams_the_answer(browser, serve, db):
    client = await serve()
    page = await open_page(browser, client)
    await page.check("#use-ws")
    await page.evaluate(SAMPLE_GROWTH)
    ws_urls = []
    page.on("websocket", lambda ws: ws_urls.append(ws.url))
    await send(page, "Over the socket,\u0007\tplease")  # a title holds no control character

    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()
    assert len(await page.evaluate("window.__samples")) >= 5
    assert len(ws_urls) == 1
    assert "/api/ws?ticket=" in ws_urls[0]
    answer = await done.locator(".msg-body").text_content()
    assert answer.startswith("(demo model) You asked")
    await page.locator(".chat-item .chat-name", has_text="Over the socket, please").wait_for()

    # A second turn on the same page (the socket is reused or replaced transparently).
    await send(page, "And again")
    await page.locator(".msg.assistant[data-status=complete] >> nth=1").wait_for()
    await sends_carried_keys(db, 2)

    await page.reload()  # the switch is remembered; history came through the same store
    await page.wait_for_selector("#app[data-state=ready]")
    assert await page.locator("#use-ws").is_checked()
    assert await page.locator(".msg.assistant[data-status=complete]").count() == 2
    assert page.uncaught == []


# ------------------------------------------------------------------ a turn outlives its connection
# The answer holds at the fake upstream's gate after its first four chunks (an emoji among them,
# so an offset counted in UTF-16 units instead of code points shows as lost or repeated text).
HEAD = ["héllo ", "😀 ", "wörld, ", "𝄞 ça va? "]
TAIL = ["Ünïcode ", "👍🏽 ", "日本語 ", "and the end."]
ANSWER = "".join(HEAD + TAIL)
STREAMING = f"{LAST_ASSISTANT} .msg-body"


class Records:
    """The stored chat, read straight from the app (not through the page or the relay)."""

    def __init__(self, client, token, chat_id):
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.chat_id = chat_id

    @classmethod
    async def of(cls, page, client):
        token = await page.evaluate("sessionStorage.getItem('chat-gateway.token')")
        chat_id = (await page.evaluate("location.hash")).removeprefix("#/chat/")
        return cls(client, token, chat_id)

    async def answer(self):
        resp = await self.client.get(f"/api/chat/{self.chat_id}", headers=self.headers)
        assert resp.status == 200
        return [m for m in (await resp.json())["messages"] if m["role"] == "assistant"][-1]

    async def wait(self, check, timeout_s=10.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            record = await self.answer()
            if check(record):
                return record
            assert asyncio.get_running_loop().time() < deadline, record
            await asyncio.sleep(0.05)


async def wait_until(check, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def answer_held_at_gate(page, client, fake_openai):
    """Send, and wait until HEAD is on the page and saved as the record's checkpoint."""
    await send(page, "Say hello in many scripts")
    await page.wait_for_function(
        f"() => document.querySelector({STREAMING!r})?.textContent === {''.join(HEAD)!r}"
    )
    records = await Records.of(page, client)
    await records.wait(lambda r: r["status"] == "streaming" and r["content"] == "".join(HEAD))
    return records


async def completes_exactly(page, records):
    """The bubble ends complete with exactly the stored answer (no repeat, nothing missing)."""
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()
    record = await records.wait(lambda r: r["status"] == "complete")
    assert record["content"] == ANSWER
    assert await done.locator(".msg-body").text_content() == record["content"]
    assert await page.locator("#send").is_visible()
    assert await page.locator("#error").is_hidden()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_reload_mid_answer_follows_it_to_the_end(
    browser, serve_gated, fake_openai, transport
):
    client = await serve_gated()
    page = await open_page(browser, client)
    await use_transport(page, transport)
    records = await answer_held_at_gate(page, client, fake_openai)

    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    following = page.locator(f"{LAST_ASSISTANT}[data-status=streaming]")
    await following.wait_for()  # the stored text, and the answer followed from its end
    assert await following.locator(".msg-body").text_content() == "".join(HEAD)
    assert await page.locator("#stop").is_visible()
    assert await page.locator("#send").is_hidden()  # one turn at a time, as for a send
    await page.evaluate(SAMPLE_GROWTH)

    fake_openai.gate.set()
    await completes_exactly(page, records)
    assert len(await page.evaluate("window.__samples")) >= 1  # the rest streamed in live
    await page.wait_for_function("() => Number(document.querySelector('#usage').dataset.used) > 0")
    assert page.uncaught == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_network_drop_of_three_seconds_resumes_by_itself(
    browser, network, fake_openai, transport
):
    client, proxy = await network()
    page = await open_page(browser, client, port=proxy.port)
    await use_transport(page, transport)
    records = await answer_held_at_gate(page, client, fake_openai)

    # Chromium's offline mode alone leaves a streaming response open: the relay cuts it.
    proxy.cut()
    await page.context.set_offline(True)
    await page.locator(f"{LAST_ASSISTANT}[data-status=reconnecting]").wait_for()
    assert "reconnecting" in await page.locator(f"{LAST_ASSISTANT} .msg-status").text_content()
    fake_openai.gate.set()  # the answer goes on without the page, to its end
    await records.wait(lambda r: r["status"] == "complete")
    await asyncio.sleep(3)  # the scenario itself: the page stays offline for three seconds

    proxy.restore()
    await page.context.set_offline(False)
    await completes_exactly(page, records)  # resumed from the page's offset by itself
    assert page.uncaught == []


@pytest.mark.parametrize(
    ("transport", "lost"),
    [("sse", "answer"), ("ws", "answer"), ("sse", "request"), ("ws", "request")],
)
async def test_send_lost_on_the_network_is_retried_with_its_key_into_one_answer(
    browser, network, fake_openai, db, transport, lost
):
    """The network drops before "started" came back, after the send reached the service (its
    answer is lost) or before (the request is): the page sends again with the same
    Idempotency-Key, and follows the turn the first attempt started or starts it. One upstream
    request, one stored answer, one answer on the page."""
    client, proxy, page = await after_a_first_turn(browser, network, fake_openai, transport)

    if lost == "answer":
        proxy.mute()
        await send(page, "Say hello in many scripts")
        await asyncio.wait_for(fake_openai.reached_gate.wait(), TIMEOUT_MS / 1000)
        # The turn is admitted once its records exist (the upstream may be asked before, beside
        # the admission): cut only then, so that the lost part is the answer, not the send.
        streaming = {"status": "streaming"}
        await eventually(lambda: db["messages"].count_documents(streaming), what="the records")
        assert await page.locator(LAST_ASSISTANT).get_attribute("data-status") == "pending"
        proxy.cut()
    else:
        proxy.cut()
        await send(page, "Say hello in many scripts")
    await page.locator(f"{LAST_ASSISTANT}[data-status=reconnecting]").wait_for()
    await wait_until(lambda: proxy.refused >= 1)  # the page tried again while it was down
    assert len(fake_openai.requests) == (2 if lost == "answer" else 1)
    proxy.restore()
    fake_openai.gate.set()
    records = await Records.of(page, client)
    await completes_exactly(page, records)

    assert len(fake_openai.requests) == 2  # one per message sent, none for the retry
    stored = await db["messages"].find({"chat_id": records.chat_id}).to_list(None)
    assert sorted(m["role"] for m in stored) == ["assistant", "assistant", "user", "user"]
    claims = await sends_carried_keys(db, 2)  # the retry's key was the first attempt's
    assert {c["state"] for c in claims} == {"admitted"}
    bubbles = page.locator("#messages .msg")
    assert await bubbles.count() == 4
    assert await page.locator(".msg.user[data-status=complete]").count() == 2
    shown = await page.locator(LAST_ASSISTANT).get_attribute("data-message-id")
    assert shown == (await records.answer())["message_id"]
    assert page.uncaught == []


async def stopped_by_the_user(page, records, db):
    """The answer shows as cancelled, and its record says the user stopped it."""
    stopped = page.locator(f"{LAST_ASSISTANT}[data-status=cancelled]")
    await stopped.wait_for()
    record = await records.wait(lambda r: r["status"] != "streaming")
    assert record["status"] == "cancelled"
    stored = await db["messages"].find_one({"_id": record["message_id"]})  # the API has no reason
    assert stored["reason"] == "user_cancel"
    return stopped, record


async def test_stop_after_reload_stops_the_followed_answer(browser, serve_gated, fake_openai, db):
    client = await serve_gated()
    page = await open_page(browser, client)
    records = await answer_held_at_gate(page, client, fake_openai)

    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    await page.locator(f"{LAST_ASSISTANT}[data-status=streaming]").wait_for()
    await page.click("#stop")

    stopped, record = await stopped_by_the_user(page, records, db)
    assert await stopped.locator(".msg-body").text_content() == record["content"] == "".join(HEAD)
    assert await page.locator("#send").is_visible()
    assert await page.locator("#error").is_hidden()
    assert page.uncaught == []


async def test_stop_while_reconnecting_stops_the_answer(browser, network, fake_openai, db):
    client, proxy = await network()
    page = await open_page(browser, client, port=proxy.port)
    records = await answer_held_at_gate(page, client, fake_openai)

    proxy.cut()
    await page.locator(f"{LAST_ASSISTANT}[data-status=reconnecting]").wait_for()
    # Two attempts failed (0.5 s and 1.5 s after the drop), so the next is a second or more
    # away: the network comes back and the user presses Stop before the page tried again.
    await wait_until(lambda: proxy.refused >= 2)
    proxy.restore()
    assert await page.locator(LAST_ASSISTANT).get_attribute("data-status") == "reconnecting"
    await page.click("#stop")

    stopped, record = await stopped_by_the_user(page, records, db)
    assert await stopped.locator(".msg-body").text_content() == record["content"]
    assert await page.locator("#send").is_visible()
    assert page.uncaught == []


async def test_stop_without_network_says_the_answer_may_go_on(browser, network, fake_openai):
    client, proxy = await network()
    page = await open_page(browser, client, port=proxy.port)
    records = await answer_held_at_gate(page, client, fake_openai)

    proxy.cut()
    await page.locator(f"{LAST_ASSISTANT}[data-status=reconnecting]").wait_for()
    await page.click("#stop")  # the cancel request cannot get through

    await page.locator(f"{LAST_ASSISTANT}[data-status=interrupted]").wait_for()
    assert "could not be reached to stop" in await page.locator("#error").text_content()
    assert await page.locator("#send").is_visible()
    assert (await records.answer())["status"] == "streaming"  # it did go on

    proxy.restore()
    fake_openai.gate.set()
    await records.wait(lambda r: r["status"] == "complete")
    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    assert await page.locator(LAST_ASSISTANT).get_attribute("data-status") == "complete"
    assert await page.locator(f"{LAST_ASSISTANT} .msg-body").text_content() == ANSWER
    assert page.uncaught == []


async def test_answer_offsets_count_code_points_and_never_repeat_text(browser, serve):
    """resume.js in the page itself: what a resumed stream repeats is dropped, a gap is seen."""
    client = await serve()
    page = await open_page(browser, client)
    steps = await page.evaluate(
        """async () => {
          const { AnswerOffset, codePoints } = await import("/static/js/resume.js");
          const answer = new AnswerOffset(2);  // the page has "h😀"
          return [
            codePoints("h😀"),
            answer.take("h😀llo", 5),  // sent again from 0: only the new part
            answer.take("lo", 5),  // all known already
            answer.take(" wö", 8),
            answer.take("rld", 12),  // starts at 9, the page has 8: a gap
            answer.offset,
            answer.complete(8),
            answer.complete(9),
          ];
        }"""
    )
    assert steps == [2, "llo", "", " wö", None, 8, True, False]


async def test_an_answer_that_ends_shorter_than_the_page_has_keeps_the_stored_text(browser, serve):
    """A terminal event's ``unsaved`` (a resume from past the end of an answer whose replica
    died before saving it): the page keeps the answer's first characters, code points."""
    client = await serve()
    page = await open_page(browser, client)
    shown = await page.evaluate(
        """async () => {
          const { cutText, messageEl, rawText, settle } = await import("/static/js/messages.js");
          const content = "h😀 **one** two";
          const li = messageEl({ role: "assistant", content, status: "streaming" });
          document.body.append(li);
          cutText(li, 10);  // what the record has: "h😀 **one**"
          settle(li);
          return [rawText(li), li.querySelector(".msg-md").innerHTML.trim()];
        }"""
    )
    assert shown == ["h😀 **one**", "<p>h😀 <strong>one</strong></p>"]


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_reasoning_is_folded_away_above_the_answer(browser, serve, fake_openai, transport):
    """A reasoning model's thinking (recorded frames) shows as a closed "Thinking" fold above
    the answer, live and after a reload; the answer's text is only the answer."""
    from tests.openai_recordings import recording

    frames, _ = recording("reasoning")
    fake_openai.default = Script(frames=frames)
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await use_transport(page, transport)
    await send(page, "What is 6 times 7?")
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()
    for _ in range(2):
        fold = done.locator("details.msg-reasoning")
        assert await fold.get_attribute("open") is None  # folded away
        assert await fold.locator("div").text_content() == (
            "The user wants a number; 6 times 7 is 42."
        )
        assert await done.locator(".msg-body").text_content() == "It is 42."
        await page.reload()
        await page.wait_for_selector("#app[data-state=ready]")
        done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
        await done.wait_for()
    assert page.uncaught == []

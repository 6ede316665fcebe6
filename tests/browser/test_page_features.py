"""The chat page a new user would choose (issue 19), in a real headless Chromium: answers as
Markdown while they stream and safely, copy, rename, search, feedback, the signed-out view,
keyboard use and the phone layout. Fixtures: conftest.py; helpers: test_page_browser.py."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.browser.test_page_browser import LAST_ASSISTANT, TIMEOUT_MS, open_page, send
from tests.fake_openai import Script

pytestmark = pytest.mark.browser

# An answer in the Markdown models write, in pieces; the upstream holds after HEAD.
HEAD = [
    "## Start small\n\n",
    "Pick **one** goal and *measure* it:\n\n",
    "- first item\n",
    "- second item\n\n",
    "```python\nprint('hi')\n",
]
TAIL = [
    "for i in range(3):\n    print(i)\n```\n\n",
    "| step | why |\n| :-: | --: |\n| plan | focus |\n\n",
    "5. fifth\n6. sixth\n\n",
    "See [the docs](https://example.com/docs) and `inline code`.",
]
CODE = "print('hi')\nfor i in range(3):\n    print(i)\n"


def markdown_of(page, selector=LAST_ASSISTANT):
    return page.locator(f"{selector} .msg-md")


async def rendered_tags(page):
    return await page.evaluate(
        f"""() => [...document.querySelectorAll({LAST_ASSISTANT + " .msg-md *"!r})]
            .map((n) => n.tagName.toLowerCase())"""
    )


async def test_markdown_renders_while_streaming_and_at_the_end_with_copy(
    browser, serve, fake_openai
):
    fake_openai.default = Script(chunks=HEAD + TAIL, gate_after=len(HEAD))
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await send(page, "How do I start?")

    # Mid-stream: the heading, emphasis and list are already rendered; the open code fence shows
    # as code; the answer is busy for screen readers and says what it is doing.
    md = markdown_of(page)
    await md.locator("h2", has_text="Start small").wait_for()
    await md.locator("pre code", has_text="print('hi')").wait_for()
    assert await page.locator(LAST_ASSISTANT).get_attribute("data-status") == "streaming"
    assert await page.locator(LAST_ASSISTANT).get_attribute("aria-busy") == "true"
    assert await md.locator("strong").text_content() == "one"
    assert await md.locator("em").text_content() == "measure"
    assert await md.locator("li").all_text_contents() == ["first item", "second item"]
    assert "**" not in await md.text_content()
    assert await md.get_attribute("aria-live") == "polite"

    fake_openai.gate.set()
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()
    raw = "".join(HEAD + TAIL)
    assert await done.locator(".msg-body").text_content() == raw  # the raw text, kept exactly
    assert await done.get_attribute("aria-busy") == "false"
    assert await md.locator("table th").all_text_contents() == ["step", "why"]
    # A list's first number and a table's alignment are kept (numbered steps split by code).
    aligns = [await th.get_attribute("align") for th in await md.locator("table th").all()]
    assert aligns == ["center", "right"]
    assert await md.locator("ol[start='5'] li").all_text_contents() == ["fifth", "sixth"]
    link = md.locator("a", has_text="the docs")
    assert await link.get_attribute("href") == "https://example.com/docs"
    assert await link.get_attribute("target") == "_blank"
    assert "noopener" in await link.get_attribute("rel")
    block = md.locator(".code-block")
    assert await block.locator(".code-lang").text_content() == "python"
    assert await block.locator("pre code").text_content() == CODE
    assert await page.locator("#announce").text_content() == "The answer is complete."

    async def clipboard():
        return await page.evaluate("navigator.clipboard.readText()")

    await block.locator(".code-copy").click()
    await page.locator(".code-copy", has_text="Copied").wait_for()
    assert await clipboard() == CODE
    await done.locator("[data-action=copy-md]").click()
    assert await clipboard() == raw
    await done.locator("[data-action=copy]").click()
    plain = await clipboard()
    assert plain.startswith("Start small\n") and "**" not in plain and "print('hi')" in plain
    assert "Copy" not in plain and "python" not in plain  # not the code block's head

    # After a reload the stored answer is rendered the same way.
    tags = await rendered_tags(page)
    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    assert await rendered_tags(page) == tags
    assert page.uncaught == []


# Everything a model (or a prompt injection through it) might write to attack the page.
HOSTILE = [
    "Hello <script>alert('script')</script> there.\n\n",
    '<img src="/static/favicon.svg?evil=img" onerror="alert(\'img\')">\n\n',
    "[click me](javascript:alert('link')) and <a href=\"javascript:alert('a')\">raw a</a>\n\n",
    "![pixel](http://127.0.0.1:9/evil-pixel.png) and [ref][r] and <javascript:alert('auto')>\n\n",
    '<iframe src="/static/favicon.svg?evil=iframe"></iframe><style>body{display:none}</style>\n\n',
    '<svg onload="alert(\'svg\')"><circle r="5"/></svg> <b>bold?</b>\n\n',
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) ",
    '<div onclick="alert(\'div\')" style="position:fixed;inset:0">cover</div>\n\n',
    "[r]: javascript:alert('reference')\n",
]


async def test_an_answer_with_script_html_and_javascript_links_renders_inert(
    browser, serve, fake_openai
):
    """No dialog, no request, nothing the CSP had to refuse: the sanitiser stopped it all,
    while streaming and at the end; raw HTML shows as text; bad links are not links."""
    fake_openai.default = Script(chunks=HEAD[:1] + HOSTILE, gate_after=5)
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    dialogs, requests, console = [], [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    await send(page, "Show me HTML")
    await fake_openai.reached_gate.wait()
    md = markdown_of(page)
    await md.locator("p", has_text="Hello").wait_for()
    fake_openai.gate.set()
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()

    for _ in range(2):  # live, then as stored after a reload
        found = await page.evaluate(
            f"""() => {{
              const root = document.querySelector({LAST_ASSISTANT + " .msg-md"!r});
              const all = [...root.querySelectorAll("*")];
              return {{
                tags: [...new Set(all.map((n) => n.tagName.toLowerCase()))].sort(),
                handlers: all.flatMap((n) => [...n.attributes].map((a) => a.name))
                  .filter((a) => a.startsWith("on") || a === "style" || a === "src"),
                hrefs: all.filter((n) => n.hasAttribute("href")).map((n) => n.getAttribute("href")),
                text: root.textContent,
              }};
            }}"""
        )
        assert not {"script", "img", "iframe", "style", "svg", "div", "b"} & set(found["tags"])
        assert found["handlers"] == []
        assert all(re.match(r"^(https?:|mailto:)", h) for h in found["hrefs"]), found["hrefs"]
        # Raw HTML is shown as the text it is; the image is a link to click, not a load.
        assert "<script>alert('script')</script>" in found["text"]
        assert "<b>bold?</b>" in found["text"]
        assert "http://127.0.0.1:9/evil-pixel.png" in found["hrefs"]
        # Clicking what looked like links does nothing.
        for text in ("click me", "ref", "data"):
            await md.get_by_text(text, exact=True).first.click()
        await page.reload()
        await page.wait_for_selector("#app[data-state=ready]")
        md = markdown_of(page)

    assert dialogs == []
    assert not [u for u in requests if "evil" in u or u.startswith(("javascript:", "data:"))]
    assert not [line for line in console if "Refused" in line or "error" in line.split(":")[0]]
    assert page.uncaught == []


async def test_a_long_answer_renders_on_frames_without_jank(browser, serve, fake_openai):
    """A 20 KB Markdown answer in 450 pieces at about 4 KB/s (faster than the fastest models):
    the view is rendered on animation frames (not per piece) and only its tail is parsed again,
    so the main thread is never held long, the whole answer's end included."""
    section = (
        "## Section {i}\n\nSome *text* with **bold**, `code` and a [link](https://example.com/{i})."
        "\n\n- item one\n- item two\n\n```py\nprint({i})\n```\n\n"
    )
    text = "".join(section.format(i=i) for i in range(150))
    pieces = [text[i : i + 45] for i in range(0, len(text), 45)]
    fake_openai.default = Script(chunks=pieces, delay_s=0.01)
    client = await serve(default_model="gpt-test")
    page = await open_page(browser, client)
    await page.evaluate(
        """() => {
          window.__long = [];
          new PerformanceObserver((list) => {
            for (const e of list.getEntries()) window.__long.push(e.duration);
          }).observe({ type: "longtask" });
          window.__frames = 0;
          const tick = () => { window.__frames++; requestAnimationFrame(tick); };
          requestAnimationFrame(tick);
        }"""
    )
    await send(page, "Write a lot")
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for(timeout=60_000)
    raw = await done.locator(".msg-body").text_content()
    assert raw == text
    assert await markdown_of(page).locator("h2").count() == 150
    long_tasks = await page.evaluate("window.__long")
    stats = await page.evaluate(
        f"""async () => {{
          const {{ viewOf }} = await import("/static/js/messages.js");
          const {{ renderMarkdown }} = await import("/static/js/markdown.js");
          const bubble = document.querySelector({LAST_ASSISTANT!r});
          const view = viewOf(bubble);
          const wholes = [];  // what rendering the whole answer costs here, now
          for (let i = 0; i < 3; i++) {{
            const t = performance.now();
            renderMarkdown(bubble.querySelector(".msg-body").textContent);
            wholes.push(performance.now() - t);
          }}
          const frames = [...view.frameMs].sort((a, b) => a - b);
          const parsed = [...view.parsed].sort((a, b) => a - b);
          return {{
            renders: frames.length,
            median: frames[Math.floor(frames.length / 2)],
            longest: frames[frames.length - 1],
            flush: view.flushMs,
            whole: Math.min(...wholes),
            frames: window.__frames,
            parsedMedian: parsed[Math.floor(parsed.length / 2)],
            length: bubble.querySelector(".msg-body").textContent.length,
            wholeRenders: view.wholeRenders,
          }};
        }}"""
    )
    # At most one render a frame, fewer than the pieces; a frame's render parses the new text
    # and the last few blocks again, not the whole answer (counted in characters, not timed:
    # the times are in `stats` for a reader); the end is parsed whole but not rendered whole
    # again.
    assert stats["renders"] <= stats["frames"], stats
    assert stats["renders"] < len(pieces) * 0.8, stats
    assert stats["parsedMedian"] < stats["length"] / 10, stats
    assert stats["wholeRenders"] == 0, stats
    assert max(long_tasks, default=0) < 1000, (long_tasks, stats)
    assert page.uncaught == []


# ------------------------------------------------------------------ rename, search, feedback
async def test_rename_search_and_feedback_end_to_end(browser, serve, db, token_for):
    client = await serve(demo_token_delay_ms=1)
    # Bob's chat holds the same words: Alice never sees it.
    bob = {"Authorization": f"Bearer {token_for('bob')}"}
    resp = await client.post("/api/chat", json={"title": "Bob plans a garden"}, headers=bob)
    assert resp.status == 201

    page = await open_page(browser, client)
    question = "How should I plan a garden that has many moving parts and several seasons to it?"
    await send(page, question)
    done = page.locator(f"{LAST_ASSISTANT}[data-status=complete]")
    await done.wait_for()
    # The title is the first message, cut at a word boundary.
    title = "How should I plan a garden that has many moving parts and…"
    await page.locator("#chat-title", has_text=title).wait_for()
    assert await page.locator(".chat-item .chat-name").text_content() == title
    # Timestamps on both messages.
    assert await page.locator(".msg .msg-time").count() == 2

    # Rename: Enter saves, the list and the store follow.
    await page.click("#rename")
    await page.fill("#rename-input", "Garden plan")
    await page.press("#rename-input", "Enter")
    await page.locator("#chat-title", has_text="Garden plan").wait_for()
    await page.locator(".chat-item .chat-name", has_text="Garden plan").wait_for()
    assert (await db["chats"].find_one({"user_id": "alice"}))["title"] == "Garden plan"
    # Escape cancels a rename.
    await page.click("#rename")
    await page.fill("#rename-input", "Not this")
    await page.press("#rename-input", "Escape")
    assert await page.locator("#chat-title").text_content() == "Garden plan"

    # Search: results replace the list, with the words marked; one opens the chat at its message.
    await page.click("#new-chat")
    await page.fill("#search", "garden seasons")
    hits = page.locator("#search-results .search-hit")
    await hits.first.wait_for()
    assert await page.locator("#chat-list").is_hidden()
    marks = await page.locator("#search-results mark").all_text_contents()
    assert {m.lower() for m in marks} >= {"garden", "seasons"}
    texts = await hits.all_text_contents()
    assert not any("Bob" in t for t in texts)
    assert await page.locator("#search-status").text_content() == (
        f"{await hits.count()} result{'s' if await hits.count() > 1 else ''} for “garden seasons”"
    )
    mine = page.locator(".search-meta", has_text=re.compile(r"^you ·"))
    await page.locator(".search-open", has=mine).click()
    await page.locator(".msg.user.found").wait_for()
    assert await page.locator("#chat-title").text_content() == "Garden plan"
    await page.fill("#search", "zzzqqq")
    await page.locator("#search-status", has_text="Nothing found").wait_for()
    await page.press("#search", "Escape")
    assert await page.locator("#chat-list").is_visible()
    assert await page.locator("#search-results").is_hidden()

    # Feedback: a thumb, then an optional comment, stored with the message; shown after reload.
    answer_id = await done.get_attribute("data-message-id")
    await done.locator(".msg-rate.rate-down").click()
    await page.locator(".msg-comment textarea").fill("Too vague.")
    await page.locator(".msg-comment button[type=submit]").click()
    await done.locator(".msg-note", has_text="comment").wait_for()
    record = await db["messages"].find_one({"_id": answer_id})
    assert record["feedback"]["rating"] == "down"
    assert record["feedback"]["comment"] == "Too vague."
    await page.reload()
    await page.wait_for_selector("#app[data-state=ready]")
    assert await done.locator(".rate-down").get_attribute("aria-pressed") == "true"
    assert await done.locator(".rate-up").get_attribute("aria-pressed") == "false"
    # Pressed again: the rating is taken back.
    await done.locator(".rate-down").click()
    await done.locator(".msg-note", has_text="removed").wait_for()
    assert "feedback" not in await db["messages"].find_one({"_id": answer_id})
    assert page.uncaught == []


# ------------------------------------------------------------------ signed out, keyboard, phone
async def test_signed_out_shows_only_the_sign_in_and_a_bad_token_in_words(
    browser, serve, token_for
):
    client = await serve(dev_token_endpoint=False)
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(str(client.make_url("/")))
    await page.wait_for_selector("#app[data-state=login]")
    assert await page.locator("#login").is_visible()
    for hidden in ("#sidebar", "#new-chat", "#model", "#use-ws", "#usage", "#chat", "#sign-out"):
        assert await page.locator(hidden).is_hidden(), hidden
    assert await page.evaluate("document.activeElement.id") == "token-input"

    for bad in ("garbage", "not.a.jwt"):
        await page.fill("#token-input", bad)
        await page.click("#login-form button[type=submit]")
        error = page.locator("#error-text")
        await error.wait_for()
        words = await error.text_content()
        assert words.startswith("Your sign-in was not accepted"), words
        assert "not a well-formed JWT" in words and "Paste a new token" in words
        assert not re.search(r"[a-z][A-Z]\w*Error|\(\w+_\w+\)", words), words
        await page.wait_for_selector("#app[data-state=login]")
        assert await page.locator("#sidebar").is_hidden()

    await page.fill("#token-input", token_for("alice"))
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#app[data-state=ready]")
    assert await page.locator("#new-chat").is_visible()
    assert await page.locator("#error").is_hidden()
    await context.close()


async def test_keyboard_only_send_and_stop_and_every_button_is_named(browser, serve):
    client = await serve(demo_token_delay_ms=150)
    page = await open_page(browser, client)
    assert await page.evaluate("document.activeElement.id") == "input"  # ready to type
    await page.keyboard.type("Tell me something long")
    await page.keyboard.press("Enter")
    streaming = page.locator(f"{LAST_ASSISTANT}[data-status=streaming]")
    await streaming.wait_for()
    await page.locator(f"{LAST_ASSISTANT} .msg-md p").first.wait_for()
    await page.keyboard.press("Escape")
    await page.locator(f"{LAST_ASSISTANT}[data-status=cancelled]").wait_for(timeout=8_000)
    assert await page.evaluate("document.activeElement.id") == "input"

    # Tab from the composer reaches Send; every visible button has a name for screen readers.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "send"
    unnamed = await page.evaluate(
        """() => [...document.querySelectorAll("button")]
            .filter((b) => b.offsetParent !== null)
            .filter((b) => !(b.getAttribute("aria-label") || b.textContent).trim())
            .map((b) => b.outerHTML)"""
    )
    assert unnamed == []
    assert page.uncaught == []


@pytest.mark.parametrize("width", [390, 320])
async def test_phone_header_keeps_to_one_row(browser, serve, width):
    client = await serve()
    page = await open_page(browser, client, viewport=(width, 740))
    rows = await page.evaluate(
        """() => {
          const bar = document.querySelector(".topbar");
          const shown = [...bar.querySelectorAll("button, select, input, meter")]
            .filter((n) => n.offsetParent !== null)
            .map((n) => n.getBoundingClientRect());
          return {
            height: bar.getBoundingClientRect().height,
            tops: shown.map((r) => Math.round(r.top + r.height / 2)),
            right: Math.max(...shown.map((r) => r.right)),
            count: shown.length,
          };
        }"""
    )
    assert rows["count"] >= 4, rows  # Chats, the model, the WebSocket switch, Sign out
    assert max(rows["tops"]) - min(rows["tops"]) <= 4, rows
    assert rows["height"] < 56, rows
    assert rows["right"] <= width, rows
    assert page.uncaught == []

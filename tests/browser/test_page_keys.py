"""The chat page's API keys screen (issue 20), in a real headless Chromium: a key is created
with its secret shown once (copied, then gone from the page), the list shows its name and
prefix but never the secret, the key works on ``/v1/chat/completions``, and revoking it in the
page makes that call 401. Fixtures: tests/browser/conftest.py."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.browser.test_page_browser import open_page

pytestmark = pytest.mark.browser

DEADLINE_S = 10.0


async def complete(client, secret):
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    await resp.read()
    return resp.status


async def everything_the_page_keeps(page):
    return await page.evaluate(
        """() => JSON.stringify([{...localStorage}, {...sessionStorage}, document.cookie,
                                 document.documentElement.outerHTML])"""
    )


async def test_a_key_is_shown_once_works_and_stops_once_revoked(browser, serve):
    client = await serve(api_key_cache_s=0.2)
    page = await open_page(browser, client)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    dialog = page.locator("#keys-dialog")

    # Opened from the header: a modal dialog, focus in its first field.
    await page.click("#keys-open")
    await dialog.wait_for()
    assert await dialog.evaluate("(d) => d.open && d.matches(':modal')")
    assert await page.evaluate("document.activeElement.id") == "keys-name"
    await page.locator("#keys-empty").wait_for()

    # A key needs a name: said in words, next to the field.
    await page.click("#keys-create")
    error = page.locator("#keys-error")
    assert "name" in await error.text_content()
    assert await page.get_attribute("#keys-name", "aria-invalid") == "true"

    await page.fill("#keys-name", "laptop script")
    await page.check("#keys-models-list input[value=demo]")
    await page.fill("#keys-limit", "100000")
    await page.click("#keys-create")
    secret_box = page.locator("#keys-secret")
    await secret_box.wait_for()
    assert await error.is_hidden()
    secret = await page.input_value("#keys-secret-value")
    assert secret.startswith("cgw-") and len(secret) > 30
    assert "you will not see it again" in await secret_box.text_content()
    assert await page.evaluate("document.activeElement.id") == "keys-secret-value"
    await page.click("#keys-secret-copy")
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    # Escape while the secret is shown keeps it (as a stray click on the backdrop does): it is
    # never shown again. Before, the dialog closed and the secret was gone.
    await page.keyboard.press("Escape")
    assert await dialog.evaluate("(d) => d.open") and await secret_box.is_visible()
    assert await page.input_value("#keys-secret-value") == secret

    row = page.locator("#keys-list .key-row")
    assert await row.count() == 1
    assert await row.locator(".key-name").text_content() == "laptop script"
    prefix = (await row.locator(".key-prefix").text_content()).rstrip("…")
    assert secret.startswith(prefix) and len(prefix) < len(secret)
    assert await row.locator(".key-models").text_content() == "demo"
    assert await row.locator(".key-limit").text_content() == "0 of 100,000 tokens used"
    assert secret not in await page.locator("#keys-list").evaluate("(n) => n.outerHTML")

    # Dismissed, the secret is gone from the page; it was never stored.
    await page.click("#keys-secret-done")
    assert await secret_box.is_hidden()
    assert secret not in await everything_the_page_keeps(page)

    # The key works for a program.
    assert await complete(client, secret) == 200

    # Escape closes the dialog and focus goes back to the button; reopened, the list comes from
    # the server: name and prefix, no secret, and when the key was last used (written in the
    # background after the call, so the dialog is reopened until it shows).
    deadline = time.monotonic() + DEADLINE_S
    while True:
        await page.keyboard.press("Escape")
        await dialog.wait_for(state="hidden")
        assert await page.evaluate("document.activeElement.id") == "keys-open"
        await page.click("#keys-open")
        await row.wait_for()
        assert await row.locator(".key-name").text_content() == "laptop script"
        used = await row.locator(".key-limit").text_content()  # its month, once settled
        if await row.locator(".key-used").text_content() != "never" and not used.startswith("0 "):
            break
        assert time.monotonic() < deadline, "last used never shown"
        await asyncio.sleep(0.05)
    assert re.fullmatch(r"[1-9][\d,]* of 100,000 tokens used", used)
    assert secret not in await everything_the_page_keeps(page)

    # Revoke asks first; Cancel (or Escape) keeps the key, and the dialog open.
    await row.locator(".key-revoke").click()
    await row.locator(".key-revoke-no").click()
    assert await row.locator(".key-revoke").is_visible()
    await row.locator(".key-revoke").click()
    await page.keyboard.press("Escape")
    assert await dialog.evaluate("(d) => d.open")
    assert await row.locator(".key-revoke").is_visible()
    await row.locator(".key-revoke").click()
    await row.locator(".key-revoke-yes").click()
    await row.wait_for(state="detached")
    await page.locator("#keys-empty").wait_for()
    assert "revoked" in await page.locator("#keys-announce").text_content()

    # The program is refused from now on (within API_KEY_CACHE_S).
    deadline = time.monotonic() + DEADLINE_S
    while (status := await complete(client, secret)) != 401:
        assert status == 200 and time.monotonic() < deadline, status
        await asyncio.sleep(0.05)
    assert page.uncaught == []

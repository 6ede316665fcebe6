"""Rename a chat, search one's own chats, rate an answer: against the real MongoDB-compatible
server (SecantusDB, which has no text index: search scans there, see ``Store.find_messages``)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from service.search import Query, snippet
from tests.fake_openai import Script
from tests.sse_client import collect, events


async def new_chat(client, h, title=None):
    resp = await client.post("/api/chat", json={"title": title} if title else None, headers=h)
    assert resp.status == 201
    return (await resp.json())["chat_id"]


async def turn(client, fake_openai, h, chat_id, question, answer):
    """One complete turn whose answer is ``answer``; its message id."""
    fake_openai.scripts.append(Script(chunks=[answer]))
    resp = await client.post(f"/api/chat/{chat_id}/message", json={"message": question}, headers=h)
    assert resp.status == 200
    evs = await collect(resp)
    assert evs[-1]["event"] == "done", evs
    return evs[0]["data"]["message_id"]


async def search(client, h, q, **params):
    resp = await client.get("/api/search", params={"q": q, **params}, headers=h)
    return resp.status, await resp.json()


# ------------------------------------------------------------------------------- rename
async def test_rename_sets_the_title_and_keeps_the_chat_in_its_place(client, auth):
    h = auth("alice")
    first = await new_chat(client, h, "first")
    second = await new_chat(client, h, "second")
    resp = await client.patch(f"/api/chat/{first}", json={"title": "  Trip to Lisbon  "}, headers=h)
    assert resp.status == 200
    body = await resp.json()
    assert body["chat_id"] == first and body["title"] == "Trip to Lisbon"
    listed = await (await client.get("/api/chat", headers=h)).json()
    assert [(c["chat_id"], c["title"]) for c in listed["chats"]] == [
        (second, "second"),
        (first, "Trip to Lisbon"),
    ]
    got = await (await client.get(f"/api/chat/{first}", headers=h)).json()
    assert got["title"] == "Trip to Lisbon"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"title": "   "}, "validation_error"),
        ({"title": ""}, "validation_error"),
        ({"title": "x" * 201}, "validation_error"),
        ({"title": 5}, "validation_error"),
        ({}, "validation_error"),
        ({"title": "ok", "model": "demo"}, "validation_error"),
    ],
)
async def test_rename_refuses_a_bad_title(client, auth, body, code):
    h = auth("alice")
    chat = await new_chat(client, h, "kept")
    resp = await client.patch(f"/api/chat/{chat}", json=body, headers=h)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code
    assert (await (await client.get(f"/api/chat/{chat}", headers=h)).json())["title"] == "kept"


async def test_rename_of_another_users_or_a_deleted_chat_is_404(client, auth):
    mine = await new_chat(client, auth("alice"), "alice's")
    resp = await client.patch(f"/api/chat/{mine}", json={"title": "bob's now"}, headers=auth("bob"))
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "chat_not_found"
    await client.delete(f"/api/chat/{mine}", headers=auth("alice"))
    resp = await client.patch(f"/api/chat/{mine}", json={"title": "x"}, headers=auth("alice"))
    assert resp.status == 404
    resp = await client.patch("/api/chat/nope", json={"title": "x"}, headers=auth("alice"))
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_id"


# ------------------------------------------------------------------------------- search
async def test_search_finds_only_the_users_own_text_ranked_with_highlights(
    stream_client, fake_openai, auth
):
    client, alice, bob = stream_client, auth("alice"), auth("bob")
    trip = await new_chat(client, alice, "Lisbon trip")
    await turn(client, fake_openai, alice, trip, "Where to eat in Lisbon?", "Try the pastéis.")
    code = await new_chat(client, alice, "Code review")
    await turn(
        client,
        fake_openai,
        alice,
        code,
        "How do I start small?",
        "Start small: one **small** module first, then start the next.",
    )
    # Bob has the same words, and a word of his own.
    theirs = await new_chat(client, bob, "Lisbon secrets")
    await turn(client, fake_openai, bob, theirs, "start small Lisbon", "bob-only-zebra start small")

    status, body = await search(client, alice, "start small")
    assert status == 200, body
    results = body["results"]
    assert body["query"] == "start small" and body["next_cursor"] is None
    assert {r["chat_id"] for r in results} == {code}
    # The answer says both words most often: first; the question holds the phrase too.
    assert [r["role"] for r in results] == ["assistant", "user"]
    best = results[0]
    assert best["kind"] == "message" and best["chat_title"] == "Code review"
    # The snippet is text: Markdown's marks are left out.
    assert best["snippet"] == "Start small: one small module first, then start the next."
    marked = [best["snippet"][s:e] for s, e in best["highlights"]]
    assert marked == ["Start", "small", "small", "start"]
    assert best["score"] > results[1]["score"]

    # A title matches too (and counts double); Bob's chat of the same name does not show.
    _, body = await search(client, alice, "lisbon")
    kinds = [(r["kind"], r["chat_id"]) for r in body["results"]]
    assert kinds == [("chat", trip), ("message", trip)]
    assert body["results"][0]["snippet"] == "Lisbon trip"

    # What only Bob wrote is not found by Alice, whatever she asks.
    for q in ("zebra", "bob", "bob-only-zebra", "secrets"):
        status, body = await search(client, alice, q)
        assert status == 200 and body["results"] == [], (q, body)
    status, body = await search(client, bob, "zebra")
    assert [r["chat_id"] for r in body["results"]] == [theirs]


async def test_search_leaves_out_deleted_chats(stream_client, fake_openai, auth):
    client, h = stream_client, auth("alice")
    gone = await new_chat(client, h, "to delete")
    await turn(client, fake_openai, h, gone, "walrus facts", "Walruses are large.")
    kept = await new_chat(client, h)
    await turn(client, fake_openai, h, kept, "more walrus", "Yes.")
    assert (await client.delete(f"/api/chat/{gone}", headers=h)).status == 200
    _, body = await search(client, h, "walrus")
    assert [r["chat_id"] for r in body["results"]] == [kept]


async def test_search_pages_through_every_hit_once(stream_client, fake_openai, auth):
    client, h = stream_client, auth("alice")
    chat = await new_chat(client, h)
    for i in range(4):
        await turn(client, fake_openai, h, chat, f"otter question {i}", f"otter answer {i}")
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        status, body = await search(client, h, "otter", **params)
        assert status == 200 and len(body["results"]) <= 3
        seen += [r["message_id"] for r in body["results"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 8


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"q": "   "}, "invalid_query"),
        ({"q": "!!! ???"}, "invalid_query"),
        ({}, "validation_error"),
        ({"q": "x" * 201}, "validation_error"),
        ({"q": "a", "limit": "0"}, "validation_error"),
        ({"q": "a", "limit": "51"}, "validation_error"),
        ({"q": "a", "cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"q": "a", "cursor": "eyJvIjotMX0"}, "invalid_cursor"),  # {"o":-1}
        ({"q": "a", "cursor": "eyJvIjp0cnVlfQ"}, "invalid_cursor"),  # {"o":true}
        ({"q": "a", "sort": "new"}, "validation_error"),
    ],
)
async def test_search_refuses_bad_parameters(client, auth, params, code):
    resp = await client.get("/api/search", params=params, headers=auth())
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code


async def test_search_needs_a_token(client):
    assert (await client.get("/api/search", params={"q": "a"})).status == 401


def test_a_word_whose_capital_lowercases_to_two_characters_stays_one_term():
    """ "İ" lowercases to "i" and a combining dot: the word is not cut in two, so "İstanbul"
    does not search for every "i" (the "i" of "trip")."""
    query = Query.parse("İstanbul trip")
    assert query.terms == ("İstanbul", "trip")
    cut = snippet(query, "İSTANBUL in spring, a trip")
    assert [cut.text[s:e] for s, e in cut.highlights] == ["İSTANBUL", "trip"]
    assert query.score("istanbul") > 0


def test_snippet_is_cut_at_spaces_around_the_first_match_with_offsets_in_code_points():
    query = Query.parse("Needle")
    text = "😀 " * 40 + "the needle is here, " + "word " * 60
    cut = snippet(query, text)
    assert cut.text.startswith("…😀 ") and cut.text.endswith("word…")
    assert len(cut.text) <= 160 + 2
    [(start, end)] = cut.highlights
    assert cut.text[start:end] == "needle"
    # No match (a text index ignores diacritics; the words may not be found): the start.
    assert snippet(Query.parse("zzz"), "short text").text == "short text"
    # An answer's Markdown is shown as its text; marks inside words stay.
    markdown = (
        "## Plan\n\n- **Pick** one `goal`, see [docs](https://x).\n\n```py\nsnake_case = a*b\n```"
    )
    cut = snippet(Query.parse("goal"), markdown)
    assert cut.text == "Plan Pick one goal, see docs. snake_case = a*b"
    assert [cut.text[s:e] for s, e in cut.highlights] == ["goal"]


# ------------------------------------------------------------------------------- feedback
def feedback_url(chat_id, message_id):
    return f"/api/chat/{chat_id}/messages/{message_id}/feedback"


async def test_feedback_is_stored_with_the_message(stream_client, fake_openai, auth, db):
    client, h = stream_client, auth("alice")
    chat = await new_chat(client, h)
    answer = await turn(client, fake_openai, h, chat, "Hi", "Hello there.")
    url = feedback_url(chat, answer)

    resp = await client.put(url, json={"rating": "down", "comment": "  Too short.  "}, headers=h)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["feedback"]["rating"] == "down" and body["feedback"]["comment"] == "Too short."
    record = await db["messages"].find_one({"_id": answer})
    assert record["feedback"]["rating"] == "down"
    assert record["feedback"]["comment"] == "Too short."
    assert record["feedback"]["at"] is not None
    assert record["content"] == "Hello there." and record["status"] == "complete"

    # Changed, then shown with the chat's history.
    assert (await client.put(url, json={"rating": "up"}, headers=h)).status == 200
    history = await (await client.get(f"/api/chat/{chat}", headers=h)).json()
    rated = next(m for m in history["messages"] if m["message_id"] == answer)
    assert rated["feedback"]["rating"] == "up" and rated["feedback"]["comment"] is None
    assert "feedback" not in history["messages"][0]  # the question has none

    # Taken back.
    resp = await client.delete(url, headers=h)
    assert resp.status == 200 and (await resp.json())["feedback"] is None
    assert "feedback" not in await db["messages"].find_one({"_id": answer})


async def test_feedback_only_on_ones_own_ended_answers(stream_client, fake_openai, auth):
    client, alice = stream_client, auth("alice")
    chat = await new_chat(client, alice)
    answer = await turn(client, fake_openai, alice, chat, "Hi", "Hello.")
    history = await (await client.get(f"/api/chat/{chat}", headers=alice)).json()
    question = history["messages"][0]["message_id"]
    up = {"rating": "up"}

    for url, headers in [
        (feedback_url(chat, answer), auth("bob")),  # not Bob's
        (feedback_url(chat, question), alice),  # a question is not rated
        (feedback_url(chat, str(uuid.uuid4())), alice),
        (feedback_url(str(uuid.uuid4()), answer), alice),
    ]:
        resp = await client.put(url, json=up, headers=headers)
        assert resp.status == 404, url
        assert (await resp.json())["error"]["code"] == "message_not_found"
    for body in ({"rating": "meh"}, {"rating": "up", "comment": "x" * 2001}, {}, {"up": True}):
        resp = await client.put(feedback_url(chat, answer), json=body, headers=alice)
        assert resp.status == 400, body

    # While the answer is still being written: 409, then fine once it has ended.
    fake_openai.scripts.append(Script(chunks=["Still ", "going"], gate_after=1))
    resp = await client.post(f"/api/chat/{chat}/message", json={"message": "More"}, headers=alice)
    stream = events(resp)
    started = await anext(e async for e in stream if e.get("event") == "started")
    await anext(e async for e in stream if e.get("event") == "delta")  # its records exist
    running = feedback_url(chat, started["data"]["message_id"])
    resp = await client.put(running, json=up, headers=alice)
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "answer_streaming"
    fake_openai.gate.set()
    async for ev in stream:
        if ev.get("event") == "done":
            break
    for _ in range(50):  # the record is final once "done" was sent; poll with a deadline
        resp = await client.put(running, json=up, headers=alice)
        if resp.status == 200:
            break
        await asyncio.sleep(0.02)
    assert resp.status == 200

    # A deleted chat's answers cannot be rated any more.
    await client.delete(f"/api/chat/{chat}", headers=alice)
    resp = await client.put(feedback_url(chat, answer), json=up, headers=alice)
    assert resp.status == 404

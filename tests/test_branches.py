"""Regenerate an answer, edit a question: versions and branches over the real MongoDB-compatible
server and a fake upstream. The history shows the chosen branch, every version is kept, billing
counts every turn exactly, and the next turn's context follows the chosen branch."""

from __future__ import annotations

import asyncio

from service.app import create_app
from tests.fake_openai import Script
from tests.sse_client import collect, text_of
from tests.test_stream_sse import new_chat, records, send, usage_doc


def prompt(fake_openai, i: int = -1) -> list[tuple[str, str]]:
    """What the upstream received (request ``i``), without the system prompt."""
    return [(m["role"], m["content"]) for m in fake_openai.requests[i]["messages"][1:]]


async def regenerate(client, chat_id, message_id, headers, **body):
    path = f"/api/chat/{chat_id}/messages/{message_id}/regenerate"
    return await client.post(path, json=body or None, headers=headers)


async def edit(client, chat_id, message_id, headers, message, **body):
    path = f"/api/chat/{chat_id}/messages/{message_id}/edit"
    return await client.post(path, json={"message": message, **body}, headers=headers)


async def history(client, chat_id, headers) -> list[dict]:
    resp = await client.get(f"/api/chat/{chat_id}", headers=headers)
    assert resp.status == 200
    return (await resp.json())["messages"]


async def versions(client, chat_id, message_id, headers):
    return await client.get(f"/api/chat/{chat_id}/messages/{message_id}/versions", headers=headers)


async def turn(resp) -> tuple[str, str]:
    """A streamed turn's answer id and text (it must have ended ``done``)."""
    assert resp.status == 200, await resp.text()
    evs = await collect(resp)
    assert evs[0]["event"] == "started" and evs[-1]["event"] == "done", evs
    return evs[0]["data"]["message_id"], text_of(evs)


def billed(docs) -> int:
    return sum(d["tokens"]["total"] for d in docs if d["role"] == "assistant")


async def test_regenerate_keeps_the_answer_as_a_version_and_the_next_turn_follows_it(
    stream_client, fake_openai, auth
):
    client, h = stream_client, auth("regen")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["first answer"], usage=(10, 3)),
        Script(chunks=["second answer"], usage=(11, 4)),
        Script(chunks=["third answer"], usage=(20, 5)),
    ]
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    a2, text = await turn(await regenerate(client, chat_id, a1, h))
    assert text == "second answer" and a2 != a1
    assert prompt(fake_openai) == [("user", "q1")]  # the question again, not the old answer

    shown = await history(client, chat_id, h)
    assert [(m["role"], m["content"]) for m in shown] == [
        ("user", "q1"),
        ("assistant", "second answer"),
    ]
    assert shown[1]["message_id"] == a2 and shown[1]["replaces"] == a1
    assert shown[1]["version"] == 2 and shown[1]["version_of"] == a1

    listed = await versions(client, chat_id, a2, h)
    body = await listed.json()
    assert listed.status == 200 and body["chosen"] == a2
    assert [(v["message_id"], v["content"]) for v in body["versions"]] == [
        (a1, "first answer"),
        (a2, "second answer"),
    ]
    assert body["versions"][0]["superseded_by"] == a2
    assert (await (await versions(client, chat_id, a1, h)).json())["versions"] == body["versions"]

    await turn(await send(client, chat_id, h, "q2"))
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "second answer"), ("user", "q2")]

    # Every turn billed for its own prompt and answer; the superseded answer keeps its tokens.
    docs = await records(client, chat_id)
    assert [d["tokens"]["total"] for d in docs if d["role"] == "assistant"] == [13, 15, 25]
    usage = await usage_doc(client, "regen")
    assert usage["used"] == billed(docs) == 53 and usage["reserved"] == 0
    assert len([d for d in docs if d["role"] == "user"]) == 2  # the question is not copied


async def test_edit_supersedes_the_question_and_its_answer(stream_client, fake_openai, auth):
    client, h = stream_client, auth("edit")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["a1"], usage=(5, 1)),
        Script(chunks=["a2"], usage=(9, 1)),
        Script(chunks=["a2 again"], usage=(9, 2)),
        Script(chunks=["a3"], usage=(14, 1)),
        Script(chunks=["a3 edited"], usage=(14, 2)),
        Script(chunks=["a4"], usage=(20, 1)),
    ]
    await turn(await send(client, chat_id, h, "q1"))
    a2, _ = await turn(await send(client, chat_id, h, "q2"))
    await turn(await regenerate(client, chat_id, a2, h))  # an edit replaces every version
    q2 = (await history(client, chat_id, h))[2]["message_id"]
    a3, _ = await turn(await edit(client, chat_id, q2, h, "  q2, better  "))
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "a1"), ("user", "q2, better")]

    shown = await history(client, chat_id, h)
    assert [(m["role"], m["content"]) for m in shown] == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2, better"),
        ("assistant", "a3"),
    ]
    assert shown[2]["edits"] == q2 and shown[2]["version"] == 2 and shown[3]["message_id"] == a3

    body = await (await versions(client, chat_id, q2, h)).json()
    assert [v["content"] for v in body["versions"]] == ["q2", "q2, better"]
    assert body["chosen"] == shown[2]["message_id"]
    assert body["versions"][0]["superseded_by"] == a3
    old = await (await versions(client, chat_id, a2, h)).json()
    assert [v["content"] for v in old["versions"]] == ["a2", "a2 again"] and old["chosen"] is None

    # The edited question's answer can itself be regenerated, and the question edited again.
    await turn(await regenerate(client, chat_id, a3, h))
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "a1"), ("user", "q2, better")]
    await turn(await send(client, chat_id, h, "q3"))
    assert prompt(fake_openai) == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2, better"),
        ("assistant", "a3 edited"),
        ("user", "q3"),
    ]
    docs = await records(client, chat_id)
    # Nothing deleted: q1 a1, q2 with a2 and its regeneration, q2's edit with a3 and its
    # regeneration, q3 a4.
    assert len(docs) == 10 and sum("superseded_by" in d for d in docs) == 4
    usage = await usage_doc(client, "edit")
    assert usage["used"] == billed(docs) == 6 + 10 + 11 + 15 + 16 + 21


async def test_an_earlier_answer_or_question_leaves_what_followed_behind(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Regenerating or editing further back supersedes everything the history showed after
    it; the context is the chosen records before the question (read, not cut from the recent
    window: here the window is two messages)."""
    client = await aiohttp_client(create_app(stream_settings(context_messages=2)))
    h = auth("rewind")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [Script(chunks=[f"a{i}"]) for i in (1, 2, 3)]
    fake_openai.scripts += [Script(chunks=["a2 bis"]), Script(chunks=["a1 new"]), Script()]
    for q in ("q1", "q2", "q3"):
        await turn(await send(client, chat_id, h, q))
    q1, _, _, a2, q3, a3 = [m["message_id"] for m in await history(client, chat_id, h)]

    await turn(await regenerate(client, chat_id, a2, h))
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    shown = await history(client, chat_id, h)
    assert [m["content"] for m in shown] == ["q1", "a1", "q2", "a2 bis"]
    docs = {d["_id"]: d for d in await records(client, chat_id)}
    assert docs[q3]["superseded_by"] == docs[a3]["superseded_by"] == shown[-1]["message_id"]

    await turn(await edit(client, chat_id, q1, h, "q1, again"))
    assert prompt(fake_openai) == [("user", "q1, again")]
    assert [m["content"] for m in await history(client, chat_id, h)] == ["q1, again", "a1 new"]
    await turn(await send(client, chat_id, h, "next"))
    assert prompt(fake_openai) == [("user", "q1, again"), ("assistant", "a1 new"), ("user", "next")]
    body = await (await versions(client, chat_id, a2, h)).json()
    assert [v["content"] for v in body["versions"]] == ["a2", "a2 bis"] and body["chosen"] is None


async def test_refusals_and_only_your_own(stream_client, fake_openai, auth):
    client, h = stream_client, auth("owner")
    chat_id = await new_chat(client, h)
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    q1 = (await history(client, chat_id, h))[0]["message_id"]

    async def refused(resp, status, code):
        assert resp.status == status, await resp.text()
        assert (await resp.json())["error"]["code"] == code

    await refused(await regenerate(client, chat_id, q1, h), 409, "wrong_role")
    await refused(await edit(client, chat_id, a1, h, "x"), 409, "wrong_role")
    await refused(await edit(client, chat_id, q1, h, "   "), 400, "invalid_message")
    await refused(await edit(client, chat_id, q1, h, "x", extra=1), 400, "validation_error")
    missing = "00000000-0000-4000-8000-000000000000"
    await refused(await regenerate(client, chat_id, missing, h), 404, "message_not_found")
    await refused(await versions(client, chat_id, missing, h), 404, "message_not_found")
    await refused(await regenerate(client, chat_id, "nope", h), 400, "invalid_id")
    mallory = auth("mallory")
    await refused(await regenerate(client, chat_id, a1, mallory), 404, "chat_not_found")
    await refused(await edit(client, chat_id, q1, mallory, "mine"), 404, "chat_not_found")
    await refused(await versions(client, chat_id, a1, mallory), 404, "message_not_found")
    other = await new_chat(client, mallory)
    await refused(await regenerate(client, other, a1, mallory), 404, "message_not_found")
    await refused(await edit(client, other, q1, mallory, "mine"), 404, "message_not_found")
    await refused(await versions(client, other, a1, mallory), 404, "message_not_found")
    assert [m["message_id"] for m in await history(client, chat_id, h)] == [q1, a1]
    assert len(fake_openai.requests) == 1

    a2, _ = await turn(await regenerate(client, chat_id, a1, h))
    await refused(await regenerate(client, chat_id, a1, h), 409, "superseded")
    # The refusals took seqs and wrote nothing; the chat goes on.
    assert [m["message_id"] for m in await history(client, chat_id, h)] == [q1, a2]


async def test_a_refused_regenerate_leaves_the_answer_chosen(
    aiohttp_client, stream_settings, fake_openai, auth
):
    client = await aiohttp_client(create_app(stream_settings(message_rate_limit_ms=60_000)))
    h = auth("hasty")
    chat_id = await new_chat(client, h)
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    resp = await regenerate(client, chat_id, a1, h)
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "rate_limited"
    shown = await history(client, chat_id, h)
    assert [m["message_id"] for m in shown][1] == a1 and "superseded_by" not in shown[1]
    assert len(await records(client, chat_id)) == 2


async def test_two_regenerates_at_once_one_wins(stream_client, fake_openai, auth):
    client, h = stream_client, auth("twice")
    chat_id = await new_chat(client, h)
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    fake_openai.scripts = [Script(chunks=["slow", " one"], gate_after=1)]
    fake_openai.gate.clear()
    first = await regenerate(client, chat_id, a1, h)
    reading = asyncio.create_task(collect(first))
    await fake_openai.reached_gate.wait()
    second = await regenerate(client, chat_id, a1, h)
    assert second.status == 409 and (await second.json())["error"]["code"] == "superseded"
    q1 = (await history(client, chat_id, h))[0]["message_id"]
    third = await edit(client, chat_id, q1, h, "while it runs")
    assert third.status == 409 and (await third.json())["error"]["code"] == "answer_running"
    fake_openai.gate.set()
    evs = await reading
    assert text_of(evs) == "slow one"
    assert [m["content"] for m in await history(client, chat_id, h)] == ["q1", "slow one"]


async def test_regenerate_with_an_idempotency_key_runs_once(stream_client, fake_openai, auth):
    client, h = stream_client, auth("keyed")
    chat_id = await new_chat(client, h)
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    keyed = {**h, "Idempotency-Key": "regen-1"}
    a2, text = await turn(await regenerate(client, chat_id, a1, keyed))
    again = await regenerate(client, chat_id, a1, keyed)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert await turn(again) == (a2, text)
    assert len(fake_openai.requests) == 2 and len(await records(client, chat_id)) == 3


async def test_a_regenerated_answer_resumes_and_cancels_like_a_sent_one(
    stream_client, fake_openai, auth
):
    client, h = stream_client, auth("resumer")
    chat_id = await new_chat(client, h)
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    fake_openai.scripts = [Script(chunks=["part", " rest"], gate_after=1)]
    fake_openai.gate.clear()
    resp = await regenerate(client, chat_id, a1, h)
    reading = asyncio.create_task(collect(resp))
    await fake_openai.reached_gate.wait()
    running = await client.get(f"/api/chat/{chat_id}/stream", headers=h)
    assert running.status == 200
    following = asyncio.create_task(collect(running))
    shown = await history(client, chat_id, h)
    a2 = shown[-1]["message_id"]
    assert shown[-1]["status"] == "streaming" and a2 != a1
    cancel = await client.post(f"/api/chat/{chat_id}/messages/{a2}/cancel", headers=h)
    assert cancel.status == 202
    fake_openai.gate.set()
    for evs in await asyncio.gather(reading, following):
        assert evs[-1]["event"] == "done" and evs[-1]["data"]["status"] == "cancelled"
    docs = await records(client, chat_id)
    assert docs[-1]["status"] == "cancelled" and docs[-1]["replaces"] == a1


async def test_search_finds_the_chosen_versions_only(stream_client, fake_openai, auth):
    """A search result opens its chat at the message: one the history no longer shows would
    lead nowhere."""
    client, h = stream_client, auth("finder")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [Script(chunks=["walrus tusks"]), Script(chunks=["walrus whiskers"])]
    a1, _ = await turn(await send(client, chat_id, h, "tell me"))
    a2, _ = await turn(await regenerate(client, chat_id, a1, h))
    resp = await client.get("/api/search", params={"q": "walrus"}, headers=h)
    hits = [r.get("message_id") for r in (await resp.json())["results"]]
    assert hits == [a2]


async def test_an_attempt_the_upstream_refuses_leaves_the_history_as_it_was(
    stream_client, fake_openai, auth
):
    """The page puts the old answer back when a regenerate is refused before it streamed; so
    does the history. The refused attempt is kept as a version that lost (billed nothing)."""
    client, h = stream_client, auth("refused")
    chat_id = await new_chat(client, h)
    fake_openai.scripts = [
        Script(chunks=["kept answer"], usage=(7, 2)),
        Script(status=400, error_body={"error": {"message": "no", "type": "invalid_request"}}),
        Script(status=400, error_body={"error": {"message": "no", "type": "invalid_request"}}),
        Script(chunks=["next"], usage=(12, 1)),
    ]
    a1, _ = await turn(await send(client, chat_id, h, "q1"))
    resp = await regenerate(client, chat_id, a1, h)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "upstream_bad_request"
    q1 = (await history(client, chat_id, h))[0]["message_id"]
    resp = await edit(client, chat_id, q1, h, "q1 changed")
    assert resp.status == 400
    shown = await history(client, chat_id, h)
    assert [(m["message_id"], m["content"]) for m in shown] == [(q1, "q1"), (a1, "kept answer")]

    body = await (await versions(client, chat_id, a1, h)).json()
    assert body["chosen"] == a1 and len(body["versions"]) == 2
    lost = body["versions"][1]
    assert lost["status"] == "failed" and lost["superseded_by"] == a1
    await turn(await send(client, chat_id, h, "q2"))
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "kept answer"), ("user", "q2")]
    docs = await records(client, chat_id)
    usage = await usage_doc(client, "refused")
    assert usage["used"] == billed(docs) == 9 + 13 and usage["reserved"] == 0


async def test_another_replicas_cached_context_never_shows_a_superseded_answer(
    aiohttp_client, stream_settings, fake_openai, auth
):
    """Replica A ran the chat's turn (its context cache holds it); B regenerates the answer;
    A's next turn must see B's version, not its cached one."""
    settings = stream_settings()
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    h = auth("roaming")
    chat_id = await new_chat(a, h)
    fake_openai.scripts = [Script(chunks=["from A"]), Script(chunks=["from B"]), Script()]
    a1, _ = await turn(await send(a, chat_id, h, "q1"))
    await turn(await regenerate(b, chat_id, a1, h))
    await turn(await send(a, chat_id, h, "q2"))
    assert prompt(fake_openai) == [("user", "q1"), ("assistant", "from B"), ("user", "q2")]

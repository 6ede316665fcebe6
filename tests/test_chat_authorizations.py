"""The group commit of the chats' authorizations (``ChatAuthorizations``,
``Store.begin_chat_turns``): the turns beginning together are authorized in two commands, each
told exactly the seqs it took, and refused exactly as one alone is (a chat gone or another's)."""

from __future__ import annotations

import asyncio

from service import store as store_module
from service.app import create_app
from service.keys import STORE
from service.stream.groups import ChatAuthorizations
from tests.faults import calls


async def _chat(store, user: str) -> str:
    return str((await store.create_chat(user, title=None, model=None, cap=100))["_id"])


async def test_turns_beginning_together_are_authorized_in_one_group(
    aiohttp_client, stream_settings
):
    """Five turns in one group: two of one chat take two pairs of seqs, one after the other;
    another chat's its first pair; another user's chat and a deleted chat refuse theirs (None)
    and are left as they were."""
    store = (await aiohttp_client(create_app(stream_settings()))).app[STORE]
    twice, once = await _chat(store, "alice"), await _chat(store, "alice")
    bobs, gone = await _chat(store, "bob"), await _chat(store, "alice")
    assert await store.delete_chat("alice", gone) is not None
    before = calls("begin_chat_turns"), calls("begin_chat_turn")
    authorizations = ChatAuthorizations(store, lambda task: None)
    asked = [(twice, "t1"), (twice, "t2"), (once, "o1"), (bobs, "b1"), (gone, "g1")]
    told = await asyncio.gather(*(authorizations.begin("alice", c, m) for c, m in asked))
    assert (calls("begin_chat_turns"), calls("begin_chat_turn")) == (before[0] + 1, before[1])
    assert sorted(t["next_seq"] for t in told[:2]) == [2, 4]  # one pair each, whichever first
    assert told[2]["next_seq"] == 2 and told[2]["_id"] == once
    assert told[3] is None and told[4] is None
    chats = {c["_id"]: c for c in await store.db.chats.find({}).to_list(None)}
    assert (chats[twice]["next_seq"], chats[once]["next_seq"]) == (4, 2)
    assert (chats[bobs]["next_seq"], chats[gone]["next_seq"]) == (0, 0)


async def test_a_turn_whose_note_later_turns_pushed_out_is_authorized_again(
    aiohttp_client, stream_settings, monkeypatch
):
    """A chat keeps the notes of its last ``BEGAN_KEPT`` turns; a turn whose note was pushed
    out (more turns of the chat began at once, on any replica) cannot know its seqs, and is
    authorized again on its own: new seqs, never another turn's."""
    store = (await aiohttp_client(create_app(stream_settings()))).app[STORE]
    monkeypatch.setattr(store_module, "BEGAN_KEPT", 1)
    chat = await _chat(store, "alice")
    before = calls("begin_chat_turn")
    authorizations = ChatAuthorizations(store, lambda task: None)
    told = await asyncio.gather(*(authorizations.begin("alice", chat, m) for m in ("a", "b")))
    assert calls("begin_chat_turn") == before + 1  # the one whose note went
    assert sorted(t["next_seq"] for t in told) == [4, 6]  # 2 went unused, never given twice
    assert (await store.db.chats.find_one({"_id": chat}))["next_seq"] == 6

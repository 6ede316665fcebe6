"""A turn's prompt: the system prompt, recent history (partials marked), the new message."""

from __future__ import annotations

from collections import OrderedDict

from service.providers.base import Message
from service.records import PARTIAL, Status
from service.store import Doc
from service.tokens import TokenCounter

PARTIAL_MARK = "\n\n[this answer was cut off before it finished]"


def history_messages(docs: list[Doc]) -> list[Message]:
    """Records as chat messages: an answer's tool calls with it, a record of tool results as
    one ``tool`` message per result; a cut answer marked as such."""
    out: list[Message] = []
    for doc in docs:
        if doc["role"] == "tool":
            out.extend(
                {"role": "tool", "tool_call_id": r["tool_call_id"], "content": r["content"]}
                for r in doc.get("results") or ()
            )
            continue
        content = doc.get("content") or ""
        calls = doc.get("tool_calls") if doc["role"] == "assistant" else None
        if not content and not calls:
            continue
        if doc["role"] == "assistant" and doc.get("status") in PARTIAL:
            content += PARTIAL_MARK
        message: Message = {"role": doc["role"], "content": content or None}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def fit_to_window(
    system: list[Message],
    history: list[Message],
    tail: list[Message],
    counter: TokenCounter,
    budget_tokens: int,
) -> tuple[list[Message], int]:
    """Drop the oldest history messages until the prompt fits ``budget_tokens``; a tool result
    never opens the history (the answer that called the tool is gone: upstreams refuse it).
    The prompt, and its tokens (as ``TokenCounter.count_messages`` counts them). The history's
    counts are remembered: the chat's next turn counts the same messages again."""
    costs = [counter.count_message(m, remember=True) for m in history]
    fixed = counter.count_messages([*system, *tail])
    total = fixed + sum(costs)
    start = 0
    while total > budget_tokens and start < len(history):
        total -= costs[start]
        start += 1
    while start < len(history) and history[start]["role"] == "tool":
        total -= costs[start]
        start += 1
    return [*system, *history[start:], *tail], total


class ContextCache:
    """The recent messages of the chats whose latest turn ran on this replica, so that the next
    turn of such a chat does not read them again (one MongoDB query less per turn).

    Exact by construction: an entry is keyed by the seq the chat's next turn gets if no other turn
    began in between, and is used only when ``begin_chat_turn`` hands out exactly that seq. Only
    final messages are kept (an entry that would hold a message still streaming, i.e. a concurrent
    turn's, is not stored), so nothing in it can change behind this replica's back; and only a
    complete view (every seq below the key present: a concurrent turn that took its seqs first may
    not have written its records when this one read the chat; see ``producer._complete``).

    With the entry, the chat's owner and model are remembered (``know``: fixed at creation), so a
    turn can ``predict`` all it needs of the chat and be admitted while the authorization that
    checks the prediction runs (``TurnProducer._admit``).

    When entries keep missing (replicas taking turns of the same chats, no session affinity), the
    producer stops relying on them and reads the history alongside the chat's authorization, as
    without a cache; it keeps scoring what would have hit and relies on the cache again when that
    rate recovers.
    """

    TRUST = 0.5  # the least hit rate at which reading the history first from here pays off
    DECAY = 0.9  # weight of the past in the hit rate (an exponential moving average)

    def __init__(self, size: int) -> None:
        self.size = size
        self.hit_rate = 1.0
        self._entries: OrderedDict[str, tuple[int, list[Doc]]] = OrderedDict()
        # What never changes of a chat once created: its owner and its model.
        self._chats: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def trusted(self, chat_id: str) -> bool:
        """Worth asking first: there is an entry and entries have been hitting."""
        return chat_id in self._entries and self.hit_rate >= self.TRUST

    def know(self, chat_id: str, user_id: str, model: str | None) -> None:
        """Remember a chat's owner and model (both fixed when it is created)."""
        if self.size <= 0:
            return
        self._chats[chat_id] = (user_id, model)
        self._chats.move_to_end(chat_id)
        while len(self._chats) > self.size:
            self._chats.popitem(last=False)

    def predict(self, chat_id: str, user_id: str) -> tuple[int, str | None, list[Doc]] | None:
        """The seq the chat's next turn gets if no other turn began meanwhile, its model and
        its messages before that seq, when the entry is trusted and the chat is ``user_id``'s;
        not taken: the authorization that runs meanwhile says whether it holds (``resolve``)."""
        chat = self._chats.get(chat_id)
        if chat is None or chat[0] != user_id or not self.trusted(chat_id):
            return None
        seq, docs = self._entries[chat_id]
        return seq, chat[1], docs

    def resolve(self, chat_id: str, seq: int) -> list[Doc] | None:
        """The chat's messages before ``seq`` when the entry is exact; scores the outcome."""
        entry = self._entries.pop(chat_id, None)
        if entry is None:
            return None
        hit = entry[0] == seq
        self.hit_rate = self.DECAY * self.hit_rate + (1 - self.DECAY) * hit
        return entry[1] if hit else None

    def put(self, chat_id: str, next_seq: int, docs: list[Doc]) -> None:
        """Remember ``docs`` as the chat's messages before ``next_seq``."""
        if self.size <= 0 or any(d.get("status") == Status.STREAMING for d in docs):
            self._entries.pop(chat_id, None)
            return
        current = self._entries.get(chat_id)
        if current is not None and current[0] > next_seq:
            return  # a later turn of the chat already finished here
        self._entries[chat_id] = (next_seq, docs)
        self._entries.move_to_end(chat_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, chat_id: str) -> None:
        self._entries.pop(chat_id, None)

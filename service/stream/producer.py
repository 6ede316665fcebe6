"""The turn producer: every rule of a chat turn, from authorization to the final record.

``TurnProducer.start`` runs everything that may refuse the turn (validation, authorization,
model, rate limit and budget, persisting, opening the upstream) and raises ``ServiceError`` with
the right status. From admission on the turn runs as its own task, owned by the registry: it
reads the upstream to its end into its ``LiveStream`` (``turn.live``), which transports follow
from an offset (``registry.follow``); a client leaving never stops it by itself. Finalization
(persist the text, settle the tokens, log the outcome) runs shielded and tracked by the
registry, so neither a cancel nor a shutdown can skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import structlog

from service.auth import KeyScope
from service.costs import NANOS, cost_nanos
from service.errors import (
    HELD,
    BadRequest,
    BudgetExceeded,
    BudgetHeld,
    Conflict,
    ServiceError,
    ServiceUnavailable,
    StoreUnavailable,
    UpstreamError,
)
from service.http import not_found, wire_status
from service.logs import error_text
from service.metrics import COST, DURATION, REJECTIONS, TOKENS, TTFT, TURNS, UPSTREAM_ERRORS
from service.model_lists import ModelLists
from service.models import Catalogue, ModelSpec
from service.providers.base import (
    Chunk,
    CompletionRequest,
    Message,
    Provider,
    Usage,
    cache_writes,
    close_stream,
)
from service.records import Status, final_fields, finish_reason_of, tokens_doc
from service.settings import Settings
from service.store import (
    Doc,
    Reservation,
    ReserveRequest,
    Rollup,
    Store,
    key_account,
    utcnow,
)
from service.stream import branches
from service.stream.ahead import Ahead, Drained, Expected
from service.stream.assembly import Assembly
from service.stream.context import ContextCache, fit_to_window, history_messages
from service.stream.events import Final
from service.stream.finals import FinalCommits, FinalWrite, final_of
from service.stream.groups import ChatAuthorizations, RecordInserts, Reservations
from service.stream.leases import Leases
from service.stream.live import LiveStream
from service.stream.registry import StreamRegistry
from service.tokens import TokenCounter, estimate_tokens

log = structlog.get_logger("service.stream")

MIN_COMPLETION_TOKENS = 16
# The longest answer a turn keeps: an upstream that ignores max_tokens must not grow a turn's
# memory, or its record, without end (MongoDB's documents stop at 16 MiB; this is at most 8).
MAX_ANSWER_CHARS = 2_000_000
MAX_RESULTS_CHARS = 1_000_000  # the tool results of one stored chat turn, in all
MAX_MARKS = 200_000  # steps that are more than text (reasoning, tool call deltas): ditto
OUTCOME = {Status.COMPLETE: "completed", Status.CANCELLED: "cancelled", Status.FAILED: "failed"}
# A turn refused by one of these rules is counted in gateway_turn_rejections_total.
# Refusals of a turn by a rule, counted once as its admission ends (``REJECTIONS``); an API key
# used outside its models too, not a count of tokens (no turn) nor a turn admitted again.
REFUSED_BY_RULE = frozenset(
    {"rate_limited", "budget_exceeded", "budget_held", "shutting_down", "model_not_allowed"}
)


def _log_refusal(inp: TurnInput, message_id: str, exc: ServiceError) -> None:
    """A turn refused before it started (it has no ``stream.started`` or ``stream.ended``):
    why, on every transport (a WebSocket's refusal is a frame, not a response)."""
    rule = exc.details.get("rule") if isinstance(exc.details, dict) else None
    status = wire_status(inp.transport, exc)
    (log.warning if status >= 500 else log.info)(
        "stream.refused",
        message_id=message_id,
        chat_id=inp.chat_id,
        transport=inp.transport,
        model=inp.model,
        status=status,
        code=exc.code,
        **({"rule": rule} if rule else {}),
    )


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback: the outcome is nobody's any more (never "not retrieved")."""
    if not future.cancelled():
        future.exception()


def _allowed(key: KeyScope | None, spec: ModelSpec) -> None:
    """An API key with a model list may use only those models."""
    if key is not None and not key.may_use(spec.name):
        raise key.not_allowed(spec.name)


def period_of(at: datetime) -> str:
    return _period(at.year, at.month)


@functools.lru_cache(maxsize=4)
def _period(year: int, month: int) -> str:
    """One string per month, shared by the turns that keep it (thousands are live at once)."""
    return f"{year:04d}-{month:02d}"


@dataclass(frozen=True, slots=True)
class TurnInput:
    user_id: str
    transport: str
    chat_id: str | None = None  # a stored chat's turn ...
    text: str | None = None
    # ... whose new message is tool results instead: [{"tool_call_id", "content"}] (the /v1
    # route's tool loop on a stored chat), kept as one record of role "tool"
    results: list[dict[str, Any]] | None = None
    messages: list[Message] | None = None  # ... or a stateless turn (OpenAI route)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    # The client's other OpenAI request fields, sent on as given (``CompletionRequest.options``).
    options: dict[str, Any] | None = None
    # An Idempotency-Key claimed for this turn (``Admissions.admit``): the claim's id is the
    # turn's message id; the turn marks it admitted once it streams, or releases it if refused.
    key: str | None = None
    # A regenerate or an edit of the chat's latest exchange (``service/stream/branches.py``).
    branch: branches.Branch | None = None
    # Sent with an API key: the models it allows, its own limit; its id goes on the records.
    api_key: KeyScope | None = None


class TurnProducer:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        catalogue: Catalogue,
        model_lists: ModelLists,
        providers: dict[str, Provider],
        counter_for: Callable[[ModelSpec], TokenCounter],
        registry: StreamRegistry,
        context_cache: ContextCache | None = None,
        leases: Leases | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalogue = catalogue
        self.model_lists = model_lists
        self.providers = providers
        self.counter_for = counter_for
        self.registry = registry
        self.context_cache = context_cache or ContextCache(settings.context_cache_chats)
        self.leases = leases
        self.commits = FinalCommits(  # grouped
            store, registry.track, registry.rollups, registry.pending
        )
        self.inserts = RecordInserts(store, registry.track)  # grouped too
        self.reservations = Reservations(store, registry.track)  # and the page's
        self.key_reservations = Reservations(store, registry.track)  # and keys' own months
        self.authorizations = ChatAuthorizations(store, registry.track)  # and the chats'
        self.budget = settings.budget  # the month's budget: tokens or currency

    async def start(self, inp: TurnInput, *, message_id: str | None = None) -> Turn:
        """Admit a turn and start it; a refusal is a ``ServiceError``. With a claimed key
        (``inp.key``, claimed under ``message_id``) a refusal before the turn exists releases
        the key; from then on the turn settles its claim itself."""
        mid = message_id or str(uuid.uuid4())
        began: list[int] = []  # the seqs its chat's authorization gave it
        try:
            turn, text, seq, now = await self._admit(inp, mid, began=began)
        except BaseException as exc:
            if isinstance(exc, ServiceError):
                if exc.code in REFUSED_BY_RULE:  # once, as it ends (a turn may be admitted twice)
                    REJECTIONS.labels(exc.code).inc()
                _log_refusal(inp, mid, exc)
            if inp.chat_id is not None and began:  # no records: the chat did not move
                self._unmove(inp.user_id, inp.chat_id, began[-1])
            if inp.key is not None and message_id is not None:
                with contextlib.suppress(ServiceError):
                    await asyncio.shield(self.store.release_claim(message_id))
            if inp.branch is not None and inp.chat_id is not None:  # what it superseded
                with contextlib.suppress(ServiceError):
                    await asyncio.shield(branches.release(self.store, inp.chat_id, mid))
            raise
        try:
            await turn.launch(text, seq, now)
        except ServiceError:
            if inp.branch is not None and inp.chat_id is not None:  # refused: it replaced nothing
                with contextlib.suppress(ServiceError):
                    await asyncio.shield(
                        branches.abandon(self.store, inp.branch, inp.chat_id, mid, seq)
                    )
            raise
        return turn

    async def _admit(
        self,
        inp: TurnInput,
        message_id: str,
        chat: Doc | None = None,
        *,
        began: list[int],
    ) -> tuple[Turn, str, int, datetime]:
        """Admit a turn. A chat's turn whose chat this replica knows (its previous turn ran
        here, ``ContextCache.predict``) is admitted with the seq, model and history it predicts
        while the chat's authorization runs alongside (no round trip before the reservation);
        the authorization then decides: another's turn came first (the prediction is wrong), and
        the turn is admitted again with the chat as it is (``chat``); the chat is gone, and it
        is refused as it would have been, what it reserved given back. ``began``: the seq the
        chat's authorization gave the turn, once it has (for ``_unmove``)."""
        started = time.perf_counter()
        if self.registry.draining:
            raise ServiceUnavailable("the server is shutting down; retry", code="shutting_down")
        regenerate = inp.branch is not None and inp.branch.kind == "regenerate"
        text = "" if regenerate else self._validate(inp)
        seq = 0
        chat_model = None
        history: list[Doc] = []
        check: asyncio.Future[Doc | None] | None = None
        if inp.chat_id is not None:
            predicted = None if chat is not None else self._predicted(inp)
            if predicted is not None:
                seq, chat_model, history = predicted
                check = self.authorizations.begin(inp.user_id, inp.chat_id, message_id)
            else:
                chat, history = await self._chat_and_history(
                    inp.user_id, inp.chat_id, message_id, chat
                )
                seq, chat_model = int(chat["next_seq"]) - 2, chat.get("model")
                began.append(seq)
                self.context_cache.know(inp.chat_id, inp.user_id, chat_model)
                if inp.branch is not None:
                    inp, text, history = await self._branch(inp, text, message_id, seq)
        if check is None:
            return await self._admit_turn(inp, message_id, text, seq, chat_model, history, started)
        assert inp.chat_id is not None
        try:
            admitted = await self._admit_turn(
                inp, message_id, text, seq, chat_model, history, started
            )
        except asyncio.CancelledError:  # the client left: its authorization ends on its own
            check.add_done_callback(_retrieved)
            self.context_cache.drop(inp.chat_id)  # it takes the seqs predicted for the next
            raise
        except BaseException:
            chat = await self._authorized(check, inp.chat_id, seq)
            if chat is None:
                began.append(seq)
                raise  # the prediction held: the refusal is the turn's
            return await self._admit(inp, message_id, chat, began=began)
        try:
            chat = await self._authorized(check, inp.chat_id, seq)
        except BaseException:
            await asyncio.shield(self._unadmit(admitted[0], admitted[3]))
            raise
        if chat is None:
            return admitted
        await asyncio.shield(self._unadmit(admitted[0], admitted[3]))
        return await self._admit(inp, message_id, chat, began=began)

    def _unmove(self, user_id: str, chat_id: str, seq: int) -> None:
        """A chat's turn refused after its authorization moved the chat's ``updated_at`` (its
        place in the list), before it wrote a record: the chat goes back to its last record's
        time, unless a later turn has begun since (``Store.unmove_chat``). In the background:
        the refusal does not wait."""

        async def unmove() -> None:
            with contextlib.suppress(ServiceError):
                await self.store.unmove_chat(user_id, chat_id, seq)

        self.registry.track(asyncio.ensure_future(unmove()))

    def _predicted(self, inp: TurnInput) -> tuple[int, str | None, list[Doc]] | None:
        """The chat's next seq, model and history from this replica's cache, for a plain turn
        (not a regenerate or an edit, not on an API key with a limit of its own)."""
        if inp.chat_id is None or inp.branch is not None or not self.settings.context_messages:
            return None
        if inp.api_key is not None and inp.api_key.limit is not None:
            return None
        return self.context_cache.predict(inp.chat_id, inp.user_id)

    async def _authorized(
        self, check: asyncio.Future[Doc | None], chat_id: str, seq: int
    ) -> Doc | None:
        """The predicted turn's authorization: None when it allocated the predicted seq (the
        prediction held), else the chat as it is now; 404 when the chat is gone or another's."""
        try:
            chat = await asyncio.shield(check)
        except asyncio.CancelledError:
            check.add_done_callback(_retrieved)
            self.context_cache.drop(chat_id)  # it takes the seqs predicted for the next
            raise
        if chat is None:
            self.context_cache.drop(chat_id)
            raise not_found("chat")
        allocated = int(chat["next_seq"]) - 2
        self.context_cache.resolve(chat_id, allocated)  # scored, and taken
        return None if allocated == seq else chat

    async def _unadmit(self, turn: Turn, now: datetime) -> None:
        """Give back what an admitted turn that will not run reserved, as if it never had:
        its grant (to the lease, or the month), its request, the page's message gap."""
        self._discard(turn.opening(), turn.inp, turn.message_id)
        reservation = turn.admitted()
        if reservation is None:
            return
        inp = turn.inp
        if reservation.lease_id is not None and self.leases is not None:
            request = bool(self._requests_per_minute(inp.transport))
            self.leases.unadmit(inp.user_id, turn.period, grant=reservation.grant, request=request)
            return
        gap = self._gap_ms(inp.transport)
        with contextlib.suppress(ServiceError):
            await self.store.unreserve(
                inp.user_id, turn.period, turn.message_id, now=now, gap_ms=gap
            )

    # The page (SSE) is held to one message per interval; programs (/v1 and WebSocket clients)
    # to requests per minute and turns at once.
    def _gap_ms(self, transport: str) -> int:
        return self.settings.message_rate_limit_ms if transport == "sse" else 0

    def _requests_per_minute(self, transport: str) -> int:
        return 0 if transport == "sse" else self.settings.v1_requests_per_minute

    async def _admit_turn(
        self,
        inp: TurnInput,
        message_id: str,
        text: str,
        seq: int,
        chat_model: str | None,
        history: list[Doc],
        started: float,
    ) -> tuple[Turn, str, int, datetime]:
        """Admit a turn whose chat (if any) is known: the model, the prompt, the reservation."""
        spec = self.catalogue.resolve(inp.model or chat_model, inp.api_key)
        _allowed(inp.api_key, spec)
        await self.model_lists.require(spec)
        provider = self.providers.get(spec.provider)
        if provider is None:
            raise ServiceUnavailable(
                f"provider '{spec.provider}' is not configured", code="model_unavailable"
            )
        counter = self.counter_for(spec)
        max_out = min(spec.max_output_tokens, inp.max_tokens or spec.max_output_tokens)
        messages, counted = self._prompt(inp, text, history, spec, counter, max_out)
        request = CompletionRequest(
            model=spec.upstream,
            messages=messages,
            max_tokens=max_out,
            temperature=inp.temperature,
            top_p=inp.top_p,
            stop=inp.stop,
            options=inp.options or {},
        )
        _honoured(provider, spec, request)
        prompt_tokens = await self._count_prompt(spec, provider, counter, request, counted)
        choices = _choices(inp.options)  # n answers: each may run to max_out
        now = utcnow()
        period = period_of(now)
        budget, price = self.budget, spec.price
        want = budget.ask(price, prompt_tokens, choices * max_out)
        need = budget.ask(price, prompt_tokens, choices * min(MIN_COMPLETION_TOKENS, max_out))
        key_grant = None
        if inp.api_key is not None and inp.api_key.limit is not None:
            key_grant = await self._reserve_key(inp.api_key, period, message_id, want, need, now)
            want = min(want, key_grant)  # the key's own limit binds first
        req = ReserveRequest(
            user_id=inp.user_id,
            period=period,
            message_id=message_id,
            want=want,
            need=need,
            default_limit=budget.default_limit,
            rate_limit_ms=self._gap_ms(inp.transport),
            now=now,
            requests_per_minute=self._requests_per_minute(inp.transport),
            max_concurrent=(
                0 if inp.transport == "sse" else self.settings.max_concurrent_turns_per_user
            ),
        )
        opening = self._open_early(inp, provider, request, req)
        try:
            reservation = await self._reserve(inp.transport, req)
        except BaseException as exc:
            self._discard(opening, inp, message_id)
            if key_grant is not None:  # the key's reservation is free again
                assert inp.api_key is not None
                with contextlib.suppress(ServiceError):
                    await asyncio.shield(
                        self.store.settle_usage(
                            key_account(inp.api_key.key_id),
                            period,
                            message_id,
                            billed=0,
                        )
                    )
            if isinstance(exc, BudgetExceeded):  # its amounts in the budget's unit
                words = exc.message
                if budget.unit != "tokens" and not isinstance(exc, BudgetHeld):
                    words = "monthly budget exhausted"
                raise exc.restated(words, budget.refusal(exc.details)) from None
            raise
        finally:  # admitted or refused: another turn of the user may ask early
            if opening is not None:
                self._expected(inp).answered(inp.user_id)
        within = budget.completion_within(price, reservation.grant, prompt_tokens) // choices
        if opening is not None and within < max_out:  # clamped: the answer asked was longer
            self._discard(opening, inp, message_id)
            opening = None
        turn = Turn(
            producer=self,
            inp=inp,
            spec=spec,
            provider=provider,
            counter=counter,
            message_id=message_id,
            messages=messages,
            prompt_tokens=prompt_tokens,
            max_tokens=max(1, min(max_out, within)),
            reservation=reservation,
            key_grant=key_grant,
            period=period,
            started=started,
            history=history,
            opening=opening,
        )
        return turn, text, seq, now

    def _open_early(
        self, inp: TurnInput, provider: Provider, request: CompletionRequest, req: ReserveRequest
    ) -> Ahead | None:
        """A turn whose admission this replica expects (``Expected``) but which must ask
        MongoDB for it (a chat page's reservation; a program's lease that must grow) asks its
        upstream now, beside that command (and beside the chat's authorization, when its turn
        was predicted), rather than after it: their round trips hide behind the model's time
        to its first token. The turn takes the upstream over (``Turn._open``); a turn refused
        after all, or admitted again, drops it (``_discard``), unread. A program's turn the
        lease admits from memory asks nothing of MongoDB: it opens as it always did. One turn
        of a user at a time asks early (``Expected.asking``): a burst of turns that must ask (a
        program's concurrent sends as its lease must grow) would otherwise send the upstream as
        many requests as turns, and nobody is billed for those refused (turns at once, the
        month)."""
        leases = self.leases
        if inp.transport != "sse" and leases is not None and not leases.must_ask(req):
            return None  # admitted from memory: no round trip to hide
        expected = self._expected(inp)
        if not (expected.likely(req) and expected.asking(req.user_id)):
            return None
        return Ahead(provider.open(request))

    def _expected(self, inp: TurnInput) -> Expected:
        """What ``inp``'s admission is expected to do: the page's reservations', or the leases'."""
        if inp.transport == "sse" or self.leases is None:
            return self.reservations.expected
        return self.leases.expected

    def _discard(self, early: Ahead | None, inp: TurnInput, mid: str) -> None:
        """Drop an upstream asked beside an admission that did not go through as expected;
        the user's next turn then asks only once admitted (``Expected``), so the requests
        nobody is billed for never outnumber the user's admissions here, whatever ended this
        one (a refusal, a client gone mid-admission, a stale prediction)."""
        if early is not None:
            early.drop(self.registry.track)
            self._expected(inp).refused(inp.user_id)
            log.info("stream.early_upstream_dropped", message_id=mid)

    async def _branch(
        self, inp: TurnInput, text: str, message_id: str, seq: int
    ) -> tuple[TurnInput, str, list[Doc]]:
        """Take what a regenerate or an edit replaces; its context is the chosen records
        before the question (read: the question may be far back), and a regenerate asks the
        question again."""
        assert inp.branch is not None and inp.chat_id is not None
        branch = await branches.take(
            self.store,
            inp.branch,
            user_id=inp.user_id,
            chat_id=inp.chat_id,
            message_id=message_id,
            seq=seq,
        )
        text = branch.question if branch.kind == "regenerate" else text
        limit = self.settings.context_messages
        history = await self.store.recent_messages(
            inp.chat_id, inp.user_id, limit=limit, before_seq=branch.question_seq
        )
        return dataclasses.replace(inp, branch=branch), text, history

    async def _reserve_key(
        self, key: KeyScope, period: str, message_id: str, want: int, need: int, now: datetime
    ) -> int:
        """Reserve a turn on an API key's own month (its ``limit``, inside the user's), by the
        budget rule alone (the rate limits are the user's); the grant. The keys' turns arriving
        together are reserved together (``Reservations``, as the page's)."""
        assert key.limit is not None
        try:
            reservation = await self.key_reservations.reserve(
                ReserveRequest(
                    user_id=key_account(key.key_id),
                    period=period,
                    message_id=message_id,
                    want=want,
                    need=need,
                    default_limit=key.limit,
                    rate_limit_ms=0,
                    now=now,
                )
            )
        except BudgetExceeded as exc:
            words = "this API key's monthly budget is exhausted"
            if isinstance(exc, BudgetHeld):
                words = f"the rest of this API key's monthly budget {HELD}"
            details = {**self.budget.refusal(exc.details), "key_id": key.key_id}
            raise exc.restated(words, details) from None
        return reservation.grant

    async def _reserve(self, transport: str, req: ReserveRequest) -> Reservation:
        """Programs' turns (``/v1``, WebSocket) from this replica's lease on the user's month,
        in memory while it has room; the page's with a conditional update each (its message
        gap is a rule between two sends, not a quantity a lease could hold), the updates of
        the page's turns arriving together sent together (``Reservations``)."""
        if transport == "sse" or self.leases is None:
            return await self.reservations.reserve(req)
        return await self.leases.admit(req)

    async def count_tokens(self, inp: TurnInput) -> int:
        """The prompt tokens of a stateless turn of ``inp`` (its ``messages`` and ``options``),
        counted as ``start`` counts them (``_count_prompt``): what a client may ask before it
        sends. The model is resolved and what its provider cannot honour refused as for a turn;
        nothing is reserved, stored or sent to the model. An API key counts only for its own
        models (counting may be a call to the vendor's own count, on the operator's key). A
        count the vendor makes (the model has no local tokenizer) takes a request from the
        user's per-minute bucket, as a turn does: each is a call on the operator's key."""
        spec = self.catalogue.resolve(inp.model, inp.api_key)
        _allowed(inp.api_key, spec)
        await self.model_lists.require(spec)
        provider = self.providers.get(spec.provider)
        if provider is None:
            raise ServiceUnavailable(
                f"provider '{spec.provider}' is not configured", code="model_unavailable"
            )
        request = CompletionRequest(
            model=spec.upstream,
            messages=inp.messages or [],
            max_tokens=spec.max_output_tokens,
            options=inp.options or {},
        )
        _honoured(provider, spec, request)
        rpm = self._requests_per_minute(inp.transport)
        if spec.encoding is None and rpm and self.leases is not None:  # the vendor counts it
            now = utcnow()
            await self.leases.take_request(
                ReserveRequest(
                    user_id=inp.user_id,
                    period=period_of(now),
                    message_id=str(uuid.uuid4()),
                    want=0,
                    need=0,
                    default_limit=self.budget.default_limit,
                    rate_limit_ms=0,
                    now=now,
                    requests_per_minute=rpm,
                )
            )
        return await self._count_prompt(spec, provider, self.counter_for(spec), request)

    async def _count_prompt(
        self,
        spec: ModelSpec,
        provider: Provider,
        counter: TokenCounter,
        request: CompletionRequest,
        counted: int | None = None,
    ) -> int:
        """The local tokenizer when the model has one; else the upstream's count (Gemini's
        countTokens), falling back to the estimate when that call fails. Tool definitions and
        a response schema count as their JSON. ``counted``: the messages' count with
        ``counter``, when the caller has it already."""
        if spec.encoding is None:
            try:
                exact = await provider.count_prompt(request)
            except UpstreamError as exc:
                log.warning(
                    "stream.count_tokens_failed",
                    model=spec.name,
                    code=exc.code,
                    error=error_text(exc),
                )
                exact = None
            if exact is not None:
                return exact
        options = request.options
        schema = [options[k] for k in ("tools", "response_format") if options.get(k)]
        extra = counter.count(orjson.dumps(schema).decode()) if schema else 0
        if counted is None:
            counted = counter.count_messages(request.messages)
        return counted + extra

    def _validate(self, inp: TurnInput) -> str:
        if inp.messages is not None:
            return ""
        if inp.results is not None:
            size = sum(len(r["content"]) for r in inp.results)
            if not inp.results or size > MAX_RESULTS_CHARS:
                raise BadRequest(
                    f"tool results must be 1 to {MAX_RESULTS_CHARS} characters in all",
                    code="invalid_message",
                    details={"length": size, "max": MAX_RESULTS_CHARS},
                )
            return ""
        text = (inp.text or "").strip()
        limit = self.settings.max_message_chars
        if not 1 <= len(text) <= limit:
            raise BadRequest(
                f"message must be 1 to {limit} characters after trimming",
                code="invalid_message",
                details={"length": len(text), "max": limit},
            )
        return text

    async def _chat_and_history(
        self, user_id: str, chat_id: str, message_id: str, chat: Doc | None = None
    ) -> tuple[Doc, list[Doc]]:
        """Authorize the chat (allocating the turn's seqs) and get its recent messages: from the
        context cache when this replica ran the chat's previous turn (no query), else read at
        the same time as the authorization (one round trip). The read asks for two extra
        messages, for a concurrent turn of the same chat, whose messages are not context.
        ``chat``: authorized already (a prediction that did not hold), only read."""
        limit = self.settings.context_messages
        cache = self.context_cache
        store = self.store
        if chat is not None:
            history = await store.recent_messages(chat_id, user_id, limit=limit + 2)
        elif limit and cache.trusted(chat_id):
            chat = await self.authorizations.begin(user_id, chat_id, message_id)
            if chat is None:
                raise not_found("chat")
            cached = cache.resolve(chat_id, int(chat["next_seq"]) - 2)
            if cached is not None:
                return chat, cached
            history = await store.recent_messages(chat_id, user_id, limit=limit + 2)
        else:
            chat, history = await asyncio.gather(
                self.authorizations.begin(user_id, chat_id, message_id),
                store.recent_messages(chat_id, user_id, limit=limit + 2 if limit else 0),
            )
            if chat is None:
                raise not_found("chat")
            cache.resolve(chat_id, int(chat["next_seq"]) - 2)  # scored, not used
        seq = int(chat["next_seq"]) - 2
        return chat, [d for d in history if d["seq"] < seq][-limit:] if limit else []

    def _prompt(
        self,
        inp: TurnInput,
        text: str,
        docs: list[Doc],
        spec: ModelSpec,
        counter: TokenCounter,
        max_out: int,
    ) -> tuple[list[Message], int]:
        """A stored chat's prompt: the system prompt, as much recent history as fits, the new
        message; and its tokens. A stateless turn's messages are the client's, sent as given
        (never trimmed): too long for the model is a 400, as it would be upstream."""
        budget = spec.context_window - max_out
        if inp.messages is not None:
            messages = inp.messages
            counted = counter.count_messages(messages)
        else:
            system: list[Message] = [{"role": "system", "content": self.settings.system_prompt}]
            tail = history_messages([input_record(inp, text)])
            messages, counted = fit_to_window(system, history_messages(docs), tail, counter, budget)
        if counted > budget:
            raise BadRequest(
                "the message does not fit the model's context window", code="context_too_long"
            )
        return messages, counted


class Turn:
    """One running turn. ``launch`` starts its task (``_run``: persist, open, read, finalize).

    A replica holds thousands of these at once, so a turn keeps only what its stream still
    needs: slots, no bound logger (``_log`` adds the ids per line), the prompt dropped once the
    upstream has it, the records' insert kept as its outcome once it is done."""

    __slots__ = (
        "_admitted",
        "_insert",
        "_opening",
        "_stage_deadline",
        "_stream",
        "chunks",
        "counter",
        "day",
        "final",
        "finish_reason",
        "grant",
        "history",
        "inp",
        "key_grant",
        "lease_id",
        "live",
        "max_tokens",
        "message_id",
        "messages",
        "p",
        "parts",
        "period",
        "prompt_tokens",
        "provider",
        "seq",
        "spec",
        "started",
        "text",
        "usage",
    )

    def __init__(
        self,
        *,
        producer: TurnProducer,
        inp: TurnInput,
        spec: ModelSpec,
        provider: Provider,
        counter: TokenCounter,
        message_id: str,
        messages: list[Message],
        prompt_tokens: int,
        max_tokens: int,
        reservation: Reservation,
        period: str,
        started: float,
        history: list[Doc],
        key_grant: int | None = None,
        opening: Ahead | None = None,
    ) -> None:
        self.p = producer
        self.inp = inp
        self.spec = spec
        self.provider = provider
        self.counter = counter
        self.message_id = message_id
        self.messages = messages
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.grant = reservation.grant
        self.lease_id = reservation.lease_id
        self.key_grant = key_grant  # reserved on the API key's own month (``key_account``)
        # What admitted it, for the request's rate-limit headers: handed over once (``admitted``)
        # so a live turn does not keep it.
        self._admitted: Reservation | None = reservation
        self.period = period
        self.day = ""  # the UTC day it was admitted, in ``period``: its line in the rollup
        self.started = started
        # The chat's messages before this turn, for the context cache; not kept when one is a
        # concurrent turn's, still streaming (the cache would refuse them at the end anyway),
        # nor for a stateless turn (no chat: nothing to cache).
        streaming = any(d.get("status") == Status.STREAMING for d in history)
        self.history: list[Doc] | None = None if streaming or inp.chat_id is None else history
        self.seq = 0
        self.text = ""
        self.live = LiveStream(
            message_id,
            inp.chat_id,
            inp.user_id,
            inp.transport,
            spec.name,
            # A stateless turn stops with its client, unless a key makes it resumable.
            cancel_when_alone=(inp.chat_id is None and inp.key is None)
            or producer.settings.on_disconnect == "cancel",
            prompt_tokens=prompt_tokens,
        )
        self.parts = self.live.parts  # the watcher checkpoints it
        self.chunks = 0
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.final: Final | None = None
        self._stream: AsyncIterator[Chunk] | None = None
        self._insert: asyncio.Future[None] | BaseException | None = None
        self._opening = opening  # its upstream, asked beside its admission (``_open_early``)
        self._stage_deadline = 0.0  # loop time: the first token's deadline, then the answer's

    def admitted(self) -> Reservation | None:
        """The reservation that admitted the turn, once (its usage is for the headers only)."""
        reservation, self._admitted = self._admitted, None
        return reservation

    def opening(self) -> Ahead | None:
        """The upstream asked beside the admission, once (taken by ``_open``, or discarded)."""
        opening, self._opening = self._opening, None
        return opening

    def _log(self, level: str, event: str, **fields: Any) -> None:
        inp = self.inp
        getattr(log, level)(
            event,
            stream_id=self.message_id,
            message_id=self.message_id,
            chat_id=inp.chat_id,
            user_id=inp.user_id,
            model=self.spec.name,
            transport=inp.transport,
            **fields,
        )

    # ------------------------------------------------------------------ launch
    async def launch(self, text: str, seq: int, now: datetime) -> None:
        """Start the turn's own task and wait until its upstream has answered, so a refusal
        before the first token is still an ordinary error of the request, and until its
        records exist, so no client learns the turn (its ``started`` event, its id) before a
        cancel, a resume or feedback on any replica can find it (the turn reads the upstream
        meanwhile). From here on the turn belongs to the registry: a client that leaves does
        not stop it (unless it is a stateless API turn, or ON_DISCONNECT=cancel)."""
        self.seq, self.text = seq, text
        self.day = now.date().isoformat()
        registry = self.p.registry
        registry.add(self.live)
        self._log(
            "info", "stream.started", prompt_tokens=self.prompt_tokens, max_tokens=self.max_tokens
        )
        opened: asyncio.Future[ServiceError | None] = asyncio.get_running_loop().create_future()
        registry.run(self.live, self._run(now, opened))
        try:
            refused: BaseException | None = await asyncio.shield(opened)
            if refused is None:
                refused = await self._insert_finished()
                if refused is None and self.inp.chat_id is not None:
                    registry.written.append(self.live)  # its chat looked at once more
        except asyncio.CancelledError:
            if self.live.cancel_when_alone:
                self.live.cancel("client_disconnect")
            raise
        if refused is not None:
            raise refused

    async def _run(self, now: datetime, opened: asyncio.Future[ServiceError | None]) -> None:
        """The turn's task: persist and open (at the same time), read the upstream to its end
        (or until stopped) into the live stream, finalize, and hand the final to the followers.
        One frame for all of it while reading: thousands of these run at once."""
        try:
            refused = await self._begin(now)
        except BaseException:  # a cancel that was not ours (the loop is closing): finalized
            opened.set_result(_stop_error("shutdown"))
            raise
        opened.set_result(refused)
        del opened, now  # a live turn keeps little
        if self.inp.key is not None:  # not waited for: the answer does not wait for MongoDB
            self.p.registry.track(asyncio.ensure_future(self._settle_claim(refused is None)))
        if refused is not None:
            return
        live = self.live
        status, reason, error = Status.COMPLETE, "finished", None
        stream = self._stream
        assert stream is not None
        loop = asyncio.get_running_loop()
        try:
            try:
                while live.reason is None:
                    live.reading = True
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        break
                    except Drained as drained:  # what was read ahead is out: the upstream's own
                        stream = self._stream = drained.stream
                        continue
                    except (ServiceError, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # a provider's bug must not escape the turn
                        self._log("error", "stream.upstream_unreadable", exc_info=exc)
                        raise UpstreamError(
                            "upstream_bad_response", "the upstream's answer could not be read"
                        ) from exc
                    finally:
                        live.reading = False
                    self._active(loop)
                    if chunk.text or chunk.frame is not None:
                        if not self.chunks:
                            await self._records_written()
                            self._first_token(loop)
                        if chunk.frame is None:
                            live.append(chunk.text)
                        else:
                            live.mark(chunk.frame, chunk.text)
                        self.chunks += chunk.frames
                        if live.length > MAX_ANSWER_CHARS or _too_many(live.marks):
                            raise UpstreamError(
                                "upstream_bad_response",
                                "the upstream sent a longer answer than the service keeps",
                            )
                    if chunk.meta is not None:
                        live.meta = chunk.meta
                    if chunk.usage is not None:
                        self.usage = chunk.usage
                    if chunk.finish_reason is not None:
                        self.finish_reason = chunk.finish_reason
                        live.finish_seen = True
                    if not chunk.more:  # the last of what one network read brought
                        await live.publish()
                    del chunk  # not kept while the next one is awaited
            finally:
                await close_stream(stream)
            if live.reason is not None:
                status, reason, error = _stopped(live.reason)
        except ServiceError as exc:  # the upstream failed, or MongoDB did (the records' insert)
            status, reason, error = Status.FAILED, _reason_of(exc), exc
        except asyncio.CancelledError:
            if not _absorb_cancel(live):  # not ours: the loop is closing; finalize, then go
                live.end(await self._finalize_shielded(Status.CANCELLED, live.reason or "shutdown"))
                raise
            status, reason, error = _stopped(live.reason or "shutdown")
        # A failed insert is its request's error (``launch``): a refusal, billed nothing.
        unwritten = error is not None and error is self._insert
        live.end(await self._finalize_shielded(status, reason, error, billable=not unwritten))

    async def _settle_claim(self, admitted: bool) -> None:
        """A retry with the same key follows this turn from now on, once its records exist (a
        retry on another replica finds it), or (refused before it streamed, its records not
        written) claims the key afresh. A failure leaves the claim starting: retries wait for
        it, then answer 409, until it is a minute old; then a retry finds this turn's records
        and follows it (``Admissions.admit``)."""
        store = self.p.store
        if admitted and await self._insert_finished() is not None:
            admitted = False  # the request was refused (503): its retry is a send of its own
        try:
            if admitted:
                await store.admit_claim(self.message_id)
            else:
                await store.release_claim(self.message_id)
        except Exception as exc:  # noqa: BLE001 - logged; the turn goes on regardless
            self._log("warning", "stream.claim_not_settled", admitted=admitted, error=repr(exc))

    async def _begin(self, now: datetime) -> ServiceError | None:
        """Persist the records and open the upstream at the same time: the insert's round trip
        hides behind the upstream's (an insert shared with the turns starting meanwhile,
        ``RecordInserts``). The request (``launch``) and the first delta wait for the insert
        (``_records_written`` raises if it failed), and so does finalization: no client learns
        the turn, and no update reaches the records, before they exist. A failure to open ends
        the turn here (billed nothing) and is returned, to be the request's error."""
        live = self.live
        self._insert = self.p.inserts.insert(self._records(self.text, self.seq, now))
        try:
            try:
                await self._open()
            finally:
                if self._stream is None:
                    await self._insert_finished()
        except ServiceError as exc:
            live.end(
                await self._finalize_shielded(Status.FAILED, _reason_of(exc), exc, billable=False)
            )
            return exc
        except Exception as exc:  # noqa: BLE001 - a provider's bug must not escape the turn
            # (taken for the loop's shutdown, it left the record streaming and its grant held)
            self._log("error", "stream.upstream_unreadable", exc_info=exc)
            err = UpstreamError("upstream_bad_response", "the upstream's answer could not be read")
            live.end(
                await self._finalize_shielded(Status.FAILED, "upstream_error", err, billable=False)
            )
            return err
        except asyncio.CancelledError:
            if not _absorb_cancel(live):
                live.end(
                    await self._finalize_shielded(Status.CANCELLED, "shutdown", billable=False)
                )
                raise
            status, reason, error = _stopped(live.reason or "shutdown")
            live.end(await self._finalize_shielded(status, reason, error, billable=False))
            return _stop_error(live.reason)
        return None

    async def _insert_finished(self) -> BaseException | None:
        """Wait for the records' insert, even through a cancellation; return its failure."""
        insert = self._insert
        if not isinstance(insert, asyncio.Future):
            return insert  # done before: None, or what it failed with
        if not insert.done():
            try:
                await asyncio.wait({insert})  # never cancels it, never raises its error
            except asyncio.CancelledError:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({insert})
                raise
        self._insert = failure = insert.exception()  # not the task: a live turn keeps little
        return failure

    async def _records_written(self) -> None:
        failure = await self._insert_finished()
        if failure is not None:
            raise failure

    def _records(self, text: str, seq: int, now: datetime) -> list[Doc]:
        common = {"chat_id": self.inp.chat_id, "user_id": self.inp.user_id, "created_at": now}
        assistant = {
            **common,
            "_id": self.message_id,
            "seq": seq + 1 if self.inp.chat_id else 0,
            "role": "assistant",
            "content": "",
            "status": Status.STREAMING,
            "model": self.spec.name,
            "transport": self.inp.transport,
            "period": self.period,
            "reservation": self.grant,
            **({"lease": self.lease_id} if self.lease_id else {}),
            **self._billing(),
            "prompt_tokens": self.prompt_tokens,
            "encoding": self.spec.encoding,
            "alive_at": now,
            "checkpoint_at": now,
            "replica": self.p.registry.replica_id,
        }
        if self.inp.chat_id is None:
            assistant["seq"] = None
            return [assistant]
        user = {**common, "_id": str(uuid.uuid4()), "seq": seq, **input_record(self.inp, text)}
        if self.inp.branch is not None:
            return branches.shape(self.inp.branch, user, assistant)
        return [user, assistant]

    async def _open(self) -> None:
        live = self.live
        loop = asyncio.get_running_loop()
        self._stage_deadline = loop.time() + self.p.settings.upstream_first_token_timeout_s
        self._active(loop)
        early = self.opening()
        live.reading = True
        try:
            if early is not None:  # asked beside the admission (``TurnProducer._open_early``)
                self._stream = await early.take()
            else:
                self._stream = await self.provider.open(
                    CompletionRequest(
                        model=self.spec.upstream,
                        messages=self.messages,
                        max_tokens=self.max_tokens,
                        temperature=self.inp.temperature,
                        top_p=self.inp.top_p,
                        stop=self.inp.stop,
                        options=self.inp.options or {},
                    )
                )
            # The upstream has the prompt: a live turn does not keep it (nor the request's).
            self.messages = []
            if self.inp.messages is not None or self.inp.options:
                self.inp = dataclasses.replace(self.inp, messages=None, options=None)
        except asyncio.CancelledError:
            if early is not None:  # it may have opened just as the turn was cancelled
                early.drop(self.p.registry.track)
            if not _absorb_cancel(live):
                raise
            raise _stop_error(live.reason) from None
        finally:
            live.reading = False

    def _active(self, loop: asyncio.AbstractEventLoop) -> None:
        """The upstream was heard from. Until the first token the watcher stops the turn
        (``timeout``) at ``UPSTREAM_FIRST_TOKEN_TIMEOUT_S`` (a model may think in silence);
        after it, at ``UPSTREAM_TOTAL_TIMEOUT_S`` or after ``UPSTREAM_IDLE_TIMEOUT_S`` without a
        chunk, whichever comes first. A float per chunk, where a socket read timeout would cost
        a timer per network read."""
        if self.chunks:  # answering: the idle timeout applies
            idle = loop.time() + self.p.settings.upstream_idle_timeout_s
            self.live.deadline = min(self._stage_deadline, idle)
        else:
            self.live.deadline = self._stage_deadline

    def _first_token(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stage_deadline = loop.time() + self.p.settings.upstream_total_timeout_s
        idle = loop.time() + self.p.settings.upstream_idle_timeout_s
        self.live.deadline = min(self._stage_deadline, idle)
        ttft = time.perf_counter() - self.started
        TTFT.labels(self.spec.name).observe(ttft)
        self._log("info", "stream.first_token", ttft_ms=round(ttft * 1000, 2))

    # ------------------------------------------------------------------ finalize
    async def _finalize_shielded(
        self,
        status: Status,
        reason: str,
        error: ServiceError | None = None,
        *,
        billable: bool = True,
    ) -> Final:
        if self.final is not None:
            return self.final
        task = asyncio.ensure_future(self._finalize(status, reason, error, billable))
        self.p.registry.track(task)
        return await asyncio.shield(task)

    async def _finalize(
        self, status: Status, reason: str, error: ServiceError | None, billable: bool
    ) -> Final:
        await self._insert_finished()  # the final write must not overtake the first
        content = "".join(self.parts)
        try:
            prompt, completion, source = self._tokens(content, billable)
        except Exception as exc:  # noqa: BLE001 - a counting bug must not cost the final record
            self._log("error", "stream.count_failed", exc_info=exc)
            prompt, completion, source = self.prompt_tokens, estimate_tokens(content), "estimate"
        usage = self.usage if source == "upstream" or billable else None
        cached = usage.cached_tokens if usage is not None else 0
        reasoning = usage.reasoning_tokens if usage is not None else 0
        written, written_1h = cache_writes(usage.details if usage is not None else None)
        price, key = self.spec.price, self.inp.api_key
        cost = (
            cost_nanos(
                price,
                prompt=prompt,
                completion=completion,
                cached=cached,
                reasoning=reasoning,
                written=written,
                written_1h=written_1h,
            )
            if price is not None
            else None
        )
        ended_at = utcnow()
        write = FinalWrite(
            self.inp.user_id,
            self.period,
            self.message_id,
            grant=self.grant,
            billed=self.p.budget.billed(prompt, completion, cost or 0),
            lease_id=self.lease_id,
            cost=cost or 0,
            rollup=Rollup(
                day=self.day,
                user_id=self.inp.user_id,
                model=self.spec.name,
                key_id=key.key_id if key is not None else None,
                outcome=OUTCOME[status],
                prompt=prompt,
                completion=completion,
                cached=cached,
                reasoning=reasoning,
                cost=cost or 0,
            ),
            key_account=key_account(key.key_id) if self.key_grant is not None and key else None,
            fields={
                **self._extras(),
                **({"meta": self.live.meta} if self.live.meta else {}),
                "content": content,
                **final_fields(
                    status,
                    reason,
                    finish_reason=self.finish_reason,
                    error=(error.code, error.message) if error else None,
                    tokens=tokens_doc(
                        prompt,
                        completion,
                        source,
                        cached=cached,
                        reasoning=reasoning,
                        details=usage.details if usage is not None else None,
                    ),
                    cost=cost,
                    completed_at=ended_at,
                ),
            },
        )
        limit = remaining = 0
        leases = self.p.leases
        if write.lease_id is not None and leases is not None:  # its grant is free again
            leases.ended(self.inp.user_id, self.period, grant=write.grant, billed=write.billed)
            write.landed = leases.settling(self.inp.user_id, self.period)
        elsewhere: Doc | None = None
        try:
            finished = await self.p.commits.apply(write)
            self._remember_context(content, status, finished)
            if not finished and self._insert is None:  # its record exists, ended by another
                elsewhere = await self._ended_record()
        except ServiceError as exc:
            # MongoDB is away: the replica retries this write once it answers again.
            self._log("warning", "stream.finalize_deferred", code=exc.code, error=error_text(exc))
            self.p.registry.pending.add(write)
            self._remember_context(content, status, False)
        finally:
            self.p.registry.remove(self.message_id)
            if self.message_id not in self.p.registry.pending:  # written, or the reaper's
                write.let_go()
        if elsewhere is not None:
            return self._ended_elsewhere(elsewhere, write.usage, status)
        if write.usage is not None:
            limit = int(write.usage.get("limit", self.p.budget.default_limit))
            spent = int(write.usage["used"]) + int(write.usage["reserved"])
            if write.lease_id is not None and leases is not None:  # the lease's room is yours
                spent -= leases.free(self.inp.user_id, self.period)
                leases.observe(self.inp.user_id, self.period, write.usage)
            remaining = max(0, limit - spent)
        self.final = Final(
            message_id=self.message_id,
            status=status,
            reason=reason,
            finish_reason=finish_reason_of(status, self.finish_reason),
            prompt_tokens=prompt,
            completion_tokens=completion,
            token_source=source,
            budget_limit=limit,
            budget_remaining=remaining,
            error_code=error.code if error else None,
            error_message=error.message if error else None,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            usage_details=usage.details if usage is not None else None,
            cost=cost,
            currency=self.p.budget.currency,
            budget_unit=self.p.budget.label,
        )
        duration = time.perf_counter() - self.started
        self._count(OUTCOME[status], reason, error, prompt, completion, source, duration)
        if cost:
            COST.labels(self.spec.name).inc(cost / NANOS)
        self._log(
            "info",
            "stream.ended",
            outcome=OUTCOME[status],
            reason=reason,
            error_code=error.code if error else None,
            tokens={"prompt": prompt, "completion": completion, "total": prompt + completion},
            token_source=source,
            chunks=self.chunks,
            duration_ms=round(duration * 1000, 2),
        )
        return self.final

    async def _ended_record(self) -> Doc | None:
        """The turn's record, when something else ended it (None: it could not be read)."""
        try:
            doc = await self.p.store.get_message(self.message_id)
        except ServiceError:
            return None
        return doc if doc is not None and doc.get("status") != Status.STREAMING else None

    def _ended_elsewhere(self, doc: Doc, usage: Doc | None, status: Status) -> Final:
        """The final write found the record already ended: another replica's reaper took this
        one for dead (MongoDB out of its reach for STALE_STREAM_S while the upstream went on)
        and settled the turn as its last checkpoint held. The record, and the bill that came
        with it, is the answer: the followers get its end at its length (those sent more get
        ``unsaved``, as from a mirror), not an end no record or bill agrees with. The reaper
        logged and counted the turn."""
        kept = doc.get("content") or ""
        self._log(
            "warning",
            "stream.ended_elsewhere",
            stored=doc["status"],
            outcome=OUTCOME[status],
            kept=len(kept),
            produced=self.live.length,
        )
        self.live.cut(len(kept))
        if self.lease_id is not None and self.p.leases is not None:  # given back too, likely
            self.p.leases.observe(self.inp.user_id, self.period, usage)
        self.final = final_of(doc, usage, self.p.budget)
        return self.final

    def _billing(self) -> Doc:
        """What the record keeps for billing: the API key that sent it (and what it reserved on
        the key's own month), and the price in force (the reaper prices a dead turn by it)."""
        doc: Doc = {}
        if self.inp.api_key is not None:
            doc["key_id"] = self.inp.api_key.key_id
            if self.key_grant is not None:
                doc["key_grant"] = self.key_grant
        if self.spec.price is not None:
            doc["price"] = self.spec.price.record()
            doc["currency"] = self.p.budget.currency
        return doc

    def _extras(self) -> dict[str, Any]:
        """What the record keeps of the answer besides its text: choice 0's reasoning, tool
        calls and refusal, put together from the live stream's marks."""
        assembly = _assembled(self.live.marks)
        return assembly.extras() if assembly is not None else {}

    def _remember_context(self, content: str, status: Status, finished: bool) -> None:
        """The chat's messages as this turn leaves them, for the chat's next turn here."""
        chat_id, limit = self.inp.chat_id, self.p.settings.context_messages
        if chat_id is None or not limit:
            return
        cache = self.p.context_cache
        # A regenerate's or an edit's view has gaps (the records it superseded): read next time.
        branched = self.inp.branch is not None
        if not finished or branched or not _complete(self.history, self.seq, limit):
            cache.drop(chat_id)  # not (only) this turn's records, or a view that is not exact
            return
        assert self.history is not None
        user = {"seq": self.seq, **input_record(self.inp, self.text)}
        answer = {
            "seq": self.seq + 1,
            "role": "assistant",
            "content": content,
            "status": status,
            **self._extras(),
        }
        cache.put(chat_id, self.seq + 2, [*self.history, user, answer][-limit:])

    def _count(
        self,
        outcome: str,
        reason: str,
        error: ServiceError | None,
        prompt: int,
        completion: int,
        source: str,
        duration: float,
    ) -> None:
        transport = self.inp.transport
        TURNS.labels(transport, outcome, reason).inc()
        DURATION.labels(transport, outcome).observe(duration)
        if prompt:
            TOKENS.labels(self.spec.name, "prompt", source).inc(prompt)
        if completion:
            TOKENS.labels(self.spec.name, "completion", source).inc(completion)
        if isinstance(error, UpstreamError):
            stage = "stream" if self._stream is not None else "connect"
            UPSTREAM_ERRORS.labels(self.provider.name, error.code, stage).inc()

    def _tokens(self, content: str, billable: bool) -> tuple[int, int, str]:
        usage = self.usage
        if usage is not None and not usage.partial:
            return usage.prompt_tokens, usage.completion_tokens, "upstream"
        if not billable:
            return 0, 0, self.counter.source
        count = self.counter.count
        completion = count(content) + sum(map(count, self._generated()))
        # The prompt as the upstream reported it when it said so before the answer's bill.
        prompt = usage.prompt_tokens if usage is not None else self.prompt_tokens
        return prompt, completion, self.counter.source

    def _generated(self) -> list[str]:
        """What the model wrote besides choice 0's text, from the live stream's marks:
        reasoning, tool calls, a refusal, the other choices of ``n`` (output as much as the
        text, so billed as such when the upstream reports no usage)."""
        assembly = _assembled(self.live.marks)
        return assembly.generated() if assembly is not None else []


# ---------------------------------------------------------------------- helpers
def _assembled(marks: list[Any] | None) -> Assembly | None:
    """The choices a live stream's marks (its steps that are more than text) make; None when
    it has none."""
    if not marks:
        return None
    assembly = Assembly()
    for _, _, frame in marks:
        assembly.frame(frame)
    return assembly


def input_record(inp: TurnInput, text: str) -> Doc:
    """The record of a stored chat turn's new message: the user's text, or tool results."""
    if inp.results is not None:
        return {"role": "tool", "content": "", "results": inp.results, "status": Status.COMPLETE}
    return {"role": "user", "content": text, "status": Status.COMPLETE}


def _honoured(provider: Provider, spec: ModelSpec, request: CompletionRequest) -> None:
    """Refuse, before anything is reserved, what the model's provider cannot honour."""
    param = provider.unsupported(request)
    if param is not None:
        raise BadRequest(
            f"'{param}' is not supported with model '{spec.name}' (provider {spec.provider})",
            code="unsupported_parameter",
            details={"param": param, "model": spec.name, "provider": spec.provider},
        )


def _complete(history: list[Doc] | None, seq: int, limit: int) -> bool:
    """Whether ``history`` is exactly the chat's last messages before ``seq``: every seq below it
    present (up to ``limit`` of them, or from the chat's first). A concurrent turn that took its
    seqs first may not have written its records yet when this turn read the chat; such a view
    must not be cached."""
    if history is None:
        return False
    first = seq - len(history)
    if len(history) < limit and first != 0:
        return False
    return all(d["seq"] == first + i for i, d in enumerate(history))


def _choices(options: dict[str, Any] | None) -> int:
    n = (options or {}).get("n")
    return n if isinstance(n, int) and n > 1 else 1


def _too_many(marks: list[Any] | None) -> bool:
    return marks is not None and len(marks) > MAX_MARKS


def _absorb_cancel(live: LiveStream) -> bool:
    """A cancel we asked for (reason set) is handled; a foreign one (disconnect) propagates."""
    task = asyncio.current_task()
    if live.reason is None or task is None or task.cancelling() > 1:
        return False
    task.uncancel()
    return True


def _stopped(reason: str) -> tuple[Status, str, ServiceError | None]:
    if reason == "timeout":
        return Status.FAILED, reason, UpstreamError("upstream_timeout", "the model took too long")
    if reason == "shutdown":
        return Status.CANCELLED, reason, _stop_error(reason)
    return Status.CANCELLED, reason, None


def _stop_error(reason: str | None) -> ServiceError:
    if reason == "timeout":
        return UpstreamError("upstream_timeout", "the model did not answer in time")
    if reason == "shutdown":
        return ServiceUnavailable("the server is shutting down; retry", code="shutting_down")
    return Conflict("the turn was cancelled before it started", code="cancelled")


def _reason_of(exc: ServiceError) -> str:
    if exc.code == "upstream_timeout":
        return "timeout"
    if isinstance(exc, StoreUnavailable):
        return "database_error"  # the records could not be written
    return "upstream_error"

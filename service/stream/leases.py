"""Budget leases: a program's turns admitted from memory, the user's month never overspent.

A replica takes a **lease** on a user's month (one entry ``lease:<replica>`` in the usage
document's ``open``, in the same conditional update that admits any turn: ``Store.take_lease``):
tokens reserved for it, turn slots counted by the concurrency rule, requests taken from the
per-minute bucket. Its program turns (``/v1``, WebSocket) are then admitted in memory while the
lease has room (no MongoDB round trip before the upstream), and billed from it when they end
(``Store.settle_leased``: ``used`` grows, the lease shrinks, once per turn). A lease that runs
short is grown in one update (doubling with the turns it serves, at most half of what is left
beyond the turn that asks, so other replicas keep room); one whose turns have all ended for
``LEASE_IDLE_S`` is brought to what the user's next turn needs (``Store.shrink_lease`` gives the
rest back; a lease its last turn left short takes what that turn would lack, once, off any turn's
path), and is given back ``LEASE_KEEP_S`` after its last turn (``Store.release_lease``). A dead
replica's leases are released by the reaper, and its turns billed from their checkpoints.

What holds across replicas is what held before: every lease is taken within the user's limit,
so turns never spend more than the limit plus one turn's grant; a turn slot or a request is
counted when the lease takes it, so the concurrency and per-minute rules hold too (a slot
leased and not in use is not another replica's until the lease is given back: after
``LEASE_IDLE_S`` one slot, for at most ``LEASE_KEEP_S`` after its last turn). ``reserved`` in
the usage counts what leases hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from service.errors import BudgetExceeded, RateLimited, ServiceError, StoreUnavailable
from service.limits import Allowance, request_interval
from service.logs import error_text
from service.store import (
    Doc,
    LeaseRequest,
    Reservation,
    ReserveRequest,
    Store,
    allowance_of,
    utcnow,
)
from service.stream.ahead import Expected
from service.stream.groups import taken_or_given_back

log = structlog.get_logger("service.stream")

MAX_BATCH = 16  # the most turns' worth one growth of a lease asks for


@dataclass(slots=True)
class Lease:
    user_id: str
    period: str
    lease_id: str
    tokens: int = 0  # reserved for this replica (the entry's grant, as far as this replica knows)
    held: int = 0  # of which granted to its running turns
    turns: int = 0  # turn slots the lease holds
    running: int = 0  # turns admitted from it and not ended
    unsettled: int = 0  # turns ended whose settlement is not written yet (``settling``)
    requests: int = 0  # requests taken from the bucket and not used yet
    interval_ms: int = 0  # the bucket's interval when they were taken (0: no per-minute rule)
    doc: Doc = field(default_factory=dict)  # the usage as of the last take (for the headers)
    idle_since: float = 0.0
    last: ReserveRequest | None = None  # the latest turn's: what an idle lease keeps for the next
    topped: float = -1.0  # the idle spell (its ``idle_since``) whose shortfall was taken
    closing: bool = False  # being given back or shrunk: nothing is granted from memory
    shrink: Shrink | None = None  # a shrink whose answer was lost: asked again, as it was
    unreleased: bool = False  # a release whose answer was lost: closing until one answers
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def fits(self, req: ReserveRequest, *, full: bool = True) -> bool:
        """Whether the lease has room for one turn: its whole ``want`` (``full``), or at least
        its ``need`` (what is left, as a reservation would), a turn slot, a request."""
        free = self.tokens - self.held
        if self.closing or free < (req.want if full else req.need):
            return False
        if req.max_concurrent and self.running >= self.turns:
            return False
        return not (req.requests_per_minute and self.requests < 1)

    def admit(self, req: ReserveRequest, loop_now: float, *, full: bool = True) -> int:
        """A grant from memory for one turn (``fits``), or 0 when the lease has no room."""
        if not self.fits(req, full=full):
            return 0
        grant = min(req.want, self.tokens - self.held)
        self.last = req
        self.held += grant
        self.running += 1
        if req.requests_per_minute:
            self.requests -= 1
        self.idle_since = loop_now
        return grant


@dataclass(frozen=True, slots=True)
class Shrink:
    """What one shrink of a lease gives back, and its number (``Store.shrink_lease`` applies
    it once, however often it is asked)."""

    n: int
    tokens: int
    turns: int
    requests: int


# A growth of requests alone: the budget is not its rule (credit past any month's tokens).
NO_BUDGET = 2**62


class Leases:
    """This replica's leases, by (user, period)."""

    def __init__(
        self,
        store: Store,
        replica_id: str,
        *,
        idle_s: float,
        keep_s: float = 0.0,
        track: Callable[[asyncio.Task[Any]], None] | None = None,
    ) -> None:
        self.store = store
        self._background: set[asyncio.Task[Any]] = set()
        self._track = track or self._keep
        self._growths = itertools.count(1)
        self._shrinks = itertools.count(1)
        self.idle_s = idle_s
        self.keep_s = max(idle_s, keep_s)
        self.replica_id = replica_id
        self.lease_id = f"lease:{replica_id}"
        self._leases: dict[tuple[str, str], Lease] = {}
        self.expected = Expected()  # whose next growth this replica expects to go through

    def must_ask(self, req: ReserveRequest) -> bool:
        """Whether ``req``'s turn cannot be admitted from memory now (no lease, or no room):
        its admission asks MongoDB (a growth)."""
        lease = self._leases.get((req.user_id, req.period))
        return lease is None or not lease.fits(req)

    def __len__(self) -> int:
        return len(self._leases)

    def _lease_of(self, req: ReserveRequest) -> tuple[tuple[str, str], Lease]:
        """The user's lease on ``req``'s month here (a new, empty one when there is none)."""
        key = (req.user_id, req.period)
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = Lease(req.user_id, req.period, self.lease_id)
        return key, lease

    async def admit(self, req: ReserveRequest) -> Reservation:
        """Admit one turn: from the lease when it has room, else after growing it (one
        conditional update, which refuses with the same errors as a reservation)."""
        key, lease = self._lease_of(req)
        loop = asyncio.get_running_loop()
        grant = lease.admit(req, loop.time())
        if grant:
            return self._reservation(lease, req, grant)
        async with lease.lock:  # one growth at a time; the others wait for it, then fit
            if lease.closing and self._leases.get(key) is not lease:
                return await self.admit(req)  # given back while this turn waited: a new one
            if lease.unreleased:  # maybe given back: released first (503 if it cannot be)
                await self._release(key, lease)
                return await self.admit(req)
            grant = lease.admit(req, loop.time())
            if not grant:
                try:
                    await self._grow(lease, req)
                except BudgetExceeded as exc:  # the month has no more: what the lease has left
                    self.expected.refused(req.user_id)
                    grant = lease.admit(req, loop.time(), full=False)
                    if not grant:
                        _refused(exc, lease, req)
                        raise
                except RateLimited as exc:
                    self.expected.refused(req.user_id)
                    _refused(exc, lease, req)
                    raise
                grant = grant or lease.admit(req, loop.time(), full=False)
            if not grant:  # cannot happen: the growth held room for this turn
                raise StoreUnavailable("could not admit the turn from its lease")
            return self._reservation(lease, req, grant)

    async def _grow(self, lease: Lease, req: ReserveRequest) -> None:
        # Turn slots: doubling with the turns running (a slot held and not used is another
        # replica's to miss). Tokens: one turn's more than that, so the next turn of a client
        # that sends one at a time fits too. Requests are cheap to hold (unused ones are still
        # the user's, see ``_allowance``): a second's worth at a time.
        batch = min(MAX_BATCH, max(1, 2 * lease.running))
        requests = max(batch, req.requests_per_minute // 60)
        tokens = (batch + 1) * req.want  # at most half of what the month has left (the update)
        free = max(0, lease.tokens - lease.held)  # the turn needs only what the lease lacks
        # A rule whose room the lease already holds for this turn (a free slot, a request
        # taken) is not asked of the month again: only the tokens are short, and a growth
        # that asked one more slot was refused "too many turns at once" with a slot free.
        # What the growth counts on (that slot, that request, the free tokens credited) is set
        # aside for this turn while it runs: a turn admitted from memory meanwhile (no lock
        # for that) would otherwise take it, and this one find no room after all.
        rules = req
        slot = bool(req.max_concurrent and lease.running < lease.turns)
        request = bool(req.requests_per_minute and lease.requests >= 1)
        if slot:
            rules, batch = dataclasses.replace(rules, max_concurrent=0), 0
        if request:
            rules, requests = dataclasses.replace(rules, requests_per_minute=0), 0
        lease.held += free
        lease.running += slot
        lease.requests -= request
        try:
            await self._take(
                lease, rules, tokens=tokens, turns=batch, requests=requests, credit=free
            )
        finally:  # the turn takes them itself once the growth has its answer (``admit``)
            lease.held -= free
            lease.running -= slot
            lease.requests += request

    async def _take(
        self,
        lease: Lease,
        req: ReserveRequest,
        *,
        tokens: int,
        turns: int,
        requests: int,
        credit: int = 0,
    ) -> None:
        """Grow the lease by what fits of ``tokens``, ``turns``, ``requests``, where ``req``'s
        rules hold for one more turn (``Store.take_lease``; refused with their errors)."""
        growth = next(self._growths)
        take = asyncio.ensure_future(
            self.store.take_lease(
                LeaseRequest(
                    turn=req,
                    lease_id=self.lease_id,
                    replica=self.replica_id,
                    want_tokens=tokens,
                    want_turns=turns,
                    want_requests=requests,
                    growth=growth,
                    shrunk=lease.shrink.n if lease.shrink else 0,
                    credit=credit,
                )
            )
        )
        # Its command runs on if the turn's client leaves: what it takes, undone.
        doc = await taken_or_given_back(take, functools.partial(self._withdraw, lease, req, growth))
        entry = next(e for e in doc["open"] if e["mid"] == self.lease_id)
        took = entry["took"]
        lease.tokens += int(took["tokens"])
        lease.turns += int(took["turns"])
        lease.requests += int(took["requests"])
        remaining = allowance_of(doc, req.default_limit, req.now).remaining_tokens
        self.expected.admitted(req, remaining)
        if rpm := req.requests_per_minute:
            lease.interval_ms = request_interval(rpm) // timedelta(milliseconds=1)
        lease.doc = doc

    def _withdraw(self, lease: Lease, req: ReserveRequest, growth: int) -> None:
        """A growth whose answer did not come may have been taken all the same, beyond what
        this replica knows the lease holds: undo it now (``Store.undo_growth``, nothing when it
        was not taken), in the background, so that the turn's 503 does not wait; otherwise it
        would be held, unused, until the lease is given back."""
        rpm = req.requests_per_minute
        interval_ms = request_interval(rpm) // timedelta(milliseconds=1) if rpm else 0

        async def withdraw() -> None:
            with contextlib.suppress(ServiceError):
                await self.store.undo_growth(
                    lease.user_id, lease.period, lease.lease_id, growth, interval_ms=interval_ms
                )

        self._track(asyncio.ensure_future(withdraw()))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _reservation(self, lease: Lease, req: ReserveRequest, grant: int) -> Reservation:
        return Reservation(
            grant=grant, allowance=self._allowance(lease, req), lease_id=lease.lease_id
        )

    @staticmethod
    def _allowance(lease: Lease, req: ReserveRequest) -> Allowance:
        return _theirs(lease, allowance_of(lease.doc, req.default_limit, req.now), req)

    def observe(self, user_id: str, period: str, doc: Doc | None) -> None:
        """The usage as a turn's final write left it: the freshest for the next headers. A
        lease the month no longer holds was given back by the reaper (it took this replica for
        dead: MongoDB out of its reach for STALE_STREAM_S): granting from it would hold nothing
        any replica sees. Once none of its turns runs and no growth is on its way, it is
        forgotten (as ``_shrink`` does) and the user's next turn here takes a new one."""
        key = (user_id, period)
        lease = self._leases.get(key)
        if lease is None or not doc:
            return
        if any(e.get("mid") == lease.lease_id for e in doc.get("open") or ()):
            lease.doc = doc
        elif not lease.running and not lease.closing and not lease.lock.locked():
            del self._leases[key]

    def ended(self, user_id: str, period: str, *, grant: int, billed: int) -> None:
        """A turn admitted from the lease ended: its grant is free again, less what it spent
        (which its final write moves from the lease to ``used``)."""
        lease = self._leases.get((user_id, period))
        if lease is None:
            return
        lease.held -= grant
        lease.tokens -= min(billed, grant)  # past its grant was never the lease's
        lease.running -= 1
        lease.idle_since = asyncio.get_running_loop().time()

    def settling(self, user_id: str, period: str) -> Callable[[], None]:
        """The settlement of a turn of the lease is on its way (its final write): what this
        returns is to be called once it is written (or given up to the reaper). Until then the
        lease is not idle, neither shrunk nor given back: a settlement written after the lease
        was given back (one waiting in the queue while MongoDB was away, say) would shrink the
        next lease of the same entry id, below what this replica counts."""
        lease = self._leases.get((user_id, period))
        if lease is None:
            return _nothing
        lease.unsettled += 1
        return functools.partial(_settled, lease)

    def unadmit(self, user_id: str, period: str, *, grant: int, request: bool) -> None:
        """A turn admitted from the lease that will not run: its grant, its turn slot and (if
        it took one) its request are the lease's again, as if it had never been admitted."""
        lease = self._leases.get((user_id, period))
        if lease is None:
            return
        lease.held -= grant
        lease.running -= 1
        lease.requests += int(request)
        lease.idle_since = asyncio.get_running_loop().time()

    async def take_request(self, req: ReserveRequest) -> None:
        """One request from the user's per-minute bucket for a call that is not a turn (a
        prompt counted by its vendor, on the operator's key): from the lease when it holds
        one, else by a growth of requests alone (429 ``rate_limited`` when the bucket is
        empty). No token, no turn slot: the budget and the turns at once are not its rules."""
        key, lease = self._lease_of(req)
        if lease.requests >= 1 and not lease.closing:
            lease.requests -= 1
            return
        async with lease.lock:
            if lease.closing and self._leases.get(key) is not lease:
                return await self.take_request(req)  # given back meanwhile: a new lease
            if lease.unreleased:  # maybe given back: released first (503 if it cannot be)
                await self._release(key, lease)
                return await self.take_request(req)
            if lease.requests < 1:
                rules = dataclasses.replace(req, want=0, need=0, max_concurrent=0)
                requests = max(1, req.requests_per_minute // 60)
                try:
                    await self._take(
                        lease, rules, tokens=0, turns=0, requests=requests, credit=NO_BUDGET
                    )
                except RateLimited as exc:
                    _refused(exc, lease, req)
                    raise
            if lease.requests < 1:  # cannot happen: the growth held room for one
                raise StoreUnavailable("could not take a request from the bucket")
            lease.requests -= 1
            lease.idle_since = asyncio.get_running_loop().time()

    def free(self, user_id: str, period: str) -> int:
        """Tokens this replica's lease holds for the user's next turns (no turn's grant)."""
        lease = self._leases.get((user_id, period))
        return max(0, lease.tokens - lease.held) if lease is not None else 0

    async def release_idle(self, loop_now: float, *, everything: bool = False) -> int:
        """Bring the leases with no running turn for ``idle_s`` to one turn's worth (shrunk,
        or topped up once), give them back after ``keep_s`` (``everything``: every lease with
        no running turn, at shutdown), and those whose release's answer was lost at once; how
        many were given back."""
        released = 0
        for key, lease in list(self._leases.items()):
            if self._leases.get(key) is not lease:  # forgotten during this pass (a turn gave
                continue  # it back, ``admit``): its entry id may be a new lease's now
            # At shutdown a settlement still queued is no matter: no lease follows this one.
            unsettled = lease.unsettled and not everything
            idle = not (lease.running or unsettled or lease.lock.locked())
            idle_for = loop_now - lease.idle_since
            due = lease.unreleased or everything
            if not idle or not (due or idle_for >= self.idle_s):
                continue
            if lease.shrink is not None and not everything:  # (at shutdown: given back whole)
                await self._shrink(key, lease)  # requests go back by it, once); the rest, at
                continue  # the next round
            if not due and idle_for < self.keep_s:
                await self._shrink(key, lease)
                if self._leases.get(key) is lease and lease.topped != lease.idle_since:
                    lease.topped = lease.idle_since  # once per idle spell, taken or refused
                    await self._top_up(lease)
                continue
            # A turn arriving meanwhile waits for the release (the lock), then takes a new
            # lease: none may be granted from, or grow, an entry that is being pulled.
            lease.closing = True
            async with lease.lock:
                try:
                    await self._release(key, lease)
                except ServiceError as exc:  # given back at a later round
                    log.warning(
                        "stream.lease_release_failed",
                        user_id=lease.user_id,
                        code=exc.code,
                        error=error_text(exc),
                    )
                    continue
            released += 1
        return released

    async def _release(self, key: tuple[str, str], lease: Lease) -> None:
        """Give ``lease`` back (its lock held, ``closing``) and forget it. One whose answer was
        lost (an outage, a deadline: ``StoreUnavailable``) may have been given back all the
        same: it stays closing (``unreleased``), nothing granted from it nor grown, until a
        release answers (asked again, it finds nothing to give back when the first was
        applied); granting from it held room nobody sees held, and a growth made its entry
        anew below what this replica counts. One MongoDB refused (not applied) is kept, open."""
        try:
            await self.store.release_lease(
                lease.user_id,
                lease.period,
                lease.lease_id,
                lease.requests,
                lease.interval_ms,
            )
        except (ServiceError, asyncio.CancelledError):  # perhaps applied all the same
            lease.unreleased = True
            raise
        except BaseException:  # refused: kept (a turn waiting on the lock would otherwise
            lease.closing = lease.unreleased  # wait for itself, for ever), open unless an
            raise  # earlier release may have been applied
        del self._leases[key]

    async def _shrink(self, key: tuple[str, str], lease: Lease) -> None:
        """Keep what the user's next turn needs (its latest want, a turn slot, a request) and
        give the rest back: a user's next turn within ``keep_s`` is still admitted from memory,
        while other replicas lose at most that much room to an idle lease.

        What a shrink gives back is no longer granted from once it is asked, whether its answer
        comes or not: MongoDB may have applied it. One whose answer did not come is asked again,
        as it was, before any other (``Store.shrink_lease`` applies it once): asked anew from
        what the lease then holds, it gave the same back twice, the entry and the month's
        ``reserved`` below what they hold."""
        lease.closing = True  # turns arriving meanwhile wait for the lock, then fit
        async with lease.lock:
            shrink = lease.shrink
            if shrink is None:
                shrink = Shrink(
                    next(self._shrinks),
                    tokens=max(0, lease.tokens - (lease.last.want if lease.last else 0)),
                    turns=max(0, lease.turns - 1),
                    requests=max(0, lease.requests - 1),
                )
                if not (shrink.tokens or shrink.turns or shrink.requests):
                    lease.closing = False
                    return
                lease.tokens -= shrink.tokens
                lease.turns -= shrink.turns
                lease.requests -= shrink.requests
                lease.shrink = shrink
            try:
                doc = await self.store.shrink_lease(
                    lease.user_id,
                    lease.period,
                    lease.lease_id,
                    shrink=shrink.n,
                    tokens=shrink.tokens,
                    turns=shrink.turns,
                    requests=shrink.requests,
                    interval_ms=lease.interval_ms,
                )
            except ServiceError as exc:  # asked again at a later round
                lease.closing = False
                log.warning(
                    "stream.lease_shrink_failed",
                    user_id=lease.user_id,
                    code=exc.code,
                    error=error_text(exc),
                )
                return
            except BaseException:
                lease.closing = False
                raise
            lease.shrink = None
            if doc is None:  # released meanwhile (the reaper): nothing is held here any more,
                del self._leases[key]  # and a turn waiting on the lock takes a new lease
                return
            lease.closing = False
            lease.doc = doc

    async def _top_up(self, lease: Lease) -> None:
        """Take what the user's next turn would lack (its latest want, a request), so that it
        too is admitted from memory: a user whose turns come further apart than LEASE_IDLE_S
        spends the lease's last turn's worth, and without this every other turn would wait for
        a take. The turn's rules hold for this take as for its own (the budget, the requests
        per minute); no turn slot is added (the lease keeps one). Refused (the month has no
        more) or MongoDB away: the lease stays as it is, and the next turn asks for itself."""
        async with lease.lock:  # a turn arriving meanwhile waits, then fits
            last = lease.last
            if last is None or lease.closing:
                return
            if self._leases.get((lease.user_id, lease.period)) is not lease:
                return
            tokens = max(0, last.want - (lease.tokens - lease.held))
            request = 1 if last.requests_per_minute and lease.requests < 1 else 0
            if not (tokens or request):
                return
            turn = dataclasses.replace(
                last,
                want=tokens,
                need=tokens,
                now=utcnow(),
                requests_per_minute=last.requests_per_minute if request else 0,
                max_concurrent=0,  # no slot is taken: the rule is not this take's
            )
            try:
                await self._take(lease, turn, tokens=tokens, turns=0, requests=request)
            except ServiceError as exc:
                log.info("stream.lease_top_up_refused", user_id=lease.user_id, code=exc.code)


def _nothing() -> None:
    pass


def _settled(lease: Lease) -> None:
    lease.unsettled -= 1


def _theirs(lease: Lease, seen: Allowance, req: ReserveRequest) -> Allowance:
    """The usage as the user sees it: what the lease holds beyond its running turns' grants,
    and the requests it took and did not use yet, are still theirs to spend."""
    free = max(0, lease.tokens - lease.held)
    due = seen.requests_due
    if due is not None and req.requests_per_minute:
        due -= lease.requests * request_interval(req.requests_per_minute)
    return dataclasses.replace(seen, reserved=max(0, seen.reserved - free), requests_due=due)


def _refused(exc: RateLimited | BudgetExceeded, lease: Lease, req: ReserveRequest) -> None:
    if exc.allowance is not None:
        exc.allowance = _theirs(lease, exc.allowance, req)

"""Operators' routes, ``/api/admin/...``: a user's monthly limit (read, set, reset the month's
usage), users by usage, and usage analytics from the daily rollup (JSON or CSV). The routes over
users' API keys are ``service/api/admin_keys.py``.

Every route answers 403 ``forbidden`` unless the caller is an administrator
(``Principal.admin``: the token's admin role, or an admin API key). Actions that change a user's
budget are logged (``admin.limit_set``, ``admin.period_reset``) with who did it, the user and the
values before and after.

A limit set here holds from the next admission on every replica: it is written on the month's
usage document, which every admission reads in its conditional update. A replica's lease taken
before the change (``service/stream/leases.py``) may still admit turns from what it holds, until
it is spent or given back (``LEASE_KEEP_S`` after the user's last program turn there); the SSE
page's turns have no lease and see it at once (docs/architecture.md, "Budget leases").
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service import analytics
from service.costs import Budget, format_cost
from service.errors import BadRequest, Forbidden
from service.http import json_response, no_query, read_json, validate
from service.keys import PRINCIPAL, SETTINGS, STORE
from service.settings import Settings
from service.store import KEY_ACCOUNT, Doc, utcnow
from service.stream.producer import period_of

log = structlog.get_logger("service.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_USER_ID = 256  # as a token's ``sub``


def budget_of(settings: Settings) -> Budget:
    """The month's budget: its unit (``tokens``, or ``currency``: nano-units shown as decimal
    strings), the default limit in it and the currency."""
    return settings.budget


def parse_limit(value: object, budget: Budget) -> int:
    """A limit in the budget's unit (``Budget.parse``); 400 ``validation_error`` otherwise."""
    try:
        return budget.parse(value)
    except ValueError as exc:
        raise BadRequest(
            "request validation failed",
            code="validation_error",
            details=[{"field": "limit", "problem": str(exc), "type": "value_error"}],
        ) from None


def admin_only(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not request[PRINCIPAL].admin:
            raise Forbidden("this route is for administrators")
        return await handler(request)

    return guarded


def target_user(request: web.Request) -> str:
    """The ``{user_id}`` of the path: a token's ``sub``, not an API key's own month (400)."""
    user_id = request.match_info["user_id"]
    problem = None
    if len(user_id) > MAX_USER_ID:
        problem = f"at most {MAX_USER_ID} characters"
    elif user_id.startswith(KEY_ACCOUNT):  # an API key's own month, not a user
        problem = "an API key's account, not a user: a key's limit is set on the key"
    if problem is not None:
        raise BadRequest(
            "request validation failed",
            code="validation_error",
            details=[{"field": "user_id", "problem": problem, "type": "value_error"}],
        )
    return user_id


def actor(request: web.Request) -> dict[str, Any]:
    """Who acts, for the log: the administrator and, when they came with one, their key."""
    principal = request[PRINCIPAL]
    return {
        "admin_id": principal.user_id,
        "admin_key_id": principal.key.key_id if principal.key else None,
    }


def month_limit(doc: Doc, budget: Budget, standing: int | None) -> int:
    """The month's limit as admissions hold to it: its usage document's; before the month has
    one (no turn yet), the standing limit its first turn will create it with, else the
    default (``Store._new_month``)."""
    if not doc and standing is not None:
        return standing
    return int(doc.get("limit", budget.default_limit))


def limit_view(
    user_id: str, period: str, doc: Doc, budget: Budget, standing: int | None
) -> dict[str, Any]:
    limit = month_limit(doc, budget, standing)
    used, reserved = int(doc.get("used", 0)), int(doc.get("reserved", 0))
    return {
        "user_id": user_id,
        "period": period,
        "unit": budget.label,
        "limit": budget.show(limit),
        "used": budget.show(used),
        "reserved": budget.show(reserved),
        "remaining": budget.show(max(0, limit - used - reserved)),
        "cost": format_cost(int(doc.get("cost", 0))),
        "currency": budget.currency,
        # What the user's next months start with (null: the default limit).
        "standing_limit": None if standing is None else budget.show(standing),
    }


@admin_only
async def get_limit(request: web.Request) -> web.Response:
    no_query(request)
    user_id = target_user(request)
    period = period_of(utcnow())
    store = request.app[STORE]
    doc = await store.get_usage(user_id, period) or {}
    standing = await store.standing_limit(user_id)
    budget = budget_of(request.app[SETTINGS])
    return json_response(limit_view(user_id, period, doc, budget, standing))


class SetLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # Any JSON value: ``parse_limit`` says what a limit is in the budget's unit, for a value of
    # the wrong kind (1.5, true, null) as for a wrong value (-1), not one problem per type.
    limit: Any


@admin_only
async def set_limit(request: web.Request) -> web.Response:
    no_query(request)
    user_id = target_user(request)
    budget = budget_of(request.app[SETTINGS])
    limit = parse_limit((await read_json(request, SetLimit)).limit, budget)
    period = period_of(utcnow())
    store = request.app[STORE]
    old_standing = await store.standing_limit(user_id)
    who = actor(request)
    before = await store.set_user_limit(user_id, period, limit, by=who["admin_id"])
    log.info(
        "admin.limit_set",
        **who,
        target_user_id=user_id,
        period=period,
        unit=budget.label,
        old_limit=month_limit(before, budget, old_standing),
        old_standing_limit=old_standing,
        new_limit=limit,
    )
    return json_response(limit_view(user_id, period, {**before, "limit": limit}, budget, limit))


@admin_only
async def reset_period(request: web.Request) -> web.Response:
    no_query(request)
    user_id = target_user(request)
    period = period_of(utcnow())
    store = request.app[STORE]
    before = await store.reset_usage(user_id, period)
    log.info(
        "admin.period_reset",
        **actor(request),
        target_user_id=user_id,
        period=period,
        old_used=int(before.get("used", 0)),
        old_cost=int(before.get("cost", 0)),
        reserved=int(before.get("reserved", 0)),
    )
    after = {**before, "used": 0, "cost": 0} if before else {}
    standing = await store.standing_limit(user_id)
    budget = budget_of(request.app[SETTINGS])
    return json_response(limit_view(user_id, period, after, budget, standing))


class UsersQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    period: str | None = Field(None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$")
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=400)


def encode_cursor(rank: int, last_id: str) -> str:
    """A page's ``next_cursor``: where its last item stands in the order (a number, such as
    ``used``) and its id, which breaks ties."""
    return base64.urlsafe_b64encode(orjson.dumps([rank, last_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``encode_cursor``'s pair again; 400 ``invalid_cursor`` for anything else."""
    try:
        rank, last_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc
    if type(rank) is not int or not isinstance(last_id, str):
        raise BadRequest("invalid cursor", code="invalid_cursor")
    return rank, last_id


@admin_only
async def list_users(request: web.Request) -> web.Response:
    query = validate(UsersQuery, dict(request.query))
    period = query.period or period_of(utcnow())
    after = decode_cursor(query.cursor) if query.cursor else None
    docs = await request.app[STORE].users_by_usage(period, limit=query.limit, after=after)
    more = len(docs) > query.limit
    docs = docs[: query.limit]
    budget = budget_of(request.app[SETTINGS])
    users = []
    for doc in docs:
        limit = int(doc.get("limit", budget.default_limit))
        used, reserved = int(doc.get("used", 0)), int(doc.get("reserved", 0))
        users.append(
            {
                "user_id": doc["user_id"],
                "used": budget.show(used),
                "reserved": budget.show(reserved),
                "limit": budget.show(limit),
                "remaining": budget.show(max(0, limit - used - reserved)),
                "cost": format_cost(int(doc.get("cost", 0))),
            }
        )
    last = docs[-1] if docs else None
    return json_response(
        {
            "period": period,
            "unit": budget.label,
            "currency": budget.currency,
            "users": users,
            "next_cursor": encode_cursor(int(last.get("used", 0)), last["user_id"])
            if more and last
            else None,
        }
    )


def _wants_csv(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is None:
        accept = request.headers.get("Accept", "")
        return any(part.split(";")[0].strip() == "text/csv" for part in accept.split(","))
    if fmt not in ("json", "csv"):
        raise BadRequest(
            "request validation failed",
            code="validation_error",
            details=[{"field": "format", "problem": "json or csv", "type": "value_error"}],
        )
    return fmt == "csv"


@admin_only
async def usage(request: web.Request) -> web.Response:
    query = analytics.UsageQuery.parse(dict(request.query), datetime.now(UTC).date())
    as_csv = _wants_csv(request)
    docs = await request.app[STORE].rollup_docs(query.selections())
    currency = budget_of(request.app[SETTINGS]).currency
    with analytics.collector_paused():  # no await inside: nothing else runs meanwhile
        rows = query.group(docs)
        del docs
        if as_csv:
            name = f"usage-{query.start.isoformat()}-{query.end.isoformat()}.csv"
            return web.Response(
                text=analytics.to_csv(query, rows),
                content_type="text/csv",
                charset="utf-8",
                headers={"Content-Disposition": f'attachment; filename="{name}"'},
            )
        return json_response(analytics.report(query, rows, currency))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/admin/users", list_users)
    app.router.add_get("/api/admin/users/{user_id}/limit", get_limit)
    app.router.add_put("/api/admin/users/{user_id}/limit", set_limit)
    app.router.add_post("/api/admin/users/{user_id}/reset", reset_period)
    app.router.add_get("/api/admin/usage", usage)

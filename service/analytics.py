"""Usage analytics over the daily rollup (``usage_daily``): the query, its one aggregation, and
the answer as JSON or CSV.

The rollup holds one line per (UTC day, user, model, API key) with counters added at each
turn's settlement, so a month of a busy service is tens of thousands of lines, not the millions
of messages they count; and one **total** line per (day, model) (``user_id`` and ``key_id``
null), so a query that asks for neither users nor keys reads a few lines a day. A query
groups a range of days on any of the four dimensions, filtered on any of user, model and key,
in one aggregation; totals are summed from its rows here (integers: exact). Money stays
integer nano-units until it is shown (``format_cost``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date
from typing import Any

from service.costs import format_cost
from service.errors import BadRequest

Doc = dict[str, Any]

# The dimensions a query may group on: its name in ``by``, the rollup's field, the row's key.
DIMENSIONS = {"day": "day", "model": "model", "user": "user_id", "key": "key_id"}
OUTCOMES = ("completed", "cancelled", "failed", "interrupted")
TOKENS = ("prompt", "completion", "cached", "reasoning")
MAX_DAYS = 366  # the longest range one query reads (a year, a leap day included)
MAX_FILTER_CHARS = 256


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: date
    end: date  # inclusive
    by: tuple[str, ...]  # of DIMENSIONS, in their canonical order
    user: str | None = None
    model: str | None = None
    key: str | None = None

    @classmethod
    def parse(cls, params: dict[str, str], today: date) -> UsageQuery:
        """``from``/``to`` (YYYY-MM-DD, inclusive; the current month up to today by default),
        ``by`` (comma-separated dimensions; all four by default), ``user``/``model``/``key``
        filters. Anything else in the query string is refused: nothing is silently ignored."""
        unknown = set(params) - {"from", "to", "by", "user", "model", "key", "format"}
        if unknown:
            raise _invalid(sorted(unknown)[0], "unknown parameter")
        start = _day(params, "from", today.replace(day=1))
        end = _day(params, "to", today)
        if start > end:
            raise _invalid("to", "must not be before 'from'")
        if (end - start).days + 1 > MAX_DAYS:
            raise _invalid("to", f"a range is at most {MAX_DAYS} days")
        return cls(
            start=start,
            end=end,
            by=_dimensions(params.get("by")),
            user=_filter(params, "user"),
            model=_filter(params, "model"),
            key=_filter(params, "key"),
        )

    @property
    def totals_only(self) -> bool:
        """Whether the day's model totals answer it (no user or key asked for or filtered)."""
        return not {"user", "key"} & set(self.by) and self.user is None and self.key is None

    @property
    def every_line(self) -> bool:
        """Grouped on all four dimensions: each rollup line is a row (nothing to group)."""
        return len(self.by) == len(DIMENSIONS)

    def match(self) -> Doc:
        match: Doc = {"day": {"$gte": self.start.isoformat(), "$lte": self.end.isoformat()}}
        # A day's model totals (user_id null) when they answer the query, else the users' lines.
        match["user_id"] = None if self.totals_only else {"$type": "string"}
        for field, value in (("user_id", self.user), ("model", self.model), ("key_id", self.key)):
            if value is not None:
                match[field] = value
        return match

    def pipeline(self) -> list[Doc]:
        match = self.match()
        group: Doc = {"_id": {name: f"${DIMENSIONS[name]}" for name in self.by}}
        # $sum counts a missing counter as 0 (a line written before a counter existed).
        group["turns"] = {"$sum": "$turns"}
        for outcome in OUTCOMES:
            group[outcome] = {"$sum": f"$outcomes.{outcome}"}
        for field in (*TOKENS, "cost"):
            group[field] = {"$sum": f"${field}"}
        return [
            {"$match": match},
            {"$group": group},
            {"$sort": {f"_id.{name}": 1 for name in self.by}},
        ]


def model_totals(lines: list[Doc]) -> list[Doc]:
    """The (day, model) total lines (``user_id`` and ``key_id`` null) that settlement writes
    beside rollup ``lines``: for data written some other way (a seed, an import)."""
    totals: dict[tuple[str, str], Doc] = {}
    for line in lines:
        total = totals.setdefault(
            (line["day"], line["model"]),
            {"day": line["day"], "user_id": None, "model": line["model"], "key_id": None},
        )
        for field in ("turns", *TOKENS, "cost"):
            total[field] = total.get(field, 0) + int(line.get(field, 0))
        outcomes = total.setdefault("outcomes", {})
        for name, n in (line.get("outcomes") or {}).items():
            outcomes[name] = outcomes.get(name, 0) + int(n)
    return list(totals.values())


def as_rows(lines: list[Doc]) -> list[Doc]:
    """Rollup lines read as they are (``UsageQuery.every_line``: one row each, the unique index
    makes them so) in the shape the aggregation gives, sorted as it sorts (null first)."""
    docs = []
    for line in lines:
        outcomes = line.get("outcomes") or {}
        doc: Doc = {
            "_id": {name: line.get(field) for name, field in DIMENSIONS.items()},
            "turns": line.get("turns", 0),
            **{o: outcomes.get(o, 0) for o in OUTCOMES},
            **{f: line.get(f, 0) for f in (*TOKENS, "cost")},
        }
        docs.append(doc)
    docs.sort(key=lambda d: tuple((v is not None, v or "") for v in d["_id"].values()))
    return docs


def _invalid(field: str, problem: str) -> BadRequest:
    return BadRequest(
        "request validation failed",
        code="validation_error",
        details=[{"field": field, "problem": problem, "type": "value_error"}],
    )


def _day(params: dict[str, str], name: str, default: date) -> date:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        if len(raw) != 10:  # fromisoformat also takes 20240101 and week dates
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise _invalid(name, "must be a date YYYY-MM-DD") from None


def _dimensions(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return tuple(DIMENSIONS)
    names = [n.strip() for n in raw.split(",")]
    bad = [n for n in names if n not in DIMENSIONS]
    if bad or not names:
        raise _invalid("by", f"a comma-separated list of {', '.join(DIMENSIONS)}")
    if len(set(names)) != len(names):
        raise _invalid("by", "names a dimension twice")
    return tuple(n for n in DIMENSIONS if n in names)


def _filter(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is not None and not 1 <= len(value) <= MAX_FILTER_CHARS:
        raise _invalid(name, f"1 to {MAX_FILTER_CHARS} characters")
    return value


def _row(doc: Doc, by: tuple[str, ...]) -> Doc:
    """An aggregated line as the API shows it (cost still in nano-units)."""
    keys = doc["_id"] or {}
    row: Doc = {DIMENSIONS[name]: keys.get(name) for name in by}
    row["turns"] = int(doc["turns"])
    row["outcomes"] = {o: int(doc[o]) for o in OUTCOMES}
    tokens = {t: int(doc[t]) for t in TOKENS}
    tokens["total"] = tokens["prompt"] + tokens["completion"]
    row["tokens"] = tokens
    row["cost"] = int(doc["cost"])
    return row


def _total(rows: list[Doc]) -> Doc:
    return {
        "turns": sum(r["turns"] for r in rows),
        "outcomes": {o: sum(r["outcomes"][o] for r in rows) for o in OUTCOMES},
        "tokens": {t: sum(r["tokens"][t] for r in rows) for t in (*TOKENS, "total")},
        "cost": sum(r["cost"] for r in rows),
    }


def report(query: UsageQuery, docs: list[Doc], currency: str) -> Doc:
    """The JSON answer: rows and their totals, money as decimal strings."""
    rows = [_row(d, query.by) for d in docs]
    totals = _total(rows)
    for item in (*rows, totals):
        item["cost"] = format_cost(item["cost"])
    return {
        "from": query.start.isoformat(),
        "to": query.end.isoformat(),
        "by": [DIMENSIONS[name] for name in query.by],
        "currency": currency,
        "rows": rows,
        "totals": totals,
    }


def csv_columns(by: tuple[str, ...]) -> list[str]:
    return [
        *(DIMENSIONS[name] for name in by),
        "turns",
        *OUTCOMES,
        *TOKENS,
        "total_tokens",
        "cost",
    ]


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV injection");
# only user ids are free text here.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text_cell(value: str | None) -> str:
    if value is None:
        return ""
    return "'" + value if value.startswith(_FORMULA_START) else value


def to_csv(query: UsageQuery, docs: list[Doc]) -> str:
    """The rows as CSV (a header row, then one line per row; no totals line)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(csv_columns(query.by))
    for doc in docs:
        row = _row(doc, query.by)
        writer.writerow(
            [
                *(_text_cell(row[DIMENSIONS[name]]) for name in query.by),
                row["turns"],
                *(row["outcomes"][o] for o in OUTCOMES),
                *(row["tokens"][t] for t in (*TOKENS, "total")),
                format_cost(row["cost"]),
            ]
        )
    return out.getvalue()

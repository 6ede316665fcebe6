"""Usage analytics over the rollup (``usage_rollup``): the query, the rows, and the answer as
JSON or CSV.

The rollup holds one **document per user and month** (``user_id``, ``month``), whose ``lines``
map each (UTC day, model, API key) the user's turns touched to counters added at each turn's
settlement (``line_key``), and one per month with every user's turns per (day, model): the
month's **totals** (``user_id`` null). A month of a busy service is a few thousand documents,
not the millions of messages they count, nor the tens of thousands of lines: a query reads the
documents of its months (of one user, of every user, or the totals when it asks for neither
users nor keys) by the ``(month, user_id)`` index, and groups their lines here on any of the
four dimensions, filtered on any of user, model and key (integers: exact). A plain read of few
documents is what every MongoDB, SecantusDB included, serves fastest; an aggregation would
group the same lines in the database. Money stays integer nano-units until it is shown
(``format_cost``).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

from service.costs import format_cost
from service.errors import BadRequest

Doc = dict[str, Any]

# The dimensions a query may group on: its name in ``by``, the rollup's field, the row's key.
DIMENSIONS = {"day": "day", "model": "model", "user": "user_id", "key": "key_id"}
# ``by`` also takes the rows' names, which the answer's ``by`` lists: an answer's ``by`` asked
# again gives the same rows.
_BY_NAMES = {**{field: name for name, field in DIMENSIONS.items()}, **{n: n for n in DIMENSIONS}}
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
        ``by`` (comma-separated dimensions, by their names or their rows' fields: ``user`` or
        ``user_id``, ``key`` or ``key_id``; all four by default), ``user``/``model``/``key``
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
        """Whether the month's model totals answer it (no user or key asked for or filtered)."""
        return not {"user", "key"} & set(self.by) and self.user is None and self.key is None

    def months(self) -> list[str]:
        """The months (``YYYY-MM``) the range touches."""
        out, year, month = [], self.start.year, self.start.month
        while (year, month) <= (self.end.year, self.end.month):
            out.append(f"{year:04d}-{month:02d}")
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return out

    def selections(self) -> list[Doc]:
        """The rollup documents to read, one filter per month (an equality on the unique
        ``(month, user_id)`` index each): of the one user asked for, the month's totals when
        they answer the query, else the whole month (its totals left out when grouped)."""
        if self.user is not None:
            return [{"month": m, "user_id": self.user} for m in self.months()]
        if self.totals_only:
            return [{"month": m, "user_id": None} for m in self.months()]
        return [{"month": m} for m in self.months()]

    def group(self, docs: list[Doc]) -> list[Doc]:
        """The rows: the documents' lines in the range and the filters, summed per the
        dimensions asked for, sorted on them (null first), as the API shows them (cost in
        nano-units). Integers: exact. One pass, no object per line: a month of a busy
        service is tens of thousands of lines."""
        first, last, by = self.start.isoformat(), self.end.isoformat(), self.by
        totals, only_model, only_key = self.totals_only, self.model, self.key
        pick = [tuple(DIMENSIONS).index(d) for d in by]  # of (day, model, user, key)
        every = len(pick) == len(DIMENSIONS)  # by all four, in their order
        sums: dict[tuple[Any, ...], list[int]] = {}
        for doc in docs:
            user = doc.get("user_id")
            if (user is None) != totals:  # the month's totals, or a user's document
                continue
            for name, c in (doc.get("lines") or {}).items():
                day = name[:10]
                if day < first or day > last:
                    continue
                _, model, key = parse_line_key(name)
                if (only_model is not None and model != only_model) or (
                    only_key is not None and key != only_key
                ):
                    continue
                values = (day, model, user or "", key or "")  # "": null, sorted first
                dims = values if every else tuple([values[i] for i in pick])
                acc = sums.get(dims)
                if acc is None:  # a row's first line (every row's, grouped on all four)
                    sums[dims] = _counts(c)
                    continue
                acc[0] += c.get("turns", 0)  # the order of _counts, spelled out: hot loop
                acc[1] += c.get("completed", 0)
                acc[2] += c.get("cancelled", 0)
                acc[3] += c.get("failed", 0)
                acc[4] += c.get("interrupted", 0)
                acc[5] += c.get("prompt", 0)
                acc[6] += c.get("completion", 0)
                acc[7] += c.get("cached", 0)
                acc[8] += c.get("reasoning", 0)
                acc[9] += c.get("cost", 0)
        names = [DIMENSIONS[d] for d in by]
        return [_row(names, dims, sums[dims]) for dims in sorted(sums)]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector while a report is built: tens of thousands of
    rows are made and none freed, so each collection the allocations trigger would walk the
    whole growing heap for nothing (it halves the time of a month's export). Reference
    counting still frees as usual; the collector runs again after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _counts(c: Doc) -> list[int]:
    """A line's counters in a row's order: turns, the outcomes, the tokens, the cost."""
    return [
        c.get("turns", 0),
        c.get("completed", 0),
        c.get("cancelled", 0),
        c.get("failed", 0),
        c.get("interrupted", 0),
        c.get("prompt", 0),
        c.get("completion", 0),
        c.get("cached", 0),
        c.get("reasoning", 0),
        c.get("cost", 0),
    ]


def _row(names: list[str], dims: tuple[str, ...], acc: list[int]) -> Doc:
    """A row as the API shows it (cost still in nano-units; "" in ``dims``: null)."""
    row: Doc = {}
    for name, value in zip(names, dims, strict=True):
        row[name] = value or None
    row["turns"] = acc[0]
    row["outcomes"] = {
        "completed": acc[1],
        "cancelled": acc[2],
        "failed": acc[3],
        "interrupted": acc[4],
    }
    row["tokens"] = {
        "prompt": acc[5],
        "completion": acc[6],
        "cached": acc[7],
        "reasoning": acc[8],
        "total": acc[5] + acc[6],
    }
    row["cost"] = acc[9]
    return row


# A line's name in its month's document: ``day|model|key`` (``-``: no key). A field name may
# not hold ``.`` or start with ``$``, and ``|`` separates: those (and ``%``) are %-encoded.
_ESCAPES = {"%": "%25", ".": "%2E", "$": "%24", "|": "%7C"}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def _unescape(text: str) -> str:
    for char, code in reversed(_ESCAPES.items()):  # %25 last: it may have made the others
        text = text.replace(code, char)
    return text


def line_key(day: str, model: str, key_id: str | None) -> str:
    """The name of the (day, model, key) line in a month's rollup document."""
    return f"{day}|{_escape(model)}|{'-' if key_id is None else _escape(key_id)}"


def parse_line_key(name: str) -> tuple[str, str, str | None]:
    day, model, key = name.split("|")
    if "%" in name:
        model, key = _unescape(model), key if key == "-" else _unescape(key)
    return day, model, None if key == "-" else key


def rollup_docs(lines: list[Doc]) -> list[Doc]:
    """The rollup documents that settlement leaves for ``lines`` (flat: ``day``, ``user_id``,
    ``model``, ``key_id`` and counters), the month's totals included: for data written some
    other way (a seed, an import)."""
    docs: dict[tuple[str, str | None], Doc] = {}
    for line in lines:
        month = line["day"][:7]
        for user, key in ((line["user_id"], line["key_id"]), (None, None)):
            doc = docs.setdefault((month, user), {"month": month, "user_id": user, "lines": {}})
            counters = doc["lines"].setdefault(line_key(line["day"], line["model"], key), {})
            for field in ("turns", *TOKENS, "cost"):
                counters[field] = counters.get(field, 0) + int(line.get(field, 0))
            for name, n in (line.get("outcomes") or {}).items():
                counters[name] = counters.get(name, 0) + int(n)
    return list(docs.values())


def lines_of(docs: list[Doc]) -> list[Doc]:
    """The flat lines rollup documents hold (the totals' with ``user_id`` None), their
    outcomes under ``outcomes`` (as ``rollup_docs`` takes them)."""
    out = []
    for doc in docs:
        for name, counters in (doc.get("lines") or {}).items():
            day, model, key = parse_line_key(name)
            line = {"day": day, "user_id": doc.get("user_id"), "model": model, "key_id": key}
            line |= {k: v for k, v in counters.items() if k not in OUTCOMES}
            line["outcomes"] = {k: v for k, v in counters.items() if k in OUTCOMES}
            out.append(line)
    return out


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
    names = [_BY_NAMES.get(n.strip(), "") for n in raw.split(",")]
    if "" in names:
        raise _invalid(
            "by", f"a comma-separated list of {', '.join(DIMENSIONS)} (or user_id, key_id)"
        )
    if len(set(names)) != len(names):
        raise _invalid("by", "names a dimension twice")
    return tuple(n for n in DIMENSIONS if n in names)


def _filter(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is not None and not 1 <= len(value) <= MAX_FILTER_CHARS:
        raise _invalid(name, f"1 to {MAX_FILTER_CHARS} characters")
    return value


def _total(rows: list[Doc]) -> Doc:
    return {
        "turns": sum(r["turns"] for r in rows),
        "outcomes": {o: sum(r["outcomes"][o] for r in rows) for o in OUTCOMES},
        "tokens": {t: sum(r["tokens"][t] for r in rows) for t in (*TOKENS, "total")},
        "cost": sum(r["cost"] for r in rows),
    }


def report(query: UsageQuery, rows: list[Doc], currency: str) -> Doc:
    """The JSON answer: ``rows`` (``UsageQuery.group``) and their totals, money as decimal
    strings."""
    totals = _total(rows)
    return {
        "from": query.start.isoformat(),
        "to": query.end.isoformat(),
        "by": [DIMENSIONS[name] for name in query.by],
        "currency": currency,
        "rows": [{**row, "cost": format_cost(row["cost"])} for row in rows],
        "totals": {**totals, "cost": format_cost(totals["cost"])},
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
    # Leading spaces too: a spreadsheet that trims cells on import would see the formula.
    return "'" + value if value.lstrip().startswith(_FORMULA_START) else value


def to_csv(query: UsageQuery, rows: list[Doc]) -> str:
    """``rows`` (``UsageQuery.group``) as CSV (a header row, then one line per row; no totals
    line)."""
    lines = [",".join(csv_columns(query.by))]
    names = [DIMENSIONS[name] for name in query.by]
    for row in rows:
        o, t = row["outcomes"], row["tokens"]
        cells = [_csv_cell(_text_cell(row[name])) for name in names]
        lines.append(
            ",".join(cells)
            + ("," if cells else "")
            + f"{row['turns']},{o['completed']},{o['cancelled']},{o['failed']},"
            f"{o['interrupted']},{t['prompt']},{t['completion']},{t['cached']},"
            f"{t['reasoning']},{t['total']},{format_cost(row['cost'])}"
        )
    return "\r\n".join(lines) + "\r\n"


def _csv_cell(text: str) -> str:
    """A text cell as the csv module writes it (quoted when it holds a comma, a quote or a
    line break); the numbers need no quoting."""
    if "," in text or '"' in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text

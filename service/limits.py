"""A user's limits as a client sees them, and the arithmetic of the requests-per-minute rule.

Programs (``/v1`` and WebSocket sends) are held to ``V1_REQUESTS_PER_MINUTE``: a bucket of that
many requests that refills continuously, one request every ``60 s / RPM`` (rounded up to the
millisecond, MongoDB's date unit). It is kept as one date in the user's usage document
(GCRA: ``requests_due``, when the bucket is full again), checked and moved in the same
conditional update as the budget, so it needs no counter per window and holds across replicas.
A burst may use the whole bucket at once; after that a request fits every interval. Over any
span the requests admitted are at most RPM plus one per interval in it (so at most about
2 x RPM in one 60-second span that starts with a full bucket), and the refusal's wait is exact:
until the next interval frees a request.

The same figures answer OpenAI's ``x-ratelimit-*`` headers and Anthropic's
``anthropic-ratelimit-*`` ones; the tokens are the month's budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MINUTE_MS = 60_000
# How long a program refused for too many turns at once is told to wait: a turn's end cannot be
# foreseen, so this is a hint, short enough to take a freed slot soon after it is freed.
CONCURRENCY_RETRY_S = 1.0


def request_interval(rpm: int) -> timedelta:
    """How often the bucket gains one request (``rpm`` > 0)."""
    return timedelta(milliseconds=-(-MINUTE_MS // rpm))


def request_window(rpm: int) -> timedelta:
    """How long a drained bucket takes to fill again: ``rpm`` intervals (60 s when ``rpm``
    divides 60,000; a few milliseconds more otherwise)."""
    return rpm * request_interval(rpm)


def period_end(at: datetime) -> datetime:
    """The end of ``at``'s budget period (its calendar month, UTC)."""
    return datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a user's usage document allows at ``at``: the month's budget and the request bucket
    (``requests_due``: when it is full again; None or past: full)."""

    at: datetime
    limit: int
    used: int
    reserved: int
    requests_due: datetime | None = None

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.limit - self.used - self.reserved)

    def _due(self) -> datetime:
        return self.at if self.requests_due is None else max(self.requests_due, self.at)

    def remaining_requests(self, rpm: int) -> int:
        """How many requests the bucket would admit now, one after the other."""
        free = self.at + request_window(rpm) - self._due()
        return max(0, free // request_interval(rpm))

    def requests_reset(self) -> timedelta:
        """How long until the bucket is full again."""
        return self._due() - self.at


def duration(span: timedelta) -> str:
    """A span in OpenAI's (Go's) duration format: ``17ms``, ``1s``, ``1.5s``, ``6m0s``,
    ``412h3m7s``."""
    ms = max(0, round(span.total_seconds() * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, frac = divmod(rest, 1000)
    secs = f"{seconds}.{frac:03d}".rstrip("0") if frac else str(seconds)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(allowance: Allowance, *, rpm: int, tokens: bool = True) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers: requests (left out when ``rpm`` is 0, off) and the
    month's tokens (remaining: the limit less what is used and reserved; reset: the period's
    end; left out when the budget counts money, ``tokens`` False)."""
    headers: dict[str, str] = {}
    if rpm:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(allowance.remaining_requests(rpm))
        headers["x-ratelimit-reset-requests"] = duration(allowance.requests_reset())
    if not tokens:
        return headers
    headers["x-ratelimit-limit-tokens"] = str(allowance.limit)
    headers["x-ratelimit-remaining-tokens"] = str(allowance.remaining_tokens)
    headers["x-ratelimit-reset-tokens"] = duration(period_end(allowance.at) - allowance.at)
    return headers


def rfc3339(at: datetime) -> str:
    """``at`` as Anthropic writes a reset time: RFC 3339, UTC, whole seconds rounded up (a
    client that waits until then is never early)."""
    up = at.replace(microsecond=0) + timedelta(seconds=1 if at.microsecond else 0)
    return up.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_rate_limit_headers(
    allowance: Allowance, *, rpm: int, tokens: bool = True
) -> dict[str, str]:
    """Anthropic's ``anthropic-ratelimit-*`` headers from the same figures: requests (left out
    when ``rpm`` is 0, off; reset: when the bucket is full again) and the month's tokens (reset:
    the period's end). The budget counts input and output together, so there are no separate
    ``-input-tokens-`` / ``-output-tokens-`` figures to give."""
    headers: dict[str, str] = {}
    prefix = "anthropic-ratelimit-"
    if rpm:
        headers[prefix + "requests-limit"] = str(rpm)
        headers[prefix + "requests-remaining"] = str(allowance.remaining_requests(rpm))
        headers[prefix + "requests-reset"] = rfc3339(allowance.at + allowance.requests_reset())
    if not tokens:  # the budget counts money, not tokens
        return headers
    headers[prefix + "tokens-limit"] = str(allowance.limit)
    headers[prefix + "tokens-remaining"] = str(allowance.remaining_tokens)
    headers[prefix + "tokens-reset"] = rfc3339(period_end(allowance.at))
    return headers

"""Money: a model's price, what a turn cost, and the month's budget in tokens or in currency.

Amounts of money are integers of **nano-units** of ``CURRENCY`` (1e-9) wherever they are stored
or summed (records, usage documents, the daily rollup), so sums are exact integer arithmetic in
MongoDB and in Python; they are computed with ``Decimal`` (never a float) from prices given per
million tokens, rounded half-up once per turn, and shown to clients as decimal strings
(``format_cost``). A price with more than three decimals per million tokens is below a
nano-unit per token: each turn's cost is still exact to the nano-unit.

``Budget`` puts the month's budget in one unit (``BUDGET_UNIT``): tokens (a turn spends its
prompt and completion tokens) or currency (a turn spends its cost, in nano-units). The store's
admission and settlement rules are the same integers either way; only what a turn asks, what it
is granted in completion tokens, and what it is billed depend on the unit.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NANOS = 1_000_000_000  # nano-units in one unit of the currency
MAX_INT64 = 2**63 - 1  # the largest integer MongoDB stores
PER_TOKEN = Decimal(NANOS) / Decimal(1_000_000)  # a price per million tokens -> nanos per token


class Price(BaseModel):
    """A model's price, in ``CURRENCY`` per million tokens. Cached input defaults to the input
    price and reasoning to the output price (OpenAI bills reasoning as output); a prompt token
    written to the cache (Anthropic: 1.25x input for its 5-minute cache) to the input price,
    one written to the 1-hour cache (2x input) to the 5-minute write's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0, allow_inf_nan=False)
    output: Decimal = Field(ge=0, allow_inf_nan=False)
    cached_input: Decimal | None = Field(None, ge=0, allow_inf_nan=False)
    cache_write_input: Decimal | None = Field(None, ge=0, allow_inf_nan=False)
    cache_write_1h_input: Decimal | None = Field(None, ge=0, allow_inf_nan=False)
    reasoning: Decimal | None = Field(None, ge=0, allow_inf_nan=False)

    @property
    def write(self) -> Decimal:
        return self.input if self.cache_write_input is None else self.cache_write_input

    @property
    def write_1h(self) -> Decimal:
        return self.write if self.cache_write_1h_input is None else self.cache_write_1h_input

    def record(self) -> dict[str, str]:
        """The price as a record keeps it (decimal strings: the price in force when it ran)."""
        return {k: str(v) for k, v in self.model_dump(exclude_none=True).items()}

    @classmethod
    def from_record(cls, doc: dict[str, Any] | None) -> Price | None:
        return cls.model_validate(doc) if doc else None

    @property
    def most_per_output_token(self) -> Decimal:
        """The dearest a completion token can be (output or reasoning), in nanos."""
        return max(self.output, self.reasoning or self.output) * PER_TOKEN

    @property
    def most_per_prompt_token(self) -> Decimal:
        """The dearest a prompt token can be (read, written to a cache, or neither), in nanos:
        what the prompt may cost is known only from the upstream's usage."""
        cached = self.input if self.cached_input is None else self.cached_input
        return max(self.input, cached, self.write, self.write_1h) * PER_TOKEN


def cost_nanos(
    price: Price,
    *,
    prompt: int,
    completion: int,
    cached: int = 0,
    reasoning: int = 0,
    written: int = 0,
    written_1h: int = 0,
) -> int:
    """What a turn cost: its prompt tokens read from a cache (``cached``), written to one
    (``written``, ``written_1h`` of them to a 1-hour cache) and neither, its answer and reasoning
    tokens (``cached`` and ``written`` are part of ``prompt`` and ``reasoning`` of
    ``completion``, as OpenAI counts)."""
    cached = min(max(cached, 0), prompt)
    written = min(max(written, 0), prompt - cached)
    written_1h = min(max(written_1h, 0), written)
    reasoning = min(max(reasoning, 0), completion)
    total = (
        (prompt - cached - written) * price.input
        + cached * (price.cached_input if price.cached_input is not None else price.input)
        + (written - written_1h) * price.write
        + written_1h * price.write_1h
        + (completion - reasoning) * price.output
        + reasoning * (price.reasoning if price.reasoning is not None else price.output)
    ) * PER_TOKEN
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))


def format_cost(nanos: int) -> str:
    """Nano-units as a decimal string of the currency, without trailing zeros past the cent:
    ``1234500`` -> ``"0.0012345"``, ``0`` -> ``"0.00"``, ``-5`` -> ``"-0.000000005"``."""
    units, rest = divmod(abs(nanos), NANOS)  # integers: exact, and cheap for a long report
    frac = f"{rest:09d}".rstrip("0").ljust(2, "0")
    return f"{'-' if nanos < 0 else ''}{units}.{frac}"


def parse_cost(text: str) -> int:
    """A decimal string of the currency as nano-units; ValueError when it is not one, has more
    than nine decimals, or is negative."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"not a non-negative amount: {text!r}")
    nanos = value.scaleb(9)
    if nanos != nanos.to_integral_value():
        raise ValueError(f"more than nine decimals: {text!r}")
    return int(nanos)


class Budget:
    """The month's budget in one unit: ``tokens``, or ``currency`` (nano-units)."""

    def __init__(self, unit: str, default_limit: int, currency: str) -> None:
        self.unit = unit
        self.default_limit = default_limit  # in the unit
        self.currency = currency

    @property
    def in_currency(self) -> bool:
        return self.unit == "currency"

    def ask(self, price: Price | None, prompt: int, completion: int) -> int:
        """What a turn of ``prompt`` tokens and at most ``completion`` answer tokens may spend."""
        if not self.in_currency:
            return prompt + completion
        if price is None:
            return 0
        most = price.most_per_prompt_token * prompt + price.most_per_output_token * completion
        return int(most.to_integral_value(rounding=ROUND_HALF_UP))

    def completion_within(self, price: Price | None, granted: int, prompt: int) -> int:
        """The most answer tokens ``granted`` (in the unit) pays for after the prompt."""
        if not self.in_currency:
            return granted - prompt
        if price is None or not price.most_per_output_token:
            return 1 << 30
        left = Decimal(granted) - price.most_per_prompt_token * prompt
        return int((left / price.most_per_output_token).to_integral_value(rounding=ROUND_FLOOR))

    def billed(self, prompt: int, completion: int, cost: int) -> int:
        """What a turn spent of the budget."""
        return cost if self.in_currency else prompt + completion

    def parse(self, value: object) -> int:
        """A limit as a client sends it, in the unit: a whole number of tokens, or a decimal
        string of the currency (nano-units). ValueError naming what is expected."""
        if self.in_currency:
            if isinstance(value, str):
                try:
                    nanos = parse_cost(value)
                except ValueError:
                    nanos = -1
                if 0 <= nanos <= MAX_INT64:
                    return nanos
            raise ValueError(f'a decimal string of {self.currency}, such as "25.00"')
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT64:
            return value
        raise ValueError("a whole number of tokens, 0 or more")

    def show(self, amount: int) -> int | str:
        """An amount of the budget as clients see it: tokens, or a decimal string."""
        return format_cost(amount) if self.in_currency else amount

    def refusal(self, details: dict[str, Any] | None) -> dict[str, Any]:
        """A budget refusal's details (``limit``, ``remaining``, ``needed``, ``reserved``) in
        the unit, named."""
        out = dict(details or {})
        for name in ("limit", "remaining", "needed", "reserved"):
            if isinstance(out.get(name), int):
                out[name] = self.show(out[name])
        out["unit"] = self.label
        return out

    @property
    def label(self) -> str:
        """The unit's name in an API answer: ``tokens`` or the currency's code."""
        return self.currency if self.in_currency else "tokens"

// Money as the service sends it: decimal strings ("0.0012345") with an ISO currency code. Shown
// with the browser's locale; a tiny amount keeps enough digits to be seen ("$0.000038"), and one
// too small even for that says so ("< $0.000001") rather than showing a false "$0.00".

const MAX_DIGITS = 6;
const formats = new Map(); // "USD:6" -> Intl.NumberFormat (building one is not free)

function formatter(currency, digits) {
  const key = `${currency}:${digits}`;
  if (!formats.has(key)) {
    formats.set(
      key,
      new Intl.NumberFormat(undefined, {
        style: "currency",
        currency,
        minimumFractionDigits: Math.min(2, digits),
        maximumFractionDigits: digits,
      }),
    );
  }
  return formats.get(key);
}

// The decimal string as a number, or null when it is not one (never NaN on the page).
function amountOf(value) {
  if (value == null || value === "") return null;
  const text = String(value).trim();
  if (!/^-?\d+(\.\d+)?$/.test(text)) return null;
  return Number(text);
}

// "0.0012345", "USD" -> "$0.001235"; null when there is no amount or no currency (an unpriced
// answer has neither: it shows no cost).
export function formatMoney(value, currency) {
  const amount = amountOf(value);
  if (amount === null || !currency) return null;
  try {
    if (amount > 0 && amount < 10 ** -MAX_DIGITS) return `< ${formatter(currency, MAX_DIGITS).format(10 ** -MAX_DIGITS)}`;
    // cents for amounts of a unit or more; more digits only where they carry the amount
    const digits = Math.abs(amount) >= 1 ? 2 : MAX_DIGITS;
    return formatter(currency, digits).format(amount);
  } catch {
    return `${value} ${currency}`; // a code Intl does not know: still the exact amount
  }
}

// Whether the budget unit names a currency (BUDGET_UNIT=currency) rather than tokens.
export const isMoneyUnit = (unit) => Boolean(unit) && unit !== "tokens";

// A decimal string of the currency as integer nano-units (1e-9), exactly (no float); null when
// it is not a non-negative amount with at most nine decimals.
export function toNanos(text) {
  const match = /^(\d+)(?:\.(\d{1,9}))?$/.exec(String(text).trim());
  if (!match) return null;
  const nanos = BigInt(match[1]) * 1_000_000_000n + BigInt((match[2] || "").padEnd(9, "0"));
  return nanos <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(nanos) : null;
}

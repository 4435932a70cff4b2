"""Money is integer micro-dollars (1 USD = 1_000_000); prices are micro-dollars per million tokens. The cost
formula itself is Lua (`money/lua.py`), run where the money moves."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICROS = 1_000_000
MAX_MICROS = 2**53 - 1  # every amount stays exact as a JSON number and in Redis's Lua (doubles), and in int64


def usd_to_micros(value: str | Decimal) -> int:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not an amount in USD: {value!r}") from None
    if not amount.is_finite() or abs(amount) > Decimal(MAX_MICROS) / MICROS:
        raise ValueError(f"not an amount in USD: {value!r} (at most {micros_to_usd(MAX_MICROS)} either way)")
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise ValueError(f"{value} USD has more than 6 decimal places")
    return int(micros)


def micros_to_cost(micros: int) -> float:
    """USD as a JSON number (`usage.cost`): the nearest double to micros / 10^6, whose shortest form, the one JSON
    writes, is that decimal exactly (for any amount below 2^53 micro-dollars)."""
    return int(micros) / 1_000_000


def micros_to_usd(micros: int | str) -> str:
    """Exact decimal string, for example 12.500000."""
    return str((Decimal(int(micros)) / MICROS).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP))

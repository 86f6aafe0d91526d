"""Money as integer micros (1/1,000,000 of a currency unit). No floats, anywhere.

HTTP shows money as decimal strings with at most 6 fractional digits; inside the system and in
events every amount is an ``int`` of micros. Conversions are exact; where a result can have
more precision than a micro (quantity x unit price, price x markup) the rounding is explicit.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from pydantic import Field

MICROS_PER_UNIT = 1_000_000
MAX_MICROS = 10**18  # far above any real balance, well inside BIGINT

# ASCII digits only: Python's Decimal (and \d) also take other scripts' digits ("١"), which no
# client of a billing API means. Surrounding blanks (space, tab) are forgiven on purpose.
_DECIMAL_RE = re.compile(r"[+-]?([0-9]+)(\.([0-9]+))?")

# ISO 4217 minor units for currencies whose exponent is not 2.
_MINOR_UNIT_EXPONENT = {
    "BIF": 0,
    "CLP": 0,
    "DJF": 0,
    "GNF": 0,
    "JPY": 0,
    "KMF": 0,
    "KRW": 0,
    "MGA": 0,
    "PYG": 0,
    "RWF": 0,
    "UGX": 0,
    "VND": 0,
    "VUV": 0,
    "XAF": 0,
    "XOF": 0,
    "XPF": 0,
    "BHD": 3,
    "JOD": 3,
    "KWD": 3,
    "OMR": 3,
    "TND": 3,
}


class MoneyError(ValueError):
    """A money or decimal string that cannot be represented exactly."""


def parse_decimal(text: str, *, max_places: int = 6, field: str = "amount") -> Decimal:
    """Parse a plain decimal string (``"12.5"``) exactly; no exponents, no floats."""
    if not isinstance(text, str):
        raise MoneyError(f"{field} must be a decimal string")
    text = text.strip(" \t")  # blanks only: not control characters or other spaces
    match = _DECIMAL_RE.fullmatch(text)
    if not match:
        raise MoneyError(f'{field} must be a decimal string like "12.50"')
    places = len(match.group(3) or "")
    if places > max_places:
        raise MoneyError(f"{field} has more than {max_places} decimal places")
    try:
        return Decimal(text)
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards
        raise MoneyError(f"{field} is not a decimal") from exc


def to_micros(text: str, *, field: str = "amount") -> int:
    """``"12.345678"`` -> ``12345678``. More than 6 decimals is an error, never rounded."""
    micros = int(parse_decimal(text, field=field) * MICROS_PER_UNIT)
    if abs(micros) >= MAX_MICROS:
        raise MoneyError(f"{field} is too large")
    return micros


def format_micros(micros: int) -> str:
    """``12345678`` -> ``"12.345678"``; ``-500`` -> ``"-0.000500"``. Always 6 places."""
    sign = "-" if micros < 0 else ""
    units, frac = divmod(abs(micros), MICROS_PER_UNIT)
    return f"{sign}{units}.{frac:06d}"


def round_half_up(value: Decimal) -> int:
    """Round a Decimal amount of micros to a whole micro, halves away from zero."""
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def price_usage(quantity: Decimal, unit_price_micros: int) -> int:
    """Amount in micros for ``quantity`` units at ``unit_price_micros``: exact, then half-up."""
    return round_half_up(quantity * unit_price_micros)


def apply_markup(amount_micros: int, markup: Decimal) -> int:
    """The company price for a platform amount: ``amount x markup``, half-up to a micro."""
    return round_half_up(Decimal(amount_micros) * markup)


# A markup multiplies the platform price: a decimal string from "1" to "10" with at most six
# decimals (spec: 1x-10x). One rule, on the rebilling settings model (tally.events) and
# wherever markups are entered or applied.
MIN_MARKUP, MAX_MARKUP, MARKUP_PLACES = Decimal(1), Decimal(10), 6


def parse_markup(text: object, *, field: str = "markup") -> Decimal:
    """A markup as a Decimal; MoneyError (a ValueError) when it is not one."""
    if not isinstance(text, str):
        raise MoneyError(f'{field}: a markup is a decimal string like "1.5"')
    value = parse_decimal(text, max_places=MARKUP_PLACES, field=field)
    if not MIN_MARKUP <= value <= MAX_MARKUP:
        raise MoneyError(f"{field} must be between 1 and 10, got {text}")
    return value


def minor_unit_exponent(currency: str) -> int:
    return _MINOR_UNIT_EXPONENT.get(currency.upper(), 2)


def micros_to_minor_units_ceil(micros: int, currency: str) -> int:
    """Micros -> the currency's minor unit for a Stripe charge, rounding UP (never undercharge
    the amount that must be credited)."""
    per_minor = _micros_per_minor_unit(currency)
    return int((Decimal(micros) / per_minor).to_integral_value(rounding=ROUND_CEILING))


def minor_units_to_micros(minor: int, currency: str) -> int:
    return minor * _micros_per_minor_unit(currency)


def _micros_per_minor_unit(currency: str) -> int:
    return MICROS_PER_UNIT // int(10 ** minor_unit_exponent(currency))


# --- the same rules as patterns, for the OpenAPI documents ------------------------------------
# What ``tally.errors.money_field`` (through ``to_micros``) accepts, exactly: blanks around,
# an optional sign, digits, at most 6 decimals, below MAX_MICROS. tests/unit/test_money.py
# holds each pattern against the parser, both ways.

_BLANKS = "[ \\t]*"
_INTEGER = "0*[1-9][0-9]{0,11}"  # below 10**12 units (MAX_MICROS)
_FRACTION = "[0-9]{1,6}"
# 1 to 6 decimals, not all zero
_NONZERO_FRACTION = "(?:" + "|".join(f"0{{{z}}}[1-9][0-9]{{0,{5 - z}}}" for z in range(6)) + ")"
_POSITIVE = f"\\+?(?:{_INTEGER}(?:\\.{_FRACTION})?|0+\\.{_NONZERO_FRACTION})"
_ZERO = "[+-]?0+(?:\\.0{1,6})?"

POSITIVE_AMOUNT_PATTERN = f"^{_BLANKS}{_POSITIVE}{_BLANKS}$"
AMOUNT_PATTERN = f"^{_BLANKS}(?:{_POSITIVE}|{_ZERO}){_BLANKS}$"  # zero allowed
_MARKUP = "\\+?(?:0*[1-9](?:\\.[0-9]{1,6})?|0*10(?:\\.0{1,6})?)"  # 1 to 10
MARKUP_PATTERN = f"^{_BLANKS}{_MARKUP}{_BLANKS}$"


def amount_field(description: str, *, allow_zero: bool = False, default: Any = ...) -> Any:
    """A money field of a request model: a decimal string, documented with its exact pattern
    (the route parses it with ``tally.errors.money_field``, which says what is wrong)."""
    pattern = AMOUNT_PATTERN if allow_zero else POSITIVE_AMOUNT_PATTERN
    return Field(default, description=description, json_schema_extra={"pattern": pattern})

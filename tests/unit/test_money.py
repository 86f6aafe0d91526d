import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.money import (
    AMOUNT_PATTERN,
    POSITIVE_AMOUNT_PATTERN,
    MoneyError,
    apply_markup,
    format_micros,
    micros_to_minor_units_ceil,
    price_usage,
    to_micros,
)


def test_parse_and_format_are_exact() -> None:
    assert to_micros("12.345678") == 12_345_678
    assert to_micros("0.000675") == 675
    assert to_micros("-1.5") == -1_500_000
    assert format_micros(675) == "0.000675"
    assert format_micros(-500) == "-0.000500"
    assert format_micros(12_000_000) == "12.000000"
    assert to_micros(" 2.5\t") == to_micros("+2.5") == 2_500_000  # blanks and a sign are forgiven


@pytest.mark.parametrize(
    "bad",
    # other scripts' digits, control characters and other spaces around the digits: no client
    # of a billing API means those (Decimal and str.strip would take them)
    ["1.2345678", "abc", "1e3", "", " ", "1,5", "NaN", "0x10", "١", "５", "5\n", "5\x1c", "\u00a05", "1_0"],
)
def test_rejects_what_is_not_an_exact_decimal(bad: str) -> None:
    with pytest.raises(MoneyError):
        to_micros(bad)


def test_rejects_floats_outright() -> None:
    with pytest.raises(MoneyError):
        to_micros(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_format_then_parse_round_trips(micros: int) -> None:
    assert to_micros(format_micros(micros)) == micros


def test_usage_pricing_rounds_half_up_to_a_micro() -> None:
    assert price_usage(Decimal("3"), 675) == 2025
    assert price_usage(Decimal("0.5"), 675) == 338  # 337.5 -> 338
    assert price_usage(Decimal("0.1"), 1) == 0


def test_markup_is_exact() -> None:
    assert apply_markup(675, Decimal("1.5")) == 1013  # 1012.5 -> 1013
    assert apply_markup(1_000_000, Decimal("1")) == 1_000_000


def test_stripe_amount_rounds_up_to_the_minor_unit() -> None:
    assert micros_to_minor_units_ceil(10_000_001, "USD") == 1001
    assert micros_to_minor_units_ceil(10_000_000, "USD") == 1000
    assert micros_to_minor_units_ceil(1_500_000, "JPY") == 2


def test_token_buckets_limit_per_key_and_refill() -> None:
    from tally.ratelimit import TokenBuckets

    buckets = TokenBuckets(rate=10, burst=5)
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    wait = buckets.take("a")
    assert 0 < wait <= 0.1 + 1e-9
    assert buckets.take("b") == 0.0  # another token has its own bucket
    assert TokenBuckets(rate=0, burst=1).take("x", 1000) == 0.0  # 0 = unlimited


# --- the OpenAPI patterns say exactly what the parser accepts ----------------------------------


def _accepts(text: str, allow_zero: bool) -> bool:
    from tally.errors import ApiError, money_field

    try:
        money_field(text, "amount", allow_zero=allow_zero)
    except ApiError:
        return False
    return True


_PATTERNS = [(POSITIVE_AMOUNT_PATTERN, False), (AMOUNT_PATTERN, True)]
_NEAR_MONEY = st.text(alphabet="0123456789.+- \t\n\x0b١", max_size=22)


@pytest.mark.parametrize(("pattern", "allow_zero"), _PATTERNS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_an_amount_pattern_matches_what_the_parser_accepts(pattern: str, allow_zero: bool, data: Any) -> None:
    text = data.draw(st.one_of(_NEAR_MONEY, st.from_regex(pattern, fullmatch=True)))
    # the document's patterns are ECMA regexes: ``$`` is the end, never before a newline
    matches = re.fullmatch(pattern.removeprefix("^").removesuffix("$"), text) is not None
    assert matches == _accepts(text, allow_zero), text


def strip(pattern: str) -> str:
    return pattern.removeprefix("^").removesuffix("$")


@pytest.mark.parametrize(
    ("text", "positive", "zero_or_more"),
    [
        ("12.50", True, True),
        ("0", False, True),
        ("-0.0", False, True),
        ("0.000001", True, True),
        ("0.0000001", False, False),
        ("999999999999.999999", True, True),
        ("1000000000000", False, False),
        (" 5\t", True, True),
        ("5\n", False, False),
        ("-1", False, False),
    ],
)
def test_amount_patterns_on_the_edges(text: str, positive: bool, zero_or_more: bool) -> None:
    assert (re.fullmatch(strip(POSITIVE_AMOUNT_PATTERN), text) is not None) is positive
    assert (re.fullmatch(strip(AMOUNT_PATTERN), text) is not None) is zero_or_more
    assert _accepts(text, False) is positive and _accepts(text, True) is zero_or_more

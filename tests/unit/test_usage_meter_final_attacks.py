"""Attacks on usage-meter's price memory (``domain.priced_quantity``, #20), in process.

A review found this in the memory's first version, now mended (only texts of 32 characters
or fewer are kept): the memory was bounded at 4,096 *entries*, not in bytes, and its key is
the quantity *as sent*. A valid quantity may be as long as the body allows
(TALLY_MAX_BODY_BYTES, 2,000,000): leading zeros ("000…0001") and blanks around it are
accepted, and an accepted event's text stayed in the memory. So one product token could make
each usage-meter process keep ~2 MB per event it sends, up to 4,096 x 2 MB ≈ 8 GB, with
events that cost it nothing ("000…0.000001" prices to 0 micros). The chart gives usage-meter
512 MiB (768 MiB in production): a few hundred such events, over HTTP or on
``usage.ingest``, would get every replica OOM-killed, and ingestion (the money path) stop.
Before the memory, pricing kept nothing.

The rest (``test_held``) are guards of what held: the memory never answers another price's
amount, nor a refusal after an acceptance or the reverse."""

from __future__ import annotations

import gc
import itertools
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from tally_usage_meter.domain import (
    InvalidQuantity,
    Price,
    Priced,
    Rejected,
    parse_quantity,
    price_event,
    recorded_message,
)
from tally_usage_meter.ingestion import parse_ingest_record
from tally_usage_meter.schemas import parse_usage_body

if TYPE_CHECKING:  # the file also runs on the code before the change (no IncomingUsage there)
    from tally.events import IncomingUsage

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)
LONG = 1_900_000  # under TALLY_MAX_BODY_BYTES' default of 2,000,000
_lengths = itertools.count(LONG, 100)  # texts no other test priced: each run adds its own


def _event(i: int, quantity: object, service: str = "sms") -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "company_id": "co_1", "service": service, "quantity": quantity})


def _http(raw: bytes) -> IncomingUsage:
    [event] = parse_usage_body(raw)
    return event


@pytest.mark.parametrize("read", [_http, parse_ingest_record], ids=["POST /v1/usage", "usage.ingest"])
@pytest.mark.parametrize("padding", ["zeros", "blanks"])
def test_accepted_long_quantity_texts_are_not_kept_after_pricing(read: object, padding: str) -> None:
    """Found by a review, mended: 12 events whose quantity is ~1.9 MB of valid text (leading
    zeros, or blanks around) are priced, and nothing of them is referenced any more; the
    process holds no more than it did (before the price memory: ~0 bytes kept). The first
    version kept ~1.9 MB per event (~23 MB here), up to 4,096 of them."""
    prices = {("sms", "USD"): Price("sms", "message", 7500, "USD")}
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(12):
            length = next(_lengths)
            if padding == "zeros":
                quantity = "0" * length + "0.000001"  # costs 0 micros at any usual price
            else:
                quantity = " " * length + "1"
            event = read(_event(i, quantity))  # type: ignore[operator]
            verdict = price_event(event, prices, "USD", NOW)
            assert isinstance(verdict, Priced), verdict  # accepted, as before the memory
            del event, verdict, quantity
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, f"{kept:,} bytes kept after pricing 12 events of ~1.9 MB"


def _verdict(raw: bytes, prices: dict[tuple[str, str], Price], currency: str = "USD") -> tuple[Any, ...]:
    v = price_event(_http(raw), prices, currency, NOW)
    if isinstance(v, Rejected):
        return ("rejected", v.code, v.message)
    data = orjson.loads(recorded_message(v, NOW))["data"]
    return (data["quantity"], data["unit_price_micros"], data["platform_amount_micros"], data["currency"])


def _anew(quantity: str, unit_price: int) -> tuple[str, int] | tuple[str, str]:
    """What pricing without the memory answers: (text, amount), or ("rejected", code)."""
    try:
        q = parse_quantity(quantity)
    except InvalidQuantity:
        return "rejected", "invalid_quantity"
    return format(q, "f"), int((q * unit_price).to_integral_value(rounding="ROUND_HALF_UP"))


SPELLINGS = ["1", "01", "1.0", " 1 ", "\t1", "+1", "1.000000", "001.500000", "0.0000015", "2.5", "0.000001"]


def test_held_a_price_change_between_the_same_text_prices_anew() -> None:
    """A→B→A for the same texts, and another service and another currency at the same price:
    each amount is quantity x the price of the moment, half-up; the text written in
    usage.recorded is the parsed quantity's, as before."""
    for unit in (7500, 7501, 7500, 333_333, 1, 7500):
        prices = {
            ("sms", "USD"): Price("sms", "m", unit, "USD"),
            ("sms", "EUR"): Price("sms", "m", unit, "EUR"),
            ("email", "USD"): Price("email", "m", unit, "USD"),
        }
        for i, q in enumerate(SPELLINGS):
            text, amount = _anew(q, unit)
            for service, currency in (("sms", "USD"), ("sms", "EUR"), ("email", "USD")):
                got = _verdict(_event(i, q, service), prices, currency)
                if text == "rejected":
                    assert got[:2] == (text, amount)
                else:
                    assert got == (text, unit, amount, currency)


def test_held_a_refusal_after_an_acceptance_of_the_same_text_and_the_reverse() -> None:
    """Accepted at a low price, the same text is refused at a price past what a wallet holds,
    and accepted again when the price is back; refusals are not remembered as acceptances."""
    low = {("sms", "USD"): Price("sms", "m", 10**6, "USD")}
    high = {("sms", "USD"): Price("sms", "m", 10**15, "USD")}
    raw = _event(1, "1000")
    assert _verdict(raw, low)[0] == "1000"
    assert _verdict(raw, high) == (
        "rejected",
        "invalid_quantity",
        "quantity x price is more than a wallet can hold",
    )
    assert _verdict(raw, low)[0] == "1000"
    for bad in ("0", "-1", "1e3", "1.0000001", "1000000000.000001", "abc", ""):
        for _ in range(2):
            assert _verdict(_event(2, bad), low)[:2] == ("rejected", "invalid_quantity")


def test_held_past_4096_distinct_quantities_every_amount_is_right() -> None:
    """5,000 distinct texts (the memory empties itself on the way), then the first ones again
    at another price."""
    texts = [f"{n}.{n % 1000:03d}" for n in range(1, 5001)]
    for unit in (7, 11, 7):
        prices = {("sms", "USD"): Price("sms", "m", unit, "USD")}
        for i, q in enumerate(texts):
            text, amount = _anew(q, unit)
            assert _verdict(_event(i, q), prices) == (text, unit, amount, "USD")


def test_held_namedtuple_verdicts_decide_as_before() -> None:
    """Two equal refusals stay refusals (a NamedTuple is never falsy with three fields), and a
    Priced is never taken for a Rejected nor the reverse."""
    r = Rejected("e1", "invalid_quantity", "")
    assert r and r == Rejected("e1", "invalid_quantity", "") and not isinstance(r, Priced)
    p = price_event(_http(_event(1, "1")), {("sms", "USD"): Price("sms", "m", 1, "USD")}, "USD", NOW)
    assert isinstance(p, Priced) and not isinstance(p, Rejected) and p.quantity == Decimal(1)

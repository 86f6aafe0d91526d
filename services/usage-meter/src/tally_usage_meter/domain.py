"""Pricing and validation of usage events. Pure: no I/O.

An event is priced at the platform price of its service; the amount is exact
(quantity x unit price in micros, rounded half-up to a whole micro)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import msgspec

from tally.events import IncomingUsage, encoded_envelope, occurred_instant
from tally.money import MAX_MICROS, MoneyError, parse_decimal, price_usage

MAX_QUANTITY = Decimal(1_000_000_000)
# The most one event may cost: a million units of its currency (docs/0030). With the highest
# markup (x10) its account leg is 10**13 micros, so a wallet's balance (BIGINT, ~9.2 * 10**18)
# takes ~920,000 such events to overflow, not the ~100 a tenth of tally.money.MAX_MICROS took
# (an attack of 2026-12-05 overflowed a company wallet with one batch of 300 accepted events,
# whose last 198 were then dead-lettered, never charged). Usage is stopped long before that by
# the suspension of a wallet below zero.
MAX_EVENT_MICROS = MAX_MICROS // 10**6
DEFAULT_CURRENCY = "USD"  # of a company id no one can create (rebilling pins the others')

Rejection = Literal[
    "unknown_service",
    "price_unavailable",
    "invalid_quantity",
    "unknown_account",
    "account_suspended",
    "agency_wallet_empty",
]


@dataclass(frozen=True)
class Price:
    service: str
    unit: str
    unit_price_micros: int
    currency: str


class Priced(NamedTuple):
    """An event and its price (a NamedTuple: one per event, built in a third of a frozen
    dataclass's time, and as immutable)."""

    event: IncomingUsage
    quantity: Decimal
    price: Price
    amount_micros: int
    occurred_at: datetime


class Rejected(NamedTuple):
    event_id: str
    code: Rejection
    message: str


class InvalidQuantity(ValueError):
    pass


def parse_quantity(value: Any) -> Decimal:
    """A quantity is a decimal string (or a JSON integer) > 0, with at most 6 decimals."""
    if isinstance(value, bool) or value is None:
        raise InvalidQuantity("quantity must be a decimal string greater than 0")
    if isinstance(value, int):
        quantity = Decimal(value)
    elif isinstance(value, str):
        try:
            quantity = parse_decimal(value, field="quantity")
        except MoneyError as exc:
            raise InvalidQuantity(str(exc)) from exc
    else:
        raise InvalidQuantity('quantity must be a decimal string like "1.5" (not a float)')
    if quantity <= 0:
        raise InvalidQuantity("quantity must be greater than 0")
    if quantity > MAX_QUANTITY:
        raise InvalidQuantity(f"quantity must be at most {MAX_QUANTITY}")
    return quantity


# (quantity as sent, unit price) -> (quantity, amount): products send the same few quantities
# ("1", "2", "3.5") over and over, and parsing one and pricing it exactly took ~2 µs an event.
# Both are pure functions of the key; refusals are not kept. Emptied when full. Only short
# texts are kept: a valid quantity may be padded with zeros or blanks up to the body limit,
# and 4,096 such keys would hold gigabytes (found by a review: ~1.9 MB an event).
_PRICED: dict[tuple[str, int], tuple[Decimal, int]] = {}
PRICED_KEPT = 4096
PRICED_TEXT = 32  # "1000000000.000000" is 17


def priced_quantity(value: Any, unit_price_micros: int) -> tuple[Decimal, int]:
    """``parse_quantity(value)`` and its price at ``unit_price_micros``
    (``tally.money.price_usage``), remembered for quantities sent as text."""
    if type(value) is not str or len(value) > PRICED_TEXT:
        quantity = parse_quantity(value)
        return quantity, price_usage(quantity, unit_price_micros)
    key = (value, unit_price_micros)
    known = _PRICED.get(key)
    if known is None:
        quantity = parse_quantity(value)
        known = (quantity, price_usage(quantity, unit_price_micros))
        if len(_PRICED) >= PRICED_KEPT:
            _PRICED.clear()
        _PRICED[key] = known
    return known


def price_event(
    event: IncomingUsage, prices: dict[tuple[str, str], Price], currency: str, now: datetime
) -> Priced | Rejected:
    """Price ``event`` in its company's ``currency``."""
    price = prices.get((event.service, currency))
    if price is None:
        if any(service == event.service for service, _ in prices):
            return Rejected(
                event.event_id,
                "price_unavailable",
                f"{event.service!r} has no price in {currency}, the company's currency",
            )
        return Rejected(
            event.event_id, "unknown_service", f"unknown service {event.service!r}; see GET /v1/prices"
        )
    try:
        quantity, amount = priced_quantity(event.quantity, price.unit_price_micros)
    except InvalidQuantity as exc:
        return Rejected(event.event_id, "invalid_quantity", str(exc))
    if amount > MAX_EVENT_MICROS:
        return Rejected(event.event_id, "invalid_quantity", "quantity x price is more than a wallet can hold")
    occurred = now if event.occurred_at is None else occurred_instant(event.occurred_at)
    return Priced(event, quantity, price, amount, occurred)


def tenancy_of(event: IncomingUsage, owners: dict[str, str], announced: AbstractSet[str]) -> Rejected | None:
    """An event's account must be one of its company's: an account rebilling placed in another
    company, or one the company (announced by rebilling) never had, is refused."""
    if not event.account_id:
        return None
    owner = owners.get(event.account_id)
    if owner == event.company_id:
        return None
    if owner is not None or event.company_id in announced:
        return Rejected(
            event.event_id,
            "unknown_account",
            f"account {event.account_id!r} is not one of {event.company_id!r}'s",
        )
    return None


def suspension_of(event: IncomingUsage, suspended: set[tuple[str, str]]) -> Rejected | None:
    """Usage is refused while the account's wallet, or its agency's wallet, is suspended."""
    if event.account_id and ("account", event.account_id) in suspended:
        return Rejected(
            event.event_id, "account_suspended", "the account's wallet is empty; usage resumes after a credit"
        )
    if ("company", event.company_id) in suspended:
        return Rejected(
            event.event_id,
            "agency_wallet_empty",
            "the agency wallet is empty; usage resumes after it is reloaded",
        )
    return None


class _Recorded(msgspec.Struct, gc=False):
    """``usage.recorded``'s payload: the fields of ``tally.events.UsageRecorded``, in order."""

    event_id: str
    company_id: str
    account_id: str | None
    service: str
    quantity: str
    occurred_at: str
    recorded_at: str
    unit_price_micros: int
    platform_amount_micros: int
    currency: str


RECORDED = "usage.recorded"
SOURCE = "usage-meter"


def recorded_message(p: Priced, recorded_at: datetime, recorded_text: str | None = None) -> bytes:
    """The ``usage.recorded`` envelope of an accepted event, encoded; ``recorded_text`` is
    ``recorded_at.isoformat()`` when the caller has it already. Encoded from structs: this runs
    once per event, and a dict encoded by orjson took about twice as long (unit tests hold it
    to ``UsageRecorded``)."""
    e = p.event
    recorded = recorded_text or recorded_at.isoformat()
    data = _Recorded(
        e.event_id,
        e.company_id,
        e.account_id,
        e.service,
        format(p.quantity, "f"),
        recorded if p.occurred_at is recorded_at else p.occurred_at.isoformat(),
        recorded,
        p.price.unit_price_micros,
        p.amount_micros,
        p.price.currency,
    )
    # the id is "usage:" + tally.events.usage_key (an event id is unique within its company)
    return encoded_envelope(f"usage:{e.company_id}/{e.event_id}", RECORDED, recorded, SOURCE, data)

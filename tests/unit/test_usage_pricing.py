from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
import pytest

from tally import events
from tally.errors import ApiError
from tally.events import IncomingUsage, RecordedUsage, UsageEvent, UsageRecorded
from tally_usage_meter.domain import (
    Price,
    Priced,
    Rejected,
    price_event,
    suspension_of,
    tenancy_of,
)
from tally_usage_meter.domain import (
    recorded_message as encoded_recorded,
)
from tally_usage_meter.schemas import parse_usage_body

PRICES = {
    ("email", "USD"): Price("email", "email", 675, "USD"),
    ("email", "EUR"): Price("email", "email", 600, "EUR"),
    ("sms", "USD"): Price("sms", "segment", 7900, "USD"),
}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def recorded_payload(p: Priced, at: datetime, text: str | None = None) -> dict[str, Any]:
    """The payload of the ``usage.recorded`` usage-meter writes for ``p``."""
    data: dict[str, Any] = orjson.loads(encoded_recorded(p, at, text))["data"]
    return data


def ev(**kw: object) -> IncomingUsage:
    base: dict[str, object] = {"event_id": "e1", "company_id": "c1", "service": "email", "quantity": "3"}
    return IncomingUsage.of(UsageEvent.model_validate({**base, **kw}))


def test_prices_at_the_catalog_price() -> None:
    p = price_event(ev(), PRICES, "USD", NOW)
    assert isinstance(p, Priced) and p.amount_micros == 2025
    payload = UsageRecorded.model_validate(recorded_payload(p, NOW))
    assert payload.platform_amount_micros == 2025 and payload.unit_price_micros == 675


def recorded_message(**data: object) -> bytes:
    p = price_event(ev(account_id="a1", occurred_at="2026-01-01T09:30:00.25+02:00"), PRICES, "USD", NOW)
    assert isinstance(p, Priced)
    payload = {**recorded_payload(p, NOW), **data}
    envelope = {"id": "usage:e1", "type": "usage.recorded", "time": NOW.isoformat(), "source": "usage-meter"}
    return events.dumps({**envelope, "data": payload})


def test_the_wallet_reads_usage_recorded_as_the_schema_does() -> None:
    """The wallet decodes ``usage.recorded`` with msgspec (``RecordedUsage``), not with the
    pydantic model the schema is made of: both must read the same fields, to the same values."""
    assert set(RecordedUsage.__struct_fields__) == set(UsageRecorded.model_fields)
    raw = recorded_message()
    fast = events.parse_usage_recorded(raw)
    schema = events.parse_message(raw).data
    assert isinstance(schema, UsageRecorded)
    assert msgspec.structs.asdict(fast) == schema.model_dump()
    without_account = events.parse_usage_recorded(recorded_message(account_id=None, extra_field=1))
    assert without_account.account_id is None  # and a field it does not know is ignored


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"occurred_at": "2026-01-01T09:30:00"}, "timezone"),  # no offset: no instant
        ({"platform_amount_micros": 2025.0}, "int"),  # never a float of money
        ({"platform_amount_micros": "2025"}, "int"),
        ({"event_id": None}, "str"),
        ({"currency": 1}, "str"),
        ({"platform_amount_micros": -5}, ">= 0"),  # no price gives one: dead-lettered, not dropped
        ({"unit_price_micros": -1}, ">= 0"),
        ({"occurred_at": "0001-01-01T00:00:00+01:00"}, "1900-2099"),  # the schema's years
        ({"occurred_at": "2100-01-01T00:00:00Z"}, "1900-2099"),
        ({"recorded_at": "1899-12-31T23:59:59Z"}, "1900-2099"),
        ({"event_id": "co-1/e1"}, "'/'"),  # it would take company co-1's event e1's key
        ({"company_id": "co-1/e1", "event_id": "x"}, "'/'"),
    ],
)
def test_a_usage_recorded_the_wallet_cannot_read_is_bad(broken: dict[str, object], reason: str) -> None:
    raw = recorded_message(**broken)
    with pytest.raises(events.BadMessage, match=reason):
        events.parse_usage_recorded(raw)
    with pytest.raises(events.BadMessage):  # the schema says the same
        events.parse_message(raw)


@pytest.mark.parametrize("raw", [None, b"", b"{", b"[]", b'{"id": "x", "type": "wallet.debited"}'])
def test_what_is_not_a_usage_recorded_is_a_bad_message(raw: bytes | None) -> None:
    with pytest.raises(events.BadMessage):
        events.parse_usage_recorded(raw)


@pytest.mark.parametrize("quantity", ["0", "-1", "abc", 1.5, None, True, "1.1234567", "1e9"])
def test_bad_quantities_are_rejected(quantity: object) -> None:
    r = price_event(ev(quantity=quantity), PRICES, "USD", NOW)
    assert isinstance(r, Rejected) and r.code == "invalid_quantity"


def test_unknown_service_is_rejected() -> None:
    r = price_event(ev(service="fax"), PRICES, "USD", NOW)
    assert isinstance(r, Rejected) and r.code == "unknown_service"


def test_a_company_is_priced_in_its_currency_or_refused() -> None:
    p = price_event(ev(), PRICES, "EUR", NOW)
    assert isinstance(p, Priced) and p.amount_micros == 1800 and p.price.currency == "EUR"
    r = price_event(ev(service="sms"), PRICES, "EUR", NOW)
    assert isinstance(r, Rejected) and r.code == "price_unavailable"


def test_an_amount_beyond_what_a_wallet_holds_is_an_invalid_quantity() -> None:
    dear = {("email", "USD"): Price("email", "email", 10**12, "USD")}  # 1,000,000 a unit
    assert isinstance(price_event(ev(quantity="1"), dear, "USD", NOW), Priced)  # a million: the most
    r = price_event(ev(quantity="1.000001"), dear, "USD", NOW)
    assert isinstance(r, Rejected) and r.code == "invalid_quantity"


def test_an_account_must_be_the_companys() -> None:
    owners = {"a1": "c1", "b1": "c2"}
    assert tenancy_of(ev(account_id="a1"), owners, {"c1"}) is None
    assert tenancy_of(ev(), owners, {"c1"}) is None  # no account: the company's own usage
    foreign = tenancy_of(ev(account_id="b1"), owners, set())
    assert foreign is not None and foreign.code == "unknown_account"
    unknown = tenancy_of(ev(account_id="zz"), owners, {"c1"})
    assert unknown is not None and unknown.code == "unknown_account"
    # a company rebilling never announced (usage without rebilling): its accounts are its own
    assert tenancy_of(ev(company_id="c9", account_id="zz"), owners, {"c1"}) is None


def test_suspension_reasons() -> None:
    e = ev(account_id="a1")
    assert suspension_of(e, {("account", "a1")}).code == "account_suspended"  # type: ignore[union-attr]
    assert suspension_of(e, {("company", "c1")}).code == "agency_wallet_empty"  # type: ignore[union-attr]
    assert suspension_of(e, set()) is None


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"x"',
        b'{"events": []}',
        b'{"events": {}}',
        b'{"event_id": "bad id!", "company_id": "c", "service": "email", "quantity": "1"}',
        b'{"company_id": "c", "service": "email", "quantity": "1"}',
    ],
)
def test_malformed_bodies_are_422(body: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_usage_body(body)
    assert info.value.status == 422 and info.value.code == "validation_error"


def test_batches_are_capped_at_1000() -> None:
    one = b'{"event_id": "e", "company_id": "c", "service": "email", "quantity": "1"}'
    with pytest.raises(ApiError):
        parse_usage_body(b'{"events": [' + b",".join([one] * 1001) + b"]}")
    assert len(parse_usage_body(b'{"events": [' + b",".join([one] * 1000) + b"]}")) == 1000

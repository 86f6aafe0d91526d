from datetime import UTC, datetime

import pytest

from tally.errors import ApiError
from tally.events import UsageEvent, UsageRecorded
from tally_usage_meter.api import parse_usage_body
from tally_usage_meter.domain import (
    Price,
    Priced,
    Rejected,
    price_event,
    recorded_payload,
    suspension_of,
)

PRICES = {"email": Price("email", "email", 675, "USD")}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def ev(**kw: object) -> UsageEvent:
    base: dict[str, object] = {"event_id": "e1", "company_id": "c1", "service": "email",
                               "quantity": "3"}
    return UsageEvent.model_validate({**base, **kw})


def test_prices_at_the_catalog_price() -> None:
    p = price_event(ev(), PRICES, NOW)
    assert isinstance(p, Priced) and p.amount_micros == 2025
    payload = UsageRecorded.model_validate(recorded_payload(p, NOW))
    assert payload.platform_amount_micros == 2025 and payload.unit_price_micros == 675


@pytest.mark.parametrize("quantity", ["0", "-1", "abc", 1.5, None, True, "1.1234567", "1e9"])
def test_bad_quantities_are_rejected(quantity: object) -> None:
    r = price_event(ev(quantity=quantity), PRICES, NOW)
    assert isinstance(r, Rejected) and r.code == "invalid_quantity"


def test_unknown_service_is_rejected() -> None:
    r = price_event(ev(service="fax"), PRICES, NOW)
    assert isinstance(r, Rejected) and r.code == "unknown_service"


def test_suspension_reasons() -> None:
    e = ev(account_id="a1")
    assert suspension_of(e, {("account", "a1")}).code == "account_suspended"  # type: ignore[union-attr]
    assert suspension_of(e, {("company", "c1")}).code == "agency_wallet_empty"  # type: ignore[union-attr]
    assert suspension_of(e, set()) is None


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", b'"x"', b'{"events": []}', b'{"events": {}}',
    b'{"event_id": "bad id!", "company_id": "c", "service": "email", "quantity": "1"}',
    b'{"company_id": "c", "service": "email", "quantity": "1"}',
])
def test_malformed_bodies_are_422(body: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_usage_body(body)
    assert info.value.status == 422 and info.value.code == "validation_error"


def test_batches_are_capped_at_1000() -> None:
    one = b'{"event_id": "e", "company_id": "c", "service": "email", "quantity": "1"}'
    with pytest.raises(ApiError):
        parse_usage_body(b'{"events": [' + b",".join([one] * 1001) + b"]}")
    assert len(parse_usage_body(b'{"events": [' + b",".join([one] * 1000) + b"]}")) == 1000

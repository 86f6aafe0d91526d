"""The auto-recharge rule and Idempotency-Key fingerprints, pure."""

from hypothesis import given
from hypothesis import strategies as st

from tally.autorecharge import TIERS, needs_recharge, next_tier, recharge_amount
from tally.idempotency import request_hash

money = st.integers(min_value=-(10**12), max_value=10**12)
positive = st.integers(min_value=1, max_value=10**12)


@given(auto=st.booleans(), card=st.booleans(), balance=money, threshold=money, flying=st.booleans())
def test_recharged_only_when_every_condition_holds(
    auto: bool, card: bool, balance: int, threshold: int, flying: bool
) -> None:
    assert needs_recharge(
        auto_recharge=auto, has_card=card, balance=balance, threshold=threshold, in_flight=flying
    ) == (auto and card and balance < threshold and not flying)


@given(balance=money, threshold=st.integers(min_value=0, max_value=10**12), reload=positive)
def test_a_recharge_always_reaches_the_threshold(balance: int, threshold: int, reload: int) -> None:
    amount = recharge_amount(balance, threshold, reload)
    assert amount >= reload
    assert balance + amount >= threshold
    if balance + reload >= threshold:
        assert amount == reload
    else:
        assert balance + amount == threshold + reload


def test_tiers_climb_one_rung_from_where_the_amount_is() -> None:
    assert next_tier(10_000_000) == 25_000_000
    assert next_tier(30_000_000) == 50_000_000  # an amount between rungs goes to the next one
    assert next_tier(TIERS[-1]) is None


def test_a_fingerprint_is_the_route_and_the_body_whatever_the_key_order() -> None:
    a = request_hash("/v1/x", {"amount": "1", "reference": None})
    assert a == request_hash("/v1/x", {"reference": None, "amount": "1"})
    assert a != request_hash("/v1/y", {"amount": "1", "reference": None})
    assert a != request_hash("/v1/x", {"amount": "1.0", "reference": None})

"""recharge's pure rules: card order, retries and cancellation, smart adjustment, why an
automatic recharge is dropped, whose wallet a recharge is for; and the wallet state it reads."""

from datetime import UTC, datetime, timedelta

import pytest

from tally.autorecharge import WalletState
from tally_recharge.domain import (
    RAISE_AFTER,
    Card,
    RetryPolicy,
    WalletTarget,
    card_order,
    should_raise_tier,
    why_not,
)
from tally_recharge.wallets import _micros

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def state(*, auto_recharge: bool = True, balance: int = 0, threshold: int = 10) -> WalletState:
    return WalletState(
        balance=balance,
        threshold=threshold,
        reload_amount=50_000_000,
        auto_recharge=auto_recharge,
        smart_adjustment=False,
    )


# --- smart adjustment -----------------------------------------------------------------------


def test_the_tier_is_raised_after_three_auto_recharges_with_smart_adjustment_on() -> None:
    assert RAISE_AFTER == 3
    assert not should_raise_tier(2, smart_adjustment=True)
    assert should_raise_tier(3, smart_adjustment=True)
    assert should_raise_tier(7, smart_adjustment=True)


def test_the_tier_is_never_raised_with_smart_adjustment_off() -> None:
    assert not should_raise_tier(3, smart_adjustment=False)
    assert not should_raise_tier(100, smart_adjustment=False)


# --- which card first -----------------------------------------------------------------------


def test_the_default_card_is_tried_first_even_if_another_succeeded_more_recently() -> None:
    default = Card("pm_default", True, None, 1)
    recent = Card("pm_recent", False, T0, 2)
    assert [c.id for c in card_order([recent, default])] == ["pm_default", "pm_recent"]


def test_after_the_default_the_most_recently_successful_card_comes_first() -> None:
    cards = [
        Card("pm_old_success", False, T0, 5),
        Card("pm_never", False, None, 9),
        Card("pm_new_success", False, T0 + timedelta(hours=1), 1),
    ]
    assert [c.id for c in card_order(cards)] == ["pm_new_success", "pm_old_success", "pm_never"]


def test_cards_that_never_succeeded_go_newest_attached_first() -> None:
    cards = [Card("pm_a", False, None, 1), Card("pm_c", False, None, 3), Card("pm_b", False, None, 2)]
    assert [c.id for c in card_order(cards)] == ["pm_c", "pm_b", "pm_a"]


def test_card_order_keeps_every_card_and_leaves_its_input_alone() -> None:
    cards = [Card("pm_a", False, None, 1), Card("pm_b", True, None, 2)]
    ordered = card_order(cards)
    assert sorted(c.id for c in ordered) == ["pm_a", "pm_b"]
    assert [c.id for c in cards] == ["pm_a", "pm_b"]
    assert card_order([]) == []


# --- retries and cancellation ---------------------------------------------------------------


def test_the_default_policy_retries_after_5_then_30_minutes_then_gives_up() -> None:
    policy = RetryPolicy()
    assert policy.after_failure(1) == timedelta(minutes=5)
    assert policy.after_failure(2) == timedelta(minutes=30)
    assert policy.after_failure(3) is None  # cancellation: auto-recharge is turned off
    assert policy.after_failure(10) is None


def test_the_retry_waits_come_from_the_setting() -> None:
    policy = RetryPolicy.from_text("4, 4,")
    assert policy.delays == (timedelta(seconds=4), timedelta(seconds=4))
    assert policy.after_failure(2) == timedelta(seconds=4)
    assert policy.after_failure(3) is None
    assert RetryPolicy.from_text("60").after_failure(2) is None  # one retry, then off


@pytest.mark.parametrize("text", [None, ""])
def test_an_empty_setting_means_the_default_policy(text: str | None) -> None:
    assert RetryPolicy.from_text(text) == RetryPolicy()


def test_a_malformed_retry_setting_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy.from_text("5m")


# --- why an automatic recharge is not wanted ------------------------------------------------


def test_auto_recharge_off_comes_before_every_other_reason() -> None:
    assert why_not(state(auto_recharge=False), usable_card=False, cancelling=False) == "auto_recharge_off"


def test_a_cancellation_in_progress_counts_as_auto_recharge_off() -> None:
    assert why_not(state(auto_recharge=True), usable_card=True, cancelling=True) == "auto_recharge_off"


def test_without_a_usable_card_the_reason_is_no_payment_method() -> None:
    assert why_not(state(), usable_card=False, cancelling=False) == "no_payment_method"


def test_otherwise_the_balance_is_back_at_its_threshold() -> None:
    assert why_not(state(balance=20, threshold=10), usable_card=True, cancelling=False) == (
        "balance_at_threshold"
    )


# --- whose wallet ---------------------------------------------------------------------------


def test_a_company_wallet_is_owned_by_its_company() -> None:
    t = WalletTarget("company:acme", "company", "acme", None, "USD")
    assert t.owner_id == "acme"
    assert t.ref() == {
        "wallet_id": "company:acme",
        "owner": "company",
        "company_id": "acme",
        "account_id": None,
        "currency": "USD",
    }


def test_an_account_wallet_is_owned_by_its_account() -> None:
    t = WalletTarget("account:a1", "account", "acme", "a1", "EUR")
    assert t.owner_id == "a1"
    assert t.ref()["account_id"] == "a1"
    assert t.ref()["company_id"] == "acme"


def test_an_account_wallet_without_an_account_id_falls_back_to_the_company() -> None:
    assert WalletTarget("account:?", "account", "acme", None, "USD").owner_id == "acme"


# --- the wallet's live state, as the wallet service writes it --------------------------------


def test_wallet_amounts_are_read_exactly_as_micros() -> None:
    assert _micros("12.5") == 12_500_000
    assert _micros("0.000001") == 1
    assert _micros("-3.250000") == -3_250_000


def test_a_balance_beyond_the_largest_chargeable_amount_is_still_read() -> None:
    assert _micros("99999999999999.000000") == 99_999_999_999_999_000_000

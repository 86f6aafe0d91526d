"""What a Stripe PaymentIntent means for a recharge try (``StripeGateway._result``, pure): paid,
still processing (wait, never the next card), or failed with a decline code; the fee in micros."""

from typing import Any

from tally_recharge.gateway import ChargeResult, StripeGateway


def intent(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "pi_1", "status": status, **extra}


def test_a_succeeded_intent_is_paid_with_its_stripe_fee_in_micros() -> None:
    paid = intent("succeeded", latest_charge={"balance_transaction": {"fee": 59}})
    assert StripeGateway._result(paid, "USD") == ChargeResult("succeeded", "pi_1", None, 590_000)


def test_the_fee_follows_the_currency_minor_unit() -> None:
    paid = intent("succeeded", latest_charge={"balance_transaction": {"fee": 40}})
    assert StripeGateway._result(paid, "JPY").fee_micros == 40_000_000


def test_a_fee_stripe_did_not_expand_is_unknown() -> None:
    assert StripeGateway._result(intent("succeeded", latest_charge="ch_1"), "USD").fee_micros is None
    assert StripeGateway._result(intent("succeeded"), "USD").fee_micros is None


def test_a_processing_intent_is_pending_not_failed() -> None:
    assert StripeGateway._result(intent("processing"), "USD") == ChargeResult("pending", "pi_1")


def test_an_intent_that_needs_the_customer_fails_that_card() -> None:
    result = StripeGateway._result(intent("requires_action"), "USD")
    assert result == ChargeResult("failed", "pi_1", "authentication_required")


def test_a_declined_intent_carries_the_decline_code_else_the_error_code_else_its_status() -> None:
    declined = intent(
        "requires_payment_method",
        last_payment_error={"decline_code": "insufficient_funds", "code": "card_declined"},
    )
    assert StripeGateway._result(declined, "USD").decline_code == "insufficient_funds"
    coded = intent("requires_payment_method", last_payment_error={"code": "expired_card"})
    assert StripeGateway._result(coded, "USD").decline_code == "expired_card"
    bare = StripeGateway._result(intent("canceled"), "USD")
    assert (bare.outcome, bare.decline_code) == ("failed", "canceled")

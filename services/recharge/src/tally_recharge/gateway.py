"""Stripe, through the official SDK (async client). The platform's Stripe for companies; the
company's connected account (``stripe_account``) for its accounts' customers and charges.

Every charge carries ``metadata.tally_attempt`` / ``tally_try`` and an idempotency key, so an
attempt interrupted by a crash can be found again (``find_charge``) instead of charged twice:
localstripe ignores idempotency keys, and our own records must hold regardless."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import stripe

from tally.money import micros_to_minor_units_ceil, minor_units_to_micros

log = logging.getLogger(__name__)


class StripeUnavailable(Exception):
    """Stripe could not be reached or answered 5xx: the outcome is unknown, retry later."""


class PaymentMethodRejected(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CardInfo:
    id: str
    brand: str | None
    last4: str | None


# A PaymentIntent still processing has not failed: the payment may still complete (a bank's
# delay). It stays pending until a webhook or a later look says. One that requires action (3-D
# Secure) cannot complete off-session without the customer: that card failed, try the next.
UNSETTLED = frozenset({"processing"})


@dataclass(frozen=True)
class ChargeResult:
    outcome: Literal["succeeded", "failed", "pending"]
    payment_intent: str | None = None
    decline_code: str | None = None
    fee_micros: int | None = None


def _options(stripe_account: str | None, idempotency_key: str | None = None) -> Any:
    opts: dict[str, str] = {}
    if stripe_account:
        opts["stripe_account"] = stripe_account
    if idempotency_key:
        opts["idempotency_key"] = idempotency_key
    return opts


class StripeGateway:
    # A call's worst case is (retries + 1) x timeout, well under the recharge lease (120 s by
    # default), so a leased attempt is never run by two replicas at once.
    TIMEOUT_SECONDS = 20
    RETRIES = 1

    def __init__(self, api_key: str, api_base: str) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            http_client=stripe.HTTPXClient(timeout=self.TIMEOUT_SECONDS),
            max_network_retries=self.RETRIES,
        )

    async def create_customer(
        self, *, email: str | None, name: str, stripe_account: str | None, idempotency_key: str
    ) -> str:
        try:
            customer = await self.client.v1.customers.create_async(
                params={"email": email or "", "name": name, "metadata": {"tally_owner": name}},
                options=_options(stripe_account, idempotency_key),
            )
        except (stripe.APIConnectionError, stripe.APIError) as exc:
            raise StripeUnavailable(str(exc)) from exc
        return str(customer.id)

    async def attach(self, payment_method: str, customer: str, stripe_account: str | None) -> CardInfo:
        try:
            pm = await self.client.v1.payment_methods.attach_async(
                payment_method, params={"customer": customer}, options=_options(stripe_account)
            )
        except stripe.CardError as exc:
            raise PaymentMethodRejected("card_declined", exc.user_message or "the card was declined") from exc
        except stripe.InvalidRequestError as exc:
            raise PaymentMethodRejected(
                "invalid_payment_method", exc.user_message or "unknown payment method"
            ) from exc
        except (stripe.APIConnectionError, stripe.APIError) as exc:
            raise StripeUnavailable(str(exc)) from exc
        card = pm.to_dict().get("card") or {}
        return CardInfo(str(pm.id), card.get("brand"), card.get("last4"))

    async def detach(self, payment_method: str, stripe_account: str | None) -> None:
        try:
            await self.client.v1.payment_methods.detach_async(
                payment_method, options=_options(stripe_account)
            )
        except stripe.InvalidRequestError:
            log.info("payment method already gone at Stripe", extra={"pm": payment_method})
        except (stripe.APIConnectionError, stripe.APIError) as exc:
            raise StripeUnavailable(str(exc)) from exc

    async def charge(
        self,
        *,
        amount_micros: int,
        currency: str,
        customer: str,
        payment_method: str,
        stripe_account: str | None,
        attempt_id: str,
        try_no: int,
    ) -> ChargeResult:
        """An off-session charge of the card, rounded UP to the currency's minor unit."""
        params: Any = {
            "amount": micros_to_minor_units_ceil(amount_micros, currency),
            "currency": currency.lower(),
            "customer": customer,
            "payment_method": payment_method,
            "off_session": True,
            "confirm": True,
            "metadata": {"tally_attempt": attempt_id, "tally_try": str(try_no)},
            "expand": ["latest_charge.balance_transaction"],
        }
        try:
            intent = await self.client.v1.payment_intents.create_async(
                params=params, options=_options(stripe_account, f"{attempt_id}:{try_no}")
            )
        except stripe.CardError as exc:
            err = exc.error
            code = (err.decline_code if err else None) or exc.code or "card_declined"
            pi = getattr(err, "payment_intent", None) if err else None
            return ChargeResult("failed", str(pi.id) if pi else None, code)
        except stripe.InvalidRequestError as exc:
            return ChargeResult("failed", None, exc.code or "invalid_request")
        except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as exc:
            raise StripeUnavailable(str(exc)) from exc
        return self._result(intent.to_dict(), currency)

    async def find_charge(
        self, *, attempt_id: str, try_no: int, stripe_account: str | None, currency: str
    ) -> ChargeResult | None:
        """The PaymentIntent a previous run created for this try, if any (reconciliation).
        Uses Search where Stripe offers it, else scans the recent intents' metadata."""
        try:
            found = await self.client.v1.payment_intents.search_async(
                params={"query": f"metadata['tally_attempt']:'{attempt_id}'", "limit": 100},
                options=_options(stripe_account),
            )
            candidates = [i.to_dict() for i in found.data]
        except stripe.InvalidRequestError:  # localstripe has no search: scan recent intents
            candidates = []
            params: Any = {"limit": 100}
            for _ in range(20):
                page = await self.client.v1.payment_intents.list_async(
                    params=params, options=_options(stripe_account)
                )
                candidates.extend(i.to_dict() for i in page.data)
                if not page.has_more or not page.data:
                    break
                params = {"limit": 100, "starting_after": page.data[-1].id}
        except (stripe.APIConnectionError, stripe.APIError) as exc:
            raise StripeUnavailable(str(exc)) from exc
        for intent in candidates:
            meta = intent.get("metadata") or {}
            if meta.get("tally_attempt") == attempt_id and meta.get("tally_try") == str(try_no):
                return self._result(intent, currency)
        return None

    @staticmethod
    def _result(intent: dict[str, Any], currency: str) -> ChargeResult:
        fee = None
        charge = intent.get("latest_charge")
        if isinstance(charge, dict):
            txn = charge.get("balance_transaction")
            if isinstance(txn, dict) and isinstance(txn.get("fee"), int):
                fee = minor_units_to_micros(txn["fee"], currency)
        if intent.get("status") == "succeeded":
            return ChargeResult("succeeded", str(intent["id"]), None, fee)
        if intent.get("status") in UNSETTLED:
            return ChargeResult("pending", str(intent["id"]), None, None)
        if intent.get("status") == "requires_action":
            return ChargeResult("failed", str(intent["id"]), "authentication_required")
        error = intent.get("last_payment_error") or {}
        return ChargeResult(
            "failed",
            str(intent["id"]),
            error.get("decline_code") or error.get("code") or intent.get("status"),
        )

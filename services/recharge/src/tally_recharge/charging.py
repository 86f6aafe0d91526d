"""Charging wallets' cards: automatic recharges on threshold crossings and manual top-ups.

An attempt is written (pending) before Stripe is called, and every try on a card is recorded
as ``calling`` before the call and settled after it. A run that dies in between is resumed by
whichever replica leases the attempt next: it asks Stripe for the PaymentIntent of that try (by
metadata) before charging again, so a crash between Stripe's answer and our commit credits
exactly once. ``recharge.succeeded`` / ``recharge.failed`` leave through the outbox in the
transaction that settles the attempt.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import Counter

from tally import events, outbox
from tally.db import Conn
from tally.events import Topics
from tally.faults import crash_point
from tally.money import micros_to_minor_units_ceil, minor_units_to_micros
from tally.outbox import OutboxRelay
from tally.telemetry import continue_trace
from tally.worker import Worker
from tally_recharge import storage
from tally_recharge.domain import (
    RAISE_WINDOW,
    RetryPolicy,
    auto_amount,
    card_order,
    next_tier,
    should_raise_tier,
)
from tally_recharge.gateway import StripeGateway, StripeUnavailable

log = logging.getLogger(__name__)
SOURCE = "recharge"

OUTCOMES = Counter("tally_recharge_attempts_total", "Recharge attempts settled", ["trigger", "status"])
DECLINES = Counter("tally_recharge_declines_total", "Card declines by code", ["decline_code"])


@dataclass(frozen=True)
class WalletTarget:
    wallet_id: str
    owner: str  # company | account
    company_id: str
    account_id: str | None
    currency: str

    @property
    def owner_id(self) -> str:
        return self.account_id if self.owner == "account" and self.account_id else self.company_id

    def ref(self) -> dict[str, Any]:
        return {"wallet_id": self.wallet_id, "owner": self.owner, "company_id": self.company_id,
                "account_id": self.account_id, "currency": self.currency}


def target_of(a: storage.Attempt) -> WalletTarget:
    return WalletTarget(a.wallet_id, a.owner, a.company_id, a.account_id, a.currency)


class Recharger(Worker):
    """Also the background charger: leases due attempts (new, retries, interrupted) and runs
    them."""

    name = "recharger"

    def __init__(self, pool: asyncpg.Pool, gateway: StripeGateway, relay: OutboxRelay, *,
                 retry: RetryPolicy, lease_seconds: int = 60, unavailable_retry_seconds: int = 30):
        self.pool = pool
        self.gateway = gateway
        self.relay = relay
        self.retry = retry
        self.lease_seconds = lease_seconds
        self.unavailable_retry_seconds = unavailable_retry_seconds
        super().__init__()

    # --- creating attempts ---------------------------------------------------------------

    async def request_auto(self, conn: Conn, crossed: events.WalletThresholdCrossed,
                           traceparent: str | None = None) -> bool:
        """In the consumer's transaction: queue an automatic recharge, unless one is in flight
        or the wallet's auto-recharge is off. Returns whether one was queued."""
        if not crossed.auto_recharge:
            return False
        stripe_account = None
        if crossed.owner == "account":
            _, stripe_account = await storage.company(conn, crossed.company_id)
        amount = auto_amount(crossed.balance_micros, crossed.threshold_micros,
                             crossed.reload_amount_micros)
        created = await storage.insert_attempt(conn, {
            "id": f"rc_{uuid.uuid4().hex}", "wallet_id": crossed.wallet_id, "owner": crossed.owner,
            "company_id": crossed.company_id, "account_id": crossed.account_id, "trigger": "auto",
            "amount_micros": amount, "currency": crossed.currency, "stripe_account": stripe_account,
            "reload_micros": crossed.reload_amount_micros,
            "smart_adjustment": crossed.smart_adjustment, "traceparent": traceparent})
        return created is not None

    async def top_up(self, target: WalletTarget, amount_micros: int,
                     stripe_account: str | None) -> storage.Attempt:
        """A manual top-up, charged now; returns the settled (or still pending) attempt."""
        async with self.pool.acquire() as conn:
            attempt = await storage.insert_attempt(conn, {
                "id": f"rc_{uuid.uuid4().hex}", **target.ref(), "trigger": "manual",
                "amount_micros": amount_micros, "stripe_account": stripe_account})
            assert attempt is not None
            leased = await storage.lease_attempt(conn, attempt.id, self.lease_seconds)
        if leased:
            await self.run(leased)
        async with self.pool.acquire() as conn:
            final = await storage.get_attempt(conn, attempt.id)
        assert final is not None
        return final

    async def charge_once(self, key: str, target: WalletTarget, amount_micros: int,
                          stripe_account: str | None, description: str) -> storage.Attempt:
        """Charge a card for another service (``purpose = 'charge'``), at most once per ``key``:
        a repeated call returns the first call's attempt. Nothing is credited to a wallet."""
        async with self.pool.acquire() as conn:
            existing = await storage.get_attempt(conn, key)
            if existing is None:
                await storage.insert_attempt(conn, {
                    "id": key, **target.ref(), "wallet_id": f"charge:{target.owner}:{target.owner_id}",
                    "trigger": "manual", "amount_micros": amount_micros,
                    "stripe_account": stripe_account, "purpose": "charge",
                    "description": description})
            leased = await storage.lease_attempt(conn, key, self.lease_seconds)
        if leased is not None:
            await self.run(leased)
        async with self.pool.acquire() as conn:
            final = await storage.get_attempt(conn, key)
        assert final is not None
        return final

    # --- running attempts ----------------------------------------------------------------

    async def run(self, a: storage.Attempt) -> None:
        """Try the wallet's cards in order until one pays; settle the attempt."""
        with continue_trace(a.traceparent, "recharge.charge", {"tally.recharge_id": a.id}):
            await self._run(a)

    async def _run(self, a: storage.Attempt) -> None:
        target = target_of(a)
        try:
            async with self.pool.acquire() as conn:
                customer = await storage.customer(conn, target.owner, target.owner_id)
                cards = card_order(storage.cards(
                    await storage.payment_methods(conn, target.owner, target.owner_id)))
            if target.owner == "account" and not a.stripe_account:
                await self._fail(a, a.tries, "company_stripe_not_connected")
                return
            if customer is None or not cards:
                await self._fail(a, a.tries, "no_payment_method")
                return
            tries = list(a.tries)
            for card in cards:
                done = [t for t in tries if t["payment_method"] == card.id]
                if done and done[-1]["outcome"] == "failed":
                    continue
                if done and done[-1]["outcome"] == "calling":  # a previous run died here
                    current = done[-1]
                    result = await self.gateway.find_charge(
                        attempt_id=a.id, try_no=current["try"], stripe_account=a.stripe_account,
                        currency=a.currency)
                else:
                    result = None
                    current = {"payment_method": card.id, "outcome": "calling",
                               "try": len(tries) + 1, "decline_code": None}
                    tries.append(current)
                    async with self.pool.acquire() as conn:
                        await storage.save_tries(conn, a.id, tries)
                if result is None:
                    crash_point("recharge.before_charge")
                    result = await self.gateway.charge(
                        amount_micros=a.amount_micros, currency=a.currency, customer=customer,
                        payment_method=card.id, stripe_account=a.stripe_account,
                        attempt_id=a.id, try_no=current["try"])
                crash_point("recharge.after_charge")
                current["outcome"] = result.outcome
                current["decline_code"] = result.decline_code
                current["payment_intent"] = result.payment_intent
                if result.outcome == "succeeded":
                    await self._succeed(a, tries, card.id, result.payment_intent,
                                        result.fee_micros)
                    return
                DECLINES.labels(result.decline_code or "unknown").inc()
                async with self.pool.acquire() as conn:
                    await storage.save_tries(conn, a.id, tries)
            await self._fail(a, tries, None)
        except StripeUnavailable as exc:
            log.warning("stripe unavailable; attempt stays pending",
                        extra={"attempt": a.id, "error": str(exc)[:200]})
            async with self.pool.acquire() as conn:
                await storage.postpone_attempt(conn, a.id, self.unavailable_retry_seconds,
                                               f"stripe unavailable: {exc}"[:500])

    async def _succeed(self, a: storage.Attempt, tries: list[dict[str, Any]], pm: str,
                       payment_intent: str | None, fee: int | None) -> None:
        target = target_of(a)
        charged_minor = micros_to_minor_units_ceil(a.amount_micros, a.currency)
        credited = minor_units_to_micros(charged_minor, a.currency)
        async with self.pool.acquire() as conn, conn.transaction():
            await storage.finish_attempt(conn, a.id, status="succeeded", tries=tries,
                                         payment_intent=payment_intent, payment_method=pm,
                                         charged_minor=charged_minor, fee_micros=fee)
            await storage.card_succeeded(conn, pm)
            if a.purpose == "charge":
                OUTCOMES.labels("charge", "succeeded").inc()
                return
            await storage.policy(conn, a.wallet_id)
            await storage.set_policy(conn, a.wallet_id, failures=0)
            rows = [outbox.row(Topics.RECHARGE_EVENTS, a.company_id, events.envelope(
                "recharge.succeeded", events.RechargeSucceeded(
                    **target.ref(), recharge_id=a.id, trigger=a.trigger,
                    amount_micros=credited, payment_intent=payment_intent, payment_method=pm,
                    fee_micros=fee), source=SOURCE, id_=f"recharge.succeeded:{a.id}"))]
            if a.trigger == "auto":
                rows.extend(await self._maybe_raise_tier(conn, a, target))
            await outbox.enqueue(conn, rows)
        OUTCOMES.labels(a.trigger, "succeeded").inc()
        self.relay.wake()

    async def _maybe_raise_tier(self, conn: Conn, a: storage.Attempt,
                                target: WalletTarget) -> list[outbox.Row]:
        since = datetime.now(UTC) - RAISE_WINDOW
        recent = await storage.recent_auto_successes(conn, a.wallet_id, since)
        if not should_raise_tier(recent, a.smart_adjustment) or a.reload_micros is None:
            return []
        new = next_tier(a.reload_micros)
        if new is None:
            return []
        await storage.set_policy(conn, a.wallet_id, tier_raised=True)
        return [outbox.row(Topics.RECHARGE_EVENTS, a.company_id, events.envelope(
            "recharge.tier_raised", events.RechargeTierRaised(
                **target.ref(), previous_reload_amount_micros=a.reload_micros,
                reload_amount_micros=new), source=SOURCE, id_=f"recharge.tier_raised:{a.id}"))]

    async def _fail(self, a: storage.Attempt, tries: list[dict[str, Any]],
                    reason: str | None) -> None:
        target = target_of(a)
        retry_at = None
        disabled = False
        failures = 1
        async with self.pool.acquire() as conn, conn.transaction():
            await storage.finish_attempt(conn, a.id, status="failed", tries=tries, error=reason)
            if a.purpose == "charge":
                OUTCOMES.labels("charge", "failed").inc()
                return
            if a.trigger == "auto":
                failures = (await storage.policy(conn, a.wallet_id))[0] + 1
                delay = self.retry.after_failure(failures)
                if delay is None:
                    disabled = True  # cancellation: the wallet turns auto-recharge off
                    await storage.set_policy(conn, a.wallet_id, failures=0)
                else:
                    await storage.set_policy(conn, a.wallet_id, failures=failures)
                    retry_at = datetime.now(UTC) + delay
                    await storage.insert_attempt(conn, {
                        "id": f"rc_{uuid.uuid4().hex}", **target.ref(), "trigger": "auto",
                        "amount_micros": a.amount_micros, "stripe_account": a.stripe_account,
                        "reload_micros": a.reload_micros, "smart_adjustment": a.smart_adjustment,
                        "round": a.round + 1, "not_before": retry_at,
                        "traceparent": a.traceparent})
            event_tries = [events.RechargeTry(
                payment_method=t["payment_method"],
                outcome="succeeded" if t["outcome"] == "succeeded" else "failed",
                decline_code=t.get("decline_code")) for t in tries]
            if not tries and reason:
                event_tries = [events.RechargeTry(payment_method="", outcome="failed",
                                                  decline_code=reason)]
            await outbox.publish(conn, Topics.RECHARGE_EVENTS, a.company_id, events.envelope(
                "recharge.failed", events.RechargeFailed(
                    **target.ref(), recharge_id=a.id, trigger=a.trigger,
                    amount_micros=a.amount_micros, tries=event_tries,
                    consecutive_failures=failures, retry_at=retry_at,
                    auto_recharge_disabled=disabled),
                source=SOURCE, id_=f"recharge.failed:{a.id}"))
        OUTCOMES.labels(a.trigger, "failed").inc()
        self.relay.wake()
        self.wake()

    # --- the background charger ----------------------------------------------------------

    async def step(self) -> bool:
        async with self.pool.acquire() as conn:
            attempt = await storage.lease_due_attempt(conn, self.lease_seconds)
        if attempt is None:
            return False
        await self.run(attempt)
        return True

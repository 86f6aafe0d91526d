"""Charging wallets' cards: automatic recharges under the auto-recharge rule, and manual top-ups.

The rule (``tally.autorecharge.needs_recharge``) is evaluated against the wallet's live state
whenever one of its inputs may have changed: a threshold crossing, a credit, a settings change
(``wallet.digest``), a card attached, detached or made default, a recharge settled. Each such
trigger queues a check of the wallet (``recharge_checks``); the charger evaluates it and, when
the rule holds, queues an automatic recharge. An automatic recharge is priced from the balance
when it is charged, and dropped (``cancelled``) if the rule no longer holds by then: a retry
after the owner turned auto-recharge off or after a top-up restored the balance charges nothing.

An attempt is written (pending) before Stripe is called, and every try on a card is recorded
as ``calling`` before the call and settled after it. A run that dies in between is resumed by
whichever replica leases the attempt next: it asks Stripe for the PaymentIntent of that try (by
metadata) before charging again, so a crash between Stripe's answer and our commit credits
exactly once. ``recharge.succeeded`` / ``recharge.failed`` leave through the outbox in the
transaction that settles the attempt.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from tally import events, outbox
from tally.autorecharge import needs_recharge, next_tier, recharge_amount
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.events import Topics
from tally.faults import crash_point
from tally.money import micros_to_minor_units_ceil, minor_units_to_micros
from tally.telemetry import continue_trace
from tally.uow import Database
from tally.worker import Worker
from tally_recharge import storage, targets
from tally_recharge.domain import (
    RAISE_WINDOW,
    RetryPolicy,
    WalletTarget,
    card_order,
    should_raise_tier,
    why_not,
)
from tally_recharge.gateway import ChargeResult, StripeGateway, StripeUnavailable
from tally_recharge.storage import LeaseLost
from tally_recharge.wallets import WalletReader, WalletUnavailable

log = logging.getLogger(__name__)
SOURCE = "recharge"

OUTCOMES = Counter("tally_recharge_attempts_total", "Recharge attempts settled", ["trigger", "status"])
DECLINES = Counter("tally_recharge_declines_total", "Card declines by code", ["decline_code"])


def target_of(a: storage.Attempt) -> WalletTarget:
    return WalletTarget(a.wallet_id, a.owner, a.company_id, a.account_id, a.currency)


class Recharger(Worker):
    """Also the background charger: evaluates queued checks of the auto-recharge rule, leases
    due attempts (new, retries, interrupted) and runs them. A lease outlasts a Stripe call with
    its retries and is renewed before each card; an attempt is settled only by the holder of its
    lease (fencing: ``storage.LeaseLost``)."""

    name = "recharger"

    def __init__(
        self,
        db: Database,
        gateway: StripeGateway,
        wallets: WalletReader,
        *,
        retry: RetryPolicy,
        directory: CompanyDirectory,
        lease_seconds: int = 120,
        unavailable_retry_seconds: int = 30,
        pending_recheck_seconds: int = 60,
    ):
        self.db = db
        self.gateway = gateway
        self.wallets = wallets
        self.directory = directory
        self.retry = retry
        self.lease_seconds = lease_seconds
        self.unavailable_retry_seconds = unavailable_retry_seconds
        self.pending_recheck_seconds = pending_recheck_seconds
        super().__init__()

    @staticmethod
    def token() -> str:
        return uuid.uuid4().hex

    # --- the auto-recharge rule ------------------------------------------------------------

    async def evaluate(self, conn: Conn, check: storage.Check) -> bool:
        """In the transaction that holds ``check``: apply the rule to the wallet's live state.
        Queues an automatic recharge when it holds and none is in flight; drops a retry waiting
        for its time when it no longer holds. Returns whether a recharge was queued."""
        _, _, cancelling = await storage.policy(conn, check.wallet_id)  # one check at a time
        flying = await storage.in_flight(conn, check.wallet_id)
        waiting = [
            a for a in flying if a.status == "pending" and a.trigger == "auto" and a.round > 1 and not a.tries
        ]
        if len(waiting) < len(flying):
            return False  # a recharge is running or not credited yet: its outcome re-checks
        owner_id = check.account_id if check.owner == "account" else check.company_id
        assert owner_id is not None
        cards = await storage.payment_methods(conn, check.owner, owner_id)
        _, stripe_account = await storage.company(conn, check.company_id)
        usable = bool(cards) and (check.owner == "company" or stripe_account is not None)
        if check.owner == "account":
            # a retry made for a Stripe account the company has left cannot charge: dropped
            # (a fresh one is made below when the rule holds)
            for a in [a for a in waiting if a.stripe_account != stripe_account]:
                await storage.cancel_attempt(conn, a.id, "company_stripe_not_connected")
                waiting.remove(a)
        if not usable and not waiting:
            return False  # no card, nothing waiting: the rule cannot hold, no need to ask
        state = await self.wallets.read(check.owner, check.company_id, check.account_id)
        wanted = needs_recharge(
            auto_recharge=state.auto_recharge and not cancelling,
            has_card=usable,
            balance=state.balance,
            threshold=state.threshold,
            in_flight=False,
        )
        if waiting:
            if not wanted:
                for a in waiting:
                    await storage.cancel_attempt(conn, a.id, why_not(state, usable, cancelling))
            return False
        if not wanted:
            return False
        currency = await targets.pinned_currency(conn, self.directory, check.company_id)
        created = await storage.insert_attempt(
            conn,
            {
                "id": f"rc_{uuid.uuid4().hex}",
                "wallet_id": check.wallet_id,
                "owner": check.owner,
                "company_id": check.company_id,
                "account_id": check.account_id,
                "trigger": "auto",
                "amount_micros": recharge_amount(state.balance, state.threshold, state.reload_amount),
                "currency": currency,
                "stripe_account": stripe_account if check.owner == "account" else None,
                "reload_micros": state.reload_amount,
                "smart_adjustment": state.smart_adjustment,
                "traceparent": check.traceparent,
            },
        )
        return created is not None

    @staticmethod
    async def _connected(conn: Conn, a: storage.Attempt) -> bool:
        """An account's attempt charges through its company's connected Stripe: only while the
        company is still connected to the account the attempt was made for."""
        if a.owner != "account":
            return True
        _, stripe_account = await storage.company(conn, a.company_id)
        return a.stripe_account is not None and stripe_account == a.stripe_account

    async def _dropped(self, a: storage.Attempt, token: str) -> str | None:
        """Before an automatic recharge charges any card: is it still wanted, and for how much?
        Reprices it from the balance now (None), or cancels it (returns why)."""
        target = target_of(a)
        async with self.db.unit() as uow:
            conn = uow.conn
            _, _, cancelling = await storage.policy(conn, a.wallet_id)
            others = [f for f in await storage.in_flight(conn, a.wallet_id) if f.id != a.id]
            cards = await storage.payment_methods(conn, target.owner, target.owner_id)
            usable = bool(cards) and await self._connected(conn, a)
            state = await self.wallets.read(target.owner, target.company_id, target.account_id)
            if others or not needs_recharge(
                auto_recharge=state.auto_recharge and not cancelling,
                has_card=usable,
                balance=state.balance,
                threshold=state.threshold,
                in_flight=False,
            ):
                reason = "recharge_in_flight" if others else why_not(state, usable, cancelling)
                await storage.cancel_attempt(conn, a.id, reason)
                OUTCOMES.labels(a.trigger, "cancelled").inc()
                return reason
            await storage.reprice_attempt(
                conn,
                a.id,
                token,
                amount_micros=recharge_amount(state.balance, state.threshold, state.reload_amount),
                reload_micros=state.reload_amount,
                smart_adjustment=state.smart_adjustment,
            )
        return None

    # --- creating attempts ---------------------------------------------------------------

    async def top_up(
        self,
        target: WalletTarget,
        amount_micros: int,
        stripe_account: str | None,
        attempt_id: str | None = None,
        token: str | None = None,
    ) -> storage.Attempt:
        """A manual top-up, charged now; returns the settled (or still pending) attempt.
        ``attempt_id`` and ``token``: an attempt the caller created leased to itself (an
        Idempotency-Key's); a second request for the same key passes no token, takes the lease
        only if the first run died, and otherwise returns the attempt as it stands."""
        if attempt_id is None:
            attempt_id, token = f"rc_{uuid.uuid4().hex}", self.token()
            async with self.db.unit() as uow:
                await storage.insert_attempt(
                    uow.conn,
                    {
                        "id": attempt_id,
                        **target.ref(),
                        "trigger": "manual",
                        "amount_micros": amount_micros,
                        "stripe_account": stripe_account,
                        "lease_token": token,
                        "lease_seconds": self.lease_seconds,
                    },
                )
        if token is not None:
            async with self.db.reading() as conn:
                leased = await storage.get_attempt(conn, attempt_id)
        else:
            token = self.token()
            leased = await self._lease(attempt_id, token)
        if leased is not None and leased.status == "pending":
            await self.run(leased, token)
        async with self.db.reading() as conn:
            final = await storage.get_attempt(conn, attempt_id)
        assert final is not None
        return final

    async def settled(self, attempt_id: str, *, timeout: float) -> storage.Attempt:
        """The attempt once it is no longer pending, or as it stands once a payment is
        processing (it settles later, by webhook or recheck) or after ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with self.db.reading() as conn:
                attempt = await storage.get_attempt(conn, attempt_id)
            assert attempt is not None
            if (
                attempt.status != "pending"
                or asyncio.get_running_loop().time() > deadline
                or any(t["outcome"] == "processing" for t in attempt.tries)
            ):
                return attempt
            await asyncio.sleep(0.05)

    async def charge_once(
        self, key: str, target: WalletTarget, amount_micros: int, stripe_account: str | None, description: str
    ) -> storage.Attempt:
        """Charge a card for another service (``purpose = 'charge'``), at most once per ``key``:
        a repeated call returns the first call's attempt. Nothing is credited to a wallet."""
        token = self.token()
        async with self.db.unit() as uow:
            conn = uow.conn
            existing = await storage.get_attempt(conn, key)
            if existing is None:  # created leased to this call (the charger cannot take it)
                leased = await storage.insert_attempt(
                    conn,
                    {
                        "id": key,
                        **target.ref(),
                        "wallet_id": f"charge:{target.owner}:{target.owner_id}",
                        "trigger": "manual",
                        "amount_micros": amount_micros,
                        "stripe_account": stripe_account,
                        "purpose": "charge",
                        "description": description,
                        "lease_token": token,
                        "lease_seconds": self.lease_seconds,
                    },
                )
            else:
                leased = await storage.lease_attempt(conn, key, self.lease_seconds, token)
        if leased is not None:
            await self.run(leased, token)
        async with self.db.reading() as conn:
            final = await storage.get_attempt(conn, key)
        assert final is not None
        if leased is None and final.status == "pending":
            log.info("charge asked again while another run holds it", extra={"attempt": key})
        return final

    async def _lease(self, attempt_id: str, token: str) -> storage.Attempt | None:
        """Lease a pending attempt no one holds (None: settled, or another run holds it)."""
        async with self.db.unit() as uow:
            return await storage.lease_attempt(uow.conn, attempt_id, self.lease_seconds, token)

    # --- running attempts ----------------------------------------------------------------

    async def resume(self, attempt_id: str) -> None:
        """Run an attempt now if it is still pending and no one holds it (a Stripe webhook
        about it: it settles from what Stripe says)."""
        token = self.token()
        leased = await self._lease(attempt_id, token)
        if leased is not None:
            await self.run(leased, token)

    async def run(self, a: storage.Attempt, token: str) -> None:
        """Try the wallet's cards in order until one pays; settle the attempt. ``token`` is the
        lease this run holds."""
        with continue_trace(a.traceparent, "recharge.charge", {"tally.recharge_id": a.id}):
            try:
                await self._run(a, token)
            except LeaseLost:
                log.warning("lease lost; another run settles this attempt", extra={"attempt": a.id})
            except (WalletUnavailable, StripeUnavailable) as exc:
                what = "wallet" if isinstance(exc, WalletUnavailable) else "stripe"
                log.warning(
                    f"{what} unavailable; attempt stays pending",
                    extra={"attempt": a.id, "error": str(exc)[:200]},
                )
                async with self.db.unit() as uow:
                    await storage.postpone_attempt(
                        uow.conn,
                        a.id,
                        token,
                        self.unavailable_retry_seconds,
                        f"{what} unavailable: {exc}"[:500],
                    )

    async def _run(self, a: storage.Attempt, token: str) -> None:
        target = target_of(a)
        if a.trigger == "auto" and a.purpose == "wallet" and not a.tries:
            dropped = await self._dropped(a, token)
            if dropped is not None:
                if dropped != "recharge_in_flight":
                    # dropped: the wallet is checked again (after the policy lock is released:
                    # the check row comes first in the lock order), so a rule that holds again
                    # on the live state (another card, a new connection) makes a fresh one
                    async with self.db.unit() as uow:
                        await storage.queue_check(
                            uow.conn, target.owner, target.company_id, target.account_id
                        )
                self.wake()
                return
            async with self.db.reading() as conn:
                fresh = await storage.get_attempt(conn, a.id)
            assert fresh is not None
            a = fresh
        async with self.db.reading() as conn:
            customer = await storage.customer(conn, target.owner, target.owner_id, a.stripe_account)
            cards = card_order(
                storage.cards(await storage.payment_methods(conn, target.owner, target.owner_id))
            )
            connected = await self._connected(conn, a)
        tries = list(a.tries)
        # A try whose outcome is not known yet (the run died mid-call, or Stripe said
        # processing) is asked for again before any other card.
        open_try = next((t for t in tries if t["outcome"] in ("calling", "processing")), None)
        if open_try is None and (customer is None or not cards):
            await self._fail(a, token, tries, "no_payment_method")
            return
        if open_try is not None:
            result = await self.gateway.find_charge(
                attempt_id=a.id, try_no=open_try["try"], stripe_account=a.stripe_account, currency=a.currency
            )
            if result is not None or open_try["outcome"] == "processing":
                if await self._settled(a, token, tries, open_try, result):
                    return
            else:  # never reached Stripe: charge that card now
                cards = [c for c in cards if c.id == open_try["payment_method"]] + [
                    c for c in cards if c.id != open_try["payment_method"]
                ]
        if not connected:  # a try already made is settled above; no new one through Stripe
            if a.trigger == "auto" and a.purpose == "wallet":
                await self._abandon(a, token, tries, "company_stripe_not_connected")
            else:
                await self._fail(a, token, tries, "company_stripe_not_connected")
            return
        for card in cards:
            done = [t for t in tries if t["payment_method"] == card.id]
            if done and done[-1]["outcome"] == "failed":
                continue
            if done and done[-1]["outcome"] == "calling":
                current = done[-1]
            else:
                current = {
                    "payment_method": card.id,
                    "outcome": "calling",
                    "try": len(tries) + 1,
                    "decline_code": None,
                }
                tries.append(current)
            async with self.db.unit() as uow:
                if not await storage.renew_lease(uow.conn, a.id, self.lease_seconds, token):
                    raise LeaseLost(a.id)
                await storage.save_tries(uow.conn, a.id, tries, token)
            crash_point("recharge.before_charge")
            result = await self.gateway.charge(
                amount_micros=a.amount_micros,
                currency=a.currency,
                customer=customer or "",
                payment_method=card.id,
                stripe_account=a.stripe_account,
                attempt_id=a.id,
                try_no=current["try"],
            )
            crash_point("recharge.after_charge")
            if await self._settled(a, token, tries, current, result):
                return
        await self._fail(a, token, tries, None)

    async def _settled(
        self,
        a: storage.Attempt,
        token: str,
        tries: list[dict[str, Any]],
        current: dict[str, Any],
        result: ChargeResult | None,
    ) -> bool:
        """Record a try's outcome; True when the attempt is settled or must wait (a payment
        still processing never moves on to the next card), False to try the next card."""
        if result is None or result.outcome == "pending":
            current["outcome"] = "processing"
            if result is not None:
                current["payment_intent"] = result.payment_intent
            async with self.db.unit() as uow:
                await storage.postpone_attempt(
                    uow.conn, a.id, token, self.pending_recheck_seconds, "payment processing", tries
                )
            return True
        current["outcome"] = result.outcome
        current["decline_code"] = result.decline_code
        current["payment_intent"] = result.payment_intent
        if result.outcome == "succeeded":
            await self._succeed(
                a, token, tries, current["payment_method"], result.payment_intent, result.fee_micros
            )
            return True
        DECLINES.labels(result.decline_code or "unknown").inc()
        async with self.db.unit() as uow:
            await storage.save_tries(uow.conn, a.id, tries, token)
        return False

    async def _succeed(
        self,
        a: storage.Attempt,
        token: str,
        tries: list[dict[str, Any]],
        pm: str,
        payment_intent: str | None,
        fee: int | None,
    ) -> None:
        target = target_of(a)
        charged_minor = micros_to_minor_units_ceil(a.amount_micros, a.currency)
        credited = minor_units_to_micros(charged_minor, a.currency)
        async with self.db.unit() as uow:
            conn = uow.conn
            if a.purpose == "wallet":  # lock order, as a check's: policy row, then attempts
                await storage.policy(conn, a.wallet_id)
            await storage.finish_attempt(
                conn,
                a.id,
                token,
                status="succeeded",
                tries=tries,
                payment_intent=payment_intent,
                payment_method=pm,
                charged_minor=charged_minor,
                fee_micros=fee,
            )
            await storage.card_succeeded(conn, pm)
            if a.purpose == "charge":
                OUTCOMES.labels("charge", "succeeded").inc()
                return
            await storage.set_policy(conn, a.wallet_id, failures=0)
            rows = [
                outbox.row(
                    Topics.RECHARGE_EVENTS,
                    a.company_id,
                    events.envelope(
                        "recharge.succeeded",
                        events.RechargeSucceeded(
                            **target.ref(),
                            recharge_id=a.id,
                            trigger=a.trigger,
                            amount_micros=credited,
                            payment_intent=payment_intent,
                            payment_method=pm,
                            fee_micros=fee,
                        ),
                        source=SOURCE,
                        id_=f"recharge.succeeded:{a.id}",
                    ),
                )
            ]
            if a.trigger == "auto":
                rows.extend(await self._maybe_raise_tier(conn, a, target))
            uow.publish(rows)
        OUTCOMES.labels(a.trigger, "succeeded").inc()

    async def _maybe_raise_tier(
        self, conn: Conn, a: storage.Attempt, target: WalletTarget
    ) -> list[outbox.Row]:
        """Smart adjustment earned: the wallet raises its reload amount one tier above the one
        current when it applies the event, and only if smart adjustment is still on."""
        since = datetime.now(UTC) - RAISE_WINDOW
        recent = await storage.recent_auto_successes(conn, a.wallet_id, since)
        if not should_raise_tier(recent, a.smart_adjustment) or a.reload_micros is None:
            return []
        new = next_tier(a.reload_micros)
        if new is None:
            return []
        await storage.set_policy(conn, a.wallet_id, tier_raised=True)
        return [
            outbox.row(
                Topics.RECHARGE_EVENTS,
                a.company_id,
                events.envelope(
                    "recharge.tier_raised",
                    events.RechargeTierRaised(
                        **target.ref(),
                        previous_reload_amount_micros=a.reload_micros,
                        reload_amount_micros=new,
                    ),
                    source=SOURCE,
                    id_=f"recharge.tier_raised:{a.id}",
                ),
            )
        ]

    async def _abandon(
        self, a: storage.Attempt, token: str, tries: list[dict[str, Any]], reason: str
    ) -> None:
        """An automatic recharge the company's Stripe connection no longer allows: ended
        without a retry or a failure counted against the wallet (its cards did not decline),
        and the wallet checked again (on the new connection the rule may hold)."""
        target = target_of(a)
        async with self.db.unit() as uow:
            await storage.queue_check(uow.conn, target.owner, target.company_id, target.account_id)
            await storage.finish_attempt(uow.conn, a.id, token, status="failed", tries=tries, error=reason)
        OUTCOMES.labels(a.trigger, "failed").inc()
        self.wake()

    async def _fail(
        self, a: storage.Attempt, token: str, tries: list[dict[str, Any]], reason: str | None
    ) -> None:
        target = target_of(a)
        retry_at = None
        disabled = False
        failures = 1
        async with self.db.unit() as uow:
            conn = uow.conn
            # Lock order, as a check's: the wallet's policy row, then its attempts.
            policy = await storage.policy(conn, a.wallet_id) if a.purpose == "wallet" else None
            await storage.finish_attempt(conn, a.id, token, status="failed", tries=tries, error=reason)
            if a.purpose == "charge":
                OUTCOMES.labels("charge", "failed").inc()
                return
            if a.trigger == "auto":
                assert policy is not None
                failures = policy[0] + 1
                delay = self.retry.after_failure(failures)
                if delay is None:
                    # Cancellation: the wallet turns auto-recharge off; until it confirms, no
                    # check starts another round.
                    disabled = True
                    await storage.set_policy(conn, a.wallet_id, failures=0, cancelling=True)
                else:
                    await storage.set_policy(conn, a.wallet_id, failures=failures)
                    retry_at = datetime.now(UTC) + delay
                    await storage.insert_attempt(
                        conn,
                        {
                            "id": f"rc_{uuid.uuid4().hex}",
                            **target.ref(),
                            "trigger": "auto",
                            "amount_micros": a.amount_micros,
                            "stripe_account": a.stripe_account,
                            "reload_micros": a.reload_micros,
                            "smart_adjustment": a.smart_adjustment,
                            "round": a.round + 1,
                            "not_before": retry_at,
                            "traceparent": a.traceparent,
                        },
                    )
            event_tries = [
                events.RechargeTry(
                    payment_method=t["payment_method"],
                    outcome="succeeded" if t["outcome"] == "succeeded" else "failed",
                    decline_code=t.get("decline_code"),
                )
                for t in tries
            ]
            if not tries and reason:
                event_tries = [events.RechargeTry(payment_method="", outcome="failed", decline_code=reason)]
            uow.emit(
                Topics.RECHARGE_EVENTS,
                a.company_id,
                events.envelope(
                    "recharge.failed",
                    events.RechargeFailed(
                        **target.ref(),
                        recharge_id=a.id,
                        trigger=a.trigger,
                        amount_micros=a.amount_micros,
                        tries=event_tries,
                        consecutive_failures=failures,
                        retry_at=retry_at,
                        auto_recharge_disabled=disabled,
                    ),
                    source=SOURCE,
                    id_=f"recharge.failed:{a.id}",
                ),
            )
        OUTCOMES.labels(a.trigger, "failed").inc()
        self.wake()

    # --- the background charger ----------------------------------------------------------

    async def step(self) -> bool:
        """One due attempt (charges first: a queue of checks never delays a recharge), then
        one due check."""
        token = self.token()
        async with self.db.unit() as uow:
            attempt = await storage.lease_due_attempt(uow.conn, self.lease_seconds, token)
        if attempt is not None:
            await self.run(attempt, token)
        checked = await self._check_one()
        return attempt is not None or checked

    async def _check_one(self) -> bool:
        """Evaluate one due check; True when there was one."""
        check: storage.Check | None = None
        try:
            async with self.db.unit() as uow:
                check = await storage.take_due_check(uow.conn)
                if check is None:
                    return False
                await self.evaluate(uow.conn, check)
                await storage.done_check(uow.conn, check.wallet_id)
        except WalletUnavailable as exc:
            log.warning(
                "wallet unavailable; check postponed",
                extra={"wallet": check.wallet_id if check else None, "error": str(exc)[:200]},
            )
            if check is not None:
                await self._postpone_check(check.wallet_id, self.unavailable_retry_seconds // 6 or 1)
        except Exception:
            # Never let one wallet's check block the others: it goes to the back of the
            # queue and is tried again later (the error is logged with the wallet).
            if check is None:
                raise
            log.exception("check failed; postponed", extra={"wallet": check.wallet_id})
            await self._postpone_check(check.wallet_id, self.unavailable_retry_seconds)
        return True

    async def _postpone_check(self, wallet_id: str, seconds: int) -> None:
        async with self.db.unit() as uow:
            await storage.postpone_check(uow.conn, wallet_id, seconds)

"""Period billing with dunning (docs/0009): every recurring charge, to cards (never wallets),
through the recharge service's idempotent charge endpoint.

Each (subscription, period) has one *leg* per payer: ``platform`` (the company's card, the
platform price) and, for a resold subscription, ``account`` (the account's card on the
company's connected Stripe, the company's price). Legs are charged independently — the
company's platform leg never waits for the account's — and each at most once: a leg is charged
while its row is locked (another runner or request skips it), and every try has its own
idempotency key at recharge (a crash mid-call finds the same charge again, never a second).
A failed leg makes the subscription ``past_due`` and is tried again on the backoff schedule,
or at once when its payer saves or defaults a card; after the last try the subscription is
cancelled and the company told. Time is a parameter (``at``): the runner passes the clock,
tests and operators any instant. The period runner (``PeriodRunner``) is a worker of the service
process, one at a time across replicas."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import asyncpg
import httpx

from tally.auth import issue_token
from tally.db import session
from tally.money import format_micros
from tally.uow import Database, UnitOfWork
from tally.worker import Worker
from tally_rebilling import licenses, publish, storage
from tally_rebilling.domain import current_period

log = logging.getLogger(__name__)

# How long after each failed try the next one comes; after the last, the subscription ends.
DEFAULT_RETRY_HOURS = (24, 72, 120)
# A try whose outcome recharge does not know yet (processing, unreachable) is asked again after.
RECHECK = timedelta(seconds=60)
RUNNER_LOCK = 0x7461_6C6C_7950  # pg advisory lock: one period runner across replicas


class Charge(NamedTuple):
    """How one card charge at recharge ended."""

    outcome: str  # charged, failed, pending (processing, or recharge did not answer)
    why: str | None = None  # decline codes or the error
    cards: tuple[str, ...] = ()  # the payment methods tried, in order


def retry_delays(raw: str | None) -> tuple[timedelta, ...]:
    """The waits between a failed leg's tries (``Settings.dunning_retry_hours``: hours,
    comma-separated; empty: the default schedule)."""
    hours = [float(h) for h in raw.split(",") if h.strip()] if raw else DEFAULT_RETRY_HOURS
    return tuple(timedelta(hours=h) for h in hours)


def after_failure(failures: int, delays: Sequence[timedelta]) -> timedelta | None:
    """The wait before the next try after ``failures`` failed tries; None: give up."""
    return delays[failures - 1] if failures <= len(delays) else None


def leg_key(sub_id: str, period: str, leg: str, try_no: int) -> str:
    """The charge's idempotency key at recharge for one try of one leg. The first try keeps the
    key the runner used before dunning (a period charged then is found, not charged again)."""
    name = {"platform": "platform", "account": "company"}.get(leg, leg)
    base = f"sub-{sub_id}-{period}-{name}"
    return base if try_no == 1 else f"{base}-t{try_no}"


class Biller:
    """Charges legs and license purchases through recharge; ``run`` is one period run."""

    def __init__(
        self,
        db: Database,
        *,
        recharge_url: str,
        secret: str,
        delays: tuple[timedelta, ...],
        license_price: int,
    ) -> None:
        self.db = db
        self.recharge_url = recharge_url  # recharge's public API (Settings.url_of)
        self.secret = secret  # signs the platform token rebilling charges with
        self.delays = delays  # retry_delays: the dunning schedule
        self.license_price = license_price  # micros per license and month (licenses.unit_price)
        self.runner: PeriodRunner | None = None  # set when this process runs periods

    def wake(self) -> None:
        """Run the periods again at once (a payer saved a card): wakes this process's runner."""
        if self.runner is not None:
            self.runner.wake()

    async def charge_card(
        self, *, key: str, owner: str, company_id: str, account_id: str | None, amount: int, description: str
    ) -> Charge:
        """One card charge at recharge, at most once per ``key``: (``charged`` | ``failed`` |
        ``pending``, why, the cards tried). Asking again with the same key tells how it ended."""
        token = issue_token("platform_admin", sub="rebilling", secret=self.secret, ttl_seconds=300)
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(
                    f"{self.recharge_url}/v1/charges",
                    headers={"Authorization": f"Bearer {token}"},
                    json={
                        "key": key,
                        "owner": owner,
                        "company_id": company_id,
                        "account_id": account_id if owner == "account" else None,
                        "amount": format_micros(amount),
                        "description": description,
                    },
                )
        except httpx.HTTPError as exc:
            return Charge("pending", f"recharge unreachable: {exc}"[:300])
        if r.status_code >= 500:
            return Charge("pending", f"recharge answered {r.status_code}")
        if r.status_code != 201:  # e.g. 409 company_stripe_not_connected: a failed try
            return Charge("failed", str(r.json().get("error", {}).get("code", r.status_code)))
        attempt = r.json()
        cards = tuple(dict.fromkeys(t["payment_method"] for t in attempt["tries"]))
        if attempt["status"] == "pending":
            return Charge("pending", "payment processing", cards)
        if attempt["status"] != "succeeded":
            codes = [t.get("decline_code") for t in attempt["tries"]] or [attempt.get("error")]
            return Charge("failed", ", ".join(str(c) for c in codes), cards)
        return Charge("charged", None, cards)

    async def _charge(self, leg: asyncpg.Record, try_no: int) -> Charge:
        """One try of ``leg``."""
        owner = "company" if leg["leg"].startswith("platform") else "account"
        what = "platform price" if owner == "company" else "company price"
        return await self.charge_card(
            key=leg_key(leg["subscription_id"], leg["period"], leg["leg"], try_no),
            owner=owner,
            company_id=leg["company_id"],
            account_id=leg["account_id"],
            amount=leg["amount"],
            description=f"{leg['product']} {leg['period']} ({what})",
        )

    async def charge_leg(
        self, sub_id: str, period: str, leg_name: str, at: datetime, *, wait: bool = False
    ) -> str:
        """Try one leg now: skipped when charged, or being charged by someone else (``wait``:
        after they are done)."""
        async with self.db.unit() as uow:
            conn = uow.conn
            leg = await storage.lock_leg(conn, sub_id, period, leg_name, wait=wait)
            if leg is None or leg["cancel_reason"] == "payment_failed" or leg["next_try_at"] > at:
                return "skipped"  # charged, being charged, tried meanwhile or given up on
            # the row stays locked while recharge charges the card: one try at a time per leg.
            # A try asked again (its payment was processing) keeps the time it began.
            asked_again = leg["status"] == "due" and leg["last_try_at"] is not None
            started = leg["last_try_at"] if asked_again else datetime.now(UTC)
            outcome, why, cards = await self._charge(leg, leg["failures"] + 1)
            log.info(
                "period leg tried",
                extra={
                    "subscription": sub_id,
                    "period": period,
                    "leg": leg_name,
                    "try": leg["failures"] + 1,
                    "outcome": outcome,
                    "why": why,
                    "cards": list(cards),
                    "at": at.isoformat(),
                },
            )
            if outcome == "charged":
                await storage.settle_leg(
                    conn,
                    leg,
                    status="charged",
                    failures=leg["failures"],
                    next_try_at=at,
                    error=None,
                    tried_at=started,
                    cards=cards,
                )
                await publish.leg_charged(uow, leg)
            elif outcome == "pending":
                await storage.settle_leg(
                    conn,
                    leg,
                    status=leg["status"],
                    failures=leg["failures"],
                    next_try_at=at + RECHECK,
                    error=why,
                    tried_at=started,
                    cards=cards,
                )
            else:
                failures = leg["failures"] + 1
                delay = after_failure(failures, self.delays)
                if delay is None and leg["kind"] == "licenses":
                    delay = self.delays[-1]  # a pool is never cancelled: slowest pace
                card_since = leg["card_saved_at"] is not None and leg["card_saved_at"] > started
                if delay is not None and card_since:
                    delay = timedelta(0)  # a card saved during the try: the next try now
                    self.wake()
                await storage.settle_leg(
                    conn,
                    leg,
                    status="failed",
                    failures=failures,
                    error=why,
                    tried_at=started,
                    cards=cards,
                    next_try_at=at + delay if delay is not None else datetime.max.replace(tzinfo=UTC),
                )
                if delay is None:
                    # the last try: no more (a subscription its customer cancelled meanwhile
                    # is not cancelled again, its leg is not tried again either)
                    await self._end(uow, sub_id, "payment_failed")
                    return "cancelled"
            await storage.set_subscription_status(conn, sub_id)
        return outcome

    async def _end(self, uow: UnitOfWork, sub_id: str, reason: str) -> None:
        ended = await storage.end_subscription(uow.conn, sub_id, reason)
        if ended is not None:
            await publish.subscription_cancelled(
                uow, ended, reason, (await storage.outstanding(uow.conn, sub_id)).outstanding
            )

    async def open_period(self, period: str, at: datetime, company_id: str | None = None) -> int:
        """Legs for every subscription that runs in ``period``; one cancelled at period end
        ends instead. Returns how many subscriptions were opened."""
        opened = 0
        async with self.db.reading() as conn:
            subs = await storage.subscriptions_to_open(conn, period, company_id)
        for sub in subs:  # each in its own transaction
            async with self.db.unit() as uow:
                if sub["cancel_at_period_end"]:  # its paid period is over
                    await self._end(uow, sub["id"], "cancelled")
                    continue
                await storage.open_legs(uow.conn, sub, period, at)
                opened += 1
        return opened

    async def charge_due(
        self,
        at: datetime,
        subscription_id: str | None = None,
        *,
        company_id: str | None = None,
        wait: bool = False,
    ) -> dict[str, int]:
        counts: dict[str, int] = {}
        tried: set[tuple[str, str, str]] = set()
        while True:
            async with self.db.reading() as conn:
                legs = [
                    tuple(r)
                    for r in await storage.due_legs(
                        conn, at, subscription_id=subscription_id, company_id=company_id
                    )
                ]
            todo = [leg for leg in legs if leg not in tried]
            if not todo:
                return counts
            for sid, period, name in todo:
                tried.add((sid, period, name))
                outcome = await self.charge_leg(sid, period, name, at, wait=wait)
                counts[outcome] = counts.get(outcome, 0) + 1

    async def run(
        self,
        at: datetime,
        period: str | None = None,
        company_id: str | None = None,
        *,
        wait: bool = False,
    ) -> dict[str, int]:
        """Open ``period`` (the one ``at`` falls in by default) and charge what is due at
        ``at`` (of one company, or all). Safe to run any number of times, from any replica,
        at once. A leg someone else is charging right now is skipped by the scheduler; with
        ``wait`` (a run asked for through the API) it is waited for and then tried if it is
        still due at ``at``, so the answer does not depend on what the scheduler was doing."""
        await licenses.settle_pending(self, company_id)
        await self.open_period(period or current_period(at), at, company_id)
        return await self.charge_due(at, company_id=company_id, wait=wait)


class PeriodRunner(Worker):
    """The scheduler: a period run every ``every`` seconds, one runner at a time across
    replicas (an advisory lock held while it runs); woken early (``wake``, ``Biller.wake``)
    when a payer saves or defaults a card. A wake during a run starts the next run as soon as
    this one ends."""

    name = "period-runner"

    def __init__(self, biller: Biller, every: float) -> None:
        super().__init__()
        self.biller = biller
        self.idle = every

    async def step(self) -> bool:
        try:
            # a session (no transaction) holds the lock for the whole run; closed after
            async with session(self.biller.db.pool) as conn:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK):
                    try:
                        await self.biller.run(datetime.now(UTC))
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", RUNNER_LOCK)
        except Exception:
            log.exception("period run failed; the next run retries")
        return False  # the next run after ``every``, or at once when woken

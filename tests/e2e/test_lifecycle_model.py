"""A model of the wallet, recharge and period-billing lifecycle, as a test. A seeded random
walk drives the real services through their public APIs (HTTP and the ``usage.ingest`` topic):
companies in two currencies on changing plans, each with a client account; Stripe connected,
disconnected and connected to another account; good and declining cards attached to the
company and to the account, removed and made default; wallet PATCHes; rebilling turned on, off
and marked up; usage (own, foreign and unknown accounts, resent ids, a service without a price
in the company's currency); credits and top-ups with and without Idempotency-Keys; credit
requests approved and rejected; time for retries; subscriptions resold and direct, cancelled at
period end, licenses bought, and the period runner at instants from an hour to a month apart (dunning). After
each step it waits for the system to settle on what an independent reference model — plain
Python written from API.md, not from Tally's code — says: every balance and status of both
wallets, their auto-recharge flag, funding, rebilling mode and markups as the wallet applies
them, the account's cards and service status, the number of successful card charges, and every
subscription's status, outstanding amount and next retry. At the end: Stripe's succeeded
charges match the recharge lines credited and the period legs charged, and nothing accepted or
charged is in a DLQ.

``MODEL_STEPS`` (default 120 in ``make test``; ``make model`` runs a long walk) and
``MODEL_SEED`` (printed; set it to replay a failing walk step for step)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any

from tests.support.builders import DECLINES, GOOD, new_card, payment_intents
from tests.support.stack import Tally, eventually, messages_on, uid

STEPS = int(os.environ.get("MODEL_STEPS", "120"))
SEED = int(os.environ.get("MODEL_SEED", str(random.SystemRandom().randrange(10**9))))
SETTLE_SECONDS = 30
EUR_EMAIL_PRICE = "0.0006"


# --- the reference model ------------------------------------------------------------------


def micros(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


def text(m: int) -> str:
    sign = "-" if m < 0 else ""
    return f"{sign}{abs(m) // 1_000_000}.{abs(m) % 1_000_000:06d}"


def charged(amount: int) -> int:
    """What a card charge of ``amount`` credits: whole cents, rounded up (USD and EUR)."""
    cents = (Decimal(amount) / 10_000).to_integral_value(rounding=ROUND_CEILING)
    return int(cents) * 10_000


def half_up(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


# What each plan allows (API.md: rebill needs unlimited or saas_pro, markup needs saas_pro).
ALLOWED = {"starter": {"off"}, "unlimited": {"off", "rebill"}, "saas_pro": {"off", "rebill", "rebill_markup"}}


def downgraded(plan: str, mode: str) -> str:
    """What a mode becomes when the plan no longer allows it: markup -> rebill -> off."""
    if mode in ALLOWED[plan]:
        return mode
    return "rebill" if mode == "rebill_markup" and "rebill" in ALLOWED[plan] else "off"


@dataclass
class Card:
    pm: str
    good: bool


@dataclass
class Wallet:
    """A company or account wallet as API.md describes it."""

    currency: str
    balance: int = 0
    threshold: int = 10_000_000
    reload: int = 50_000_000
    auto: bool = True
    cards: list[Card] = field(default_factory=list)  # oldest first
    default: str | None = None
    charges: int = 0
    changed_status_at: int = -10  # the step its status last flipped (usage-meter learns later)

    @property
    def status(self) -> str:
        # suspended by a debit below zero, reactivated by a credit back to zero or above
        return "suspended" if self.balance < 0 else "active"

    def credit(self, amount: int, step: int) -> None:
        before = self.status
        self.balance += amount
        if self.status != before:
            self.changed_status_at = step

    def debit(self, amount: int, step: int) -> None:
        before = self.status
        self.balance -= amount
        if self.status != before:
            self.changed_status_at = step

    def attach(self, card: Card) -> None:
        self.cards.append(card)
        if self.default is None:
            self.default = card.pm

    def detach(self, card: Card) -> None:
        self.cards.remove(card)
        if self.default == card.pm:  # the newest card left becomes the default
            self.default = self.cards[-1].pm if self.cards else None

    def settle(self, step: int, usable: bool) -> None:
        """The auto-recharge rule: auto-recharge on, a usable card, balance below the threshold
        and nothing in flight -> recharged by the reload amount (or up to threshold + reload),
        trying every card; when every card declines, the retries fail too and auto-recharge is
        cancelled."""
        while self.auto and usable and self.cards and self.balance < self.threshold:
            if not any(c.good for c in self.cards):
                self.auto = False
                return
            if self.balance + self.reload >= self.threshold:
                amount = self.reload
            else:
                amount = self.threshold - self.balance + self.reload
            self.credit(charged(amount), step)
            self.charges += 1


@dataclass
class Account:
    """A client account: its wallet (cards on the company's connected Stripe), its rebilling
    settings and its credit request."""

    aid: str
    wallet: Wallet
    user: dict[str, str]
    mode: str = "off"
    markups: dict[str, str] = field(default_factory=dict)
    pending_request: str | None = None

    @property
    def effective(self) -> str:
        """Rebilling applies only while the account has a card (API.md: account_card_required;
        settings wait for a card)."""
        return self.mode if self.wallet.cards else "off"

    def amount(self, service: str, platform: int) -> int | None:
        """What the account pays for usage that cost its company ``platform``."""
        if self.effective == "off":
            return None
        if self.effective == "rebill":
            return platform
        markup = self.markups.get(service) or self.markups.get("default") or "1"
        return half_up(Decimal(platform) * Decimal(markup))


# Dunning (API.md, docs/0009): a failed leg of a period is tried again after these waits, then
# the subscription is cancelled.
DUNNING = (timedelta(hours=24), timedelta(hours=72), timedelta(hours=120))
PLATFORM_PRICE, COMPANY_PRICE = 10_000_000, 15_000_000  # WhatsApp, resold at 15
LICENSE_PRICE = 10_000_000  # per license and month


def period_of(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


def month_after(at: datetime) -> datetime:
    return datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=UTC)


@dataclass
class Leg:
    payer: str  # "company" (its card, the platform price) or "account" (its card, the company's)
    amount: int
    next_try: datetime
    status: str = "due"  # due, charged, failed
    failures: int = 0
    tried_at: datetime | None = None  # wall clock of the last try
    tried_cards: set[str] = field(default_factory=set)  # the cards the last try charged


@dataclass
class Sub:
    """A subscription to WhatsApp and its period legs, as API.md describes them."""

    sid: str
    deployment: str
    first_period: str
    legs: dict[tuple[str, str], Leg] = field(default_factory=dict)  # (period, "platform"|...)
    ending: bool = False  # cancel at period end
    cancelled: str | None = None  # why: "cancelled" (asked) or "payment_failed" (dunning)
    licenses: int = 0  # a company's license pool: its total, charged every period

    def open(self, period: str, at: datetime) -> None:
        if (period, "platform") in self.legs or self.cancelled or period < self.first_period:
            return
        if self.ending:
            self.cancelled = "cancelled"
            return
        if self.licenses:
            self.legs[(period, "platform")] = Leg("company", LICENSE_PRICE * self.licenses, at)
            return
        self.legs[(period, "platform")] = Leg("company", PLATFORM_PRICE, at)
        if self.deployment == "resell":
            self.legs[(period, "account")] = Leg("account", COMPANY_PRICE, at)

    @property
    def status(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "past_due" if any(leg.status == "failed" for leg in self.legs.values()) else "active"

    @property
    def outstanding(self) -> int:
        return sum(leg.amount for leg in self.legs.values() if leg.status != "charged")

    @property
    def next_retry(self) -> datetime | None:
        waiting = [
            leg.next_try
            for leg in self.legs.values()
            if leg.status == "failed" and leg.failures <= len(DUNNING)
        ]
        return min(waiting) if waiting else None


@dataclass
class Company:
    cid: str
    wallet: Wallet
    admin: dict[str, str]
    account: Account
    plan: str
    connected: bool = False
    stripe_account: str = ""
    accepted: list[str] = field(default_factory=list)  # usage event ids accepted
    subs: list[Sub] = field(default_factory=list)
    sub_charges: int = 0  # legs charged at Stripe
    pool: Sub | None = None  # the license pool's monthly charge, from the first purchase
    purchases: list[str] = field(default_factory=list)  # license purchases charged
    # (service:principal, Idempotency-Key) -> (what was asked, the first response); each
    # service keeps the keys of the requests it serves (docs/0008)
    keys: dict[tuple[str, str], tuple[str, Any]] = field(default_factory=dict)

    def pays(self, payer: str) -> bool:
        """Whether a charge to this payer's cards succeeds now (every card is tried)."""
        if payer == "company":
            return any(card.good for card in self.wallet.cards)
        return self.connected and any(card.good for card in self.account.wallet.cards)

    def charge(self, sub: Sub, leg: Leg, at: datetime) -> None:
        """One try of a leg at ``at`` (the runner's instant)."""
        leg.tried_at = datetime.now(UTC)
        wallet = self.wallet if leg.payer == "company" else self.account.wallet
        reachable = leg.payer == "company" or self.connected  # recharge refuses before any card
        leg.tried_cards = {card.pm for card in wallet.cards} if reachable else set()
        if self.pays(leg.payer):
            leg.status = "charged"
            self.sub_charges += 1
            return
        leg.status, leg.failures = "failed", leg.failures + 1
        if leg.failures <= len(DUNNING):
            leg.next_try = at + DUNNING[leg.failures - 1]
            return
        if sub.licenses:  # a pool is never cancelled: tried at the slowest pace
            leg.next_try = at + DUNNING[-1]
            return
        leg.next_try = datetime.max.replace(tzinfo=UTC)  # no more tries on its schedule
        if not sub.cancelled:
            sub.cancelled = "payment_failed"

    def run(self, at: datetime) -> None:
        """The period runner at ``at``: opens the period, then tries every leg due, in the
        runner's order, each once."""
        for sub in self.all_subs():
            sub.open(period_of(at), at)
        due = sorted(
            ((leg.next_try, sub.sid, period, name), sub, leg)
            for sub in self.all_subs()
            for (period, name), leg in sub.legs.items()
            if leg.status != "charged" and leg.next_try <= at and sub.cancelled != "payment_failed"
        )
        # the runner's order: by time, subscription, period, and the platform leg first
        due.sort(key=lambda d: (d[0][0], d[0][1], d[0][2], d[0][3] != "platform"))
        for _, sub, leg in due:
            if sub.cancelled != "payment_failed":
                self.charge(sub, leg, at)

    def card_saved(self, payer: str, pm: str) -> bool:
        """A card saved or made default: that payer's failed legs whose last try did not charge
        that card are tried at once (even one past its schedule: what a subscription its
        customer cancelled still owes); a card the last try charged and saw decline, made
        default again, changes nothing. Returns whether the runner is woken (it then runs for
        every company)."""
        now = datetime.now(UTC)
        woken = False
        for sub in self.all_subs():
            for leg in sub.legs.values():
                if leg.payer != payer or leg.status == "charged" or pm in leg.tried_cards:
                    continue
                if leg.status == "failed" and leg.tried_at is not None:
                    leg.next_try, woken = now, True
                elif leg.status == "due" and leg.next_try <= now:
                    woken = True
        return woken

    def all_subs(self) -> list[Sub]:
        return self.subs + ([self.pool] if self.pool else [])

    def wallets(self) -> list[tuple[Wallet, bool]]:
        """Each wallet with whether its cards can be charged."""
        return [(self.wallet, True), (self.account.wallet, self.connected)]


PRICES: dict[tuple[str, str], int] = {}


class When:
    """A retry time, equal to another within half a minute: the model predicts a card-woken
    retry from its own clock at the step, the runner from when it took the card event, which on
    a loaded two-core machine was 5.8 s later once (seed 52305615). The schedule is in hours,
    so a wrong step of it is still caught."""

    def __init__(self, iso: str) -> None:
        self.at = datetime.fromisoformat(iso).astimezone(UTC)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, When) and abs(self.at - other.at) <= timedelta(seconds=30)

    def __hash__(self) -> int:
        return 0

    def __lt__(self, other: When) -> bool:
        return self.at < other.at

    def __repr__(self) -> str:
        return self.at.isoformat()


def _minute(when: str | None) -> When | None:
    return When(when) if when else None


# --- the walk -----------------------------------------------------------------------------


class Walk:
    def __init__(self, tally: Tally, rng: random.Random) -> None:
        self.t = tally
        self.rng = rng
        self.companies: list[Company] = []
        self.log: list[str] = []
        self.step = 0
        self.rebilling_steps = 0  # how thoroughly the walk covered rebilled accounts
        self.clock = datetime.now(UTC)  # the period runner's instant (only ever forward)

    async def setup(self) -> None:
        platform = self.t.auth("platform_admin")
        r = await self.t.http.put(
            self.t.url("usage-meter", "/v1/prices/email"),
            headers=platform,
            json={"unit": "email", "unit_price": EUR_EMAIL_PRICE, "currency": "EUR"},
        )
        assert r.status_code == 200, r.text
        for p in (await self.t.http.get(self.t.url("usage-meter", "/v1/prices"), headers=platform)).json()[
            "items"
        ]:
            PRICES[(p["service"], p["currency"])] = micros(p["unit_price"])
        for currency, plan in (("USD", "saas_pro"), ("EUR", "unlimited")):
            cid = uid("model")
            admin = self.t.auth("company_admin", company_id=cid, email=f"owner@{cid}.example.com")
            r = await self.t.http.post(
                self.t.url("rebilling", "/v1/companies"),
                headers=platform,
                json={
                    "id": cid,
                    "name": cid,
                    "plan": plan,
                    "currency": currency,
                    "owner_email": f"owner@{cid}.example.com",
                },
            )
            assert r.status_code == 201, r.text
            aid = uid("acct")
            r = await self.t.http.post(
                self.t.url("rebilling", f"/v1/companies/{cid}/accounts"),
                headers=admin,
                json={"id": aid, "name": aid, "owner_email": f"{aid}@example.com"},
            )
            assert r.status_code == 201, r.text
            user = self.t.auth("account_user", company_id=cid, account_id=aid, email=f"{aid}@example.com")
            company = Company(
                cid,
                Wallet(currency),
                admin,
                Account(aid, Wallet(currency), user),
                plan,
                stripe_account="acct_" + uid("m").replace("-", ""),
            )
            # smart adjustment off: tier raises are another test's
            for path in (f"/v1/companies/{cid}/wallet", f"/v1/accounts/{aid}/wallet"):

                async def patched(path: str = path, admin: dict[str, str] = admin) -> bool:
                    r = await self.t.http.patch(
                        self.t.url("wallet", path), headers=admin, json={"smart_adjustment": False}
                    )
                    return r.status_code == 200

                await eventually(patched, what=f"PATCH {path}")
            self.companies.append(company)
            # connected at first (a walk disconnects and reconnects it): rebilling, account
            # cards and account recharges are reachable from the first steps
            r = await self.t.http.put(
                self.t.url("rebilling", f"/v1/companies/{cid}/stripe-connect"),
                json={"stripe_account_id": company.stripe_account},
                headers=admin,
            )
            assert r.status_code == 200, r.text
            company.connected = True
            r = await self.t.http.put(
                self.t.url("rebilling", f"/v1/companies/{cid}/reselling/whatsapp"),
                json={"company_price": text(COMPANY_PRICE)},
                headers=admin,
            )
            assert r.status_code == 200, r.text

    # --- actions: each changes the system and the model the same way ---------------------

    def _recent(self, w: Wallet) -> bool:
        return self.step - w.changed_status_at <= 2

    async def use(self, c: Company) -> None:
        service = self.rng.choice(["email", "email", "sms"])
        quantity = str(self.rng.choice([1, 10, 100, 1000, 20000]))
        account: str | None = self.rng.choice(
            [None, c.account.aid, c.account.aid, c.account.aid, "foreign", "unknown"]
        )
        if account == "foreign":
            account = next(o.account.aid for o in self.companies if o is not c)
        elif account == "unknown":
            account = uid("nobody")
        resend = bool(c.accepted) and self.rng.random() < 0.1
        event_id = self.rng.choice(c.accepted) if resend else uid("ev")
        event: dict[str, Any] = {
            "event_id": event_id,
            "company_id": c.cid,
            "service": service,
            "quantity": quantity,
        }
        if account:
            event["account_id"] = account
        w, a = c.wallet, c.account.wallet
        price = PRICES.get((service, w.currency))
        expect: set[str]
        if resend:
            expect = {"duplicate"}
        elif account not in (None, c.account.aid):
            expect = {"rejected:unknown_account"}
        elif price is None:
            expect = {"rejected:price_unavailable"}
        else:
            # usage-meter learns of suspensions from events: just after a flip either state
            # may be the one it answers from; the model follows what was answered
            mine = account == c.account.aid
            accounts = {a.status == "suspended"} | ({True, False} if self._recent(a) else set())
            agencies = {w.status == "suspended"} | ({True, False} if self._recent(w) else set())
            expect = {
                "rejected:account_suspended"
                if mine and acct
                else "rejected:agency_wallet_empty"
                if agency
                else "accepted"
                for acct in accounts
                for agency in agencies
            }
        via_topic = expect == {"accepted"} and self.rng.random() < 0.3
        self.log.append(
            f"{self.step}: use {c.cid} {service} x{quantity} account={account} "
            f"resend={resend} topic={via_topic} -> {sorted(expect)}"
        )
        if via_topic:
            await self.t.produce("usage.ingest", event, key=c.cid)
            got = "accepted"
        else:
            r = await self.t.post_usage(event)
            assert r.status_code == 202, r.text
            result = r.json()["results"][0]
            got = result["status"] + (f":{result['error']['code']}" if "error" in result else "")
        assert got in expect, f"step {self.step}: usage answered {got}, the model says {expect}"
        if got == "accepted":
            assert price is not None
            amount = half_up(Decimal(quantity) * price)
            if amount > 0:
                w.debit(amount, self.step)
                owed = c.account.amount(service, amount) if account else None
                if owed:
                    a.debit(owed, self.step)
                    self.log.append(f"{self.step}: rebilled {c.account.effective} {owed}")
            c.accepted.append(event_id)

    def _side(self, c: Company) -> tuple[str, Wallet, str, dict[str, str]]:
        """A company or its account, at random: (name, wallet, recharge path, headers)."""
        if self.rng.random() < 0.5:
            return "company", c.wallet, f"/v1/companies/{c.cid}", c.admin
        return "account", c.account.wallet, f"/v1/accounts/{c.account.aid}", c.account.user

    async def attach(self, c: Company) -> None:
        side, w, path, headers = self._side(c)
        good = self.rng.random() < 0.6
        pm = await new_card(self.t, GOOD if good else DECLINES)
        self.log.append(f"{self.step}: attach {'good' if good else 'declining'} {pm} to {side} of {c.cid}")
        r = await self.t.http.post(
            self.t.url("recharge", f"{path}/payment-methods"), json={"payment_method": pm}, headers=headers
        )
        if side == "account" and not c.connected:
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "company_stripe_not_connected"
            return
        assert r.status_code == 201, r.text
        w.attach(Card(pm, good))
        assert r.json()["is_default"] == (w.default == pm)
        self.card_saved(c, side, pm)  # failed period charges of this payer are tried at once

    async def detach(self, c: Company) -> None:
        side, w, path, headers = self._side(c)
        if not w.cards:
            return await self.attach(c)
        card = self.rng.choice(w.cards)
        self.log.append(f"{self.step}: detach {card.pm} from {side} of {c.cid}")
        r = await self.t.http.delete(
            self.t.url("recharge", f"{path}/payment-methods/{card.pm}"), headers=headers
        )
        assert r.status_code == 204, r.text
        w.detach(card)
        return None

    async def make_default(self, c: Company) -> None:
        side, w, path, headers = self._side(c)
        if not w.cards:
            return await self.attach(c)
        card = self.rng.choice(w.cards)
        self.log.append(f"{self.step}: default {card.pm} of {side} of {c.cid}")
        r = await self.t.http.post(
            self.t.url("recharge", f"{path}/payment-methods/{card.pm}/default"), headers=headers
        )
        assert r.status_code == 200, r.text
        w.default = card.pm
        self.card_saved(c, side, card.pm)
        return None

    async def patch(self, c: Company) -> None:
        side, w, path, _ = self._side(c)
        changes: dict[str, Any] = {}
        if self.rng.random() < 0.5:
            changes["auto_recharge"] = self.rng.random() < 0.6
        if self.rng.random() < 0.4:
            changes["threshold"] = self.rng.choice(["0", "5", "10", "20"])
        if self.rng.random() < 0.3:
            changes["reload_amount"] = self.rng.choice(["10", "25"])
        self.log.append(f"{self.step}: patch {side} of {c.cid} {changes}")
        r = await self.t.http.patch(self.t.url("wallet", f"{path}/wallet"), json=changes, headers=c.admin)
        assert r.status_code == 200, r.text
        w.auto = changes.get("auto_recharge", w.auto)
        w.threshold = micros(changes.get("threshold", text(w.threshold)))
        w.reload = micros(changes.get("reload_amount", text(w.reload)))

    async def credit(self, c: Company) -> None:
        side, w, path, _ = self._side(c)
        amount = self.rng.choice(["0.5", "3", "15"])
        # the platform credits a company wallet; a company admin its accounts' wallets
        who, auth = (
            ("wallet:platform", self.t.auth("platform_admin"))
            if side == "company"
            else ("wallet:admin", c.admin)
        )
        key = self._key(c, who)
        self.log.append(f"{self.step}: credit {side} of {c.cid} {amount} key={key}")
        headers = {**auth, **({"Idempotency-Key": key} if key else {})}
        r = await self.t.http.post(
            self.t.url("wallet", f"{path}/wallet/credits"), json={"amount": amount}, headers=headers
        )
        self._replayed_or_new(c, w, f"credit:{side}", who, key, r, amount)

    async def top_up(self, c: Company) -> None:
        side, w, path, headers = self._side(c)
        amount = self.rng.choice(["1.005", "7", "30"])
        who = "recharge:admin" if side == "company" else "recharge:user"
        key = self._key(c, who)
        self.log.append(f"{self.step}: top-up {side} of {c.cid} {amount} key={key}")
        headers = {**headers, **({"Idempotency-Key": key} if key else {})}
        r = await self.t.http.post(
            self.t.url("recharge", f"{path}/wallet/top-ups"), json={"amount": amount}, headers=headers
        )
        if (who, key) in c.keys or ((side == "company" or c.connected) and w.cards):
            # a key already used answers as it did (or 422), whatever changed since
            self._replayed_or_new(c, w, f"top_up:{side}", who, key, r, amount)
            return
        code = (
            "company_stripe_not_connected" if side == "account" and not c.connected else "no_payment_method"
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == code, r.text

    def _key(self, c: Company, who: str) -> str | None:
        """No key, a new one, or (a retry, or a mistake) one this principal used before."""
        mine = [k for (k_who, k) in c.keys if k_who == who]
        roll = self.rng.random()
        if mine and roll < 0.25:
            return self.rng.choice(mine)  # a retry with the same key
        return uid("key") if roll < 0.6 else None

    def _replayed_or_new(
        self, c: Company, w: Wallet, kind: str, who: str, key: str | None, r: Any, amount: str
    ) -> None:
        if key is not None and (who, key) in c.keys:
            first_kind, first = c.keys[(who, key)]
            if first_kind == f"{kind}:{amount}":
                assert (r.status_code, r.json()) == (201, first), "a replay answers the first"
            else:
                assert r.status_code == 422, r.text
                assert r.json()["error"]["code"] == "idempotency_key_reused"
            return
        assert r.status_code == 201, r.text
        if key is not None:
            c.keys[(who, key)] = (f"{kind}:{amount}", r.json())
        if kind.startswith("credit"):
            w.credit(micros(amount), self.step)
            return
        good = any(card.good for card in w.cards)
        assert r.json()["status"] == ("succeeded" if good else "failed"), r.text
        if good:
            w.credit(charged(micros(amount)), self.step)
            w.charges += 1

    async def request_credits(self, c: Company) -> None:
        """The account asks its company for credits (only while the company has not connected
        Stripe): one pending request at a time."""
        a = c.account
        amount = self.rng.choice(["2", "5.5"])
        self.log.append(f"{self.step}: {a.aid} requests {amount}")
        r = await self.t.http.post(
            self.t.url("wallet", f"/v1/accounts/{a.aid}/credit-requests"),
            json={"amount": amount},
            headers=a.user,
        )
        if c.connected:
            assert r.status_code == 409 and r.json()["error"]["code"] == "top_up_available"
            return
        if a.pending_request is not None:
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "pending_request_exists"
            return
        assert r.status_code == 201, r.text
        a.pending_request = r.json()["id"]

    async def resolve_request(self, c: Company) -> None:
        a = c.account
        if a.pending_request is None:
            return await self.request_credits(c)
        verdict = self.rng.choice(["approve", "reject"])
        self.log.append(f"{self.step}: {verdict} {a.pending_request}")
        r = await self.t.http.post(
            self.t.url("wallet", f"/v1/credit-requests/{a.pending_request}/{verdict}"), headers=c.admin
        )
        assert r.status_code == 200, r.text
        if verdict == "approve":
            a.wallet.credit(micros(r.json()["amount"]), self.step)
        a.pending_request = None
        return None

    async def set_rebilling(self, c: Company) -> None:
        a = c.account
        mode = self.rng.choice(["off", "rebill", "rebill", "rebill_markup", "rebill_markup"])
        markups = (
            self.rng.choice([{"default": "1.5"}, {"sms": "2", "default": "1.25"}, {"email": "3"}])
            if mode == "rebill_markup"
            else {}
        )
        self.log.append(f"{self.step}: rebilling of {a.aid} -> {mode} {markups}")
        r = await self.t.http.put(
            self.t.url("rebilling", f"/v1/accounts/{a.aid}/rebilling"),
            json={"mode": mode, "markups": markups},
            headers=c.admin,
        )
        refusal = None
        if mode != "off":
            if mode not in ALLOWED[c.plan]:
                refusal = (403, "plan_upgrade_required")
            elif not c.connected:
                refusal = (409, "company_stripe_not_connected")
            elif not a.wallet.cards:
                refusal = (409, "account_card_required")
        if refusal:
            assert (r.status_code, r.json()["error"]["code"]) == refusal, r.text
            return
        assert r.status_code == 200, r.text
        a.mode, a.markups = mode, markups

    async def change_plan(self, c: Company) -> None:
        plan = self.rng.choice(["starter", "unlimited", "saas_pro", "saas_pro"])
        self.log.append(f"{self.step}: plan of {c.cid} -> {plan}")
        r = await self.t.http.put(
            self.t.url("rebilling", f"/v1/companies/{c.cid}/plan"),
            json={"plan": plan},
            headers=self.t.auth("platform_admin"),
        )
        assert r.status_code == 200, r.text
        c.plan = plan
        a = c.account
        mode = downgraded(plan, a.mode)
        changed = [{"account_id": a.aid, "from": a.mode, "to": mode}] if mode != a.mode else []
        assert r.json()["changed_accounts"] == changed
        a.mode = mode
        if mode != "rebill_markup":
            a.markups = {}

    async def connection(self, c: Company) -> None:
        """Connect the company's Stripe (now and then another account: the cards saved on the
        previous one are forgotten), or disconnect it (rebilling stops)."""
        a = c.account
        if c.connected and self.rng.random() < 0.5:
            self.log.append(f"{self.step}: {c.cid} disconnects Stripe")
            r = await self.t.http.delete(
                self.t.url("rebilling", f"/v1/companies/{c.cid}/stripe-connect"), headers=c.admin
            )
            assert r.status_code == 200, r.text
            changed = [{"account_id": a.aid, "from": a.mode, "to": "off"}] if a.mode != "off" else []
            assert r.json()["changed_accounts"] == changed
            c.connected, a.mode, a.markups = False, "off", {}
            return
        if self.rng.random() < 0.2:
            c.stripe_account = "acct_" + uid("m").replace("-", "")
            a.wallet.cards.clear()
            a.wallet.default = None
        self.log.append(f"{self.step}: {c.cid} connects Stripe {c.stripe_account}")
        r = await self.t.http.put(
            self.t.url("rebilling", f"/v1/companies/{c.cid}/stripe-connect"),
            json={"stripe_account_id": c.stripe_account},
            headers=c.admin,
        )
        assert r.status_code == 200, r.text
        c.connected = True

    def card_saved(self, c: Company, payer: str, pm: str) -> None:
        if c.card_saved(payer, pm):  # the runner, woken, charges what is due of every company
            now = datetime.now(UTC)
            for o in self.companies:
                o.run(now)

    async def subscribe(self, c: Company) -> None:
        """The company subscribes its account to WhatsApp: the current period is charged at
        once, each leg on its own."""
        deployment = self.rng.choice(["resell", "resell", "direct"])
        self.log.append(f"{self.step}: {c.account.aid} subscribes ({deployment})")
        r = await self.t.http.post(
            self.t.url("rebilling", f"/v1/accounts/{c.account.aid}/subscriptions"),
            json={"product": "whatsapp", "deployment": deployment},
            headers=c.admin,
        )
        if deployment == "resell" and not c.connected:
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "company_stripe_not_connected"
            return
        assert r.status_code == 201, r.text
        now = datetime.now(UTC)
        sub = Sub(r.json()["id"], deployment, period_of(now))
        c.subs.append(sub)
        sub.open(period_of(now), now)
        for name in ("platform", "account"):
            if (period_of(now), name) in sub.legs:
                c.charge(sub, sub.legs[(period_of(now), name)], now)
        assert r.json()["charge"] == ("failed" if sub.status == "past_due" else "charged")

    async def advance(self, c: Company) -> None:
        """Time passes for the period runner: hours (retries) or a month (the next period)."""
        self.clock += self.rng.choice(
            [
                timedelta(hours=1),
                timedelta(hours=25),
                timedelta(hours=73),
                timedelta(days=6),
                timedelta(days=32),
            ]
        )
        self.clock = max(self.clock, datetime.now(UTC))
        self.log.append(f"{self.step}: the runner runs {c.cid} at {self.clock.isoformat()}")
        r = await self.t.http.post(
            self.t.url("rebilling", "/v1/reselling/run"),
            json={"at": self.clock.isoformat(), "company_id": c.cid},
            headers=self.t.auth("platform_admin"),
        )
        assert r.status_code == 200, r.text
        c.run(self.clock)

    async def buy_licenses(self, c: Company) -> None:
        """The company buys licenses: charged at once (quantity x price), the pool grows only
        then; a pool whose charge failed sells none until it is paid."""
        quantity = self.rng.choice([1, 2, 3])
        self.log.append(f"{self.step}: {c.cid} buys {quantity} licenses")
        r = await self.t.http.post(
            self.t.url("rebilling", f"/v1/companies/{c.cid}/licenses"),
            json={"quantity": quantity},
            headers=c.admin,
        )
        if (c.pool and c.pool.status == "past_due") or not c.pays("company"):
            assert r.status_code == 402, r.text
            assert r.json()["error"]["code"] == "payment_failed"
            return
        assert r.status_code == 201, r.text
        c.purchases.append(r.json()["purchase"]["id"])
        now = datetime.now(UTC)
        if c.pool is None:
            nxt = month_after(now)
            c.pool = Sub(f"lic_{c.cid}", "direct", period_of(nxt), licenses=quantity)
        else:
            c.pool.open(period_of(now), now)  # this period at the licenses held before
            c.pool.licenses += quantity
        assert r.json()["total"] == c.pool.licenses

    async def unsubscribe(self, c: Company) -> None:
        live = [sub for sub in c.subs if not sub.cancelled]
        if not live:
            return await self.subscribe(c)
        sub = self.rng.choice(live)
        self.log.append(f"{self.step}: cancel {sub.sid} at period end")
        r = await self.t.http.delete(
            self.t.url("rebilling", f"/v1/subscriptions/{sub.sid}"), headers=c.account.user
        )
        assert r.status_code == 200 and r.json()["cancel_at_period_end"], r.text
        sub.ending = True
        return None

    async def wait(self, c: Company) -> None:
        self.log.append(f"{self.step}: time passes")
        await asyncio.sleep(1.2)

    # --- comparing ---------------------------------------------------------------------

    async def _get(self, service: str, path: str, headers: dict[str, str]) -> Any:
        r = await self.t.http.get(self.t.url(service, path), headers=headers)
        return r.json() if r.status_code == 200 else None  # 404: not heard of yet

    async def observed(self, c: Company) -> dict[str, Any]:
        a = c.account
        out: dict[str, Any] = {}
        for side, path in (("company", f"/v1/companies/{c.cid}"), ("account", f"/v1/accounts/{a.aid}")):
            w = await self._get("wallet", f"{path}/wallet", c.admin) or {}
            attempts = (
                await self._get("recharge", f"{path}/wallet/recharges?limit=500", c.admin) or {"items": []}
            )["items"]
            out[side] = {
                k: w.get(k)
                for k in ("balance", "status", "auto_recharge", "currency", "funding", "rebilling", "markups")
            }
            out[side]["charges"] = sum(x["status"] == "succeeded" for x in attempts)
            out[side]["in_flight"] = sum(x["status"] == "pending" for x in attempts)
        cards = await self._get("recharge", f"/v1/accounts/{a.aid}/payment-methods", a.user)
        account = await self._get("rebilling", f"/v1/accounts/{a.aid}", c.admin) or {}
        status = await self._get("wallet", f"/v1/accounts/{a.aid}/service-status", c.admin) or {}
        subs = await self._get("rebilling", f"/v1/accounts/{a.aid}/subscriptions?limit=500", c.admin) or {
            "items": []
        }
        out["subscriptions"] = [
            (x["id"], x["status"], x["outstanding"], _minute(x["next_retry_at"]), x["failed_attempts"])
            for x in subs["items"]
        ]
        pool = await self._get("rebilling", f"/v1/companies/{c.cid}/licenses", c.admin) or {}
        out["licenses"] = pool.get("total")
        out["account"].update(
            cards=sorted(x["id"] for x in cards["items"]) if cards else None,
            recharge_connected=cards["stripe_connected"] if cards else None,
            has_valid_card=account.get("has_valid_card"),
            service=status.get("reason"),
        )
        return out

    def expected(self, c: Company) -> dict[str, Any]:
        a = c.account
        funding = "top_up" if c.connected else "request_credits"
        out: dict[str, Any] = {}
        for side, w in (("company", c.wallet), ("account", a.wallet)):
            out[side] = {
                "balance": text(w.balance),
                "status": w.status,
                "auto_recharge": w.auto,
                "currency": w.currency,
                "funding": funding,
                "rebilling": None,
                "markups": None,
                "charges": w.charges,
                "in_flight": 0,
            }
        out["account"].update(
            rebilling=a.effective,
            markups=a.markups if a.effective == "rebill_markup" else None,
            cards=sorted(x.pm for x in a.wallet.cards),
            recharge_connected=c.connected,
            has_valid_card=bool(a.wallet.cards),
            # a self-billing workspace with no license assigned (licenses are the next
            # model's): the license decides first
            service="no_license",
        )
        out["subscriptions"] = sorted(
            (
                sub.sid,
                sub.status,
                text(sub.outstanding),
                _minute(sub.next_retry.isoformat() if sub.next_retry else None),
                # every failed try counted: a try the runner is still making (woken by a card)
                # is waited for before the next step, whose outcome may depend on it
                sum(leg.failures for leg in sub.legs.values() if leg.status != "charged"),
            )
            for sub in c.subs
        )
        out["licenses"] = c.pool.licenses if c.pool else 0
        return out

    async def settle(self) -> None:
        for c in self.companies:
            for w, usable in c.wallets():
                w.settle(self.step, usable)
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            seen = [await self.observed(c) for c in self.companies]
            want = [self.expected(c) for c in self.companies]
            if seen == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"MODEL_SEED={SEED}: after step {self.step} the system did not settle on "
                    f"the model\nseen: {seen}\nmodel: {want}\nwalk:\n" + "\n".join(self.log)
                )
            await asyncio.sleep(0.1)

    async def run(self, steps: int) -> None:
        actions = [
            (self.use, 8),
            (self.attach, 3),
            (self.detach, 1),
            (self.make_default, 1),
            (self.patch, 3),
            (self.credit, 2),
            (self.top_up, 2),
            (self.wait, 1),
            (self.request_credits, 1),
            (self.resolve_request, 1),
            (self.set_rebilling, 3),
            (self.change_plan, 1),
            (self.connection, 1),
            (self.subscribe, 1),
            (self.advance, 2),
            (self.unsubscribe, 1),
            (self.buy_licenses, 1),
        ]
        weights = [w for _, w in actions]
        for self.step in range(steps):
            action = self.rng.choices([a for a, _ in actions], weights)[0]
            company = self.rng.choice(self.companies)
            try:
                await action(company)
            except AssertionError as exc:
                raise AssertionError(f"MODEL_SEED={SEED}: {exc}\nwalk:\n" + "\n".join(self.log)) from exc
            await self.settle()
            self.rebilling_steps += sum(c.account.effective != "off" for c in self.companies)
            if self.step % 20 == 0:
                print(f"model step {self.step}/{steps}", flush=True)


async def test_the_lifecycle_model(tally: Tally) -> None:
    print(f"MODEL_SEED={SEED} MODEL_STEPS={STEPS}", flush=True)
    walk = Walk(tally, random.Random(SEED))
    await walk.setup()
    await walk.settle()
    await walk.run(STEPS)

    done = [line.split(": ", 1)[1].split(" ")[0] for line in walk.log]
    print(
        "model walk:",
        {w: done.count(w) for w in sorted(set(done))},
        "rebilling on:",
        walk.rebilling_steps,
        "subscriptions (count, legs charged, legs failed):",
        [
            (len(c.subs), c.sub_charges, sum(leg.failures for sub in c.subs for leg in sub.legs.values()))
            for c in walk.companies
        ],
        "licenses (purchases, pool):",
        [(len(c.purchases), c.pool.licenses if c.pool else 0) for c in walk.companies],
        "charges:",
        [(c.wallet.charges, c.account.wallet.charges) for c in walk.companies],
        flush=True,
    )

    # every successful charge at Stripe is one credited recharge or top-up, and no more
    intents = await payment_intents(tally)
    for c in walk.companies:
        for w, path in (
            (c.wallet, f"/v1/companies/{c.cid}"),
            (c.account.wallet, f"/v1/accounts/{c.account.aid}"),
        ):
            r = await tally.http.get(
                tally.url("recharge", f"{path}/wallet/recharges?limit=500"), headers=c.admin
            )
            ids = {a["id"] for a in r.json()["items"]}
            paid = [
                i
                for i in intents
                if (i.get("metadata") or {}).get("tally_attempt") in ids and i["status"] == "succeeded"
            ]
            r = await tally.http.get(
                tally.url("wallet", f"{path}/wallet/transactions?limit=500"), headers=c.admin
            )
            lines = [t for t in r.json()["items"] if t["kind"] in ("recharge", "top_up")]
            assert len(paid) == len(lines) == w.charges, (path, len(paid), len(lines))
            assert {i["currency"] for i in paid} <= {w.currency.lower()}

    # every leg the model charged is one succeeded charge at Stripe, and no more
    for c in walk.companies:
        for sub in c.subs:
            paid = [
                i
                for i in intents
                if i["status"] == "succeeded"
                and ((i.get("metadata") or {}).get("tally_attempt") or "").startswith(f"sub-{sub.sid}-")
            ]
            assert len(paid) == sum(leg.status == "charged" for leg in sub.legs.values()), sub

    # every license purchase and every period of a pool the model charged, and no more
    for c in walk.companies:
        paid = [
            i
            for i in intents
            if i["status"] == "succeeded"
            and ((i.get("metadata") or {}).get("tally_attempt") or "").removeprefix("licenses-")
            in c.purchases
        ]
        assert len(paid) == len(c.purchases), (c.cid, len(paid), c.purchases)
        pool = [
            i
            for i in intents
            if i["status"] == "succeeded"
            and ((i.get("metadata") or {}).get("tally_attempt") or "").startswith(f"sub-lic_{c.cid}-")
        ]
        assert len(pool) == sum(
            leg.status == "charged" for leg in (c.pool.legs.values() if c.pool else [])
        ), c.cid

    # nothing accepted or charged was dead-lettered
    accepted = {e for c in walk.companies for e in c.accepted}
    ours = {c.cid for c in walk.companies} | {c.account.aid for c in walk.companies}
    for name in ("usage.recorded.dlq", "recharge.events.dlq", "wallet.digest.dlq"):
        for m in await messages_on(tally, name):
            message = str(m.get("message", ""))
            assert not any(e in message for e in accepted), (name, m["error"])
            assert not any(cid in message for cid in ours), (name, m["error"])

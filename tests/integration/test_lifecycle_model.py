"""A model of the wallet and recharge lifecycle, as a test. A seeded random walk drives the real
services through their public APIs (HTTP and the ``usage.ingest`` topic): companies in two
currencies with an account each, good and declining cards attached, removed and made default,
wallet PATCHes, usage (own, foreign and unknown accounts, resent ids, a service without a price
in the company's currency), credits and top-ups with and without Idempotency-Keys, credit
requests approved and rejected, and time for retries. After each step it waits for the system
to settle on what an independent reference model — plain Python written from API.md, not from
Tally's code — says: every balance (company and account wallets), status and auto-recharge
flag, and the number of successful card charges. At the end: Stripe's
succeeded charges match the recharge lines credited, and no accepted event is in a DLQ.

``MODEL_STEPS`` (default 120 in ``make test``; ``make model`` runs a long walk) and
``MODEL_SEED`` (printed; set it to replay a failing walk step for step)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from tests.conftest import Tally, uid
from tests.integration.test_recharge import DECLINES, GOOD, new_card, payment_intents

pytestmark = pytest.mark.integration

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


@dataclass
class Card:
    pm: str
    good: bool


@dataclass
class Wallet:
    """A company wallet as API.md describes it."""

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

    def ordered(self) -> list[Card]:
        return sorted(self.cards, key=lambda c: c.pm != self.default)

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

    def settle(self, step: int) -> None:
        """The auto-recharge rule: auto-recharge on, a card, balance below the threshold and
        nothing in flight -> recharged by the reload amount (or up to threshold + reload),
        trying every card; when every card declines, the retries fail too and auto-recharge
        is cancelled."""
        while self.auto and self.cards and self.balance < self.threshold:
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
class Company:
    cid: str
    aid: str
    wallet: Wallet
    admin: dict[str, str]
    account_balance: int = 0  # its account's wallet: credit requests approved (no rebilling)
    pending_request: str | None = None  # the account's pending credit request, if any
    accepted: list[str] = field(default_factory=list)  # usage event ids accepted
    keys: dict[str, tuple[str, Any]] = field(default_factory=dict)  # key -> (kind, response)


PRICES: dict[tuple[str, str], int] = {}


# --- the walk -----------------------------------------------------------------------------

class Walk:
    def __init__(self, tally: Tally, rng: random.Random) -> None:
        self.t = tally
        self.rng = rng
        self.companies: list[Company] = []
        self.log: list[str] = []
        self.step = 0

    async def setup(self) -> None:
        platform = self.t.auth("platform_admin")
        r = await self.t.http.put(self.t.url("usage-meter", "/v1/prices/email"), headers=platform,
                                  json={"unit": "email", "unit_price": EUR_EMAIL_PRICE,
                                        "currency": "EUR"})
        assert r.status_code == 200, r.text
        for p in (await self.t.http.get(self.t.url("usage-meter", "/v1/prices"),
                                        headers=platform)).json()["items"]:
            PRICES[(p["service"], p["currency"])] = micros(p["unit_price"])
        for currency in ("USD", "EUR"):
            cid = uid("model")
            admin = self.t.auth("company_admin", company_id=cid, email=f"owner@{cid}.example.com")
            r = await self.t.http.post(self.t.url("rebilling", "/v1/companies"), headers=platform,
                                       json={"id": cid, "name": cid, "plan": "starter",
                                             "currency": currency,
                                             "owner_email": f"owner@{cid}.example.com"})
            assert r.status_code == 201, r.text
            aid = uid("acct")
            r = await self.t.http.post(self.t.url("rebilling", f"/v1/companies/{cid}/accounts"),
                                       headers=admin, json={"id": aid, "name": aid,
                                                            "owner_email": f"{aid}@example.com"})
            assert r.status_code == 201, r.text
            company = Company(cid, aid, Wallet(currency), admin)
            # smart adjustment off: tier raises are another issue's model
            r = await self.t.http.patch(self.t.url("wallet", f"/v1/companies/{cid}/wallet"),
                                        json={"smart_adjustment": False}, headers=admin)
            assert r.status_code == 200, r.text
            self.companies.append(company)

    # --- actions: each changes the system and the model the same way ---------------------

    async def use(self, c: Company) -> None:
        service = self.rng.choice(["email", "email", "sms"])
        quantity = str(self.rng.choice([1, 10, 100, 1000, 20000]))
        account: str | None = self.rng.choice([None, c.aid, c.aid, "foreign", "unknown"])
        if account == "foreign":
            account = next(o.aid for o in self.companies if o is not c)
        elif account == "unknown":
            account = uid("nobody")
        resend = bool(c.accepted) and self.rng.random() < 0.1
        event_id = self.rng.choice(c.accepted) if resend else uid("ev")
        event: dict[str, Any] = {"event_id": event_id, "company_id": c.cid, "service": service,
                                 "quantity": quantity}
        if account:
            event["account_id"] = account
        w = c.wallet
        price = PRICES.get((service, w.currency))
        expect: set[str]
        if resend:
            expect = {"duplicate"}
        elif account not in (None, c.aid):
            expect = {"rejected:unknown_account"}
        elif price is None:
            expect = {"rejected:price_unavailable"}
        elif w.status == "suspended":
            expect = {"rejected:agency_wallet_empty"}
        else:
            expect = {"accepted"}
        if self.step - w.changed_status_at <= 2 and not resend and expect <= {
                "accepted", "rejected:agency_wallet_empty"}:
            # usage-meter learns of suspensions from events: just after a flip either answer
            # is right; the model follows what was answered
            expect = {"accepted", "rejected:agency_wallet_empty"}
        via_topic = expect == {"accepted"} and self.rng.random() < 0.3
        self.log.append(f"{self.step}: use {c.cid} {service} x{quantity} account={account} "
                        f"resend={resend} topic={via_topic} -> {sorted(expect)}")
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
            amount = int((Decimal(quantity) * price).to_integral_value(rounding=ROUND_HALF_UP))
            if amount > 0:
                w.debit(amount, self.step)
            c.accepted.append(event_id)

    async def attach(self, c: Company) -> None:
        good = self.rng.random() < 0.6
        pm = await new_card(self.t, GOOD if good else DECLINES)
        self.log.append(f"{self.step}: attach {'good' if good else 'declining'} {pm} to {c.cid}")
        r = await self.t.http.post(self.t.url("recharge", f"/v1/companies/{c.cid}/payment-methods"),
                                   json={"payment_method": pm}, headers=c.admin)
        assert r.status_code == 201, r.text
        c.wallet.cards.append(Card(pm, good))
        if c.wallet.default is None:
            c.wallet.default = pm
        assert r.json()["is_default"] == (c.wallet.default == pm)

    async def detach(self, c: Company) -> None:
        if not c.wallet.cards:
            return await self.attach(c)
        card = self.rng.choice(c.wallet.cards)
        self.log.append(f"{self.step}: detach {card.pm} from {c.cid}")
        r = await self.t.http.delete(
            self.t.url("recharge", f"/v1/companies/{c.cid}/payment-methods/{card.pm}"),
            headers=c.admin)
        assert r.status_code == 204, r.text
        c.wallet.cards.remove(card)
        if c.wallet.default == card.pm:  # the newest card left becomes the default
            c.wallet.default = c.wallet.cards[-1].pm if c.wallet.cards else None
        return None

    async def make_default(self, c: Company) -> None:
        if not c.wallet.cards:
            return await self.attach(c)
        card = self.rng.choice(c.wallet.cards)
        self.log.append(f"{self.step}: default {card.pm} of {c.cid}")
        r = await self.t.http.post(
            self.t.url("recharge", f"/v1/companies/{c.cid}/payment-methods/{card.pm}/default"),
            headers=c.admin)
        assert r.status_code == 200, r.text
        c.wallet.default = card.pm
        return None

    async def patch(self, c: Company) -> None:
        changes: dict[str, Any] = {}
        if self.rng.random() < 0.5:
            changes["auto_recharge"] = self.rng.random() < 0.6
        if self.rng.random() < 0.4:
            changes["threshold"] = self.rng.choice(["0", "5", "10", "20"])
        if self.rng.random() < 0.3:
            changes["reload_amount"] = self.rng.choice(["10", "25"])
        self.log.append(f"{self.step}: patch {c.cid} {changes}")
        r = await self.t.http.patch(self.t.url("wallet", f"/v1/companies/{c.cid}/wallet"),
                                    json=changes, headers=c.admin)
        assert r.status_code == 200, r.text
        w = c.wallet
        w.auto = changes.get("auto_recharge", w.auto)
        w.threshold = micros(changes.get("threshold", text(w.threshold)))
        w.reload = micros(changes.get("reload_amount", text(w.reload)))

    async def credit(self, c: Company) -> None:
        amount = self.rng.choice(["0.5", "3", "15"])
        key = self._key(c, "credit")
        self.log.append(f"{self.step}: credit {c.cid} {amount} key={key}")
        headers = {**self.t.auth("platform_admin"), **({"Idempotency-Key": key} if key else {})}
        r = await self.t.http.post(self.t.url("wallet", f"/v1/companies/{c.cid}/wallet/credits"),
                                   json={"amount": amount}, headers=headers)
        self._replayed_or_new(c, "credit", key, r, amount)

    async def top_up(self, c: Company) -> None:
        amount = self.rng.choice(["1.005", "7", "30"])
        key = self._key(c, "top_up")
        self.log.append(f"{self.step}: top-up {c.cid} {amount} key={key}")
        headers = {**c.admin, **({"Idempotency-Key": key} if key else {})}
        r = await self.t.http.post(self.t.url("recharge", f"/v1/companies/{c.cid}/wallet/top-ups"),
                                   json={"amount": amount}, headers=headers)
        if not c.wallet.cards:
            assert r.status_code == 409 and r.json()["error"]["code"] == "no_payment_method"
            return
        self._replayed_or_new(c, "top_up", key, r, amount)

    def _key(self, c: Company, kind: str) -> str | None:
        mine = [k for k, (k_kind, _) in c.keys.items() if k_kind.startswith(kind)]
        roll = self.rng.random()
        if mine and roll < 0.25:
            return self.rng.choice(mine)  # a retry with the same key
        return uid("key") if roll < 0.6 else None

    def _replayed_or_new(self, c: Company, kind: str, key: str | None, r: Any,
                         amount: str) -> None:
        if key is not None and key in c.keys:
            first_kind, first = c.keys[key]
            if first_kind == f"{kind}:{amount}":
                assert (r.status_code, r.json()) == (201, first), "a replay answers the first"
            else:
                assert r.status_code == 422, r.text
                assert r.json()["error"]["code"] == "idempotency_key_reused"
            return
        assert r.status_code == 201, r.text
        if key is not None:
            c.keys[key] = (f"{kind}:{amount}", r.json())
        if kind == "credit":
            c.wallet.credit(micros(amount), self.step)
            return
        good = any(card.good for card in c.wallet.cards)
        assert r.json()["status"] == ("succeeded" if good else "failed"), r.text
        if good:
            c.wallet.credit(charged(micros(amount)), self.step)
            c.wallet.charges += 1

    async def request_credits(self, c: Company) -> None:
        """The account (its company has not connected Stripe) asks for credits: one pending
        request at a time."""
        amount = self.rng.choice(["2", "5.5"])
        self.log.append(f"{self.step}: {c.aid} requests {amount}")
        user = self.t.auth("account_user", company_id=c.cid, account_id=c.aid,
                           email=f"{c.aid}@example.com")
        r = await self.t.http.post(self.t.url("wallet", f"/v1/accounts/{c.aid}/credit-requests"),
                                   json={"amount": amount}, headers=user)
        if c.pending_request is not None:
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "pending_request_exists"
            return
        assert r.status_code == 201, r.text
        c.pending_request = r.json()["id"]

    async def resolve_request(self, c: Company) -> None:
        if c.pending_request is None:
            return await self.request_credits(c)
        verdict = self.rng.choice(["approve", "reject"])
        self.log.append(f"{self.step}: {verdict} {c.pending_request}")
        r = await self.t.http.post(
            self.t.url("wallet", f"/v1/credit-requests/{c.pending_request}/{verdict}"),
            headers=c.admin)
        assert r.status_code == 200, r.text
        if verdict == "approve":
            c.account_balance += micros(r.json()["amount"])
        c.pending_request = None
        return None

    async def wait(self, c: Company) -> None:
        self.log.append(f"{self.step}: time passes")
        await asyncio.sleep(1.2)

    # --- comparing ---------------------------------------------------------------------

    async def observed(self, c: Company) -> dict[str, Any]:
        r = await self.t.http.get(self.t.url("wallet", f"/v1/companies/{c.cid}/wallet"),
                                  headers=c.admin)
        w = r.json()
        r = await self.t.http.get(
            self.t.url("recharge", f"/v1/companies/{c.cid}/wallet/recharges?limit=500"),
            headers=c.admin)
        attempts = r.json()["items"]
        r = await self.t.http.get(self.t.url("wallet", f"/v1/accounts/{c.aid}/wallet"),
                                  headers=c.admin)
        # 404 until the wallet has heard of the account: not settled yet
        account = r.json() if r.status_code == 200 else {"balance": None, "currency": None}
        return {"account_balance": account["balance"], "account_currency": account["currency"],
                "balance": w["balance"], "status": w["status"], "auto_recharge": w["auto_recharge"],
                "currency": w["currency"],
                "charges": sum(a["status"] == "succeeded" for a in attempts),
                "in_flight": sum(a["status"] == "pending" for a in attempts)}

    def expected(self, c: Company) -> dict[str, Any]:
        w = c.wallet
        return {"account_balance": text(c.account_balance), "account_currency": w.currency,
                "balance": text(w.balance), "status": w.status, "auto_recharge": w.auto,
                "currency": w.currency, "charges": w.charges, "in_flight": 0}

    async def settle(self) -> None:
        for c in self.companies:
            c.wallet.settle(self.step)
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            seen = [await self.observed(c) for c in self.companies]
            want = [self.expected(c) for c in self.companies]
            if seen == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"MODEL_SEED={SEED}: after step {self.step} the system did not settle on "
                    f"the model\nseen: {seen}\nmodel: {want}\nwalk:\n" + "\n".join(self.log))
            await asyncio.sleep(0.1)

    async def run(self, steps: int) -> None:
        actions = [(self.use, 8), (self.attach, 2), (self.detach, 1), (self.make_default, 1),
                   (self.patch, 3), (self.credit, 2), (self.top_up, 2), (self.wait, 1),
                   (self.request_credits, 1), (self.resolve_request, 1)]
        weights = [w for _, w in actions]
        for self.step in range(steps):
            action = self.rng.choices([a for a, _ in actions], weights)[0]
            company = self.rng.choice(self.companies)
            try:
                await action(company)
            except AssertionError as exc:
                raise AssertionError(f"MODEL_SEED={SEED}: {exc}\nwalk:\n"
                                     + "\n".join(self.log)) from exc
            await self.settle()
            if self.step % 20 == 0:
                print(f"model step {self.step}/{steps}", flush=True)


async def topic(tally: Tally, name: str) -> list[dict[str, Any]]:
    """Every message on ``name`` so far."""
    consumer = AIOKafkaConsumer(name, bootstrap_servers=tally.stack.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None)
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=300)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for r in records:
                    try:
                        out.append(orjson.loads(r.value))
                    except orjson.JSONDecodeError:
                        continue
    finally:
        await consumer.stop()
    return out


async def test_the_lifecycle_model(tally: Tally) -> None:
    print(f"MODEL_SEED={SEED} MODEL_STEPS={STEPS}", flush=True)
    walk = Walk(tally, random.Random(SEED))
    await walk.setup()
    await walk.settle()
    await walk.run(STEPS)

    # every successful charge at Stripe is one credited recharge or top-up, and no more
    intents = await payment_intents(tally)
    for c in walk.companies:
        r = await tally.http.get(
            tally.url("recharge", f"/v1/companies/{c.cid}/wallet/recharges?limit=500"),
            headers=c.admin)
        ids = {a["id"] for a in r.json()["items"]}
        paid = [i for i in intents if (i.get("metadata") or {}).get("tally_attempt") in ids
                and i["status"] == "succeeded"]
        lines = [t for t in await tally.company_transactions(c.cid)
                 if t["kind"] in ("recharge", "top_up")]
        assert len(paid) == len(lines) == c.wallet.charges, (c.cid, len(paid), len(lines))
        assert {i["currency"] for i in paid} <= {c.wallet.currency.lower()}

    # nothing accepted or charged was dead-lettered
    accepted = {e for c in walk.companies for e in c.accepted}
    ours = {c.cid for c in walk.companies}
    for name in ("usage.recorded.dlq", "recharge.events.dlq", "wallet.digest.dlq"):
        for m in await topic(tally, name):
            message = str(m.get("message", ""))
            assert not any(e in message for e in accepted), (name, m["error"])
            assert not any(cid in message for cid in ours), (name, m["error"])

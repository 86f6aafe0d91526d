"""Builders the end-to-end tests share: an agency set up through the topics (``Agency``), a
reseller through rebilling's API (``Reseller``), a resold subscription (``Resold``), cards in
localstripe, and small readers of what Stripe and the mail sink hold."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any

import stripe

from tally.events import RecordedUsage
from tests.support.stack import Tally, eventually, uid

GOOD = "4242424242424242"


DECLINES = "4000000000000341"  # attaches, then declines every charge


async def new_card(tally: Tally, number: str) -> str:
    client = stripe.StripeClient(
        "sk_test_tally", http_client=stripe.HTTPXClient(), base_addresses={"api": tally.stack.stripe_api_base}
    )
    pm = await client.v1.payment_methods.create_async(
        params={"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}}
    )
    return str(pm.id)


async def attach(tally: Tally, agency: Agency | Reseller, number: str, aid: str | None = None) -> str:
    pm = await new_card(tally, number)
    path = f"/v1/accounts/{aid}/payment-methods" if aid else f"/v1/companies/{agency.cid}/payment-methods"
    headers = agency.user(aid) if aid else agency.admin
    r = await tally.http.post(tally.url("recharge", path), json={"payment_method": pm}, headers=headers)
    assert r.status_code == 201, r.text
    return pm


async def configure(
    tally: Tally, agency: Agency, threshold: str, reload: str, aid: str | None = None
) -> None:
    path = f"/v1/accounts/{aid}/wallet" if aid else f"/v1/companies/{agency.cid}/wallet"
    await agency.announce()
    r = await tally.http.patch(
        tally.url("wallet", path),
        json={"threshold": threshold, "reload_amount": reload},
        headers=agency.admin,
    )
    assert r.status_code == 200, r.text


async def wait_balance(agency: Agency, balance: str, aid: str | None = None) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        w = await agency.wallet(aid)
        return w if w["balance"] == balance else None

    return await eventually(check, timeout=40, what=f"balance {balance}")


async def funded(tally: Tally, amount: str = "1.00") -> str:
    """A company with money in its wallet: its usage is never refused as agency_wallet_empty."""
    cid = uid("co")
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
        json={"amount": amount},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 201, r.text
    return cid


def usage_event(cid: str, eid: str, service: str = "sms", quantity: str = "1", **kw: str) -> dict[str, str]:
    """A usage event as a product posts it (``POST /v1/usage``, ``usage.ingest``)."""
    return {"event_id": eid, "company_id": cid, "service": service, "quantity": quantity, **kw}


def recorded_usage(
    cid: str,
    eid: str,
    amount: int,
    account: str | None = None,
    *,
    recorded: datetime | None = None,
    service: str = "sms",
) -> RecordedUsage:
    """A ``usage.recorded`` payload as the wallet reads it: ``amount`` micros of ``service``,
    occurred and recorded at ``recorded`` (now)."""
    now = recorded or datetime.now(UTC)
    return RecordedUsage(
        event_id=eid,
        company_id=cid,
        account_id=account,
        service=service,
        quantity="1",
        occurred_at=now,
        recorded_at=now,
        unit_price_micros=amount,
        platform_amount_micros=amount,
        currency="USD",
    )


def recorded_message(cid: str, eid: str, amount: int, account: str | None = None) -> dict[str, Any]:
    """``recorded_usage`` in its envelope, as usage-meter writes it to ``usage.recorded``."""
    data = recorded_usage(cid, eid, amount, account)
    body = {f: getattr(data, f) for f in data.__struct_fields__}
    time = data.recorded_at.isoformat()
    body["occurred_at"] = body["recorded_at"] = time
    return {
        "id": f"usage:{cid}/{eid}",
        "type": "usage.recorded",
        "time": time,
        "source": "test",
        "data": body,
    }


async def payment_intents(tally: Tally) -> list[dict[str, Any]]:
    """Every PaymentIntent localstripe holds."""
    client = stripe.StripeClient(
        "sk_test_tally", http_client=stripe.HTTPXClient(), base_addresses={"api": tally.stack.stripe_api_base}
    )
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = await client.v1.payment_intents.list_async(params=params)  # type: ignore[arg-type]
        found.extend(i.to_dict() for i in page.data)
        if not page.has_more or not page.data:
            break
        params = {"limit": 100, "starting_after": page.data[-1].id}
    return found


class Agency:
    """A company with accounts, set up through the topics the wallet consumes."""

    def __init__(self, tally: Tally) -> None:
        self.t = tally
        self.cid = uid("co")
        self.admin = tally.auth("company_admin", company_id=self.cid, email="owner@agency.test")

    async def announce(self, *, wait: bool = True) -> None:
        """Tell the services the company exists, as rebilling does when it creates one; once,
        and never after a test announced it itself (that would undo the test's own state).
        ``wait``: until the wallet has heard (a company no one announced has no settings)."""
        if self.cid in self.t.announced:
            return
        await self.t.envelope(
            "rebilling.events",
            "company.updated",
            {"company_id": self.cid, "name": self.cid, "plan": "starter", "stripe_connected": False},
            key=self.cid,
        )
        if wait:
            url = self.t.url("wallet", f"/v1/companies/{self.cid}/wallet")

            async def heard() -> bool:  # an empty PATCH changes nothing; 404 until it knows
                r = await self.t.http.patch(url, json={}, headers=self.admin)
                return r.status_code == 200

            await eventually(heard, what=f"the wallet to hear of {self.cid}")

    async def add_account(
        self, mode: str = "off", markups: dict[str, str] | None = None, active: bool = True
    ) -> str:
        aid = uid("acct")
        # no wait: the account's record follows on the same partition, and it is waited for
        await self.announce(wait=False)
        await self.t.envelope(
            "rebilling.events",
            "account.created",
            {"account_id": aid, "company_id": self.cid, "name": aid, "owner_email": f"{aid}@client.test"},
            key=self.cid,
        )
        if mode != "off":
            await self.t.envelope(
                "rebilling.settings",
                "rebilling.settings",
                {
                    "account_id": aid,
                    "company_id": self.cid,
                    "mode": mode,
                    "markups": markups or {},
                    "active": active,
                    "version": 1,
                },
                key=aid,
            )

        async def ready() -> bool:
            r = await self.t.http.get(self.t.url("wallet", f"/v1/accounts/{aid}/wallet"), headers=self.admin)
            return r.status_code == 200 and r.json()["rebilling"] == (mode if active else "off")

        await eventually(ready, what=f"the wallet to learn about {aid}")

        # usage-meter too: rebilling never created this account (this builder stands in for
        # it), so until usage-meter has read the record, rebilling answers its question
        # "unknown" and usage naming the account is refused as not the company's. Its consumer
        # can be a batch behind the wallet's: the company's record read, the account's not
        # (CI, 2026-12-05).
        async def metered() -> bool:
            query = "SELECT company_id FROM accounts WHERE account_id = $1"
            return [r["company_id"] for r in await self.t.sql("usage_meter", query, aid)] == [self.cid]

        await eventually(metered, what=f"usage-meter to learn about {aid}")

        # and recharge, for the same reason: an account user's token does not vouch for its
        # account's company there (docs/0027), and rebilling does not know this account
        async def rechargeable() -> bool:
            query = "SELECT company_id FROM accounts WHERE account_id = $1"
            return [r["company_id"] for r in await self.t.sql("recharge", query, aid)] == [self.cid]

        await eventually(rechargeable, what=f"recharge to learn about {aid}")
        return aid

    def user(self, aid: str) -> dict[str, str]:
        return self.t.auth("account_user", company_id=self.cid, account_id=aid, email=f"{aid}@client.test")

    async def use(self, service: str, quantity: str, account: str | None = None) -> str:
        e: dict[str, Any] = {
            "event_id": uid("ev"),
            "company_id": self.cid,
            "service": service,
            "quantity": quantity,
        }
        if account:
            e["account_id"] = account
        r = await self.t.post_usage(e)
        assert r.json()["results"][0]["status"] == "accepted", r.text
        await self.t.wait_applied(self.cid, e["event_id"])
        return str(e["event_id"])

    async def wallet(self, aid: str | None = None) -> dict[str, Any]:
        path = f"/v1/accounts/{aid}/wallet" if aid else f"/v1/companies/{self.cid}/wallet"
        r = await self.t.http.get(self.t.url("wallet", path), headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def lines(self, aid: str) -> list[dict[str, Any]]:
        r = await self.t.http.get(
            self.t.url("wallet", f"/v1/accounts/{aid}/wallet/transactions"), headers=self.admin
        )
        assert r.status_code == 200, r.text
        return r.json()["items"]  # type: ignore[no-any-return]

    async def fund(self, amount: str, aid: str | None = None) -> dict[str, Any]:
        if aid:
            url, headers = f"/v1/accounts/{aid}/wallet/credits", self.admin
        else:
            url, headers = f"/v1/companies/{self.cid}/wallet/credits", self.t.auth("platform_admin")
        r = await self.t.http.post(self.t.url("wallet", url), json={"amount": amount}, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()["wallet"]  # type: ignore[no-any-return]

    async def status(self, aid: str) -> dict[str, Any]:
        r = await self.t.http.get(
            self.t.url("wallet", f"/v1/accounts/{aid}/service-status"), headers=self.t.auth("product")
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


class Reseller:
    def __init__(self, tally: Tally, plan: str = "saas_pro", currency: str = "USD") -> None:
        self.t = tally
        self.cid = uid("agency")
        self.plan = plan
        self.currency = currency
        self.email = f"admin-{self.cid}@example.com"
        self.admin = tally.auth("company_admin", company_id=self.cid, email=self.email)

    async def announce(self) -> None:
        """Nothing to do: rebilling announces the company ``create`` makes (``Agency.announce``)."""

    async def create(self, connect: bool = True) -> Reseller:
        r = await self.t.http.post(
            self.t.url("rebilling", "/v1/companies"),
            json={
                "id": self.cid,
                "name": "Agency",
                "plan": self.plan,
                "owner_email": f"owner-{self.cid}@example.com",
                "currency": self.currency,
            },
            headers=self.t.auth("platform_admin"),
        )
        assert r.status_code == 201, r.text
        if connect:
            await self.connect()
        return self

    async def connect(self) -> None:
        acct = "acct_" + uid("c").replace("-", "")
        r = await self.t.http.put(
            self.t.url("rebilling", f"/v1/companies/{self.cid}/stripe-connect"),
            json={"stripe_account_id": acct},
            headers=self.admin,
        )
        assert r.status_code == 200 and r.json()["stripe_connected"], r.text

    async def account(
        self, billing_model: str = "self_billing", saas_plan_id: str | None = None, aid: str | None = None
    ) -> str:
        """An account created in rebilling (``aid``: the id to create it under)."""
        aid = aid or uid("ws")
        body: dict[str, Any] = {
            "id": aid,
            "name": "Client",
            "owner_email": f"{aid}@example.com",
            "billing_model": billing_model,
        }
        if saas_plan_id:
            body["saas_plan_id"] = saas_plan_id
        r = await self.t.http.post(
            self.t.url("rebilling", f"/v1/companies/{self.cid}/accounts"), json=body, headers=self.admin
        )
        assert r.status_code == 201, r.text
        return aid

    def user(self, aid: str) -> dict[str, str]:
        return self.t.auth("account_user", company_id=self.cid, account_id=aid, email=f"{aid}@example.com")

    async def add_card(self, aid: str) -> None:
        """The account user saves a card (through recharge, on the company's Stripe)."""

        async def attached() -> bool:
            r = await self.t.http.post(
                self.t.url("recharge", f"/v1/accounts/{aid}/payment-methods"),
                json={"payment_method": await new_card(self.t, GOOD)},
                headers=self.user(aid),
            )
            return r.status_code == 201

        await eventually(attached, what="the recharge service to know the account")

        async def card_known() -> bool:
            r = await self.t.http.get(self.t.url("rebilling", f"/v1/accounts/{aid}"), headers=self.admin)
            return bool(r.json()["has_valid_card"])

        await eventually(card_known, what="rebilling to learn of the card")

    async def patch_wallet(self, changes: dict[str, Any], aid: str | None = None) -> None:
        """PATCH a wallet, once the wallet service has learnt of the account."""
        path = f"/v1/accounts/{aid}/wallet" if aid else f"/v1/companies/{self.cid}/wallet"
        await self.announce()

        async def patched() -> bool:
            r = await self.t.http.patch(self.t.url("wallet", path), json=changes, headers=self.admin)
            return r.status_code == 200

        await eventually(patched, what=f"PATCH {path}")

    async def set_rebilling(
        self,
        aid: str,
        mode: str,
        markups: dict[str, str] | None = None,
    ) -> Any:
        return await self.t.http.put(
            self.t.url("rebilling", f"/v1/accounts/{aid}/rebilling"),
            json={"mode": mode, "markups": markups or {}},
            headers=self.admin,
        )

    async def wallet(self, aid: str | None = None) -> dict[str, Any]:
        path = f"/v1/accounts/{aid}/wallet" if aid else f"/v1/companies/{self.cid}/wallet"
        r = await self.t.http.get(self.t.url("wallet", path), headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def wallet_mode(self, aid: str, mode: str) -> None:
        async def applied() -> bool:
            r = await self.t.http.get(self.t.url("wallet", f"/v1/accounts/{aid}/wallet"), headers=self.admin)
            return r.status_code == 200 and r.json()["rebilling"] == mode

        await eventually(applied, what=f"the wallet to apply {mode}")

    async def use(self, aid: str, service: str, quantity: str) -> None:
        e = {
            "event_id": uid("ev"),
            "company_id": self.cid,
            "account_id": aid,
            "service": service,
            "quantity": quantity,
        }
        r = await self.t.post_usage(e)
        assert r.json()["results"][0]["status"] == "accepted", r.text
        await self.t.wait_applied(self.cid, e["event_id"])

    async def fund(self, amount: str, aid: str | None = None) -> None:
        if aid:
            url, headers = f"/v1/accounts/{aid}/wallet/credits", self.admin
        else:
            url, headers = f"/v1/companies/{self.cid}/wallet/credits", self.t.auth("platform_admin")
        r = await self.t.http.post(self.t.url("wallet", url), json={"amount": amount}, headers=headers)
        assert r.status_code == 201, r.text


def mails_about(tally: Tally, needle: str) -> list[Any]:
    out = []
    for path in tally.stack.mail.mails():
        msg = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        if needle in str(msg["Subject"]):
            out.append(msg)
    return out


class Resold:
    """A connected saas_pro agency with a good company card, reselling WhatsApp at 15 (the
    platform's price is 10) to one account with its own card."""

    def __init__(self, tally: Tally) -> None:
        self.t = tally
        self.agency = Reseller(tally)
        self.aid = ""

    async def create(self, *, company_card: str = GOOD, account_card: str = DECLINES) -> Resold:
        t, agency = self.t, self.agency
        await agency.create()
        await agency.patch_wallet({"auto_recharge": False})  # only subscriptions charge cards
        await self.card(company_card)
        self.aid = await agency.account()
        await agency.patch_wallet({"auto_recharge": False}, self.aid)  # only subscriptions charge
        await self.card(account_card, account=True)
        r = await t.http.put(
            t.url("rebilling", f"/v1/companies/{agency.cid}/reselling/whatsapp"),
            json={"company_price": "15"},
            headers=agency.admin,
        )
        assert r.status_code == 200, r.text
        return self

    async def card(self, number: str, *, account: bool = False) -> str:
        path = (
            f"/v1/accounts/{self.aid}/payment-methods"
            if account
            else f"/v1/companies/{self.agency.cid}/payment-methods"
        )
        headers = self.agency.user(self.aid) if account else self.agency.admin
        pm = await new_card(self.t, number)

        async def attached() -> bool:
            r = await self.t.http.post(
                self.t.url("recharge", path), json={"payment_method": pm}, headers=headers
            )
            return r.status_code == 201

        await eventually(attached, what="the card attached")
        return pm

    async def subscribe(self, deployment: str = "resell", key: str | None = None) -> Any:
        headers = {**self.agency.admin, **({"Idempotency-Key": key} if key else {})}
        return await self.t.http.post(
            self.t.url("rebilling", f"/v1/accounts/{self.aid}/subscriptions"),
            json={"product": "whatsapp", "deployment": deployment},
            headers=headers,
        )

    async def subscriptions(self) -> list[dict[str, Any]]:
        r = await self.t.http.get(
            self.t.url("rebilling", f"/v1/accounts/{self.aid}/subscriptions"), headers=self.agency.admin
        )
        assert r.status_code == 200, r.text
        return r.json()["items"]  # type: ignore[no-any-return]

    async def run(self, at: datetime, period: str | None = None) -> dict[str, int]:
        """Run the period runner for this agency as at ``at`` (opening ``period``: by default
        the one ``at`` falls in)."""
        r = await self.t.http.post(
            self.t.url("rebilling", "/v1/reselling/run"),
            json={"at": at.isoformat(), "company_id": self.agency.cid, "period": period},
            headers=self.t.auth("platform_admin"),
        )
        assert r.status_code == 200, r.text
        return r.json()["outcomes"]  # type: ignore[no-any-return]

    async def report(self, period: str) -> dict[str, Any]:
        r = await self.t.http.get(
            self.t.url("rebilling", f"/v1/companies/{self.agency.cid}/reselling/report?period={period}"),
            headers=self.agency.admin,
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def charges(self) -> list[tuple[str, str, str]]:
        """Every card charge made for this account's subscriptions, as Stripe holds them:
        (payer, amount, succeeded | failed), from the charge keys in the intents' metadata."""
        subs = {x["id"] for x in await self.subscriptions()}
        out = []
        for intent in await payment_intents(self.t):
            key = (intent.get("metadata") or {}).get("tally_attempt") or ""
            if not key.startswith("sub-") or key.split("-")[1] not in subs:
                continue
            payer = "companies" if "-platform" in key else "accounts"
            amount = f"{intent['amount'] // 100}.{intent['amount'] % 100:02d}0000"
            out.append((payer, amount, "succeeded" if intent["status"] == "succeeded" else "failed"))
        return sorted(out)


def month_after(now: datetime) -> datetime:
    return datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, 1, tzinfo=UTC)


async def license_charges(tally: Tally, cid: str, purchases: set[str]) -> list[str]:
    """Amounts of the successful card charges for a company's licenses: its purchases and its
    pool's periods."""
    out = []
    for intent in await payment_intents(tally):
        key = (intent.get("metadata") or {}).get("tally_attempt") or ""
        if intent["status"] == "succeeded" and (
            key.removeprefix("licenses-") in purchases or key.startswith(f"sub-lic_{cid}-")
        ):
            out.append(f"{intent['amount'] // 100}.{intent['amount'] % 100:02d}0000")
    return sorted(out)


async def new_sepa(tally: Tally, iban: str) -> str:
    client = stripe.StripeClient(
        "sk_test_tally", http_client=stripe.HTTPXClient(), base_addresses={"api": tally.stack.stripe_api_base}
    )
    pm = await client.v1.payment_methods.create_async(
        params={
            "type": "sepa_debit",
            "sepa_debit": {"iban": iban},
            "billing_details": {"name": "Client", "email": "client@example.com"},
        }
    )
    return str(pm.id)


def run_in_fresh_loop(coro: Any) -> Any:
    """Hypothesis drives sync tests; run each example's coroutine on its own loop."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


async def recharges(tally: Tally, agency: Agency, aid: str | None = None) -> list[dict[str, Any]]:
    path = f"/v1/accounts/{aid}/wallet/recharges" if aid else f"/v1/companies/{agency.cid}/wallet/recharges"
    r = await tally.http.get(tally.url("recharge", path), headers=agency.admin)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def stripe_charges_for(tally: Tally, attempt_id: str) -> list[dict[str, Any]]:
    return [
        i
        for i in await payment_intents(tally)
        if (i.get("metadata") or {}).get("tally_attempt") == attempt_id and i.get("status") == "succeeded"
    ]


async def patch_company_wallet(tally: Tally, agency: Agency, **changes: Any) -> dict[str, Any]:
    await agency.announce()
    r = await tally.http.patch(
        tally.url("wallet", f"/v1/companies/{agency.cid}/wallet"), json=changes, headers=agency.admin
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def attempts_where(tally: Tally, agency: Agency, what: str, check: Any) -> list[dict[str, Any]]:
    async def ok() -> list[dict[str, Any]] | None:
        found = await recharges(tally, agency)
        return found if check(found) else None

    return await eventually(ok, timeout=40, what=what)


async def succeeded_charges(tally: Tally, attempts: list[dict[str, Any]]) -> int:
    return sum([len(await stripe_charges_for(tally, a["id"])) for a in attempts])


async def account_the_notifier_knows(tally: Tally, *, fund: str | None = None) -> tuple[Reseller, str]:
    """A new agency (funded with ``fund`` when given) and one account of it, once the notifier
    has heard of the account (its usage-alerts answer 200)."""
    agency = await Reseller(tally).create(connect=False)
    aid = await agency.account()
    if fund is not None:
        await agency.fund(fund)

    async def known() -> bool:
        r = await tally.http.get(
            tally.url("notifier", f"/v1/accounts/{aid}/usage-alerts"), headers=agency.admin
        )
        return r.status_code == 200

    await eventually(known, what="the notifier to learn of the account")
    return agency, aid

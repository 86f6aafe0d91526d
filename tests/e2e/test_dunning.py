"""Period billing with dunning, from outside (API.md, rebilling): each leg of a period is
charged at most once; a failed leg leaves the subscription past_due with what is outstanding,
is retried on the runner's schedule and at once when the payer saves or defaults a card; the
company's platform leg never waits for the account's; after the last try the subscription is
cancelled and the company told. Subscriptions are listed and cancelled at period end; an
Idempotency-Key subscribes once; two admins at once cannot break gating. Real stack: cards in
localstripe through the recharge service, mail to the SMTP sink. Time is the runner's
parameter (``POST /v1/reselling/run {"at", "company_id"}``), not the wall clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.builders import (
    DECLINES,
    GOOD,
    Reseller,
    Resold,
    license_charges,
    mails_about,
    month_after,
    payment_intents,
)
from tests.support.stack import Tally, eventually, uid


async def test_a_declined_resold_period_is_charged_once_the_card_works(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    assert r.status_code == 201, r.text
    sub = r.json()
    assert (sub["charge"], sub["status"], sub["outstanding"]) == ("failed", "past_due", "15.000000")
    period = sub["period"]
    # the company's platform leg did not wait for the account's: charged once, now
    assert await resold.charges() == [
        ("accounts", "15.000000", "failed"),
        ("companies", "10.000000", "succeeded"),
    ]
    report = await resold.report(period)
    assert (
        report["revenue"],
        report["platform_cost"],
        report["outstanding"],
        report["platform_outstanding"],
    ) == ("0.000000", "10.000000", "15.000000", "0.000000")

    # the account saves a working card and makes it its default: the period is charged at once
    pm = await resold.card(GOOD, account=True)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods/{pm}/default"),
        headers=resold.agency.user(resold.aid),
    )
    assert r.status_code == 200, r.text

    async def collected() -> bool:
        [s] = await resold.subscriptions()
        return (s["status"], s["outstanding"]) == ("active", "0.000000")

    await eventually(collected, what="the failed period charged on the new card")
    assert await resold.charges() == [
        ("accounts", "15.000000", "failed"),
        ("accounts", "15.000000", "succeeded"),
        ("companies", "10.000000", "succeeded"),
    ]
    report = await resold.report(period)
    assert (report["revenue"], report["platform_cost"], report["profit"], report["outstanding"]) == (
        "15.000000",
        "10.000000",
        "5.000000",
        "0.000000",
    )

    # running the period again, now or later in it, charges nobody again
    now = datetime.now(UTC)
    await resold.run(now)
    await resold.run(now + timedelta(hours=1))
    assert len(await resold.charges()) == 3


async def test_dunning_retries_on_its_schedule_then_cancels_and_tells_the_company(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    assert r.json()["charge"] == "failed", r.text
    start, period = datetime.now(UTC), r.json()["period"]

    async def run(hours: float) -> dict[str, int]:  # the dunning of this period only
        return await resold.run(start + timedelta(hours=hours), period)

    # not before its time: the first retry is 24 h after the failure
    assert await run(23) == {}
    assert await run(25) == {"failed": 1}
    assert await run(26) == {}  # the next one is 72 h after that
    assert await run(25 + 73) == {"failed": 1}
    [s] = await resold.subscriptions()
    assert (s["status"], s["outstanding"]) == ("past_due", "15.000000")
    assert await run(25 + 73 + 121) == {"cancelled": 1}
    [s] = await resold.subscriptions()
    assert (s["status"], s["outstanding"]) == ("cancelled", "15.000000")
    assert await run(24 * 40) == {}  # nothing after the end
    failed = [c for c in await resold.charges() if c[0] == "accounts"]
    assert failed == [("accounts", "15.000000", "failed")] * 4
    assert [c for c in await resold.charges() if c[0] == "companies"] == [
        ("companies", "10.000000", "succeeded")
    ]  # the company once, for the one period

    async def told() -> bool:
        r = await tally.http.get(
            tally.url("notifier", f"/v1/companies/{resold.agency.cid}/notifications"),
            headers=resold.agency.admin,
        )
        return any(n["kind"] == "subscription_cancelled" for n in r.json()["items"])

    await eventually(told, what="the in-app notification")

    async def mailed() -> bool:
        return bool(mails_about(tally, f"whatsapp of {resold.aid} cancelled"))

    await eventually(mailed, what="the cancellation mail")


async def test_the_platform_leg_is_dunned_on_its_own_and_retried_when_the_company_adds_a_card(
    tally: Tally,
) -> None:
    resold = await Resold(tally).create(company_card=DECLINES, account_card=GOOD)
    r = await resold.subscribe()
    assert (r.json()["charge"], r.json()["status"]) == ("failed", "past_due"), r.text
    report = await resold.report(r.json()["period"])
    # the account paid the company; the company still owes the platform
    assert (report["revenue"], report["platform_cost"], report["platform_outstanding"]) == (
        "15.000000",
        "0.000000",
        "10.000000",
    )
    await resold.card(GOOD)  # the company saves a working card: charged at once

    async def collected() -> bool:
        [s] = await resold.subscriptions()
        return bool(s["status"] == "active")

    await eventually(collected, what="the platform leg charged on the new card")
    report = await resold.report(r.json()["period"])
    assert (report["platform_cost"], report["platform_outstanding"]) == ("10.000000", "0.000000")
    assert sorted(c for c in await resold.charges() if c[2] == "succeeded") == [
        ("accounts", "15.000000", "succeeded"),
        ("companies", "10.000000", "succeeded"),
    ]


async def test_subscriptions_are_listed_cancelled_at_period_end_and_subscribed_once_per_key(
    tally: Tally,
) -> None:
    resold = await Resold(tally).create(account_card=GOOD)
    key = uid("key")
    first = await resold.subscribe(key=key)
    again = await resold.subscribe(key=key)
    assert first.status_code == again.status_code == 201, first.text
    assert again.json() == first.json()  # one subscription, the first response again
    other = await resold.subscribe(deployment="direct", key=key)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"

    async def paid() -> dict[str, Any] | None:
        # a charge still processing when the first answer was given (a loaded machine) is
        # collected by the runner's recheck, driven here rather than waited for
        [s] = await resold.subscriptions()
        if s["outstanding"] == "0.000000":
            return s
        await resold.run(datetime.now(UTC) + timedelta(seconds=61))
        return None

    s = await eventually(paid, what="the first period paid")
    assert (s["id"], s["status"]) == (first.json()["id"], "active")
    assert len(await resold.charges()) == 2

    # another company cannot see or cancel it
    stranger = tally.auth("company_admin", company_id=uid("other"))
    r = await tally.http.delete(tally.url("rebilling", f"/v1/subscriptions/{s['id']}"), headers=stranger)
    assert r.status_code == 404
    r = await tally.http.delete(
        tally.url("rebilling", f"/v1/subscriptions/{s['id']}"), headers=resold.agency.user(resold.aid)
    )
    assert r.status_code == 200 and r.json()["cancel_at_period_end"] is True, r.text
    assert r.json()["status"] == "active"  # paid until the period ends
    nxt = month_after(datetime.now(UTC))
    assert await resold.run(nxt) == {}
    [s] = await resold.subscriptions()
    assert s["status"] == "cancelled"
    assert len(await resold.charges()) == 2  # nothing charged for the next period
    r = await tally.http.post(
        tally.url("rebilling", "/v1/reselling/run"),
        json={"at": "not a time"},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 422


async def test_a_subscription_runs_every_period_until_cancelled(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=GOOD)
    r = await resold.subscribe()
    assert r.json()["charge"] == "charged", r.text
    nxt = month_after(datetime.now(UTC))
    assert await resold.run(nxt) == {"charged": 2}
    assert await resold.run(nxt) == {}  # the same instant again: nothing
    assert await resold.run(nxt + timedelta(days=3)) == {}  # later in the period: nothing
    assert len(await resold.charges()) == 4
    report = await resold.report(f"{nxt.year:04d}-{nxt.month:02d}")
    assert (report["revenue"], report["platform_cost"]) == ("15.000000", "10.000000")


async def test_gating_holds_when_two_admins_write_at_once(tally: Tally) -> None:
    """PUT rebilling with markup racing a downgrade to starter, and rebilling racing a Stripe
    disconnection: whatever the order, no account keeps what its company no longer allows."""
    agency = await Reseller(tally).create()
    aid = await agency.account()
    await agency.add_card(aid)
    platform = tally.auth("platform_admin")
    plan = tally.url("rebilling", f"/v1/companies/{agency.cid}/plan")
    connect = tally.url("rebilling", f"/v1/companies/{agency.cid}/stripe-connect")
    settings = tally.url("rebilling", f"/v1/accounts/{aid}/rebilling")
    for _ in range(12):
        await tally.http.put(plan, json={"plan": "saas_pro"}, headers=platform)
        await asyncio.gather(
            agency.set_rebilling(aid, "rebill_markup", {"default": "2"}),
            tally.http.put(plan, json={"plan": "starter"}, headers=platform),
        )
        r = await tally.http.get(settings, headers=agency.admin)
        assert r.json()["mode"] == "off", r.text  # starter allows no rebilling
    await tally.http.put(plan, json={"plan": "saas_pro"}, headers=platform)
    acct = "acct_" + uid("g").replace("-", "")
    for _ in range(12):
        await tally.http.put(connect, json={"stripe_account_id": acct}, headers=agency.admin)
        await asyncio.gather(
            agency.set_rebilling(aid, "rebill"), tally.http.delete(connect, headers=agency.admin)
        )
        r = await tally.http.get(settings, headers=agency.admin)
        assert r.json()["mode"] == "off", r.text  # no rebilling without Stripe


async def test_licenses_are_bought_and_billed_every_period(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    await agency.patch_wallet({"auto_recharge": False})
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")

    # no card: nothing charged, the pool unchanged
    r = await tally.http.post(lic, json={"quantity": 3}, headers=agency.admin)
    assert r.status_code == 402 and r.json()["error"]["code"] == "payment_failed", r.text
    declining = await resold.card(DECLINES)
    r = await tally.http.post(lic, json={"quantity": 3}, headers=agency.admin)
    assert r.status_code == 402 and r.json()["error"]["code"] == "payment_failed", r.text
    pool = (await tally.http.get(lic, headers=agency.admin)).json()
    assert (pool["total"], pool["unit_price"]) == (0, "10.000000")

    await tally.http.delete(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{declining}"), headers=agency.admin
    )
    await resold.card(GOOD)
    key = {"Idempotency-Key": uid("key")}
    r = await tally.http.post(lic, json={"quantity": 3}, headers={**agency.admin, **key})
    assert r.status_code == 201, r.text
    assert (r.json()["total"], r.json()["purchase"]["amount"]) == (3, "30.000000")
    again = await tally.http.post(lic, json={"quantity": 3}, headers={**agency.admin, **key})
    assert (again.status_code, again.json()) == (201, r.json())  # bought once
    purchases = {r.json()["purchase"]["id"]}
    r = await tally.http.post(lic, json={"quantity": 2}, headers=agency.admin)
    assert r.status_code == 201 and r.json()["total"] == 5, r.text
    purchases.add(r.json()["purchase"]["id"])
    assert await license_charges(tally, agency.cid, purchases) == ["20.000000", "30.000000"]

    # every period after, the pool's total, once
    nxt = month_after(datetime.now(UTC))
    assert await resold.run(nxt) == {"charged": 1}
    assert await resold.run(nxt + timedelta(days=1)) == {}
    assert await license_charges(tally, agency.cid, purchases) == ["20.000000", "30.000000", "50.000000"]
    r = await tally.http.post(lic, json={"quantity": 0}, headers=agency.admin)
    assert r.status_code == 422


async def test_seats_of_an_automated_workspace_are_charged_at_the_company_seat_price(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    price = tally.url("rebilling", f"/v1/companies/{agency.cid}/seat-price")
    r = await tally.http.put(price, json={"amount": "12.3456789"}, headers=agency.admin)
    assert r.status_code == 422, r.text  # seven decimals
    r = await tally.http.put(price, json={"amount": "12.50"}, headers=agency.admin)
    assert r.status_code == 200 and r.json() == {"amount": "12.500000", "currency": "USD"}
    other = tally.auth("company_admin", company_id=uid("other"))
    assert (await tally.http.put(price, json={"amount": "1"}, headers=other)).status_code == 404

    resold.aid = await agency.account(billing_model="stripe_connect_automated")
    await agency.patch_wallet({"auto_recharge": False}, resold.aid)
    await resold.card(GOOD, account=True)
    pool = (
        await tally.http.get(
            tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses"), headers=agency.admin
        )
    ).json()
    for email in ("one@example.com", "two@example.com"):
        r = await tally.http.post(
            tally.url("rebilling", f"/v1/accounts/{resold.aid}/invitations"),
            json={"email": email},
            headers=agency.admin,
        )
        assert r.status_code == 201, r.text  # no license needed: seats are a subscription
        r = await tally.http.post(
            tally.url("rebilling", f"/v1/invitations/{r.json()['id']}/accept"), headers=agency.admin
        )
        assert r.status_code == 200, r.text
    assert (
        await tally.http.get(
            tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses"), headers=agency.admin
        )
    ).json() == pool  # the pool untouched

    def seat_charges(intents: list[dict[str, Any]], sid: str) -> list[int]:
        return sorted(
            i["amount"]
            for i in intents
            if i["status"] == "succeeded"
            and ((i.get("metadata") or {}).get("tally_attempt") or "").startswith(f"sub-{sid}-")
        )

    [seats] = [s for s in await resold.subscriptions() if s["product"] == "seats"]
    assert (seats["status"], seats["outstanding"]) == ("active", "0.000000")
    # each seat added was charged for this period at once, on the account's card
    assert seat_charges(await payment_intents(tally), seats["id"]) == [1250, 1250]
    nxt = month_after(datetime.now(UTC))
    assert await resold.run(nxt) == {"charged": 1}  # next period: two seats in one charge
    assert seat_charges(await payment_intents(tally), seats["id"]) == [1250, 1250, 2500]

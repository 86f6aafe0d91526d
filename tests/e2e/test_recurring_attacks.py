"""Attacks on recurring billing from an adversarial review (issue #18), kept as tests: dunning
schedules, what can and cannot be cancelled, seats after dunning gave up, processing payments,
one Idempotency-Key at once, tenant crossings, a past-due pool."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.builders import (
    DECLINES,
    GOOD,
    Resold,
    license_charges,
    month_after,
    new_card,
    new_sepa,
    payment_intents,
)
from tests.support.stack import Tally, eventually, uid

SEPA_OK = "DE89370400440532013000"


def period_of(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


async def intents_with(tally: Tally, prefix: str) -> list[tuple[str, int, str]]:
    out = []
    for i in await payment_intents(tally):
        key = (i.get("metadata") or {}).get("tally_attempt") or ""
        if key.startswith(prefix):
            out.append((key, i["amount"], i["status"]))
    return sorted(out)


async def invite_accept(tally: Tally, resold: Resold, email: str) -> Any:
    agency = resold.agency
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{resold.aid}/invitations"),
        json={"email": email},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    return await tally.http.post(
        tally.url("rebilling", f"/v1/invitations/{r.json()['id']}/accept"), headers=agency.admin
    )


async def automated(tally: Tally, price: str, card: str) -> Resold:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/seat-price"),
        json={"amount": price},
        headers=agency.admin,
    )
    assert r.status_code == 200, r.text
    resold.aid = await agency.account(billing_model="stripe_connect_automated")
    await agency.patch_wallet({"auto_recharge": False}, resold.aid)
    await resold.card(card, account=True)
    return resold


# --- 1. a subscription cancelled by its customer while past_due: dunning never stops ------


async def test_a_subscription_cancelled_while_past_due_is_dunned_on_schedule_only(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    r = await resold.subscribe()
    assert r.json()["charge"] == "failed", r.text
    sid, period, t0 = r.json()["id"], r.json()["period"], datetime.now(UTC)
    r = await tally.http.delete(
        tally.url("rebilling", f"/v1/subscriptions/{sid}"), headers=resold.agency.admin
    )
    assert r.status_code == 200, r.text
    # the next period opens: the subscription ends (cancelled as asked)
    await resold.run(month_after(t0))
    [s] = await resold.subscriptions()
    assert s["status"] == "cancelled", s
    # the period still owed is dunned on its schedule (24 h, 72 h, 120 h): 4 tries in all
    outcomes = []
    for n in range(1, 7):  # far apart: each run is past any retry's time
        outcomes.append(await resold.run(month_after(t0) + timedelta(hours=200 * n), period))
    tries = [c for c in await resold.charges() if c[0] == "accounts"]
    assert len(tries) == 4, (len(tries), outcomes)  # the first, then three retries, no more


# --- 2. the license pool's subscription cancelled by the company: licenses free forever ----


async def test_a_company_cannot_cancel_its_license_pool_billing(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    await agency.patch_wallet({"auto_recharge": False})
    await resold.card(GOOD)
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")
    r = await tally.http.post(lic, json={"quantity": 2}, headers=agency.admin)
    assert r.status_code == 201, r.text
    purchases = {r.json()["purchase"]["id"]}
    d = await tally.http.delete(
        tally.url("rebilling", f"/v1/subscriptions/lic_{agency.cid}"), headers=agency.admin
    )
    assert d.status_code == 409 and d.json()["error"]["code"] == "not_cancellable", d.text
    nxt = month_after(datetime.now(UTC))
    await resold.run(nxt)
    await resold.run(month_after(nxt))
    pool = (await tally.http.get(lic, headers=agency.admin)).json()
    charges = await license_charges(tally, agency.cid, purchases)
    assert pool["total"] == 2
    # the pool is still held: each of the two periods after is charged
    assert charges == ["20.000000"] * 3, (d.status_code, d.text[:200], charges)


# --- 3. seats: the account user cancels the seat subscription, members stay ---------------


async def test_seats_are_not_cancelled_apart_from_their_members(tally: Tally) -> None:
    resold = await automated(tally, "12.50", GOOD)
    r = await invite_accept(tally, resold, "one@example.com")
    assert r.status_code == 200, r.text
    sid = f"seats_{resold.aid}"
    d = await tally.http.delete(
        tally.url("rebilling", f"/v1/subscriptions/{sid}"), headers=resold.agency.user(resold.aid)
    )
    assert d.status_code == 409 and d.json()["error"]["code"] == "not_cancellable", d.text
    nxt = month_after(datetime.now(UTC))
    await resold.run(nxt)
    members = (
        await tally.http.get(
            tally.url("rebilling", f"/v1/accounts/{resold.aid}/members"), headers=resold.agency.admin
        )
    ).json()["items"]
    seat = [c for c in await intents_with(tally, f"sub-{sid}-") if c[2] == "succeeded"]
    assert len(members) == 1
    # the member's seat is charged next period as long as the member holds it
    assert [c[1] for c in seat] == [1250, 1250], (d.status_code, d.text[:300], seat)


# --- 4. seats after dunning gave up: new seats added and never charged ---------------------


async def test_a_seat_added_after_dunning_gave_up_is_charged(tally: Tally) -> None:
    resold = await automated(tally, "10", DECLINES)
    r = await invite_accept(tally, resold, "one@example.com")
    assert r.status_code == 200, r.text
    t0, period = datetime.now(UTC), period_of(datetime.now(UTC))
    sid = f"seats_{resold.aid}"
    [s] = [x for x in await resold.subscriptions() if x["id"] == sid]
    assert s["status"] == "past_due", s
    for h in (25, 25 + 73, 25 + 73 + 121):
        await resold.run(t0 + timedelta(hours=h), period)
    [s] = [x for x in await resold.subscriptions() if x["id"] == sid]
    assert s["status"] == "cancelled", s
    # the workspace now adds a member: the seat must be charged (or the invite refused)
    pm = await resold.card(GOOD, account=True)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods/{pm}/default"),
        headers=resold.agency.user(resold.aid),
    )
    assert r.status_code == 200, r.text
    r = await invite_accept(tally, resold, "two@example.com")
    accepted = r.status_code
    await asyncio.sleep(3)
    await resold.run(datetime.now(UTC) + timedelta(minutes=1), period)
    ok = [c for c in await intents_with(tally, f"sub-{sid}-") if c[2] == "succeeded"]
    [s] = [x for x in await resold.subscriptions() if x["id"] == sid]
    assert accepted != 200 or ok, (accepted, s, await intents_with(tally, f"sub-{sid}-"))


# --- 5. a purchase paid by SEPA that succeeds: the pool grows only at the next runner ------


async def test_a_processing_purchase_that_succeeds_grows_the_pool(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    await agency.patch_wallet({"auto_recharge": False})
    pm = await new_sepa(tally, SEPA_OK)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": pm},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")
    r = await tally.http.post(lic, json={"quantity": 1}, headers=agency.admin)
    assert r.status_code in (201, 202), r.text
    pid = r.json()["purchase"]["id"]
    print("A5DEBUG", r.status_code, r.json())
    if r.status_code == 201:
        return

    async def paid() -> bool:
        return any(c[2] == "succeeded" for c in await intents_with(tally, f"licenses-{pid}"))

    await eventually(paid, what="Stripe settled the SEPA debit")

    async def grown() -> bool:
        return bool((await tally.http.get(lic, headers=agency.admin)).json()["total"] == 1)

    try:
        await eventually(grown, timeout=20, what="the pool grown after the paid purchase")
    except AssertionError:
        pool = (await tally.http.get(lic, headers=agency.admin)).json()
        raise AssertionError(
            f"card charged (SEPA succeeded) but pool still {pool} after 20 s; "
            "only the runner (hourly) settles it"
        ) from None


async def test_a_processing_leg_paid_is_not_shown_outstanding(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    await agency.patch_wallet({"auto_recharge": False})
    await resold.card(GOOD)
    resold.aid = await agency.account()
    await agency.patch_wallet({"auto_recharge": False}, resold.aid)
    pm = await new_sepa(tally, SEPA_OK)

    async def attached() -> bool:
        r = await tally.http.post(
            tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods"),
            json={"payment_method": pm},
            headers=agency.user(resold.aid),
        )
        return r.status_code == 201

    await eventually(attached, what="sepa attached")
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/reselling/whatsapp"),
        json={"company_price": "15"},
        headers=agency.admin,
    )
    r = await resold.subscribe()
    assert r.status_code == 201, r.text
    sid = r.json()["id"]  # charged at once, or processing and settled by the recheck

    async def settled() -> bool:
        # the processing debit is asked again by the runner's recheck (60 s later)
        await resold.run(datetime.now(UTC) + timedelta(seconds=61))
        [s] = await resold.subscriptions()
        return bool(s["outstanding"] == "0.000000")

    await eventually(settled, timeout=60, what="the SEPA debit paid shown as not outstanding")
    paid = [c for c in await intents_with(tally, f"sub-{sid}-") if c[2] == "succeeded"]
    assert len(paid) == 2, paid  # the platform leg and the account's, once each


# --- 6. Idempotency-Key: concurrent same-key requests ---------------------------------------


async def test_one_key_at_once_subscribes_and_buys_once_with_one_answer(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=GOOD)
    key = uid("key")
    rs = await asyncio.gather(*[resold.subscribe(key=key) for _ in range(5)])
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    assert len(await resold.subscriptions()) == 1
    assert len(await resold.charges()) == 2
    lic = tally.url("rebilling", f"/v1/companies/{resold.agency.cid}/licenses")
    lkey = {"Idempotency-Key": uid("key")}
    ls = await asyncio.gather(
        *[
            tally.http.post(lic, json={"quantity": 2}, headers={**resold.agency.admin, **lkey})
            for _ in range(5)
        ]
    )
    assert {r.status_code for r in ls} == {201}, [r.text for r in ls]
    assert (await tally.http.get(lic, headers=resold.agency.admin)).json()["total"] == 2
    assert len({r.json()["purchase"]["id"] for r in ls}) == 1
    other = await tally.http.post(lic, json={"quantity": 3}, headers={**resold.agency.admin, **lkey})
    assert other.status_code == 422, other.text
    # platform admin: same key, another company's path
    pa = {**tally.auth("platform_admin"), "Idempotency-Key": uid("k")}
    a = await tally.http.post(lic, json={"quantity": 1}, headers=pa)
    b = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{uid('nope')}/licenses"), json={"quantity": 1}, headers=pa
    )
    assert a.status_code == 201 and b.status_code in (404, 422), (a.text, b.text)
    # bodies answered to the same key are the first response (status and body)
    bodies = [r.json() for r in rs]
    assert all(b == bodies[0] for b in bodies), bodies


# --- 7. tenant crossings --------------------------------------------------------------------


async def test_no_tenant_crossing_on_recurring_billing(tally: Tally) -> None:
    a = await Resold(tally).create(account_card=GOOD)
    r = await a.subscribe()
    sid = r.json()["id"]
    b = await Resold(tally).create(account_card=GOOD)
    lic_a = tally.url("rebilling", f"/v1/companies/{a.agency.cid}/licenses")
    assert (await tally.http.post(lic_a, json={"quantity": 1}, headers=b.agency.admin)).status_code == 404
    assert (
        await tally.http.delete(
            tally.url("rebilling", f"/v1/subscriptions/lic_{a.agency.cid}"), headers=b.agency.admin
        )
    ).status_code == 404
    assert (
        await tally.http.get(
            tally.url("rebilling", f"/v1/companies/{a.agency.cid}/seat-price"), headers=b.agency.admin
        )
    ).status_code == 404
    assert (
        await tally.http.post(
            tally.url("rebilling", f"/v1/accounts/{a.aid}/subscriptions"),
            json={"product": "whatsapp", "deployment": "resell"},
            headers=b.agency.admin,
        )
    ).status_code == 404
    assert (
        await tally.http.delete(
            tally.url("rebilling", f"/v1/subscriptions/{sid}"), headers=b.agency.user(b.aid)
        )
    ).status_code == 404
    # another account of the same company
    other = await a.agency.account()
    assert (
        await tally.http.delete(
            tally.url("rebilling", f"/v1/subscriptions/{sid}"), headers=a.agency.user(other)
        )
    ).status_code == 404
    assert (
        await tally.http.delete(
            tally.url("rebilling", f"/v1/subscriptions/lic_{a.agency.cid}"), headers=a.agency.user(a.aid)
        )
    ).status_code == 404
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{a.aid}/invitations"),
        json={"email": "x@example.com"},
        headers=a.agency.admin,
    )
    iid = r.json().get("id")
    if iid:
        assert (
            await tally.http.post(
                tally.url("rebilling", f"/v1/invitations/{iid}/accept"), headers=b.agency.admin
            )
        ).status_code == 404
    # the run scoped to B charges nothing of A
    before = len(await a.charges())
    await b.run(month_after(datetime.now(UTC)))
    assert len(await a.charges()) == before


# --- 8. a past_due license pool refuses purchases, and is retried when a card is saved ----


async def test_a_past_due_pool_sells_nothing_until_paid(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    await agency.patch_wallet({"auto_recharge": False})
    good = await resold.card(GOOD)
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")
    r = await tally.http.post(lic, json={"quantity": 1}, headers=agency.admin)
    assert r.status_code == 201, r.text
    await tally.http.delete(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{good}"), headers=agency.admin
    )
    await resold.card(DECLINES)
    nxt = month_after(datetime.now(UTC))
    assert await resold.run(nxt) == {"failed": 1}
    r = await tally.http.post(
        lic, json={"quantity": 1}, headers={**agency.admin, "Idempotency-Key": uid("k")}
    )
    assert r.status_code == 402, r.text
    await resold.card(GOOD)

    async def bought() -> bool:
        r = await tally.http.post(lic, json={"quantity": 1}, headers=agency.admin)
        return r.status_code == 201

    await eventually(bought, timeout=20, what="the pool charged on the new card, then a purchase")


# --- 9. a card saved while a failing charge is in flight --------------------------------


async def test_a_card_saved_while_a_charge_is_in_flight_is_used(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=DECLINES)
    for _ in range(10):  # a slow attempt: many declining cards tried in turn
        await resold.card(DECLINES, account=True)
    good = await new_card(tally, GOOD)

    async def save_good() -> None:
        await asyncio.sleep(0.2)
        r = await tally.http.post(
            tally.url("recharge", f"/v1/accounts/{resold.aid}/payment-methods"),
            json={"payment_method": good},
            headers=resold.agency.user(resold.aid),
        )
        assert r.status_code == 201, r.text

    r, _ = await asyncio.gather(resold.subscribe(), save_good())
    assert r.status_code == 201, r.text
    if r.json()["charge"] == "charged":
        pytest.skip("the good card was tried in the first attempt")

    async def collected() -> bool:
        [s] = await resold.subscriptions()
        return bool(s["status"] == "active")

    await eventually(collected, timeout=20, what="the leg retried on the card saved")

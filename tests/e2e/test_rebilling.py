"""Both spec documents' reseller scenarios, through the rebilling service's own API and on to
the wallet and the recharge service (cards in localstripe)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.support.builders import GOOD, Reseller, new_card
from tests.support.stack import Tally, eventually, uid


async def test_rebilling_scenarios_end_to_end_with_a_settings_change(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    aid = await agency.account()
    for owner in (None, aid):  # no auto-recharge in this story (a card would pre-load)
        await agency.patch_wallet({"threshold": "0", "auto_recharge": False}, owner)
    await agency.add_card(aid)
    await agency.fund("10")
    await agency.fund("10", aid)

    # Scenario 1: no rebilling: only the company wallet pays.
    await agency.use(aid, "sms", "10")
    assert (await agency.wallet())["balance"] == "9.921000"
    assert (await agency.wallet(aid))["balance"] == "10.000000"

    # Scenario 2: rebilling without markup: the same amount on both.
    r = await agency.set_rebilling(aid, "rebill")
    assert r.status_code == 200 and r.json()["active"] is True, r.text
    await agency.wallet_mode(aid, "rebill")
    await agency.use(aid, "sms", "10")
    assert (await agency.wallet())["balance"] == "9.842000"
    assert (await agency.wallet(aid))["balance"] == "9.921000"

    # Scenario 3: with markup; then a settings change takes effect on the next usage.
    r = await agency.set_rebilling(aid, "rebill_markup", {"sms": "2", "default": "1.50"})
    assert r.status_code == 200 and r.json()["markups"] == {"sms": "2", "default": "1.5"}
    await agency.wallet_mode(aid, "rebill_markup")
    await agency.use(aid, "sms", "10")  # account: 0.079 x 2
    assert (await agency.wallet(aid))["balance"] == "9.763000"
    await agency.set_rebilling(aid, "rebill_markup", {"sms": "3"})

    async def three_x() -> bool:  # the markups the wallet applies, as it shows them
        return (await agency.wallet(aid)).get("markups") == {"sms": "3"}

    await eventually(three_x, what="the new markup in the wallet")
    await agency.use(aid, "sms", "10")  # account: 0.079 x 3
    assert (await agency.wallet(aid))["balance"] == "9.526000"
    assert (await agency.wallet())["balance"] == "9.684000"  # always the platform price


async def test_every_gating_error(tally: Tally) -> None:
    starter = await Reseller(tally, plan="starter").create()
    aid = await starter.account()
    r = await starter.set_rebilling(aid, "rebill")
    assert r.status_code == 403 and r.json()["error"]["code"] == "plan_upgrade_required"

    unlimited = await Reseller(tally, plan="unlimited").create(connect=False)
    aid = await unlimited.account()
    r = await unlimited.set_rebilling(aid, "rebill_markup", {"default": "2"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "plan_upgrade_required"
    r = await unlimited.set_rebilling(aid, "rebill")
    assert r.status_code == 409 and r.json()["error"]["code"] == "company_stripe_not_connected"
    await unlimited.connect()
    r = await unlimited.set_rebilling(aid, "rebill")
    assert r.status_code == 409 and r.json()["error"]["code"] == "account_card_required"

    pro = await Reseller(tally).create()
    aid = await pro.account()
    for markups in (
        {"default": "11"},
        {"default": "0.5"},
        {"default": "1.1234567"},
        {"fax": "2"},
        {"default": "abc"},
        {},
    ):
        r = await pro.set_rebilling(aid, "rebill_markup", markups)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_markup", markups
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/accounts/{aid}/rebilling"),
        json={"mode": "rebill"},
        headers=tally.auth("company_admin", company_id=uid("other")),
    )
    assert r.status_code == 404


async def test_saas_plan_defaults_wait_for_a_card(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    plan = uid("plan")
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/saas-plans"),
        json={
            "id": plan,
            "name": "Pro clients",
            "rebilling": {"mode": "rebill_markup", "markups": {"default": "1.5"}},
        },
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    aid = await agency.account(saas_plan_id=plan)
    settings = (
        await tally.http.get(tally.url("rebilling", f"/v1/accounts/{aid}/rebilling"), headers=agency.admin)
    ).json()
    assert (settings["mode"], settings["active"]) == ("rebill_markup", False)
    await agency.wallet_mode(aid, "off")  # pending a card: not applied yet
    await agency.add_card(aid)
    await agency.wallet_mode(aid, "rebill_markup")

    small = await Reseller(tally, plan="unlimited").create()
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{small.cid}/saas-plans"),
        json={"id": "p", "name": "x", "rebilling": {"mode": "rebill"}},
        headers=small.admin,
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "plan_upgrade_required"


async def test_downgrade_and_disconnection_turn_off_what_is_no_longer_allowed(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    aid = await agency.account()
    await agency.add_card(aid)
    assert (await agency.set_rebilling(aid, "rebill_markup", {"default": "2"})).status_code == 200
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/plan"),
        json={"plan": "unlimited"},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 200
    assert r.json()["changed_accounts"] == [{"account_id": aid, "from": "rebill_markup", "to": "rebill"}]
    await agency.wallet_mode(aid, "rebill")
    r = await tally.http.delete(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/stripe-connect"), headers=agency.admin
    )
    assert r.json()["changed_accounts"] == [{"account_id": aid, "from": "rebill", "to": "off"}]
    await agency.wallet_mode(aid, "off")


async def charges(tally: Tally, cid: str) -> list[tuple[str, str, str]]:
    rows = await tally.sql(
        "recharge",
        "SELECT owner, amount_micros, status FROM recharge_attempts "
        "WHERE company_id = $1 AND purpose = 'charge' ORDER BY seq",
        cid,
    )
    return [(r["owner"], str(r["amount_micros"]), r["status"]) for r in rows]


async def test_resold_subscription_is_charged_once_per_period_with_profit(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": await new_card(tally, GOOD)},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    aid = await agency.account()
    await agency.patch_wallet({"auto_recharge": False}, aid)  # only the subscription charges
    await agency.add_card(aid)
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/reselling/whatsapp"),
        json={"company_price": "15.00"},
        headers=agency.admin,
    )
    assert r.status_code == 200 and r.json()["profit"] == "5.000000"

    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/subscriptions"),
        json={"product": "whatsapp", "deployment": "resell"},
        headers=agency.user(aid),
    )
    assert r.status_code == 201 and r.json()["charge"] == "charged", r.text
    period = r.json()["period"]
    assert await charges(tally, agency.cid) == [
        ("company", "10000000", "succeeded"),
        ("account", "15000000", "succeeded"),
    ]

    run = tally.url("rebilling", f"/v1/reselling/periods/{period}/run")
    r = await tally.http.post(run, headers=tally.auth("platform_admin"))
    assert r.status_code == 200
    assert len(await charges(tally, agency.cid)) == 2  # the same period: nothing more

    now = datetime.now(UTC)
    nxt = f"{now.year + (now.month == 12):04d}-{now.month % 12 + 1:02d}"
    await tally.http.post(
        tally.url("rebilling", f"/v1/reselling/periods/{nxt}/run"), headers=tally.auth("platform_admin")
    )
    await tally.http.post(
        tally.url("rebilling", f"/v1/reselling/periods/{nxt}/run"), headers=tally.auth("platform_admin")
    )
    assert len(await charges(tally, agency.cid)) == 4  # once for the next period, not twice

    report = (
        await tally.http.get(
            tally.url("rebilling", f"/v1/companies/{agency.cid}/reselling/report?period={period}"),
            headers=agency.admin,
        )
    ).json()
    assert (report["revenue"], report["platform_cost"], report["profit"]) == (
        "15.000000",
        "10.000000",
        "5.000000",
    )
    assert [(x["product"], x["profit"]) for x in report["lines"]] == [("whatsapp", "5.000000")]
    # Charged to cards, never to wallets.
    assert (await agency.wallet(aid))["balance"] == "0.000000"

    for bad in ("2026-13", "26-01", "2026-1"):
        r = await tally.http.get(
            tally.url("rebilling", f"/v1/companies/{agency.cid}/reselling/report?period={bad}"),
            headers=agency.admin,
        )
        assert r.status_code == 422, bad
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/subscriptions"),
        json={"product": "fax", "deployment": "resell"},
        headers=agency.admin,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_product"


async def test_direct_deployment_charges_only_the_company(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": await new_card(tally, GOOD)},
        headers=agency.admin,
    )
    assert r.status_code == 201
    aid = await agency.account()
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/subscriptions"),
        json={"product": "yext", "deployment": "direct"},
        headers=agency.admin,
    )
    assert r.status_code == 201 and r.json()["charge"] == "charged", r.text
    assert await charges(tally, agency.cid) == [("company", "30000000", "succeeded")]


async def company_card(agency: Reseller) -> None:
    """A good card for the company (licenses are bought with it); no wallet pre-load."""
    await agency.patch_wallet({"auto_recharge": False})
    r = await agency.t.http.post(
        agency.t.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": await new_card(agency.t, GOOD)},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text


async def test_the_whole_seat_handoff_story(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    await company_card(agency)
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")
    r = await tally.http.post(lic, json={"quantity": 1}, headers=agency.admin)
    assert r.status_code == 201, r.text
    assert {k: r.json()[k] for k in ("total", "assigned", "available", "unit_price")} == {
        "total": 1,
        "assigned": 0,
        "available": 1,
        "unit_price": "10.000000",
    }
    aid = await agency.account()  # the agency admin holds the single license as owner
    assert (await tally.http.get(lic, headers=agency.admin)).json()["available"] == 0
    members = tally.url("rebilling", f"/v1/accounts/{aid}/members")
    assert (await tally.http.get(members, headers=agency.admin)).json()["items"] == [
        {"email": agency.email, "role": "owner"}
    ]

    invites = tally.url("rebilling", f"/v1/accounts/{aid}/invitations")
    client = f"{aid}@example.com"
    r = await tally.http.post(invites, json={"email": client, "role": "user"}, headers=agency.admin)
    assert r.status_code == 201 and r.json()["handoff"] is True, r.text  # no spare license needed
    iid = r.json()["id"]
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/invitations/{iid}/accept"), headers=agency.user(aid)
    )
    assert r.status_code == 200 and r.json()["role"] == "owner"
    assert (await tally.http.get(members, headers=agency.admin)).json()["items"] == [
        {"email": client, "role": "owner"}
    ]  # ownership moved, the admin's seat is gone
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/invitations/{iid}/accept"), headers=agency.user(aid)
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "invitation_not_pending"

    second = f"second-{aid}@example.com"
    r = await tally.http.post(invites, json={"email": second}, headers=agency.admin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "license_required"
    await tally.http.post(lic, json={"quantity": 1}, headers=agency.admin)
    r = await tally.http.post(invites, json={"email": second}, headers=agency.admin)
    assert r.status_code == 201 and r.json()["handoff"] is False
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/invitations/{r.json()['id']}/accept"), headers=agency.admin
    )
    assert r.status_code == 200
    roles = (await tally.http.get(members, headers=agency.admin)).json()["items"]
    assert sorted(m["role"] for m in roles) == ["owner", "user"]
    assert (await tally.http.get(lic, headers=agency.admin)).json() == {
        "total": 2,
        "assigned": 2,
        "available": 0,
        "unit_price": "10.000000",
    }


async def test_a_workspace_without_a_license_cannot_use_the_product(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    await company_card(agency)
    aid = await agency.account()  # the pool is empty: no license assigned

    async def status() -> dict[str, Any] | None:
        r = await tally.http.get(
            tally.url("wallet", f"/v1/accounts/{aid}/service-status"), headers=tally.auth("product")
        )
        return r.json() if r.status_code == 200 and r.json()["reason"] == "no_license" else None

    assert await eventually(status, what="no_license") == {"allowed": False, "reason": "no_license"}
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/licenses"), json={"quantity": 1}, headers=agency.admin
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_license_available"
    await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses"),
        json={"quantity": 2},
        headers=agency.admin,
    )
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/licenses"), json={"quantity": 1}, headers=agency.admin
    )
    assert r.status_code == 201 and r.json()["assigned"] == 1

    async def allowed() -> bool:
        r = await tally.http.get(
            tally.url("wallet", f"/v1/accounts/{aid}/service-status"), headers=tally.auth("product")
        )
        return bool(r.json()["allowed"])

    await eventually(allowed, what="the license to reach the wallet")


async def test_companies_and_their_accounts_are_listed_page_by_page(tally: Tally) -> None:
    agency = await Reseller(tally).create(connect=False)
    aids = sorted([await agency.account() for _ in range(3)])
    url = tally.url("rebilling", f"/v1/companies/{agency.cid}/accounts")
    seen: list[str] = []
    cursor = None
    while True:
        r = await tally.http.get(
            url, params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=agency.admin
        )
        assert r.status_code == 200, r.text
        seen += [a["id"] for a in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == aids
    other = tally.auth("company_admin", company_id=uid("other"))
    assert (await tally.http.get(url, headers=other)).status_code == 404

    companies = tally.url("rebilling", "/v1/companies")
    assert (await tally.http.get(companies, headers=agency.admin)).status_code == 403
    found, cursor = [], None
    while True:
        r = await tally.http.get(
            companies,
            params={"limit": 50, **({"cursor": cursor} if cursor else {})},
            headers=tally.auth("platform_admin"),
        )
        found += [c["id"] for c in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert agency.cid in found and found == sorted(found)

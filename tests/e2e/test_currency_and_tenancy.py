"""One currency per company, end to end, and usage that names another tenant's account: through
the public APIs (rebilling creates the companies and accounts; usage-meter, wallet and recharge
learn of them from its events). Real stack."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.builders import GOOD, Reseller, funded, new_card, payment_intents
from tests.support.stack import Tally, eventually, uid


async def usage(
    tally: Tally, cid: str, service: str, quantity: str, account: str | None = None
) -> dict[str, Any]:
    e: dict[str, Any] = {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": quantity}
    if account:
        e["account_id"] = account
    r = await tally.post_usage(e)
    assert r.status_code == 202, r.text
    return {**r.json()["results"][0], "event": e}


async def test_a_eur_company_uses_pays_and_reloads_in_eur(tally: Tally) -> None:
    platform = tally.auth("platform_admin")
    r = await tally.http.put(
        tally.url("usage-meter", "/v1/prices/email"),
        headers=platform,
        json={"unit": "email", "unit_price": "0.0006", "currency": "EUR"},
    )
    assert r.status_code == 200 and r.json()["currency"] == "EUR", r.text
    prices = (await tally.http.get(tally.url("usage-meter", "/v1/prices"), headers=platform)).json()
    assert {(p["service"], p["currency"]) for p in prices["items"]} >= {
        ("email", "USD"),
        ("email", "EUR"),
        ("sms", "USD"),
    }

    agency = Reseller(tally)
    r = await tally.http.post(
        tally.url("rebilling", "/v1/companies"),
        headers=platform,
        json={
            "id": agency.cid,
            "name": "Agence",
            "plan": "saas_pro",
            "currency": "EUR",
            "owner_email": f"owner-{agency.cid}@example.com",
        },
    )
    assert r.status_code == 201, r.text
    # at once (rebilling.events may not have reached usage-meter yet): sms has no EUR price,
    # so it is refused, not priced in dollars
    refused = await usage(tally, agency.cid, "sms", "1")
    assert refused["status"] == "rejected" and refused["error"]["code"] == "price_unavailable"

    # a card pre-loads the EUR wallet through Stripe, in EUR
    async def attached() -> bool:
        r = await tally.http.post(
            tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
            json={"payment_method": await new_card(tally, GOOD)},
            headers=agency.admin,
        )
        return r.status_code == 201

    await eventually(attached, what="recharge to learn of the company")

    async def preloaded() -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if w["balance"] == "50.000000" else None

    wallet = await eventually(preloaded, timeout=40, what="the EUR pre-load")
    assert wallet["currency"] == "EUR"

    accepted = await usage(tally, agency.cid, "email", "1000")  # 1000 x 0.0006 EUR
    assert accepted["status"] == "accepted"
    await tally.wait_applied(agency.cid, accepted["event"]["event_id"])
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/top-ups"),
        json={"amount": "5"},
        headers=agency.admin,
    )
    assert r.status_code == 201 and r.json()["currency"] == "EUR", r.text
    assert r.json()["status"] == "succeeded"

    async def settled() -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if w["balance"] == "54.400000" else None  # 50 - 0.60 + 5

    wallet = await eventually(settled, what="the EUR top-up credited")
    assert wallet["currency"] == "EUR" and wallet["status"] == "active"

    intents = await payment_intents(tally)  # every page: earlier tests made hundreds
    ours = [
        i
        for i in intents
        if (i.get("metadata") or {}).get("tally_attempt")
        in {
            a["id"]
            for a in (
                await tally.http.get(
                    tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/recharges"),
                    headers=agency.admin,
                )
            ).json()["items"]
        }
    ]
    assert len(ours) == 2 and {i["currency"] for i in ours} == {"eur"}


async def test_usage_naming_another_tenants_account_changes_nothing(tally: Tally) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    theirs = await b.account()
    mine = await a.account()

    # at once: an account created a moment ago is known (asked of rebilling if need be)
    assert (await usage(tally, a.cid, "email", "1", mine))["status"] == "accepted"

    crossing = await usage(tally, a.cid, "email", "1000", theirs)
    assert crossing["status"] == "rejected"
    assert crossing["error"]["code"] == "unknown_account"
    unknown = await usage(tally, a.cid, "email", "1000", uid("nobody"))
    assert unknown["status"] == "rejected" and unknown["error"]["code"] == "unknown_account"

    # on the topic: dead-lettered with the reason
    bad = {
        "event_id": uid("ev"),
        "company_id": a.cid,
        "account_id": theirs,
        "service": "email",
        "quantity": "1000",
    }
    await tally.produce("usage.ingest", bad, key=a.cid)
    dead = await tally.find_on_topic("usage.ingest.dlq", lambda m: bad["event_id"] in m.get("message", ""))
    assert dead["error"].startswith("unknown_account")

    # straight onto usage.recorded (past usage-meter): the wallet refuses the pair too, once it
    # has heard the account is the other company's (rebilling.events, a side consumer: on a
    # loaded machine it may come after the record, which then names an account the wallet does
    # not know, and is charged to its company alone). The other company's admin sees the
    # account's wallet only once the wallet knows whose it is.
    async def the_wallet_knows_theirs() -> bool:
        r = await tally.http.get(tally.url("wallet", f"/v1/accounts/{theirs}/wallet"), headers=b.admin)
        return r.status_code == 200

    await eventually(the_wallet_knows_theirs, what="the wallet to hear whose account it is")
    eid = uid("ev")
    await tally.envelope(
        "usage.recorded",
        "usage.recorded",
        {
            "event_id": eid,
            "company_id": a.cid,
            "account_id": theirs,
            "service": "email",
            "quantity": "1000",
            "occurred_at": "2026-01-01T00:00:00+00:00",
            "recorded_at": "2026-01-01T00:00:00+00:00",
            "unit_price_micros": 675,
            "platform_amount_micros": 675_000,
            "currency": "USD",
        },
        key=a.cid,
        id_=f"usage:{eid}",
    )
    dead = await tally.find_on_topic("usage.recorded.dlq", lambda m: eid in m.get("message", ""))
    assert "belongs to another company" in dead["error"]
    assert (await b.wallet(theirs))["balance"] == "0.000000"
    lines = await tally.company_transactions(a.cid)
    assert eid not in {t["usage_event_id"] for t in lines}
    assert len(lines) == 1  # the one event of its own account


async def test_a_record_the_database_refuses_goes_to_the_dlq_and_the_partition_goes_on(tally: Tally) -> None:
    cid = uid("co")
    huge = 9_000_000_000_000_000_000  # two of these overflow a balance (BIGINT)
    ids = [uid("ev") for _ in range(3)]
    for eid, amount in zip(ids, (huge, huge, 675), strict=True):
        await tally.envelope(
            "usage.recorded",
            "usage.recorded",
            {
                "event_id": eid,
                "company_id": cid,
                "account_id": None,
                "service": "email",
                "quantity": "1",
                "occurred_at": "2026-01-01T00:00:00+00:00",
                "recorded_at": "2026-01-01T00:00:00+00:00",
                "unit_price_micros": amount,
                "platform_amount_micros": amount,
                "currency": "USD",
            },
            key=cid,
            id_=f"usage:{eid}",
        )
    await tally.wait_applied(cid, ids[2])  # the event after the poison one is applied
    dead = await tally.find_on_topic("usage.recorded.dlq", lambda m: ids[1] in m.get("message", ""))
    assert "out of range" in dead["error"]
    lines = {t["usage_event_id"] for t in await tally.company_transactions(cid)}
    assert lines == {ids[0], ids[2]}


async def test_an_amount_beyond_what_a_wallet_holds_is_refused_and_changes_nothing(tally: Tally) -> None:
    platform = tally.auth("platform_admin")
    service = f"bulk{uid('x')[-6:]}"
    r = await tally.http.put(
        tally.url("usage-meter", f"/v1/prices/{service}"),
        headers=platform,
        json={"unit": "lot", "unit_price": "1000000"},
    )  # 10^12 micros: the most one event may cost (docs/0030)
    assert r.status_code == 200, r.text
    cid = uid("co")
    too_much = await usage(tally, cid, service, "1.000001")  # a micro more
    assert too_much["status"] == "rejected"
    assert too_much["error"]["code"] == "invalid_quantity"
    fine = await usage(tally, cid, service, "1")
    assert fine["status"] == "accepted"
    lines = await tally.wait_applied(cid, fine["event"]["event_id"])
    assert [t["usage_event_id"] for t in lines] == [fine["event"]["event_id"]]


async def test_another_tenants_wallet_is_not_found_whatever_the_body(tally: Tally) -> None:
    """The tenant check comes before the body's checks: a company admin learns nothing of
    another company's wallets from a 422, and nothing changes."""
    mine, theirs = await Reseller(tally).create(connect=False), await Reseller(tally).create(connect=False)
    their_account = await theirs.account()

    async def known() -> dict[str, Any] | None:  # once the wallet has heard of the account
        r = await tally.http.get(
            tally.url("wallet", f"/v1/accounts/{their_account}/wallet"), headers=theirs.admin
        )
        return r.json() if r.status_code == 200 else None

    before = await eventually(known, what="the wallet to learn of the account")
    for path, method, body in [
        (f"/v1/accounts/{their_account}/wallet", "PATCH", {"threshold": "-1"}),
        (f"/v1/accounts/{their_account}/wallet", "PATCH", {"threshold": "5"}),
        (f"/v1/companies/{theirs.cid}/wallet", "PATCH", {"reload_amount": "abc"}),
        (f"/v1/accounts/{their_account}/wallet/credits", "POST", {"amount": "abc"}),
        (f"/v1/accounts/{their_account}/wallet/credits", "POST", {"amount": "5"}),
    ]:
        r = await tally.http.request(method, tally.url("wallet", path), json=body, headers=mine.admin)
        assert (r.status_code, r.json()["error"]["code"]) in {(404, "not_found"), (403, "forbidden")}, (
            path,
            body,
            r.text,
        )
    assert await theirs.wallet(their_account) == before
    # their own admin still gets the 422 for the bad body
    r = await tally.http.patch(
        tally.url("wallet", f"/v1/accounts/{their_account}/wallet"),
        json={"threshold": "-1"},
        headers=theirs.admin,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text


async def test_two_companies_may_send_the_same_event_id_and_each_is_charged(tally: Tally) -> None:
    """An event id is unique within its company (docs/0021): another company's event with the
    same id is another event. It used to be answered ``duplicate`` and never charged, and the
    suspension its debit caused carried the first company's message id, so usage-meter took it
    for one it had seen and never refused the second company's usage."""
    a, b = await funded(tally, "0.01"), await funded(tally, "0.01")
    shared = uid("ev")
    both = [
        {"event_id": shared, "company_id": a, "service": "sms", "quantity": "2"},  # 0.0158
        {"event_id": shared, "company_id": b, "service": "sms", "quantity": "3"},  # 0.0237
    ]
    r = await tally.post_usage({"events": both})
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "accepted"], r.text
    for e in both:  # each company's retry is its own duplicate
        again = await tally.post_usage(e)
        assert again.json()["results"][0]["status"] == "duplicate", again.text

    legs_a = [t for t in await tally.wait_applied(a, shared) if t["usage_event_id"] == shared]
    legs_b = [t for t in await tally.wait_applied(b, shared) if t["usage_event_id"] == shared]
    assert [t["amount"] for t in legs_a] == ["-0.015800"]
    assert [t["amount"] for t in legs_b] == ["-0.023700"]
    assert (await tally.company_wallet(a))["balance"] == "-0.005800"
    assert (await tally.company_wallet(b))["balance"] == "-0.013700"

    # both wallets went below zero: usage-meter hears of both suspensions
    for cid in (a, b):

        async def refused(cid: str = cid) -> bool:
            e = {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"}
            res = (await tally.post_usage(e)).json()["results"][0]
            return bool(res["status"] == "rejected" and res["error"]["code"] == "agency_wallet_empty")

        await eventually(refused, what=f"usage-meter to learn that {cid} is suspended")


async def create_company(tally: Tally, cid: str, currency: str) -> Any:
    return await tally.http.post(
        tally.url("rebilling", "/v1/companies"),
        headers=tally.auth("platform_admin"),
        json={
            "id": cid,
            "name": "Agency",
            "plan": "starter",
            "currency": currency,
            "owner_email": f"owner-{cid}@example.com",
        },
    )


async def eur_price_for_email(tally: Tally) -> None:
    r = await tally.http.put(
        tally.url("usage-meter", "/v1/prices/email"),
        headers=tally.auth("platform_admin"),
        json={"unit": "email", "unit_price": "0.0006", "currency": "EUR"},
    )
    assert r.status_code == 200, r.text


async def test_money_before_a_company_is_created_fixes_its_currency(tally: Tally) -> None:
    """Found by the public-API attack of 2026-12-05 (docs/0027): usage of a company no one had
    created was charged in USD and opened a USD wallet; creating the company in EUR then made
    every later event of it accepted and dead-lettered by the wallet (a USD wallet cannot pay
    in EUR), never charged. Now the first money pins the id's currency at rebilling, and a
    creation in another currency is refused and creates nothing."""
    await eur_price_for_email(tally)
    admin = tally.auth("platform_admin")

    # usage first
    used = uid("agency")
    first = await usage(tally, used, "email", "10")  # 10 x 0.000675 USD
    assert first["status"] == "accepted"
    await tally.wait_applied(used, first["event"]["event_id"])
    r = await create_company(tally, used, "EUR")
    assert r.status_code == 409 and r.json()["error"]["code"] == "currency_conflict", r.text
    assert "USD" in r.json()["error"]["message"]
    r = await tally.http.get(tally.url("rebilling", f"/v1/companies/{used}"), headers=admin)
    assert r.status_code == 404, r.text  # nothing created
    r = await create_company(tally, used, "USD")
    assert r.status_code == 201, r.text
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{used}/wallet/credits"), json={"amount": "1"}, headers=admin
    )
    assert r.status_code == 201, r.text
    assert (r.json()["wallet"]["currency"], r.json()["wallet"]["balance"]) == ("USD", "0.993250")

    async def accepted() -> dict[str, Any] | None:  # once usage-meter hears the wallet is active
        u = await usage(tally, used, "email", "10")
        return u if u["status"] == "accepted" else None

    second = await eventually(accepted, what="usage accepted after the credit")
    await tally.wait_applied(used, second["event"]["event_id"])
    wallet = await tally.company_wallet(used)
    assert (wallet["currency"], wallet["balance"]) == ("USD", "0.986500")

    # a credit first
    credited = uid("agency")
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{credited}/wallet/credits"), json={"amount": "5"}, headers=admin
    )
    assert r.status_code == 201 and r.json()["wallet"]["currency"] == "USD", r.text
    r = await create_company(tally, credited, "EUR")
    assert r.status_code == 409 and r.json()["error"]["code"] == "currency_conflict", r.text

    # a top-up first
    topped = uid("agency")
    owner = tally.auth("company_admin", company_id=topped)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{topped}/payment-methods"),
        json={"payment_method": await new_card(tally, GOOD)},
        headers=owner,
    )
    assert r.status_code == 201, r.text
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{topped}/wallet/top-ups"), json={"amount": "5"}, headers=owner
    )
    assert r.status_code == 201 and r.json()["currency"] == "USD", r.text
    r = await create_company(tally, topped, "EUR")
    assert r.status_code == 409 and r.json()["error"]["code"] == "currency_conflict", r.text

    # a read moves no money: it fixes nothing
    looked = uid("agency")
    assert (await tally.company_wallet(looked))["currency"] == "USD"  # never moved: the default
    r = await create_company(tally, looked, "EUR")
    assert r.status_code == 201, r.text
    third = await usage(tally, looked, "email", "10")  # 10 x 0.0006 EUR
    assert third["status"] == "accepted"
    await tally.wait_applied(looked, third["event"]["event_id"])
    wallet = await tally.company_wallet(looked)
    assert (wallet["currency"], wallet["balance"]) == ("EUR", "-0.006000")


async def test_usage_racing_a_creation_in_another_currency_is_never_stranded(tally: Tally) -> None:
    """Usage of new company ids and their creation in EUR, at the same moment: whichever comes
    first fixes the currency. Either the creation wins and the usage is charged in EUR, or the
    usage wins and the creation is refused (the company is then created in USD). Every
    accepted event reaches the ledger, in the wallet's currency, which is the company's."""
    await eur_price_for_email(tally)
    ids = [uid("agency") for _ in range(8)]

    async def race(cid: str, delay: float) -> tuple[Any, list[dict[str, Any]]]:
        async def post_after(d: float) -> dict[str, Any]:
            await asyncio.sleep(d)
            return await usage(tally, cid, "email", "1")

        async def create_after(d: float) -> Any:
            await asyncio.sleep(d)
            return await create_company(tally, cid, "EUR")

        created, *used = await asyncio.gather(
            create_after(delay), post_after(0), post_after(0.005), post_after(0.02)
        )
        return created, used

    outcomes = await asyncio.gather(*(race(cid, 0.004 * i) for i, cid in enumerate(ids)))
    for cid, (created, used) in zip(ids, outcomes, strict=True):
        assert created.status_code in (201, 409), created.text
        if created.status_code == 409:
            assert created.json()["error"]["code"] == "currency_conflict", created.text
            assert (await create_company(tally, cid, "USD")).status_code == 201
        currency = "EUR" if created.status_code == 201 else "USD"
        accepted = [u["event"]["event_id"] for u in used if u["status"] == "accepted"]
        assert accepted, used  # email has a price in both currencies
        for eid in accepted:
            await tally.wait_applied(cid, eid)
        wallet = await tally.company_wallet(cid)
        assert wallet["currency"] == currency, (cid, wallet)
        lines = await tally.company_transactions(cid)
        assert sorted(t["usage_event_id"] for t in lines) == sorted(accepted)
        assert all(t["currency"] == currency for t in lines if "currency" in t), lines


async def test_a_refused_request_fixes_no_currency(tally: Tally) -> None:
    """Found by the attack on this change's first version: the pin was taken before the request
    was checked, so an event refused for its service, a credit of 0 or a top-up without a card
    forbade creating the company in EUR though nothing was charged. Now each can be."""
    admin = tally.auth("platform_admin")
    refused_usage, refused_credit, refused_top_up = uid("agency"), uid("agency"), uid("agency")
    assert (await usage(tally, refused_usage, "nosuch", "1"))["error"]["code"] == "unknown_service"
    assert (await usage(tally, refused_usage, "email", "0"))["error"]["code"] == "invalid_quantity"
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{refused_credit}/wallet/credits"),
        json={"amount": "0"},
        headers=admin,
    )
    assert r.status_code == 422, r.text
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{refused_top_up}/wallet/top-ups"),
        json={"amount": "5"},
        headers=tally.auth("company_admin", company_id=refused_top_up),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_payment_method", r.text
    # the second attack: a credit refused for its reused Idempotency-Key, and a period charge
    # (rebilling's, for its own companies) for an id no one created
    refused_key, refused_charge = uid("agency"), uid("agency")
    key = uid("key")
    for cid, status in ((uid("agency"), 201), (refused_key, 422)):
        r = await tally.http.post(
            tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
            json={"amount": "1"},
            headers={**admin, "Idempotency-Key": key},
        )
        assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "idempotency_key_reused", r.text
    r = await tally.http.post(
        tally.url("recharge", "/v1/charges"),
        json={"key": uid("charge"), "owner": "company", "company_id": refused_charge, "amount": "5"},
        headers=admin,
    )
    assert r.status_code == 404, r.text
    for cid in (refused_usage, refused_credit, refused_top_up, refused_key, refused_charge):
        r = await create_company(tally, cid, "EUR")
        assert r.status_code == 201, (cid, r.text)


async def test_an_account_users_token_opens_no_wallet_for_an_account_no_one_created(tally: Tally) -> None:
    """Found by the same attack: a token vouched for its account's company, so an account user
    of a company no one created could open a USD wallet (a settings PATCH) for an account id that
    another company, in EUR, created later: its wallet, in the wrong currency and with settings
    written by another tenant, stranded the company's recharges and usage. Now an account is
    known from rebilling, not from a token."""
    ghost, x = uid("agency"), Reseller(tally, currency="EUR")
    aid = uid("ws")
    theirs = tally.auth("account_user", company_id=ghost, account_id=aid, email=f"{aid}@example.com")
    for method, body in (("PATCH", {"threshold": "7"}), ("GET", None)):
        r = await tally.http.request(
            method, tally.url("wallet", f"/v1/accounts/{aid}/wallet"), json=body, headers=theirs
        )
        assert r.status_code == 404, (method, r.text)
    r = await tally.http.get(tally.url("recharge", f"/v1/accounts/{aid}/payment-methods"), headers=theirs)
    assert r.status_code == 404, r.text
    await x.create(connect=False)
    await x.account(aid=aid)
    wallet = await x.wallet(aid)
    assert (wallet["currency"], wallet["threshold"]) == ("EUR", "10.000000"), wallet
    r = await tally.http.get(tally.url("wallet", f"/v1/accounts/{aid}/wallet"), headers=theirs)
    assert r.status_code == 404, r.text  # still not the ghost company's


async def test_a_wallet_opened_right_after_creation_is_in_the_companys_currency(tally: Tally) -> None:
    """Found by the same attack: a read before the creation left "unknown company" remembered
    for 30 s, and a settings PATCH of an account's wallet right after the creation (before the
    wallet heard of the company) opened it in USD for a EUR company (5 times in 5). An unknown
    answer no longer decides a currency: rebilling is asked again."""
    for _ in range(3):
        x = Reseller(tally, currency="EUR")
        assert (await tally.company_wallet(x.cid))["currency"] == "USD"  # not created: the default
        await x.create(connect=False)
        aid = await x.account()
        r = await tally.http.patch(
            tally.url("wallet", f"/v1/accounts/{aid}/wallet"), json={"threshold": "5"}, headers=x.user(aid)
        )
        assert r.status_code == 200 and r.json()["currency"] == "EUR", r.text
        r = await tally.http.patch(
            tally.url("wallet", f"/v1/companies/{x.cid}/wallet"), json={"threshold": "5"}, headers=x.admin
        )
        assert r.status_code == 200 and r.json()["currency"] == "EUR", r.text

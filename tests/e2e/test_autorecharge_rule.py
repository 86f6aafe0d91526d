"""The auto-recharge rule (API.md, wallet) across the lifecycle, from outside: whatever brings a
wallet with auto-recharge on and a usable card below its threshold (a card added, auto-recharge
switched back on, a credit that fell short) recharges it; a retry whose reason went away
(auto-recharge off, balance restored) charges nothing; a top-up with an Idempotency-Key charges
once. Real stack: broker, Postgres, the stripe SDK against localstripe."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.builders import (
    DECLINES,
    GOOD,
    Agency,
    Reseller,
    attach,
    configure,
    new_card,
    patch_company_wallet,
    recharges,
    succeeded_charges,
    wait_balance,
)
from tests.support.stack import Tally, eventually, uid


async def test_a_new_wallet_with_a_card_is_preloaded_before_any_usage(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="10", reload="25")
    await attach(tally, agency, GOOD)
    wallet = await wait_balance(agency, "25.000000")  # 0 + 25 reaches the threshold of 10
    assert wallet["status"] == "active"
    [attempt] = await recharges(tally, agency)
    assert attempt["trigger"] == "auto" and attempt["amount"] == "25.000000"
    assert [t["kind"] for t in await tally.company_transactions(agency.cid)] == ["recharge"]
    # the first usage is paid from the pre-loaded balance: nothing suspended, nothing mailed
    await agency.use("sms", "10")
    assert (await agency.wallet())["status"] == "active"


async def test_a_preload_below_the_threshold_reaches_threshold_plus_reload(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="40", reload="25")
    await attach(tally, agency, GOOD)
    await wait_balance(agency, "65.000000")  # 0 + 25 < 40: enough for 40 + 25


async def test_turning_auto_recharge_back_on_after_cancellation_reloads(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("0.05")
    await attach(tally, agency, DECLINES)
    await agency.use("sms", "10")  # 0.05 - 0.079 < 0: suspended, and below the threshold

    async def cancelled() -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if not w["auto_recharge"] else None

    wallet = await eventually(cancelled, timeout=60, what="auto-recharge to be cancelled")
    assert wallet["status"] == "suspended" and wallet["balance"] == "-0.029000"
    failed = await recharges(tally, agency)
    assert [a["status"] for a in failed] == ["failed"] * 3

    good = await attach(tally, agency, GOOD)  # auto-recharge is off: the card alone does nothing
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{good}/default"),
        headers=agency.admin,
    )
    assert r.status_code == 200 and r.json()["is_default"] is True
    await asyncio.sleep(1.0)
    assert len(await recharges(tally, agency)) == 3
    await patch_company_wallet(tally, agency, auto_recharge=True)
    # the reload amount, priced now: -0.029 + 10 reaches the threshold of 5
    wallet = await wait_balance(agency, "9.971000")
    assert wallet["status"] == "active"
    attempts = await recharges(tally, agency)
    assert [a["status"] for a in attempts] == ["succeeded", "failed", "failed", "failed"]
    assert attempts[0]["amount"] == "10.000000"
    assert attempts[0]["tries"][0]["payment_method"] == good
    assert await succeeded_charges(tally, attempts) == 1


async def test_raising_the_threshold_above_the_balance_recharges(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("8")
    await attach(tally, agency, GOOD)
    await asyncio.sleep(0.5)
    assert await recharges(tally, agency) == []
    await configure(tally, agency, threshold="20", reload="10")
    await wait_balance(agency, "30.000000")  # 8 + 10 < 20: 20 - 8 + 10 = 22


async def test_a_top_up_with_an_idempotency_key_charges_once(tally: Tally) -> None:
    agency = Agency(tally)
    await patch_company_wallet(tally, agency, auto_recharge=False)
    await attach(tally, agency, GOOD)
    url = tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/top-ups")
    key = {"Idempotency-Key": uid("key")}
    first = await tally.http.post(url, json={"amount": "12"}, headers={**agency.admin, **key})
    assert first.status_code == 201 and first.json()["status"] == "succeeded", first.text
    again = await tally.http.post(url, json={"amount": "12"}, headers={**agency.admin, **key})
    assert (again.status_code, again.json()) == (201, first.json())
    other = await tally.http.post(url, json={"amount": "13"}, headers={**agency.admin, **key})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # concurrent requests with one new key: one attempt, one charge
    key2 = {"Idempotency-Key": uid("key")}
    both = await asyncio.gather(
        *[tally.http.post(url, json={"amount": "5"}, headers={**agency.admin, **key2}) for _ in range(3)]
    )
    assert {r.status_code for r in both} == {201}
    assert len({r.json()["id"] for r in both}) == 1
    await wait_balance(agency, "17.000000")
    attempts = await recharges(tally, agency)
    assert len(attempts) == 2 and await succeeded_charges(tally, attempts) == 2
    # without a key, each request is its own top-up
    await tally.http.post(url, json={"amount": "1"}, headers=agency.admin)
    await tally.http.post(url, json={"amount": "1"}, headers=agency.admin)
    await wait_balance(agency, "19.000000")


async def test_credits_and_credit_requests_honour_the_idempotency_key(tally: Tally) -> None:
    agency = Agency(tally)
    aid = await agency.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    key = {"Idempotency-Key": uid("key")}
    first = await tally.http.post(url, json={"amount": "3"}, headers={**agency.admin, **key})
    assert first.status_code == 201, first.text
    again = await tally.http.post(url, json={"amount": "3"}, headers={**agency.admin, **key})
    assert (again.status_code, again.json()) == (201, first.json())
    other = await tally.http.post(url, json={"amount": "4"}, headers={**agency.admin, **key})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert (await agency.wallet(aid))["balance"] == "3.000000"

    requests_url = tally.url("wallet", f"/v1/accounts/{aid}/credit-requests")
    key = {"Idempotency-Key": uid("key")}
    first = await tally.http.post(requests_url, json={"amount": "9"}, headers={**agency.user(aid), **key})
    assert first.status_code == 201, first.text
    again = await tally.http.post(requests_url, json={"amount": "9"}, headers={**agency.user(aid), **key})
    assert (again.status_code, again.json()) == (201, first.json())
    without = await tally.http.post(requests_url, json={"amount": "9"}, headers=agency.user(aid))
    assert without.status_code == 409  # one pending request at a time, and the key made one


async def test_a_tier_raise_applies_to_the_reload_amount_current_then(tally: Tally) -> None:
    """recharge.tier_raised is applied by the wallet one tier above the reload amount it has
    when it applies it, and not at all once smart adjustment is off."""
    agency = Agency(tally)
    wallet_id = f"company:{agency.cid}"

    async def raised_from(previous: int, new: int) -> None:
        await tally.envelope(
            "recharge.events",
            "recharge.tier_raised",
            {
                "wallet_id": wallet_id,
                "owner": "company",
                "company_id": agency.cid,
                "account_id": None,
                "currency": "USD",
                "previous_reload_amount_micros": previous,
                "reload_amount_micros": new,
            },
            key=agency.cid,
        )

    await patch_company_wallet(tally, agency, reload_amount="25", smart_adjustment=True, auto_recharge=False)
    await raised_from(10_000_000, 25_000_000)  # earned while the reload amount was 10

    async def reload_is(amount: str) -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if w["reload_amount"] == amount else None

    await eventually(lambda: reload_is("50.000000"), what="25 raised one tier, to 50")

    await patch_company_wallet(tally, agency, smart_adjustment=False)
    await raised_from(50_000_000, 100_000_000)
    # a later event on the same partition (key), for another company: once it is applied, the
    # raise before it was consumed too
    marker = uid("co")
    await tally.envelope(
        "recharge.events",
        "recharge.tier_raised",
        {
            "wallet_id": f"company:{marker}",
            "owner": "company",
            "company_id": marker,
            "account_id": None,
            "currency": "USD",
            "previous_reload_amount_micros": 50_000_000,
            "reload_amount_micros": 100_000_000,
        },
        key=agency.cid,
    )

    async def marker_raised() -> bool:
        r = await tally.http.get(
            tally.url("wallet", f"/v1/companies/{marker}/wallet"), headers=tally.auth("platform_admin")
        )
        return bool(r.json()["reload_amount"] == "100.000000")

    await eventually(marker_raised, what="the later event applied")
    assert (await agency.wallet())["reload_amount"] == "50.000000"


async def test_cards_attached_at_once_all_answer_and_preload_once(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="10", reload="25")
    pms = [await new_card(tally, GOOD) for _ in range(3)]
    url = tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods")
    answers = await asyncio.gather(
        *[tally.http.post(url, json={"payment_method": pm}, headers=agency.admin) for pm in pms]
    )
    assert [r.status_code for r in answers] == [201, 201, 201], [r.text for r in answers]
    assert sum(r.json()["is_default"] for r in answers) == 1
    await wait_balance(agency, "25.000000")
    await asyncio.sleep(1.0)  # every chance for a second pre-load
    attempts = await recharges(tally, agency)
    assert [a["status"] for a in attempts] == ["succeeded"]
    assert await succeeded_charges(tally, attempts) == 1


async def test_a_lowered_threshold_still_fires_the_next_crossing(tally: Tally) -> None:
    """Found by the lifecycle model: a wallet that crossed its threshold while auto-recharge
    was off, then had its threshold lowered below its balance and auto-recharge turned on, was
    never recharged again (the crossing stayed disarmed until a credit reached the old
    threshold)."""
    agency = Agency(tally)
    await patch_company_wallet(tally, agency, auto_recharge=False, threshold="10", reload_amount="25")
    await attach(tally, agency, GOOD)
    await agency.fund("12")
    await agency.use("sms", "300")  # 12 - 2.37 = 9.63: crossed, auto-recharge off
    await wait_balance(agency, "9.630000")
    await patch_company_wallet(tally, agency, auto_recharge=True, threshold="5")  # 9.63 >= 5: nothing to do
    await asyncio.sleep(1)
    assert await recharges(tally, agency) == []
    await agency.use("sms", "700")  # 9.63 - 5.53 = 4.10 < 5: a crossing, so a recharge
    await wait_balance(agency, "29.100000")
    [attempt] = await recharges(tally, agency)
    assert (attempt["trigger"], attempt["status"]) == ("auto", "succeeded")


async def test_reconnecting_stripe_reloads_and_another_account_forgets_cards(tally: Tally) -> None:
    """An account's cards live on its company's connected Stripe. While the company is
    disconnected they are not charged; connecting again makes the rule hold again (a wallet
    that fell below its threshold meanwhile is reloaded); connecting another Stripe account
    forgets the cards saved on the previous one (they cannot be charged through it)."""

    agency = await Reseller(tally).create(connect=False)
    acct = "acct_" + uid("r").replace("-", "")
    connect = tally.url("rebilling", f"/v1/companies/{agency.cid}/stripe-connect")
    r = await tally.http.put(connect, json={"stripe_account_id": acct}, headers=agency.admin)
    assert r.status_code == 200, r.text
    aid = await agency.account()

    async def account_balance(balance: str) -> None:
        async def reached() -> bool:
            return bool((await agency.wallet(aid))["balance"] == balance)

        await eventually(reached, what=f"the account's balance {balance}")

    async def account_recharges() -> list[dict[str, Any]]:
        r = await tally.http.get(
            tally.url("recharge", f"/v1/accounts/{aid}/wallet/recharges"), headers=agency.admin
        )
        return r.json()["items"]  # type: ignore[no-any-return]

    await agency.add_card(aid)  # the account's wallet is pre-loaded: 0 + 50 >= 10
    await account_balance("50.000000")
    path = f"/v1/accounts/{aid}"

    r = await tally.http.delete(connect, headers=agency.admin)
    assert r.status_code == 200, r.text

    async def recharge_knows(connected: bool) -> bool:
        r = await tally.http.get(tally.url("recharge", f"{path}/payment-methods"), headers=agency.admin)
        return bool(r.json()["stripe_connected"] == connected)

    await eventually(lambda: recharge_knows(False), what="recharge to learn of the disconnection")
    await agency.patch_wallet({"threshold": "100"}, aid)  # below it, but no usable card
    await asyncio.sleep(1.5)
    assert [a["status"] for a in await account_recharges()] == ["succeeded"]

    r = await tally.http.put(connect, json={"stripe_account_id": acct}, headers=agency.admin)
    assert r.status_code == 200, r.text
    await account_balance("100.000000")
    assert [a["status"] for a in await account_recharges()] == ["succeeded", "succeeded"]

    other = "acct_" + uid("r").replace("-", "")
    r = await tally.http.put(connect, json={"stripe_account_id": other}, headers=agency.admin)
    assert r.status_code == 200, r.text

    async def forgotten() -> bool:
        cards = await tally.http.get(tally.url("recharge", f"{path}/payment-methods"), headers=agency.admin)
        account = await tally.http.get(tally.url("rebilling", path), headers=agency.admin)
        return cards.json()["items"] == [] and account.json()["has_valid_card"] is False

    await eventually(forgotten, what="the cards on the previous Stripe account forgotten")


async def test_idempotency_keys_are_forgotten_after_a_day(tally: Tally) -> None:
    """Keys are kept 24 h (API.md), then swept in batches (every service sweeps its own, hourly;
    here the sweep is called on the wallet's schema)."""
    import asyncpg

    from tally import idempotency

    agency = Agency(tally)
    key = {"Idempotency-Key": uid("key")}
    url = tally.url("wallet", f"/v1/companies/{agency.cid}/wallet/credits")
    r = await tally.http.post(url, json={"amount": "1"}, headers={**tally.auth("platform_admin"), **key})
    assert r.status_code == 201, r.text
    await tally.sql(
        "wallet",
        "INSERT INTO idempotency_keys (principal, key, request_hash, "
        "created_at) VALUES ('old', $1, 'h', now() - interval '25 hours')",
        uid("old"),
    )
    conn = await asyncpg.connect(tally.stack.database_url, server_settings={"search_path": "wallet"})
    try:
        assert await idempotency.sweep(conn) >= 1
    finally:
        await conn.close()
    rows = await tally.sql(
        "wallet", "SELECT principal FROM idempotency_keys WHERE created_at < now() - interval '24 hours'"
    )
    assert rows == []
    # a key within its day is kept: the same request still answers its first response
    again = await tally.http.post(url, json={"amount": "1"}, headers={**tally.auth("platform_admin"), **key})
    assert (again.status_code, again.json()) == (201, r.json())

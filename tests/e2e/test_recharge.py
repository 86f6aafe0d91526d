"""Recharges through the real ``stripe`` SDK against localstripe, end to end: the wallet emits
the threshold crossing, the recharge service charges a card, the wallet credits it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

import httpx
import orjson

from tests.support.builders import (
    DECLINES,
    GOOD,
    Agency,
    attach,
    configure,
    new_card,
    recharges,
    stripe_charges_for,
    wait_balance,
)
from tests.support.stack import Tally, eventually, uid


async def test_crossing_charges_the_default_card_once_and_credits_once(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="25")
    await agency.fund("5.10")
    pm = await attach(tally, agency, GOOD)  # at its threshold: nothing to pre-load
    await agency.use("whatsapp", "10")  # 5.10 - 0.58 = 4.52 < 5: crossing
    await wait_balance(agency, "29.520000")
    [attempt] = await recharges(tally, agency)
    assert attempt["status"] == "succeeded" and attempt["trigger"] == "auto"
    assert attempt["amount"] == "25.000000"
    assert [(t["payment_method"], t["outcome"]) for t in attempt["tries"]] == [(pm, "succeeded")]
    assert len(await stripe_charges_for(tally, attempt["id"])) == 1
    kinds = [t["kind"] for t in await tally.company_transactions(agency.cid)]
    assert kinds.count("recharge") == 1


async def test_a_declining_card_falls_back_to_the_next(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    bad = await attach(tally, agency, DECLINES)  # first card: the default
    good = await attach(tally, agency, GOOD)
    await agency.use("sms", "10")  # 5.01 - 0.079 < 5
    await wait_balance(agency, "14.931000")
    [attempt] = await recharges(tally, agency)
    assert [(t["payment_method"], t["outcome"], t["decline_code"]) for t in attempt["tries"]] == [
        (bad, "failed", "card_declined"),
        (good, "succeeded", None),
    ]


async def test_all_cards_declining_retries_then_turns_auto_recharge_off(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    await attach(tally, agency, DECLINES)
    await attach(tally, agency, DECLINES)
    await agency.use("sms", "10")

    async def cancelled() -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if not w["auto_recharge"] else None

    await eventually(cancelled, timeout=60, what="auto-recharge to be turned off")
    attempts = await recharges(tally, agency)
    assert [a["status"] for a in attempts] == ["failed", "failed", "failed"]
    assert all(len(a["tries"]) == 2 for a in attempts)
    failed = await tally.find_on_topic(
        "recharge.events",
        lambda m: m["type"] == "recharge.failed" and m["data"]["recharge_id"] == attempts[0]["id"],
    )
    assert failed["data"]["auto_recharge_disabled"] is True
    assert failed["data"]["consecutive_failures"] == 3
    assert (await agency.wallet())["balance"] == "4.931000"  # nothing credited


async def test_duplicate_and_concurrent_crossings_charge_once(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="20")
    await agency.fund("5.05")
    await attach(tally, agency, GOOD)
    tally.stack.kill("recharge")  # queue the crossings while it is down: one batch on restart
    await agency.use("whatsapp", "1")  # 5.05 - 0.058 < 5: a real crossing, then copies of one
    data = {
        "wallet_id": f"company:{agency.cid}",
        "owner": "company",
        "company_id": agency.cid,
        "currency": "USD",
        "balance_micros": 1_000_000,
        "threshold_micros": 5_000_000,
        "reload_amount_micros": 20_000_000,
        "auto_recharge": True,
        "smart_adjustment": False,
    }
    first = uid("crossing")
    await tally.envelope("wallet.digest", "wallet.threshold_crossed", data, key=agency.cid, id_=first)
    await tally.envelope("wallet.digest", "wallet.threshold_crossed", data, key=agency.cid, id_=first)
    await tally.envelope("wallet.digest", "wallet.threshold_crossed", data, key=agency.cid)
    tally.stack.spawn_service("recharge")
    await tally.stack.wait_ready("recharge")
    await wait_balance(agency, "24.992000")
    await asyncio.sleep(1.0)  # give a second charge every chance to happen
    attempts = await recharges(tally, agency)
    assert [a["status"] for a in attempts] == ["succeeded"]
    assert (await agency.wallet())["balance"] == "24.992000"


async def test_crash_after_stripe_confirmed_credits_exactly_once(tally: Tally, tmp_path: Any) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="30")
    await agency.fund("5.05")
    await attach(tally, agency, GOOD)
    tally.stack.kill("recharge")
    marker = tmp_path / "crashed"
    tally.stack.spawn_service(
        "recharge", env={"TALLY_CRASH_AT": "recharge.after_charge", "TALLY_CRASH_MARKER": str(marker)}
    )
    await tally.stack.wait_ready("recharge")
    await agency.use("whatsapp", "1")  # 5.05 - 0.058 < 5

    async def died() -> bool:
        return tally.stack.exited("recharge") is not None

    await eventually(died, timeout=40, what="the recharge process to crash after charging")
    assert marker.exists()
    [pending] = await tally.sql(
        "recharge",
        "SELECT id, status, tries::text AS tries FROM recharge_attempts WHERE company_id = $1",
        agency.cid,
    )
    assert pending["status"] == "pending"
    assert orjson.loads(pending["tries"])[0]["outcome"] == "calling"
    assert len(await stripe_charges_for(tally, pending["id"])) == 1  # Stripe did charge

    tally.stack.spawn_service("recharge")
    await tally.stack.wait_ready("recharge")
    await wait_balance(agency, "34.992000")
    [attempt] = await recharges(tally, agency)
    assert attempt["status"] == "succeeded" and attempt["id"] == pending["id"]
    assert len(await stripe_charges_for(tally, attempt["id"])) == 1  # not charged again
    kinds = [t["kind"] for t in await tally.company_transactions(agency.cid)]
    assert kinds.count("recharge") == 1


async def test_three_recharges_in_a_day_raise_the_tier(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.50")
    await attach(tally, agency, GOOD)
    balance = 5_500_000
    for _ in range(3):
        # Spend just enough to cross: balance - 5 + 0.058 in whatsapp conversations.
        spend = (balance - 5_000_000) // 58_000 + 1
        await agency.use("whatsapp", str(spend))
        balance = balance - spend * 58_000 + 10_000_000
        await wait_balance(agency, f"{balance // 1_000_000}.{balance % 1_000_000:06d}")
    assert [a["status"] for a in await recharges(tally, agency)] == ["succeeded"] * 3

    async def raised() -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if w["reload_amount"] == "25.000000" else None

    await eventually(raised, what="the reload tier to move from 10 to 25")
    event = await tally.find_on_topic(
        "recharge.events",
        lambda m: m["type"] == "recharge.tier_raised" and m["data"]["company_id"] == agency.cid,
    )
    assert event["data"]["previous_reload_amount_micros"] == 10_000_000
    assert event["data"]["reload_amount_micros"] == 25_000_000


async def test_account_recharges_go_to_the_companys_connected_stripe(tally: Tally) -> None:
    agency = Agency(tally)
    aid = await agency.add_account(mode="rebill")
    r = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{aid}/payment-methods"),
        json={"payment_method": await new_card(tally, GOOD)},
        headers=agency.user(aid),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "company_stripe_not_connected"
    r = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{aid}/wallet/top-ups"),
        json={"amount": "10"},
        headers=agency.user(aid),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "company_stripe_not_connected"

    await configure(tally, agency, threshold="5", reload="20", aid=aid)
    await agency.fund("50")
    await agency.fund("5.02", aid)  # at its threshold: the card pre-loads nothing
    acct = uid("acct_conn").replace("-", "")
    await tally.envelope(
        "rebilling.events",
        "company.updated",
        {
            "company_id": agency.cid,
            "name": "A",
            "plan": "saas_pro",
            "stripe_connected": True,
            "stripe_account_id": acct,
        },
        key=agency.cid,
    )

    async def card_attached() -> bool:
        pm = await new_card(tally, GOOD)
        r = await tally.http.post(
            tally.url("recharge", f"/v1/accounts/{aid}/payment-methods"),
            json={"payment_method": pm},
            headers=agency.user(aid),
        )
        return r.status_code == 201

    await eventually(card_attached, what="the recharge service to learn of the connection")

    await agency.use("sms", "10", account=aid)  # account: 5.02 - 0.079 < 5
    await wait_balance(agency, "24.941000", aid)
    rows = await tally.sql(
        "recharge", "SELECT stripe_account, status FROM recharge_attempts WHERE account_id = $1", aid
    )
    assert [(r["stripe_account"], r["status"]) for r in rows] == [(acct, "succeeded")]
    customers = await tally.sql(
        "recharge", "SELECT stripe_account FROM customers WHERE owner = 'account' AND owner_id = $1", aid
    )
    assert [c["stripe_account"] for c in customers] == [acct]
    # The company's own wallet is charged on the platform's Stripe, never the connected one.
    assert (await agency.wallet())["balance"] == "49.921000"


async def test_manual_top_up_and_its_bad_input(tally: Tally) -> None:
    agency = Agency(tally)
    await agency.announce()
    url = tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/top-ups")
    r = await tally.http.post(url, json={"amount": "10"}, headers=agency.admin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_payment_method"
    r = await tally.http.patch(
        tally.url("wallet", f"/v1/companies/{agency.cid}/wallet"),
        json={"auto_recharge": False},
        headers=agency.admin,
    )
    assert r.status_code == 200  # only the top-up moves this wallet
    await attach(tally, agency, GOOD)
    for bad in ("0", "-5", "1.0000001", "x"):
        r = await tally.http.post(url, json={"amount": bad}, headers=agency.admin)
        assert r.status_code == 422, bad
    r = await tally.http.post(url, json={"amount": "12.345"}, headers=agency.admin)
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    # the attempt says what was charged and credited, beside what was asked (an attack of
    # 2026-12-05 read only the amount asked, which neither Stripe nor the ledger had)
    assert (r.json()["amount"], r.json()["charged"]) == ("12.345000", "12.350000"), r.text
    await wait_balance(agency, "12.350000")  # charged in whole cents, rounded up
    listed = await tally.http.get(
        tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/recharges"), headers=agency.admin
    )
    assert [(a["amount"], a["charged"]) for a in listed.json()["items"]][:1] == [("12.345000", "12.350000")]
    r = await tally.http.post(
        url, json={"amount": "10"}, headers=tally.auth("company_admin", company_id=uid("co"))
    )
    assert r.status_code == 404

    bad_pm = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": "pm_doesnotexist"},
        headers=agency.admin,
    )
    assert bad_pm.status_code == 422 and bad_pm.json()["error"]["code"] == "invalid_payment_method"
    declined = await new_card(tally, "4000000000000002")
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": declined},
        headers=agency.admin,
    )
    assert r.status_code == 402 and r.json()["error"]["code"] == "card_declined"


def _sign(payload: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


async def test_webhook_signatures_are_checked(tally: Tally) -> None:
    url = tally.url("recharge", "/v1/stripe/webhooks")
    payload = orjson.dumps(
        {
            "id": uid("evt"),
            "object": "event",
            "type": "payment_intent.succeeded",
            "data": {"object": {"id": "pi_x", "object": "payment_intent", "metadata": {}}},
        }
    )
    r = await tally.http.post(
        url, content=payload, headers={"stripe-signature": _sign(payload, "wrong", int(time.time()))}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
    stale = _sign(payload, "whsec_tally_dev", int(time.time()) - 3600)  # replayed an hour later
    r = await tally.http.post(url, content=payload, headers={"stripe-signature": stale})
    assert r.status_code == 400
    r = await tally.http.post(
        url,
        content=payload,
        headers={"stripe-signature": _sign(payload, "whsec_tally_dev", int(time.time()))},
    )
    assert r.status_code == 200 and r.json()["status"] == "processed"
    r = await tally.http.post(
        url,
        content=payload,
        headers={"stripe-signature": _sign(payload, "whsec_tally_dev", int(time.time()))},
    )
    assert r.json()["status"] == "duplicate"


async def test_a_signed_webhook_missing_fields_is_refused_or_ignored_never_a_500(tally: Tally) -> None:
    """Found by the 2026-12-05 attack: a correctly signed body without ``type`` answered 500
    (``event.type`` on an event that has none). A signed event is read as the mapping it is: one
    that is not a payment's settlement is ignored; a payment event without an id or
    ``data.object`` is 400 ``invalid_event``; odd metadata settles nothing."""
    url = tally.url("recharge", "/v1/stripe/webhooks")

    async def send(body: object) -> httpx.Response:
        payload = orjson.dumps(body)
        signed = _sign(payload, "whsec_tally_dev", int(time.time()))
        return await tally.http.post(url, content=payload, headers={"stripe-signature": signed})

    for raw in ([], "str", 5, None, [1]):  # signed JSON that is not an object (a second attack)
        r = await send(raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_event", (raw, r.text)
    ignored: list[dict[str, object]] = [
        {"id": uid("evt")},
        {"id": uid("evt"), "type": None},
        {"type": ["x"]},
        {},
    ]
    for body in ignored:
        r = await send(body)
        assert r.status_code == 200 and r.json()["status"] == "ignored", (body, r.text)
    refused: list[dict[str, object]] = [
        {"id": uid("evt"), "type": "payment_intent.succeeded"},
        {"id": uid("evt"), "type": "payment_intent.payment_failed", "data": {"object": "pi_x"}},
        {"type": "payment_intent.succeeded", "data": {"object": {"id": "pi_x"}}},
    ]
    for body in refused:
        r = await send(body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_event", (body, r.text)
    r = await send(
        {
            "id": uid("evt"),
            "type": "payment_intent.succeeded",
            "data": {"object": {"id": "pi_x", "metadata": {"tally_attempt": {"a": 1}}}},
        }
    )
    assert r.status_code == 200 and r.json()["status"] == "processed", r.text

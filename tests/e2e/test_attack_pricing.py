"""Attacks on usage pricing (review of 2e11001 catalog-in-known() and 4f0d0c9 money strings),
from the public HTTP API only."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.support.builders import Reseller
from tests.support.stack import Tally, eventually, uid

ODD = [" 5", "5\n", "+5", "\u0665", "5.0000001", "5\x1c", "\u00a05", "\uff15", "5e0", "0x5", "1_0", "-5", "5.", ".5", "", "5 5"]


def svc() -> str:
    return "atk" + uid("x")[-8:]


async def put_price(tally: Tally, service: str, price: str, currency: str = "USD") -> Any:
    return await tally.http.put(
        tally.url("usage-meter", f"/v1/prices/{service}"),
        headers=tally.auth("platform_admin"),
        json={"unit": "call", "unit_price": price, "currency": currency},
    )


def ev(cid: str, service: str, quantity: Any, eid: str | None = None) -> dict[str, Any]:
    return {"event_id": eid or uid("ev"), "company_id": cid, "service": service, "quantity": quantity}


async def eur_company(tally: Tally, currency: str = "EUR") -> str:
    cid = uid("agency")
    r = await tally.http.post(
        tally.url("rebilling", "/v1/companies"),
        headers=tally.auth("platform_admin"),
        json={"id": cid, "name": "X", "plan": "saas_pro", "currency": currency, "owner_email": f"o-{cid}@example.com"},
    )
    assert r.status_code == 201, r.text
    return cid


async def lines(tally: Tally, cid: str) -> dict[str, str]:
    return {t["usage_event_id"]: t["amount"] for t in await tally.company_transactions(cid) if t["usage_event_id"]}


async def test_price_change_currency_and_rounding(tally: Tally) -> None:
    s = svc()
    assert (await put_price(tally, s, "0.000003")).status_code == 200
    usd = uid("co")
    eur = await eur_company(tally)
    gbp = await eur_company(tally, "GBP")

    # half-up: 0.5 x 3 = 1.5 -> 2 micros; 0.1 x 3 = 0.3 -> 0 micros?
    e1 = ev(usd, s, "0.5")
    r = await tally.post_usage(e1)
    print("e1", r.status_code, r.text)
    expected = {e1["event_id"]: "-0.000002"}

    # a price changed just now applies to the very next event, several times over
    for i, p in enumerate(["0.000007", "0.000011", "0.000005", "0.000013"]):
        r = await put_price(tally, s, p)
        assert r.status_code == 200, r.text
        e = ev(usd, s, "3")
        r = await tally.post_usage(e)
        assert r.json()["results"][0]["status"] == "accepted", r.text
        expected[e["event_id"]] = f"-0.{int(p[2:].lstrip('0') or 0) * 3:06d}"

    # EUR: no EUR price yet -> price_unavailable (not priced in USD)
    e_eur0 = ev(eur, s, "1")
    r = await tally.post_usage(e_eur0)
    print("eur before price", r.text)
    assert r.json()["results"][0]["error"]["code"] == "price_unavailable", r.text
    assert (await put_price(tally, s, "0.000017", "EUR")).status_code == 200
    # mixed batch: the same service for a USD, EUR and GBP company in one request, plus dup id
    dup = uid("ev")
    batch = [ev(usd, s, "2"), ev(eur, s, "2", dup), ev(gbp, s, "2"), ev(eur, s, "2", dup), ev(usd, s, "1", dup)]
    r = await tally.post_usage({"events": batch})
    print("mixed", r.status_code, r.text)
    res = r.json()["results"]
    assert [x["status"] for x in res[:2]] == ["accepted", "accepted"], res
    assert res[2]["status"] == "rejected" and res[2]["error"]["code"] == "price_unavailable", res
    assert res[3]["status"] == "duplicate" and res[4]["status"] == "duplicate", res
    expected[batch[0]["event_id"]] = "-0.000026"
    # the EUR one re-posted: duplicate
    r = await tally.post_usage(ev(eur, s, "2", dup))
    assert r.json()["results"][0]["status"] == "duplicate", r.text
    # an unpriced currency price reverted to USD-only? change USD again: EUR stays EUR
    assert (await put_price(tally, s, "0.000019")).status_code == 200
    e_eur2 = ev(eur, s, "1")
    r = await tally.post_usage(e_eur2)
    assert r.json()["results"][0]["status"] == "accepted", r.text

    for eid in expected:
        await tally.wait_applied(usd, eid)
    await tally.wait_applied(eur, e_eur2["event_id"])
    got_usd = await lines(tally, usd)
    got_eur = await lines(tally, eur)
    print("usd ledger", got_usd, "expected", expected)
    print("eur ledger", got_eur)
    assert got_usd == expected
    assert got_eur == {dup: "-0.000034", e_eur2["event_id"]: "-0.000017"}
    w_usd = await tally.company_wallet(usd)
    w_eur = await tally.company_wallet(eur)
    print("wallets", w_usd, w_eur)
    total = sum(int(v.replace("-0.", "")) for v in expected.values())
    assert w_usd["balance"] == f"-0.{total:06d}"
    assert w_eur["balance"] == "-0.000051" and w_eur["currency"] == "EUR"
    r = await tally.http.get(
        tally.url("wallet", f"/v1/companies/{gbp}/wallet"), headers=tally.auth("company_admin", company_id=gbp)
    )
    print("gbp wallet", r.status_code, r.text)


async def test_concurrent_batches_across_price_puts(tally: Tally) -> None:
    """Events posted concurrently with a stream of PUTs: each accepted event is charged one of
    the catalog prices, and every event accepted after a PUT's response at least that price."""
    s = svc()
    assert (await put_price(tally, s, "0.000001")).status_code == 200
    cid = uid("co")
    after: dict[str, int] = {}
    stop = False

    async def putter() -> None:
        for p in range(2, 12):
            assert (await put_price(tally, s, f"0.{p:06d}")).status_code == 200
            e = ev(cid, s, "1")
            r = await tally.post_usage(e)
            assert r.json()["results"][0]["status"] == "accepted"
            after[e["event_id"]] = p

    async def poster() -> list[str]:
        ids = []
        while not stop:
            batch = [ev(cid, s, "1") for _ in range(20)]
            r = await tally.post_usage({"events": batch})
            assert r.status_code == 202, r.text
            ids += [x["event_id"] for x in r.json()["results"] if x["status"] == "accepted"]
        return ids

    tasks = [asyncio.create_task(poster()) for _ in range(3)]
    await putter()
    stop = True
    all_ids = sum(await asyncio.gather(*tasks), [])
    last = list(after)[-1]
    await tally.wait_applied(cid, last)

    async def complete() -> dict[str, str] | None:
        got = await lines(tally, cid)
        return got if set(all_ids) | set(after) <= set(got) else None

    got = await eventually(complete, what="all applied")
    wrong = {e: (got[e], p) for e, p in after.items() if got[e] != f"-0.{p:06d}"}
    print("posted", len(all_ids), "wrong", wrong)
    assert not wrong
    assert all(-int(v.replace("-0.", "")) in range(-11, 0) for v in got.values())
    total = sum(int(v.replace("-0.", "")) for v in got.values())
    assert (await tally.company_wallet(cid))["balance"] == f"-0.{total:06d}"


async def test_odd_money_strings(tally: Tally) -> None:
    """Every money field, the same odd strings: never a 500; record what each endpoint says."""
    s = svc()
    agency = await Reseller(tally).create()
    aid = await agency.account()
    table: dict[str, dict[str, Any]] = {}
    for text in ODD:
        row: dict[str, Any] = {}
        r = await put_price(tally, s, text)
        row["price"] = (r.status_code, r.json().get("unit_price") if r.status_code == 200 else r.json()["error"]["code"])
        r = await tally.http.post(
            tally.url("wallet", f"/v1/companies/{agency.cid}/wallet/credits"),
            json={"amount": text},
            headers=tally.auth("platform_admin"),
        )
        row["credit"] = (r.status_code, r.json().get("amount") if r.status_code == 201 else r.json().get("error", {}).get("code"))

        async def acct_credit() -> Any:
            r = await tally.http.post(
                tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits"), json={"amount": text}, headers=agency.admin
            )
            return r if r.status_code != 404 else None

        r = await eventually(acct_credit, what="account wallet")
        row["acct_credit"] = (r.status_code, r.text[:80])
        r = await tally.http.post(
            tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/top-ups"),
            json={"amount": text},
            headers=agency.admin,
        )
        row["top_up"] = (r.status_code, r.text[:80])
        r = await agency.set_rebilling(aid, "rebill_markup", {"default": text})
        row["markup"] = (r.status_code, r.text[:80])
        r = await tally.post_usage(ev(agency.cid, "email", text))
        row["quantity"] = (r.status_code, r.text[:120])
        table[text] = row
    for k, v in table.items():
        print(json.dumps(k), json.dumps(v))
    fives = [(k, f, v) for k, row in table.items() for f, v in row.items() if v[0] >= 500]
    assert not fives, fives
    # consistency: the same string accepted on one money field and refused on another
    inconsistent = {}
    for k, row in table.items():
        ok = {f: v[0] < 300 for f, v in row.items() if f not in ("top_up", "quantity", "markup")}
        if len(set(ok.values())) > 1:
            inconsistent[k] = ok
    print("inconsistent", inconsistent)
    assert not inconsistent


async def test_markup_leg_rounding(tally: Tally) -> None:
    s = "sms"
    agency = await Reseller(tally).create()
    aid = await agency.account()
    for owner in (None, aid):
        await agency.patch_wallet({"threshold": "0", "auto_recharge": False}, owner)
    await agency.add_card(aid)
    r = await agency.set_rebilling(aid, "rebill_markup", {"default": "1.333333"})
    assert r.status_code == 200, r.text
    await agency.wallet_mode(aid, "rebill_markup")
    prices = (await tally.http.get(tally.url("usage-meter", "/v1/prices"), headers=tally.auth("product"))).json()["items"]
    unit = next(p for p in prices if p["service"] == s and p["currency"] == "USD")["unit_price"]
    await agency.use(aid, s, "0.5")
    await agency.use(aid, s, "0.5")
    from decimal import ROUND_HALF_UP, Decimal

    micros = int(Decimal(unit) * 1_000_000)
    comp = int((Decimal("0.5") * micros).quantize(Decimal(1), ROUND_HALF_UP))
    acct = int((Decimal(comp) * Decimal("1.333333")).quantize(Decimal(1), ROUND_HALF_UP))
    cw, aw = await agency.wallet(), await agency.wallet(aid)
    print("unit", unit, "comp", comp, "acct", acct, cw["balance"], aw["balance"])
    acct_lines = await agency.t.http.get(
        tally.url("wallet", f"/v1/accounts/{aid}/wallet/transactions"), headers=agency.admin
    )
    print("acct lines", acct_lines.text[:600])
    assert cw["balance"] == f"-{2 * comp / 1e6:.6f}"
    assert aw["balance"] == f"-{2 * acct / 1e6:.6f}"

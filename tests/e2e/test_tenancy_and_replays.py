"""Tenancy, roles, Idempotency-Key replays and exactly-once effects on every money route, from
the public HTTP APIs and the topics only: the adversarial review of the issue-19 restructuring
(units of work, folded twin routes, the key in the unit of work), kept as tests. Tests whose
docstring says ``FINDING`` failed when written and were fixed in the same issue (docs/0010);
the others held and stay as regression tests."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.builders import (
    DECLINES,
    GOOD,
    Agency,
    Reseller,
    Resold,
    attach,
    new_card,
    new_sepa,
    patch_company_wallet,
    payment_intents,
    recharges,
    wait_balance,
)
from tests.support.stack import Tally, eventually, uid


def key() -> dict[str, str]:
    return {"Idempotency-Key": uid("idem")}


def err(r: Any) -> tuple[int, str | None]:
    try:
        return r.status_code, r.json()["error"]["code"]
    except Exception:  # a success has no error body
        return r.status_code, None


async def known_account(tally: Tally, agency: Any, aid: str, service: str = "wallet") -> None:
    """Wait until ``service`` has heard of the account (rebilling.events)."""
    path = {
        "wallet": f"/v1/accounts/{aid}/wallet",
        "recharge": f"/v1/accounts/{aid}/wallet/recharges",
        "notifier": f"/v1/accounts/{aid}/usage-alerts",
    }[service]

    async def ok() -> bool:
        r = await tally.http.get(tally.url(service, path), headers=agency.admin)
        return r.status_code == 200

    await eventually(ok, what=f"{service} to learn of {aid}")


async def company_with_currency(tally: Tally, currency: str) -> Reseller:
    r = Reseller(tally)
    resp = await tally.http.post(
        tally.url("rebilling", "/v1/companies"),
        json={
            "id": r.cid,
            "name": "Agency",
            "plan": r.plan,
            "owner_email": f"owner-{r.cid}@example.com",
            "currency": currency,
        },
        headers=tally.auth("platform_admin"),
    )
    assert resp.status_code == 201, resp.text
    return r


async def ledger(
    tally: Tally, headers: dict[str, str], aid: str | None = None, cid: str | None = None
) -> list[Any]:
    path = (
        f"/v1/accounts/{aid}/wallet/transactions?limit=500"
        if aid
        else f"/v1/companies/{cid}/wallet/transactions?limit=500"
    )
    r = await tally.http.get(tally.url("wallet", path), headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def closing_patch(tally: Tally, agency: Any, aid: str | None = None) -> str:
    """A PATCH whose ``wallet.settings_changed`` closes a read of wallet.events for the
    company (everything the company published before it has been relayed)."""
    path = f"/v1/accounts/{aid}/wallet" if aid else f"/v1/companies/{agency.cid}/wallet"
    marker = f"{len(uid('x')) + 700}.123457"  # an odd threshold nothing else sets
    r = await tally.http.patch(tally.url("wallet", path), json={"threshold": marker}, headers=agency.admin)
    assert r.status_code == 200, r.text
    return marker


def settings_with(cid: str, threshold_micros: int) -> Any:
    return lambda m: (
        m["type"] == "wallet.settings_changed"
        and m["data"]["company_id"] == cid
        and m["data"]["threshold_micros"] == threshold_micros
    )


def micros(text: str) -> int:
    units, _, frac = text.partition(".")
    return int(units) * 1_000_000 + int((frac + "000000")[:6])


# --- 1. roles and tenants on the folded wallet credit routes --------------------------------


async def test_credit_roles_on_company_and_account_wallets(tally: Tally) -> None:
    a, b = Agency(tally), Agency(tally)
    mine = await a.add_account()
    sibling = await a.add_account()
    theirs = await b.add_account()
    acct = tally.url("wallet", f"/v1/accounts/{mine}/wallet/credits")
    comp = tally.url("wallet", f"/v1/companies/{a.cid}/wallet/credits")
    body = {"amount": "7"}
    cases = [
        ("account user on its own account", acct, a.user(mine), {403}),
        ("account user on its company", comp, a.user(mine), {403, 404}),
        ("company admin on its own company wallet", comp, a.admin, {403}),
        ("product on an account", acct, tally.auth("product"), {403}),
        ("product on a company", comp, tally.auth("product"), {403}),
        ("another company's admin on the account", acct, b.admin, {404}),
        ("another company's admin on the company", comp, b.admin, {403, 404}),
        ("a sibling account's user", acct, a.user(sibling), {403, 404}),
        ("another company's user", acct, b.user(theirs), {403, 404}),
    ]
    for who, url, headers, allowed in cases:
        for h in (headers, {**headers, **key()}):
            r = await tally.http.post(url, json=body, headers=h)
            assert r.status_code in allowed, (who, r.status_code, r.text)
    assert await ledger(tally, a.admin, aid=mine) == []
    assert await ledger(tally, a.admin, cid=a.cid) == []
    # the allowed ones: company admin on its account, platform admin on either
    r = await tally.http.post(acct, json=body, headers=a.admin)
    assert r.status_code == 201, r.text
    r = await tally.http.post(acct, json=body, headers=tally.auth("platform_admin"))
    assert r.status_code == 201, r.text
    r = await tally.http.post(comp, json=body, headers=tally.auth("platform_admin"))
    assert r.status_code == 201, r.text
    assert len(await ledger(tally, a.admin, aid=mine)) == 2
    assert len(await ledger(tally, a.admin, cid=a.cid)) == 1


async def test_another_tenants_top_ups_cards_and_recharges_are_404_whatever_the_body(tally: Tally) -> None:
    a = await Reseller(tally).create()
    b = await Reseller(tally).create()
    await a.patch_wallet({"auto_recharge": False})
    mine = await a.account()
    sibling = await a.account()
    await known_account(tally, a, mine, "recharge")
    await known_account(tally, a, sibling, "recharge")
    await a.patch_wallet({"auto_recharge": False}, mine)
    await a.add_card(mine)
    company_pm = await new_card(tally, GOOD)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{a.cid}/payment-methods"),
        json={"payment_method": company_pm},
        headers=a.admin,
    )
    assert r.status_code == 201, r.text
    r = await tally.http.get(tally.url("recharge", f"/v1/accounts/{mine}/payment-methods"), headers=a.admin)
    account_pm = r.json()["items"][0]["id"]
    b_acct = await b.account()
    outsiders = {"b admin": b.admin, "sibling user": a.user(sibling), "b user": b.user(b_acct)}
    for owner, oid, pm in (("companies", a.cid, company_pm), ("accounts", mine, account_pm)):
        base = f"/v1/{owner}/{oid}"
        for who, h in outsiders.items():
            for method, path, body in [
                ("GET", f"{base}/payment-methods", None),
                ("POST", f"{base}/payment-methods", {"payment_method": "pm_nope"}),
                ("DELETE", f"{base}/payment-methods/{pm}", None),
                ("POST", f"{base}/payment-methods/{pm}/default", None),
                ("POST", f"{base}/wallet/top-ups", {"amount": "5"}),
                ("POST", f"{base}/wallet/top-ups", {"amount": "abc"}),
                ("POST", f"{base}/wallet/top-ups", {"amount": "-1"}),
                ("GET", f"{base}/wallet/recharges", None),
            ]:
                for extra in ({}, key()):
                    r = await tally.http.request(
                        method, tally.url("recharge", path), json=body, headers={**h, **extra}
                    )
                    # company routes refuse account users by role (403); all else is 404
                    assert err(r) in {(404, "not_found"), (403, "forbidden")}, (
                        who,
                        method,
                        path,
                        body,
                        r.text,
                    )
                    if who == "b admin" or owner == "accounts":
                        assert r.status_code == 404, (who, method, path, body, r.text)
    # B's admin names A's card through B's own path: not B's card
    for method, path in [
        ("DELETE", f"/v1/companies/{b.cid}/payment-methods/{company_pm}"),
        ("POST", f"/v1/companies/{b.cid}/payment-methods/{company_pm}/default"),
        ("DELETE", f"/v1/accounts/{b_acct}/payment-methods/{account_pm}"),
        ("POST", f"/v1/accounts/{b_acct}/payment-methods/{account_pm}/default"),
    ]:
        r = await tally.http.request(method, tally.url("recharge", path), headers=b.admin)
        assert r.status_code == 404, (path, r.text)
    r = await tally.http.get(tally.url("recharge", f"/v1/companies/{a.cid}/payment-methods"), headers=a.admin)
    assert [x["id"] for x in r.json()["items"]] == [company_pm]
    r = await tally.http.get(tally.url("recharge", f"/v1/accounts/{mine}/payment-methods"), headers=a.admin)
    assert [x["id"] for x in r.json()["items"]] == [account_pm]
    assert await recharges(tally, a) == []  # type: ignore[arg-type]


# --- 2. 404 before 422 ---------------------------------------------------------------------


async def test_a_credit_request_on_another_account_is_404_whatever_the_amount(tally: Tally) -> None:
    """FINDING: the route parses the amount (422) before the use case's tenant check."""
    a = Agency(tally)
    mine, theirs = await a.add_account(), await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{theirs}/credit-requests")
    r = await tally.http.post(url, json={"amount": "5"}, headers=a.user(mine))
    assert err(r) == (404, "not_found"), r.text
    r = await tally.http.post(url, json={"amount": "abc"}, headers=a.user(mine))
    assert err(r) == (404, "not_found"), r.text


async def test_a_credit_request_key_reused_on_another_account_is_404(tally: Tally) -> None:
    """FINDING: the Idempotency-Key is claimed before the tenant check: a key the user used on
    its own account answers 422 idempotency_key_reused for another account instead of 404."""
    a = Agency(tally)
    mine, theirs = await a.add_account(), await a.add_account()
    k = key()
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{mine}/credit-requests"),
        json={"amount": "5"},
        headers={**a.user(mine), **k},
    )
    assert r.status_code == 201, r.text
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{theirs}/credit-requests"),
        json={"amount": "5"},
        headers={**a.user(mine), **k},
    )
    assert err(r) == (404, "not_found"), r.text


async def test_a_subscription_on_another_tenants_account_is_404_whatever_the_body(tally: Tally) -> None:
    """FINDING: ``unknown_product`` (422) is checked before the account's tenant check, and an
    account user's ``direct`` is refused (403) before it; and a key used on one's own account
    answers 422 idempotency_key_reused on another tenant's account."""
    a = await Resold(tally).create(account_card=GOOD)
    b = await Resold(tally).create(account_card=GOOD)
    url = tally.url("rebilling", f"/v1/accounts/{a.aid}/subscriptions")
    failures = []
    for who, h, body in [
        ("b admin, known product", b.agency.admin, {"product": "whatsapp", "deployment": "resell"}),
        ("b admin, unknown product", b.agency.admin, {"product": "nope", "deployment": "resell"}),
        ("b user, direct", b.agency.user(b.aid), {"product": "whatsapp", "deployment": "direct"}),
        ("b user, unknown product", b.agency.user(b.aid), {"product": "nope", "deployment": "resell"}),
    ]:
        r = await tally.http.post(url, json=body, headers=h)
        if err(r) != (404, "not_found"):
            failures.append((who, r.status_code, r.text))
    k = key()
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{b.aid}/subscriptions"),
        json={"product": "whatsapp", "deployment": "resell"},
        headers={**b.agency.admin, **k},
    )
    assert r.status_code == 201, r.text
    r = await tally.http.post(
        url, json={"product": "whatsapp", "deployment": "resell"}, headers={**b.agency.admin, **k}
    )
    if err(r) != (404, "not_found"):
        failures.append(("b admin, its key reused", r.status_code, r.text))
    assert await a.subscriptions() == []
    assert failures == [], "\n".join(f"{w}: {s} {t}" for w, s, t in failures)


async def test_licenses_of_another_company_are_404_even_with_a_reused_key(tally: Tally) -> None:
    """FINDING (same as subscriptions): the key is claimed before the company's tenant check."""
    a = Reseller(tally)
    await a.create()
    b = Reseller(tally)
    await b.create()
    k = key()
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{b.cid}/licenses"),
        json={"quantity": 1},
        headers={**b.admin, **k},
    )
    assert r.status_code in (201, 402), r.text  # B has no card: 402, recorded for the key
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{a.cid}/licenses"),
        json={"quantity": 1},
        headers={**b.admin, **k},
    )
    assert err(r) == (404, "not_found"), r.text


# --- 3. Idempotency-Key: replays, other bodies, concurrency, principals ---------------------


async def test_a_credit_replayed_after_the_wallet_moved_is_the_first_response(tally: Tally) -> None:
    a = Agency(tally)
    aid = await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    k = key()
    first = await tally.http.post(url, json={"amount": "3", "reference": "r1"}, headers={**a.admin, **k})
    assert first.status_code == 201, first.text
    await a.fund("10", aid)  # the wallet moves
    await a.use("whatsapp", "1", account=aid)
    again = await tally.http.post(url, json={"amount": "3", "reference": "r1"}, headers={**a.admin, **k})
    assert (again.status_code, again.json()) == (201, first.json())
    other = await tally.http.post(url, json={"amount": "3", "reference": "r2"}, headers={**a.admin, **k})
    assert err(other) == (422, "idempotency_key_reused"), other.text
    kinds = [x["kind"] for x in await ledger(tally, a.admin, aid=aid)]
    assert kinds.count("manual_credit") == 2


async def test_replays_are_the_first_response_byte_for_byte(tally: Tally) -> None:
    """FINDING (low): the first response is kept as jsonb, which reorders object keys; a replay
    carries the same JSON value but not the same bytes (credits, top-ups, credit requests,
    subscriptions, license purchases alike)."""
    a = Agency(tally)
    aid = await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    k = key()
    first = await tally.http.post(url, json={"amount": "3"}, headers={**a.admin, **k})
    again = await tally.http.post(url, json={"amount": "3"}, headers={**a.admin, **k})
    assert again.json() == first.json()
    assert again.content == first.content, (first.content[:120], again.content[:120])


async def test_five_credits_at_once_with_one_key_credit_once(tally: Tally) -> None:
    a = Agency(tally)
    aid = await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    k = key()
    rs = await asyncio.gather(
        *[tally.http.post(url, json={"amount": "4"}, headers={**a.admin, **k}) for _ in range(5)]
    )
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    assert all(r.json() == rs[0].json() for r in rs)
    assert rs[0].json()["created"] is True
    assert [x["kind"] for x in await ledger(tally, a.admin, aid=aid)] == ["manual_credit"]
    assert (await a.wallet(aid))["balance"] == "4.000000"
    transfer = rs[0].json()["transfer_id"]
    marker = await closing_patch(tally, a, aid)
    credited = await tally.topic_messages(
        "wallet.events",
        lambda m: m["type"] == "wallet.credited" and m["data"]["transfer_id"] == transfer,
        until=settings_with(a.cid, micros(marker)),
    )
    assert len(credited) == 1 and credited[0]["data"]["amount_micros"] == 4_000_000


async def test_five_company_credits_at_once_with_one_key_credit_once(tally: Tally) -> None:
    a = Agency(tally)
    url = tally.url("wallet", f"/v1/companies/{a.cid}/wallet/credits")
    pa = {**tally.auth("platform_admin"), **key()}
    rs = await asyncio.gather(*[tally.http.post(url, json={"amount": "4"}, headers=pa) for _ in range(5)])
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    assert [x["kind"] for x in await ledger(tally, a.admin, cid=a.cid)] == ["manual_credit"]


async def test_idempotency_keys_are_per_principal(tally: Tally) -> None:
    a, b = Agency(tally), Agency(tally)
    mine, theirs = await a.add_account(), await b.add_account()
    shared = "the-same-key"
    other_admin = tally.auth("company_admin", sub="second-admin", company_id=a.cid)
    r1 = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{mine}/wallet/credits"),
        json={"amount": "2"},
        headers={**a.admin, "Idempotency-Key": shared},
    )
    r2 = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{mine}/wallet/credits"),
        json={"amount": "2"},
        headers={**other_admin, "Idempotency-Key": shared},
    )
    r3 = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{theirs}/wallet/credits"),
        json={"amount": "2"},
        headers={**b.admin, "Idempotency-Key": shared},
    )
    assert [r.status_code for r in (r1, r2, r3)] == [201, 201, 201], [r.text for r in (r1, r2, r3)]
    assert r1.json()["transfer_id"] != r2.json()["transfer_id"]
    assert (await a.wallet(mine))["balance"] == "4.000000"
    assert (await b.wallet(theirs))["balance"] == "2.000000"


async def test_credit_requests_replay_after_approval_and_once_at_once(tally: Tally) -> None:
    a = Agency(tally)
    aid = await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/credit-requests")
    k = key()
    rs = await asyncio.gather(
        *[tally.http.post(url, json={"amount": "6"}, headers={**a.user(aid), **k}) for _ in range(5)]
    )
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    assert all(r.json() == rs[0].json() for r in rs)
    rid = rs[0].json()["id"]
    r = await tally.http.post(tally.url("wallet", f"/v1/credit-requests/{rid}/approve"), headers=a.admin)
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    again = await tally.http.post(url, json={"amount": "6"}, headers={**a.user(aid), **k})
    assert (again.status_code, again.json()) == (201, rs[0].json())
    assert again.json()["status"] == "pending"  # the first response, not the state now
    other = await tally.http.post(url, json={"amount": "7"}, headers={**a.user(aid), **k})
    assert err(other) == (422, "idempotency_key_reused"), other.text
    listing = await tally.http.get(
        tally.url("wallet", f"/v1/companies/{a.cid}/credit-requests"), headers=a.admin
    )
    assert [x["id"] for x in listing.json()["items"]] == [rid]
    assert [x["kind"] for x in await a.lines(aid)] == ["credit_request"]
    marker = await closing_patch(tally, a, aid)
    created = await tally.topic_messages(
        "wallet.events",
        lambda m: m["type"] == "credit_request.created" and m["data"]["account_id"] == aid,
        until=settings_with(a.cid, micros(marker)),
    )
    assert [m["data"]["request_id"] for m in created] == [rid]


async def test_a_failed_credit_request_then_its_key_again(tally: Tally) -> None:
    """A 409 records nothing: the same key is honoured once the conflict is gone; the 409
    published nothing."""
    a = Agency(tally)
    aid = await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/credit-requests")
    r = await tally.http.post(url, json={"amount": "1"}, headers=a.user(aid))
    assert r.status_code == 201
    pending = r.json()["id"]
    k = key()
    r = await tally.http.post(url, json={"amount": "2"}, headers={**a.user(aid), **k})
    assert err(r) == (409, "pending_request_exists"), r.text
    await tally.http.post(tally.url("wallet", f"/v1/credit-requests/{pending}/reject"), headers=a.admin)
    r = await tally.http.post(url, json={"amount": "2"}, headers={**a.user(aid), **k})
    assert r.status_code == 201, r.text
    second = r.json()
    r = await tally.http.post(url, json={"amount": "2"}, headers={**a.user(aid), **k})
    assert (r.status_code, r.json()) == (201, second)
    marker = await closing_patch(tally, a, aid)
    created = await tally.topic_messages(
        "wallet.events",
        lambda m: m["type"] == "credit_request.created" and m["data"]["account_id"] == aid,
        until=settings_with(a.cid, micros(marker)),
    )
    assert sorted(m["data"]["request_id"] for m in created) == sorted([pending, second["id"]])


# --- 4. credit requests: double approval, approve and reject at once, roles ----------------


async def test_approving_five_times_at_once_credits_once(tally: Tally) -> None:
    a = Agency(tally)
    aid = await a.add_account()
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{aid}/credit-requests"), json={"amount": "8"}, headers=a.user(aid)
    )
    rid = r.json()["id"]
    approve = tally.url("wallet", f"/v1/credit-requests/{rid}/approve")
    rs = await asyncio.gather(*[tally.http.post(approve, headers=a.admin) for _ in range(5)])
    assert sorted(r.status_code for r in rs) == [200, 409, 409, 409, 409], [r.text for r in rs]
    assert [x["kind"] for x in await a.lines(aid)] == ["credit_request"]
    assert (await a.wallet(aid))["balance"] == "8.000000"
    # another company learns nothing of a resolved request either: 404, not 409
    outsider = Agency(tally)
    for verb in ("approve", "reject"):
        r = await tally.http.post(
            tally.url("wallet", f"/v1/credit-requests/{rid}/{verb}"), headers=outsider.admin
        )
        assert err(r) == (404, "not_found"), r.text
    marker = await closing_patch(tally, a, aid)
    until = settings_with(a.cid, micros(marker))
    resolved = await tally.topic_messages(
        "wallet.events",
        lambda m: m["type"] == "credit_request.resolved" and m["data"]["request_id"] == rid,
        until=until,
    )
    assert [m["data"]["status"] for m in resolved] == ["approved"]
    credited = await tally.topic_messages(
        "wallet.events",
        lambda m: m["type"] == "wallet.credited" and m["data"]["transfer_id"] == f"credit_request:{rid}",
        until=until,
    )
    assert len(credited) == 1


async def test_approve_and_reject_at_once_resolve_once(tally: Tally) -> None:
    a = Agency(tally)
    aid = await a.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/credit-requests")
    for _ in range(3):
        r = await tally.http.post(url, json={"amount": "1"}, headers=a.user(aid))
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        rs = await asyncio.gather(
            *[
                tally.http.post(tally.url("wallet", f"/v1/credit-requests/{rid}/{verb}"), headers=a.admin)
                for verb in ("approve", "reject", "approve", "reject")
            ]
        )
        ok = [r for r in rs if r.status_code == 200]
        assert len(ok) == 1 and all(
            err(r) == (409, "request_not_pending") for r in rs if r.status_code != 200
        )
    approved = sum(
        1
        for x in (
            await tally.http.get(
                tally.url("wallet", f"/v1/companies/{a.cid}/credit-requests?status=approved"), headers=a.admin
            )
        ).json()["items"]
        if x["account_id"] == aid
    )
    assert len(await a.lines(aid)) == approved
    assert (await a.wallet(aid))["balance"] == f"{approved}.000000"


async def test_credit_request_roles_and_tenants(tally: Tally) -> None:
    a, b = Agency(tally), Agency(tally)
    aid, sibling = await a.add_account(), await a.add_account()
    theirs = await b.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/credit-requests")
    # who may ask: the account's own users only
    for h in (a.admin, tally.auth("product"), tally.auth("platform_admin")):
        r = await tally.http.post(url, json={"amount": "1"}, headers=h)
        assert r.status_code in (403, 404), r.text
    r = await tally.http.post(url, json={"amount": "2"}, headers=a.user(aid))
    rid = r.json()["id"]
    for verb in ("approve", "reject"):
        u = tally.url("wallet", f"/v1/credit-requests/{rid}/{verb}")
        for who, h, allowed in [
            ("the requester", a.user(aid), {403}),
            ("a sibling's user", a.user(sibling), {403}),
            ("another company's admin", b.admin, {404}),
            ("another company's user", b.user(theirs), {403}),
            ("product", tally.auth("product"), {403}),
        ]:
            r = await tally.http.post(u, headers=h)
            assert r.status_code in allowed, (verb, who, r.text)
    for h in (b.admin, a.user(aid), tally.auth("product")):
        r = await tally.http.get(tally.url("wallet", f"/v1/companies/{a.cid}/credit-requests"), headers=h)
        assert r.status_code in (403, 404), r.text
    r = await tally.http.get(tally.url("wallet", f"/v1/companies/{a.cid}/credit-requests"), headers=a.admin)
    assert [x["status"] for x in r.json()["items"]] == ["pending"]
    assert await a.lines(aid) == []


async def test_credit_request_notifications_stay_with_their_company(tally: Tally) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    aid = await a.account()
    await known_account(tally, a, aid)
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{aid}/credit-requests"), json={"amount": "3"}, headers=a.user(aid)
    )
    assert r.status_code == 201, r.text

    async def notified() -> list[Any] | None:
        r = await tally.http.get(
            tally.url("notifier", f"/v1/companies/{a.cid}/notifications"), headers=a.admin
        )
        return r.json()["items"] or None

    items = await eventually(notified, what="the in-app notification")
    nid = items[0]["id"]
    for h in (b.admin, a.user(aid), tally.auth("product")):
        r = await tally.http.get(tally.url("notifier", f"/v1/companies/{a.cid}/notifications"), headers=h)
        assert r.status_code in (403, 404), r.text
        r = await tally.http.post(tally.url("notifier", f"/v1/notifications/{nid}/read"), headers=h)
        assert r.status_code in (403, 404), r.text
    r = await tally.http.get(tally.url("notifier", f"/v1/companies/{b.cid}/notifications"), headers=b.admin)
    assert r.json()["items"] == []
    r = await tally.http.get(
        tally.url("notifier", f"/v1/companies/{a.cid}/notifications?unread=true"), headers=a.admin
    )
    assert [x["id"] for x in r.json()["items"]] == [nid]


# --- 5. events: every change reaches its topic, failures publish nothing ------------------


async def test_settings_changes_and_credits_reach_wallet_events_and_failures_publish_nothing(
    tally: Tally,
) -> None:
    a, b = Agency(tally), Agency(tally)
    aid = await a.add_account()
    # failures first: nothing of them may reach the topic
    bad = [
        ("PATCH", f"/v1/accounts/{aid}/wallet", {"threshold": "-1"}, a.admin),
        ("PATCH", f"/v1/accounts/{aid}/wallet", {"threshold": "3.1"}, b.admin),
        ("PATCH", f"/v1/companies/{a.cid}/wallet", {"threshold": "3.1"}, b.admin),
        ("PATCH", f"/v1/companies/{a.cid}/wallet", {"threshold": "3.1"}, tally.auth("product")),
        ("POST", f"/v1/accounts/{aid}/wallet/credits", {"amount": "3.1"}, b.admin),
        ("POST", f"/v1/accounts/{aid}/wallet/credits", {"amount": "3.1"}, a.user(aid)),
        ("POST", f"/v1/companies/{a.cid}/wallet/credits", {"amount": "3.1"}, a.admin),
        ("POST", f"/v1/accounts/{aid}/wallet/credits", {"amount": "-3.1"}, a.admin),
    ]
    for method, path, body, h in bad:
        r = await tally.http.request(method, tally.url("wallet", path), json=body, headers=h)
        assert r.status_code >= 400, (path, body, r.text)
    # then the successes
    r = await tally.http.patch(
        tally.url("wallet", f"/v1/accounts/{aid}/wallet"),
        json={"threshold": "2.5", "auto_recharge": False},
        headers=a.user(aid),  # the account's own user may
    )
    assert r.status_code == 200, r.text
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits"),
        json={"amount": "1.5", "reference": "ok"},
        headers=a.admin,
    )
    assert r.status_code == 201, r.text
    transfer = r.json()["transfer_id"]
    marker = await closing_patch(tally, a)
    mine = await tally.topic_messages(
        "wallet.events",
        lambda m: (
            m["data"].get("company_id") == a.cid and m["type"].startswith(("wallet.", "credit_request."))
        ),
        until=settings_with(a.cid, micros(marker)),
    )
    settings = [m["data"]["threshold_micros"] for m in mine if m["type"] == "wallet.settings_changed"]
    assert settings == [2_500_000, micros(marker)], settings
    credits = [m["data"] for m in mine if m["type"] == "wallet.credited"]
    assert [(c["transfer_id"], c["amount_micros"], c["account_id"]) for c in credits] == [
        (transfer, 1_500_000, aid)
    ]
    assert {m["type"] for m in mine} <= {"wallet.settings_changed", "wallet.credited"}, mine


# --- 6. top-ups: keys, declines, concurrency --------------------------------------------------


async def test_keyed_top_ups_charge_once_per_key_and_principal(tally: Tally) -> None:
    a = Agency(tally)
    await patch_company_wallet(tally, a, auto_recharge=False)
    await attach(tally, a, GOOD)
    url = tally.url("recharge", f"/v1/companies/{a.cid}/wallet/top-ups")
    k = key()
    rs = await asyncio.gather(
        *[tally.http.post(url, json={"amount": "5"}, headers={**a.admin, **k}) for _ in range(5)]
    )
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    assert len({r.json()["id"] for r in rs}) == 1
    assert {r.json()["status"] for r in rs} == {"succeeded"}, [r.text for r in rs]
    await wait_balance(a, "5.000000")
    other = await tally.http.post(url, json={"amount": "6"}, headers={**a.admin, **k})
    assert err(other) == (422, "idempotency_key_reused")
    # the same key from the platform admin is another principal: its own top-up
    pa = await tally.http.post(url, json={"amount": "5"}, headers={**tally.auth("platform_admin"), **k})
    assert pa.status_code == 201 and pa.json()["id"] != rs[0].json()["id"], pa.text
    await wait_balance(a, "10.000000")
    again = await tally.http.post(url, json={"amount": "5"}, headers={**a.admin, **k})
    assert (again.status_code, again.json()) == (201, rs[0].json())
    attempts = await recharges(tally, a)
    assert len(attempts) == 2
    charged = [
        i
        for i in await payment_intents(tally)
        if (i.get("metadata") or {}).get("tally_attempt") in {x["id"] for x in attempts}
        and i["status"] == "succeeded"
    ]
    assert len(charged) == 2
    await asyncio.sleep(1)
    assert (await a.wallet())["balance"] == "10.000000"


async def test_a_declined_keyed_top_up_answers_its_decline_again(tally: Tally) -> None:
    a = Agency(tally)
    await patch_company_wallet(tally, a, auto_recharge=False)
    await attach(tally, a, DECLINES)
    url = tally.url("recharge", f"/v1/companies/{a.cid}/wallet/top-ups")
    k = key()
    first = await tally.http.post(url, json={"amount": "5"}, headers={**a.admin, **k})
    assert first.status_code == 201 and first.json()["status"] == "failed", first.text
    await attach(tally, a, GOOD)
    again = await tally.http.post(url, json={"amount": "5"}, headers={**a.admin, **k})
    assert (again.status_code, again.json()) == (201, first.json())
    fresh = await tally.http.post(url, json={"amount": "5"}, headers={**a.admin, **key()})
    assert fresh.status_code == 201 and fresh.json()["status"] == "succeeded", fresh.text
    await wait_balance(a, "5.000000")
    assert len(await recharges(tally, a)) == 2


async def test_account_top_ups_keyed_by_user_and_admin_are_separate_and_once_each(tally: Tally) -> None:
    a = await Reseller(tally).create()
    aid = await a.account()
    await known_account(tally, a, aid, "recharge")
    await a.patch_wallet({"auto_recharge": False}, aid)
    await a.add_card(aid)
    url = tally.url("recharge", f"/v1/accounts/{aid}/wallet/top-ups")
    k = key()
    users = [tally.http.post(url, json={"amount": "3"}, headers={**a.user(aid), **k}) for _ in range(3)]
    admins = [tally.http.post(url, json={"amount": "3"}, headers={**a.admin, **k}) for _ in range(3)]
    rs = await asyncio.gather(*users, *admins)
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    assert len({r.json()["id"] for r in rs[:3]}) == 1 and len({r.json()["id"] for r in rs[3:]}) == 1
    assert rs[0].json()["id"] != rs[3].json()["id"]
    await wait_balance(a, "6.000000", aid)  # type: ignore[arg-type]
    await asyncio.sleep(1)
    assert (await a.wallet(aid))["balance"] == "6.000000"


SEPA_OK = "DE89370400440532013000"  # localstripe: processing, then succeeds 0.5 s later


async def test_a_keyed_top_up_whose_charge_is_processing_charges_once(tally: Tally) -> None:
    """Five requests at once with one key while the payment processes: one attempt, one
    PaymentIntent, one credit; once settled, the key answers one stable response."""
    a = Agency(tally)
    await patch_company_wallet(tally, a, auto_recharge=False)
    pm = await new_sepa(tally, SEPA_OK)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{a.cid}/payment-methods"),
        json={"payment_method": pm},
        headers=a.admin,
    )
    assert r.status_code == 201, r.text
    url = tally.url("recharge", f"/v1/companies/{a.cid}/wallet/top-ups")
    k = key()
    rs = await asyncio.gather(
        *[tally.http.post(url, json={"amount": "9"}, headers={**a.admin, **k}) for _ in range(5)]
    )
    assert {r.status_code for r in rs} == {201}, [r.text for r in rs]
    ids = {r.json()["id"] for r in rs}
    assert len(ids) == 1
    await wait_balance(a, "9.000000")
    later = [await tally.http.post(url, json={"amount": "9"}, headers={**a.admin, **k}) for _ in range(3)]
    assert all((r.status_code, r.json()) == (201, later[0].json()) for r in later)
    assert later[0].json()["id"] in ids and later[0].json()["status"] == "succeeded"
    intents = [
        i for i in await payment_intents(tally) if (i.get("metadata") or {}).get("tally_attempt") in ids
    ]
    assert len(intents) == 1, intents
    await asyncio.sleep(1)
    assert (await a.wallet())["balance"] == "9.000000"
    assert len(await recharges(tally, a)) == 1


async def test_a_refused_keyed_top_up_then_its_key_once_a_card_is_saved(tally: Tally) -> None:
    a = Agency(tally)
    await patch_company_wallet(tally, a, auto_recharge=False)
    url = tally.url("recharge", f"/v1/companies/{a.cid}/wallet/top-ups")
    k = key()
    r = await tally.http.post(url, json={"amount": "4"}, headers={**a.admin, **k})
    assert err(r) == (409, "no_payment_method"), r.text
    await attach(tally, a, GOOD)
    rs = await asyncio.gather(
        *[tally.http.post(url, json={"amount": "4"}, headers={**a.admin, **k}) for _ in range(3)]
    )
    assert {r.status_code for r in rs} == {201} and len({r.json()["id"] for r in rs}) == 1
    await wait_balance(a, "4.000000")
    assert len(await recharges(tally, a)) == 1


async def test_service_charges_and_purchases_need_their_roles(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=GOOD)
    agency = resold.agency
    body = {"key": uid("ch"), "owner": "company", "company_id": agency.cid, "amount": "1"}
    for h in (agency.admin, agency.user(resold.aid), tally.auth("product")):
        r = await tally.http.post(tally.url("recharge", "/v1/charges"), json=body, headers=h)
        assert err(r) == (403, "forbidden"), r.text
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")
    for h in (agency.user(resold.aid), tally.auth("product")):
        r = await tally.http.post(lic, json={"quantity": 1}, headers={**h, **key()})
        assert r.status_code in (403, 404), r.text
        r = await tally.http.post(
            tally.url("rebilling", f"/v1/accounts/{resold.aid}/licenses"), json={"quantity": 1}, headers=h
        )
        assert r.status_code in (403, 404), r.text
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{resold.aid}/subscriptions"),
        json={"product": "whatsapp", "deployment": "resell"},
        headers={**tally.auth("product"), **key()},
    )
    assert r.status_code == 403, r.text
    assert (await tally.http.get(lic, headers=agency.admin)).json()["total"] == 0
    assert await resold.subscriptions() == []
    assert await resold.charges() == []


async def test_other_tenants_prices_and_settings_are_404_whatever_the_body(tally: Tally) -> None:
    """FINDING (low, pre-existing, same class as the credit request's): seat price, reselling
    price, rebilling markups and usage alerts check the body before the tenant."""
    a = await Reseller(tally).create()
    b = await Reseller(tally).create()
    aid = await a.account()
    await known_account(tally, a, aid, "notifier")
    failures = []
    for service, method, path, body in [
        ("rebilling", "PUT", f"/v1/companies/{a.cid}/seat-price", {"amount": "abc"}),
        ("rebilling", "PUT", f"/v1/companies/{a.cid}/reselling/whatsapp", {"company_price": "-1"}),
        (
            "rebilling",
            "PUT",
            f"/v1/accounts/{aid}/rebilling",
            {"mode": "rebill_markup", "markups": {"default": "99"}},
        ),
        (
            "notifier",
            "PUT",
            f"/v1/accounts/{aid}/usage-alerts",
            {"conditions": [{"threshold": "0", "period": "daily"}]},
        ),
    ]:
        r = await tally.http.request(method, tally.url(service, path), json=body, headers=b.admin)
        if err(r) != (404, "not_found"):
            failures.append(f"{method} {path}: {r.status_code} {r.text}")
    assert failures == [], "\n".join(failures)


# --- 7. rebilling: subscriptions and licenses with keys -------------------------------------


async def test_a_subscription_replayed_after_its_cancellation_is_the_first_response(tally: Tally) -> None:
    resold = await Resold(tally).create(account_card=GOOD)
    k = uid("k")
    first = await resold.subscribe(key=k)
    assert first.status_code == 201, first.text
    r = await tally.http.delete(
        tally.url("rebilling", f"/v1/subscriptions/{first.json()['id']}"), headers=resold.agency.admin
    )
    assert r.status_code == 200 and r.json()["cancel_at_period_end"], r.text
    again = await resold.subscribe(key=k)
    assert (again.status_code, again.json()) == (201, first.json())
    other = await resold.subscribe(deployment="direct", key=k)
    assert err(other) == (422, "idempotency_key_reused"), other.text
    assert len(await resold.subscriptions()) == 1
    assert len(await resold.charges()) == 2


async def test_a_declined_license_purchase_replays_its_402_and_charges_nothing_more(tally: Tally) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    await agency.patch_wallet({"auto_recharge": False})
    await resold.card(DECLINES)
    lic = tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses")
    k = key()
    first = await tally.http.post(lic, json={"quantity": 2}, headers={**agency.admin, **k})
    assert err(first) == (402, "payment_failed"), first.text
    rs = await asyncio.gather(
        *[tally.http.post(lic, json={"quantity": 2}, headers={**agency.admin, **k}) for _ in range(5)]
    )
    assert all((r.status_code, r.json()) == (402, first.json()) for r in rs), [r.text for r in rs]
    await resold.card(GOOD)
    again = await tally.http.post(lic, json={"quantity": 2}, headers={**agency.admin, **k})
    assert (again.status_code, again.json()) == (402, first.json())
    pool = (await tally.http.get(lic, headers=agency.admin)).json()
    assert pool["total"] == 0, pool
    pid = first.json()["error"]["details"][0]["id"]
    tries = [
        i
        for i in await payment_intents(tally)
        if (i.get("metadata") or {}).get("tally_attempt") == f"licenses-{pid}"
    ]
    assert all(i["status"] != "succeeded" for i in tries)
    fresh = await tally.http.post(lic, json={"quantity": 2}, headers={**agency.admin, **key()})
    assert fresh.status_code == 201, fresh.text
    assert (await tally.http.get(lic, headers=agency.admin)).json()["total"] == 2


async def test_an_account_user_cannot_read_its_rebilling_markups(tally: Tally) -> None:
    """FINDING (pre-existing): GET /v1/accounts/{aid}/rebilling is company_admin only
    (API.md), and the wallet hides markups from account users; rebilling shows them."""
    a = await Reseller(tally).create()
    aid = await a.account()
    await a.add_card(aid)
    r = await a.set_rebilling(aid, "rebill_markup", {"default": "2.5"})
    assert r.status_code == 200, r.text
    r = await tally.http.get(tally.url("rebilling", f"/v1/accounts/{aid}/rebilling"), headers=a.user(aid))
    assert r.status_code in (403, 404), r.text


# --- 8. last: the shared manual-credits system wallet ----------------------------------------


async def test_one_company_cannot_stop_every_other_companys_manual_credits(tally: Tally) -> None:
    """FINDING: every manual credit and approved credit request of a currency is drawn from one
    system wallet shared by all companies; a company admin crediting its own accounts huge
    amounts drives that wallet to the BIGINT floor, after which every other company's credits
    (and approvals) in that currency fail with a 500. Runs last, in a currency of its own."""
    currency = "XTS"  # the ISO code for testing: no other test uses it
    attacker = await company_with_currency(tally, currency)
    victim = await company_with_currency(tally, currency)
    pockets = [await attacker.account() for _ in range(3)]
    target = await victim.account()
    for aid in [*pockets]:
        await known_account(tally, attacker, aid)
    await known_account(tally, victim, target)
    # just under the largest amount accepted; nine of them, then the rest down to the floor
    big = "999999999999.999999"
    floor = 2**63  # -floor is the smallest BIGINT
    amounts = [big] * 9
    rest = floor - 9 * (10**18 - 1)
    amounts.append(f"{rest // 10**6}.{rest % 10**6:06d}")
    for n, amount in enumerate(amounts):
        aid = pockets[n // 4]  # no one account holds more than a BIGINT either
        r = await tally.http.post(
            tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits"),
            json={"amount": amount},
            headers=attacker.admin,
        )
        assert r.status_code in (201, 422), r.text
    failures = []
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{target}/wallet/credits"),
        json={"amount": "1"},
        headers=victim.admin,
    )
    if r.status_code != 201:
        failures.append(f"the victim's credit of 1: {r.status_code} {r.text}")
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{target}/credit-requests"),
        json={"amount": "1"},
        headers=victim.user(target),
    )
    assert r.status_code == 201, r.text
    r = await tally.http.post(
        tally.url("wallet", f"/v1/credit-requests/{r.json()['id']}/approve"), headers=victim.admin
    )
    if r.status_code != 200:
        failures.append(f"the victim's approval of a request for 1: {r.status_code} {r.text}")
    assert failures == [], "\n".join(failures)


async def test_a_credit_beyond_what_a_wallet_holds_is_refused_not_a_500(tally: Tally) -> None:
    """FINDING (low): each credit is under the per-amount cap, but the sum is not checked
    against what a wallet (BIGINT micros) holds: the overflowing credit is a 500."""
    agency = await company_with_currency(tally, "XXX")
    aid = await agency.account()
    await known_account(tally, agency, aid)
    url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    statuses = []
    for _ in range(10):
        r = await tally.http.post(url, json={"amount": "999999999999.999999"}, headers=agency.admin)
        statuses.append(r.status_code)
    assert 500 not in statuses, statuses

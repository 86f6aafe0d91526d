"""No one gets in: bad tokens, other tenants, wrong roles, SQL metacharacters, secrets in logs,
and ingestion rate limits — against the running services."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import jwt
import orjson

from tests.support.builders import Reseller
from tests.support.stack import Tally, eventually, uid

SECRET = "tally-dev-secret-change-me-in-production"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def forged(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"sub": "x", "exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


def alg_none(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_bad_tokens_are_401_everywhere(tally: Tally) -> None:
    good = {"sub": "x", "role": "platform_admin", "exp": int(time.time()) + 600}
    tokens = {
        "wrong secret": forged({"role": "platform_admin"}, secret="not-the-secret-" * 3),
        "expired": forged({"role": "platform_admin", "exp": int(time.time()) - 10}),
        "alg none": alg_none(good),
        "no role": forged({}),
        "unknown role": forged({"role": "root"}),
        "company admin without company": forged({"role": "company_admin"}),
        "account user without account": forged({"role": "account_user", "company_id": "c"}),
        "not a jwt": "hello",
    }
    endpoints = [
        ("usage-meter", "GET", "/v1/prices"),
        ("wallet", "GET", "/v1/companies/c/wallet"),
        ("recharge", "GET", "/v1/companies/c/payment-methods"),
        ("rebilling", "GET", "/v1/companies/c"),
        ("notifier", "GET", "/v1/companies/c/notifications"),
    ]
    for name, token in tokens.items():
        for service, method, path in endpoints:
            r = await tally.http.request(method, tally.url(service, path), headers=bearer(token))
            assert r.status_code == 401, (name, service, r.text)
            assert r.json()["error"]["code"] == "unauthorized"


async def test_tenant_isolation_matrix(tally: Tally) -> None:
    a = await Reseller(tally).create()
    mine = await a.account()
    sibling = await a.account()
    b = await Reseller(tally).create()
    await a.fund("5")
    # Requests that a company admin of A may make; another tenant must never get data.
    matrix: list[tuple[str, str, str, Any]] = [
        ("wallet", "GET", f"/v1/companies/{a.cid}/wallet", None),
        ("wallet", "PATCH", f"/v1/companies/{a.cid}/wallet", {"threshold": "1"}),
        ("wallet", "GET", f"/v1/companies/{a.cid}/wallet/transactions", None),
        ("wallet", "GET", f"/v1/accounts/{mine}/wallet", None),
        ("wallet", "PATCH", f"/v1/accounts/{mine}/wallet", {"threshold": "1"}),
        ("wallet", "GET", f"/v1/accounts/{mine}/wallet/transactions", None),
        ("wallet", "POST", f"/v1/accounts/{mine}/wallet/credits", {"amount": "1"}),
        ("wallet", "GET", f"/v1/companies/{a.cid}/credit-requests", None),
        ("recharge", "GET", f"/v1/companies/{a.cid}/payment-methods", None),
        ("recharge", "POST", f"/v1/companies/{a.cid}/wallet/top-ups", {"amount": "1"}),
        ("recharge", "GET", f"/v1/companies/{a.cid}/wallet/recharges", None),
        ("recharge", "GET", f"/v1/accounts/{mine}/payment-methods", None),
        ("recharge", "GET", f"/v1/accounts/{mine}/wallet/recharges", None),
        ("rebilling", "GET", f"/v1/companies/{a.cid}", None),
        ("rebilling", "GET", f"/v1/accounts/{mine}", None),
        ("rebilling", "GET", f"/v1/accounts/{mine}/rebilling", None),
        ("rebilling", "PUT", f"/v1/accounts/{mine}/rebilling", {"mode": "off"}),
        ("rebilling", "GET", f"/v1/companies/{a.cid}/reselling", None),
        ("rebilling", "GET", f"/v1/companies/{a.cid}/licenses", None),
        ("rebilling", "POST", f"/v1/accounts/{mine}/licenses", {"quantity": 1}),
        ("rebilling", "POST", f"/v1/accounts/{mine}/invitations", {"email": "x@example.com"}),
        ("rebilling", "GET", f"/v1/accounts/{mine}/members", None),
        ("rebilling", "GET", f"/v1/companies/{a.cid}/reselling/report?period=2026-01", None),
        ("notifier", "GET", f"/v1/accounts/{mine}/usage-alerts", None),
        ("notifier", "GET", f"/v1/accounts/{mine}/usage?period=daily", None),
        ("notifier", "GET", f"/v1/companies/{a.cid}/notifications", None),
    ]
    outsiders = {
        "another company's admin": b.admin,
        "a user of a sibling account": a.user(sibling),
        "a user of another company": b.user(await b.account()),
    }

    async def known() -> bool:  # every service has heard of the accounts
        r = await tally.http.get(tally.url("notifier", f"/v1/accounts/{mine}/usage-alerts"), headers=a.admin)
        return r.status_code == 200

    await eventually(known, what="the accounts to reach every service")
    for who, headers in outsiders.items():
        for service, method, path, body in matrix:
            r = await tally.http.request(method, tally.url(service, path), headers=headers, json=body)
            assert r.status_code in (403, 404), (who, method, path, r.status_code, r.text)
            assert set(r.json()) == {"error"} and r.json()["error"]["code"] in ("not_found", "forbidden"), (
                who,
                path,
            )
    # The owner itself is let in (the matrix is not vacuous).
    for service, method, path, body in matrix[:6]:
        r = await tally.http.request(method, tally.url(service, path), headers=a.admin, json=body)
        assert r.status_code < 300, (path, r.text)
    # Wrong roles: a product token cannot act as an admin; a user cannot set rebilling.
    r = await tally.http.patch(
        tally.url("wallet", f"/v1/companies/{a.cid}/wallet"),
        json={"threshold": "1"},
        headers=tally.auth("product"),
    )
    assert r.status_code == 403
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/accounts/{mine}/rebilling"), json={"mode": "off"}, headers=a.user(mine)
    )
    assert r.status_code == 403


async def test_sql_metacharacters_are_stored_or_rejected_never_executed(tally: Tally) -> None:
    agency = await Reseller(tally).create(connect=False)  # credit requests need no Stripe
    aid = await agency.account()
    evil = "x'; DROP TABLE transfers; --"
    r = await tally.post_usage(
        {"event_id": evil, "company_id": agency.cid, "service": "email", "quantity": "1"}
    )
    assert r.status_code == 422  # outside the id pattern: rejected
    r = await tally.http.get(tally.url("wallet", f"/v1/companies/{evil}/wallet"), headers=agency.admin)
    assert r.status_code == 422  # path ids follow the id pattern too

    async def credited() -> bool:  # once the wallet has heard of the account
        r = await tally.http.post(
            tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits"),
            json={"amount": "1", "reference": evil},
            headers=agency.admin,
        )
        return r.status_code == 201

    await eventually(credited, what="the credit")
    lines = (
        await tally.http.get(
            tally.url("wallet", f"/v1/accounts/{aid}/wallet/transactions"), headers=agency.admin
        )
    ).json()["items"]
    assert lines[0]["reference"] == evil  # stored verbatim
    again = await tally.http.get(  # and the ledger still answers, with the line in it
        tally.url("wallet", f"/v1/accounts/{aid}/wallet/transactions"), headers=agency.admin
    )
    assert again.status_code == 200 and again.json()["items"][0]["reference"] == evil
    r = await tally.http.post(
        tally.url("wallet", f"/v1/accounts/{aid}/credit-requests"),
        json={"amount": "1", "reference": evil},
        headers=agency.user(aid),
    )
    assert r.status_code == 201 and r.json()["reference"] == evil


async def test_ingestion_is_rate_limited_per_product_token(tally: Tally) -> None:
    token = {"Authorization": "Bearer " + forged({"role": "product", "sub": uid("product")})}
    cid = uid("co")

    async def post(n: int) -> httpx.Response:
        batch = [
            {"event_id": uid(f"rl{n}"), "company_id": cid, "service": "email", "quantity": "1"}
            for _ in range(1000)
        ]
        url = tally.url("usage-meter", "/v1/usage")
        return await tally.http.post(url, json={"events": batch}, headers=token)

    # 10 x 1000 events at once against a burst of 5000 and 2000 a second: one after another,
    # a slow machine takes over half a second a request and the bucket never empties (CI,
    # 2026-12-05); at once, the bucket refills by less than 5000 before the last arrives.
    answers = await asyncio.gather(*(post(n) for n in range(10)))
    statuses = sorted(r.status_code for r in answers)
    assert 202 in statuses and 429 in statuses and set(statuses) == {202, 429}, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited"
            assert int(r.headers["Retry-After"]) >= 1
    other = {"Authorization": "Bearer " + forged({"role": "product", "sub": uid("product")})}
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/usage"),
        headers=other,
        json={"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"},
    )
    assert r.status_code == 202  # another token is not affected


async def test_secrets_and_card_data_never_reach_the_logs(tally: Tally) -> None:
    secrets = [
        "tally-dev-secret-change-me-in-production",
        "sk_test_tally",
        "whsec_tally_dev",
        "4242424242424242",
        "4000000000000341",
        "Bearer ey",
    ]
    token = tally.auth("platform_admin")["Authorization"].split()[1]
    checked = 0
    for service in ("usage-meter", "wallet", "recharge", "rebilling", "notifier"):
        text = (tally.stack.logs / f"{service}.log").read_text(errors="replace")
        assert text, service
        checked += len(text)
        for secret in [*secrets, token[:40]]:
            assert secret not in text, f"{secret[:12]}… in the {service} log"
    assert checked > 10_000  # the services did log plenty

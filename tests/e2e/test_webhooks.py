"""Outbound webhooks through the public API, against a real receiver (``tests/support/receiver``)
that verifies every Standard Webhooks signature with its own implementation: a company hears
its wallet, recharge, credit-request, subscription and usage-alert events, signed, through a
receiver outage, each event once (``webhook-id`` dedupes the retries); another company's
endpoint hears none of them, whatever a forged record names; bad input is the API.md error and
changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from tally import events
from tests.support.builders import GOOD, Reseller, Resold
from tests.support.receiver import Receiver, verify
from tests.support.stack import Tally, eventually, uid


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain predicate as ``eventually`` polls it."""

    async def check() -> bool:
        return predicate()

    return check


def hooks_url(tally: Tally, path: str) -> str:
    return tally.url("notifier", path)


async def register(
    tally: Tally, agency: Reseller, receiver: Receiver, path: str, types: list[str] | None = None
) -> dict[str, Any]:
    """Register an endpoint once the notifier knows the company; the receiver learns its secret."""

    async def created() -> dict[str, Any] | None:
        r = await tally.http.post(
            hooks_url(tally, f"/v1/companies/{agency.cid}/webhook-endpoints"),
            json={"url": receiver.url(path), "event_types": types or ["*"]},
            headers=agency.admin,
        )
        if r.status_code == 404:
            return None  # the notifier has not heard of the company yet
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    endpoint = await eventually(created, what="the endpoint registered")
    assert endpoint["secret"].startswith("whsec_") and endpoint["status"] == "enabled"
    receiver.secrets[path] = endpoint["secret"]
    return endpoint


async def deliveries(tally: Tally, agency: Reseller, eid: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 100, **params, **({"cursor": cursor} if cursor else {})}
        r = await tally.http.get(
            hooks_url(tally, f"/v1/webhook-endpoints/{eid}/deliveries"), params=query, headers=agency.admin
        )
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if not cursor:
            return items


async def test_a_company_hears_its_own_events_signed_through_an_outage(
    tally: Tally, receiver: Receiver
) -> None:
    resold = Resold(tally)
    agency = resold.agency
    await agency.create()
    hook = await register(tally, agency, receiver, "/resold")
    other = await Reseller(tally).create(connect=False)
    other_hook = await register(tally, other, receiver, "/other")

    # the resold agency's life: settings, cards, an account, a subscription, a top-up, usage
    await agency.patch_wallet({"auto_recharge": False})
    await resold.card(GOOD)
    resold.aid = await agency.account()
    await agency.patch_wallet({"auto_recharge": False}, resold.aid)
    await resold.card(GOOD, account=True)
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/reselling/whatsapp"),
        json={"company_price": "15"},
        headers=agency.admin,
    )
    assert r.status_code == 200, r.text
    r = await resold.subscribe()
    assert r.status_code == 201 and r.json()["charge"] == "charged", r.text

    async def seen(*types: str, path: str = "/resold") -> bool:
        got = {x.type for x in receiver.received if x.path == path}
        return set(types) <= got

    await eventually(
        lambda: seen("subscription.charged", "payment_method.attached", "account.created"),
        what="subscription, card and account events",
    )

    # the receiver goes down; the company tops up and uses the service meanwhile
    await receiver.stop()
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/top-ups"),
        json={"amount": "20"},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    r = await tally.http.put(
        hooks_url(tally, f"/v1/accounts/{resold.aid}/usage-alerts"),
        json={"enabled": True, "conditions": [{"threshold": "0.01", "period": "daily"}]},
        headers=agency.admin,
    )
    assert r.status_code == 200, r.text
    await agency.use(resold.aid, "sms", "10")

    async def failed_while_down() -> bool:
        return any(
            d["attempts"] >= 1 and d["status"] == "pending"
            for d in await deliveries(tally, agency, hook["id"])
        )

    await eventually(failed_while_down, what="attempts failing while the receiver is down")
    await asyncio.sleep(1)
    await receiver.start()  # the same port
    await eventually(
        lambda: seen("recharge.succeeded", "wallet.credited", "wallet.debited", "usage_alert.triggered"),
        timeout=60,
        what="the outage's events delivered",
    )

    async def all_delivered() -> list[dict[str, Any]] | None:
        items = await deliveries(tally, agency, hook["id"])
        return items if items and all(d["status"] == "succeeded" for d in items) else None

    items = await eventually(all_delivered, timeout=60, what="every delivery succeeded")
    # every delivery reached the receiver once, verified; nothing else did
    assert sorted(receiver.ids("/resold")) == sorted(d["event_id"] for d in items)
    assert receiver.refused == []
    assert any(d["attempts"] > 1 for d in items)  # the outage was retried, not skipped
    types = {d["event_type"] for d in items}
    assert {"subscription.charged", "recharge.succeeded", "wallet.debited", "usage_alert.triggered"} <= types
    for got in receiver.received:
        if got.path == "/resold":
            assert got.body["data"]["company_id"] == agency.cid, got.body
            assert got.headers["webhook-id"] == got.body["id"]
    # the other company's endpoint hears its own events only (its creation may still arrive)
    theirs = await deliveries(tally, other, other_hook["id"])
    assert not {d["event_id"] for d in theirs} & {d["event_id"] for d in items}
    assert {x.body["data"]["company_id"] for x in receiver.received if x.path == "/other"} <= {other.cid}

    # the log: every attempt with its answer; a manual retry sends the same id once more
    done = items[0]
    r = await tally.http.get(hooks_url(tally, f"/v1/webhook-deliveries/{done['id']}"), headers=agency.admin)
    assert r.status_code == 200 and r.json()["attempt_log"][-1]["response_code"] == 200, r.text
    r = await tally.http.post(
        hooks_url(tally, f"/v1/webhook-deliveries/{done['id']}/retry"), headers=agency.admin
    )
    assert r.status_code == 202, r.text
    await eventually(holds(lambda: receiver.duplicates >= 1), what="the manual retry")
    assert receiver.ids("/resold").count(done["event_id"]) == 1  # deduped on webhook-id

    # a replayed request (old timestamp) and a forged body are refused by the receiver
    sample = next(x for x in receiver.received if x.path == "/resold")
    body = orjson.dumps(sample.body)
    old = {**sample.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    assert verify(receiver.secrets["/resold"], old, body) == "timestamp outside tolerance"
    async with httpx.AsyncClient() as client:
        headers = {k: v for k, v in sample.headers.items() if k.startswith("webhook-")}
        forged = await client.post(
            receiver.url("/resold"), content=body.replace(b"20", b"90"), headers=headers
        )
    assert forged.status_code == 401
    assert sample.body in [x.body for x in receiver.received]


async def test_a_credit_request_and_its_approval_reach_the_company(tally: Tally, receiver: Receiver) -> None:
    agency = await Reseller(tally).create(connect=False)
    hook = await register(
        tally, agency, receiver, "/credits", ["credit_request.created", "credit_request.resolved"]
    )
    aid = await agency.account()

    async def requested() -> dict[str, Any] | None:
        r = await tally.http.post(
            tally.url("wallet", f"/v1/accounts/{aid}/credit-requests"),
            json={"amount": "7.5", "reference": "march"},
            headers=agency.user(aid),
        )
        return r.json() if r.status_code == 201 else None

    request = await eventually(requested, what="the credit request")
    r = await tally.http.post(
        tally.url("wallet", f"/v1/credit-requests/{request['id']}/approve"), headers=agency.admin
    )
    assert r.status_code == 200, r.text
    await eventually(holds(lambda: len(receiver.ids("/credits")) == 2), what="both credit request events")
    created, resolved = sorted(receiver.received, key=lambda x: x.type)
    assert (created.type, resolved.type) == ("credit_request.created", "credit_request.resolved")
    assert (
        created.body["data"]["amount_micros"] == 7_500_000 and resolved.body["data"]["status"] == "approved"
    )
    assert {d["event_type"] for d in await deliveries(tally, agency, hook["id"])} == {
        "credit_request.created",
        "credit_request.resolved",
    }


async def test_forged_records_naming_another_tenant_reach_no_one(tally: Tally, receiver: Receiver) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    hook_a = await register(tally, a, receiver, "/a")
    hook_b = await register(tally, b, receiver, "/b")
    account_of_b = await b.account()
    await eventually(lambda: _known_account(tally, b, account_of_b), what="the notifier to learn b's account")

    def credited(company: str, account: str | None) -> dict[str, Any]:
        data = events.WalletCredited(
            wallet_id=uid("w"),
            owner="account" if account else "company",
            company_id=company,
            account_id=account,
            currency="USD",
            transfer_id=uid("t"),
            kind="manual_credit",
            amount_micros=1_000_000,
            balance_micros=1_000_000,
        )
        return events.envelope("wallet.credited", data, source="forger", id_=uid("forged"))

    naming_b_account = credited(a.cid, account_of_b)  # "a's event" about b's account
    keyed_wrong = credited(b.cid, None)  # b's event, keyed by a
    await tally.produce(events.Topics.WALLET_EVENTS, naming_b_account, key=a.cid)
    await tally.produce(events.Topics.WALLET_EVENTS, keyed_wrong, key=a.cid)
    honest = credited(a.cid, None)
    await tally.produce(events.Topics.WALLET_EVENTS, honest, key=a.cid)  # after both: a marker
    await eventually(holds(lambda: honest["id"] in receiver.ids("/a")), what="the honest event")

    async def dropped() -> bool:
        items = await deliveries(tally, a, hook_a["id"])
        return any(d["event_id"] == naming_b_account["id"] and d["status"] == "dropped" for d in items)

    await eventually(dropped, what="the forged delivery dropped")
    # a hears the honest event and its own (its creation may arrive too), never the forged
    assert honest["id"] in receiver.ids("/a")
    assert not {naming_b_account["id"], keyed_wrong["id"]} & set(receiver.ids("/a"))
    assert {x.body["data"]["company_id"] for x in receiver.received if x.path == "/a"} == {a.cid}
    # b hears its own events (its account's creation), never the forged ones
    forged = {naming_b_account["id"], keyed_wrong["id"]}
    assert not forged & {d["event_id"] for d in await deliveries(tally, b, hook_b["id"])}
    assert not forged & set(receiver.ids("/b"))
    assert {x.body["data"]["company_id"] for x in receiver.received if x.path == "/b"} <= {b.cid}


async def _known_account(tally: Tally, agency: Reseller, aid: str) -> bool:
    r = await tally.http.get(hooks_url(tally, f"/v1/accounts/{aid}/usage-alerts"), headers=agency.admin)
    return r.status_code == 200


async def test_bad_input_is_refused_and_changes_nothing(tally: Tally, receiver: Receiver) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    hook_b = await register(tally, b, receiver, "/b")
    url = hooks_url(tally, f"/v1/companies/{a.cid}/webhook-endpoints")
    cases = [
        ({"url": "ftp://example.com/x", "event_types": ["*"]}, "invalid_url"),
        ({"url": "http://127.0.0.1:1/" + "x" * 2000, "event_types": ["*"]}, "invalid_url"),
        ({"url": "http://user:pw@127.0.0.1:1/", "event_types": ["*"]}, "invalid_url"),
        ({"url": "http://no-such-host.invalid/", "event_types": ["*"]}, "invalid_url"),
        ({"url": receiver.url("/a"), "event_types": ["wallet.exploded"]}, "unknown_event_type"),
        ({"url": receiver.url("/a"), "event_types": []}, "validation_error"),
        ({"url": receiver.url("/a"), "event_types": ["*"], "secret": "mine"}, "validation_error"),
    ]
    for body, code in cases:
        r = await tally.http.post(url, json=body, headers=a.admin)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, (body, r.text)
    # another company: its endpoints cannot be registered, seen, changed, tested or deleted
    r = await tally.http.post(
        hooks_url(tally, f"/v1/companies/{b.cid}/webhook-endpoints"),
        json={"url": receiver.url("/x"), "event_types": ["*"]},
        headers=a.admin,
    )
    assert r.status_code == 404, r.text
    eid = hook_b["id"]
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/v1/webhook-endpoints/{eid}", None),
        ("PATCH", f"/v1/webhook-endpoints/{eid}", {"enabled": False}),
        ("DELETE", f"/v1/webhook-endpoints/{eid}", None),
        ("POST", f"/v1/webhook-endpoints/{eid}/test", None),
        ("GET", f"/v1/webhook-endpoints/{eid}/deliveries", None),
        ("GET", f"/v1/companies/{b.cid}/webhook-endpoints", None),
    ]
    for method, path, payload in calls:
        r = await tally.http.request(method, hooks_url(tally, path), json=payload, headers=a.admin)
        assert r.status_code == 404, (method, path, r.text)
    aid = await a.account()
    r = await tally.http.post(
        url, json={"url": receiver.url("/a"), "event_types": ["*"]}, headers=a.user(aid)
    )
    assert r.status_code == 403, r.text
    r = await tally.http.get(url, headers=a.admin)
    assert r.status_code == 200 and r.json()["items"] == [], r.text
    r = await tally.http.get(hooks_url(tally, f"/v1/webhook-endpoints/{eid}"), headers=b.admin)
    assert r.status_code == 200 and r.json()["status"] == "enabled" and "secret" not in r.json()

    # Idempotency-Key: the same answer (and one endpoint) again; another body is refused
    keyed = {**a.admin, "Idempotency-Key": uid("k")}
    body = {"url": receiver.url("/a"), "event_types": ["wallet.credited"]}
    first = await tally.http.post(url, json=body, headers=keyed)
    again = await tally.http.post(url, json=body, headers=keyed)
    other = await tally.http.post(url, json={**body, "event_types": ["*"]}, headers=keyed)
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    listed = (await tally.http.get(url, headers=a.admin)).json()["items"]
    assert [e["id"] for e in listed] == [first.json()["id"]]

    # a test event reaches that endpoint only; a deleted endpoint is gone
    receiver.secrets["/a"] = first.json()["secret"]
    r = await tally.http.post(
        hooks_url(tally, f"/v1/webhook-endpoints/{first.json()['id']}/test"), headers=a.admin
    )
    assert r.status_code == 202 and r.json()["event_type"] == "webhook.test", r.text
    await eventually(
        holds(lambda: "webhook.test" in {x.type for x in receiver.received}), what="the test event"
    )
    r = await tally.http.delete(
        hooks_url(tally, f"/v1/webhook-endpoints/{first.json()['id']}"), headers=a.admin
    )
    assert r.status_code == 204
    r = await tally.http.get(hooks_url(tally, f"/v1/webhook-endpoints/{first.json()['id']}"), headers=a.admin)
    assert r.status_code == 404

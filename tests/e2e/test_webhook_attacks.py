"""Attacks on the outbound webhooks from the public API and the topics: tenant crossings
(other tenants' ids on every route, every role, forged records), duplicates (redelivered
records, concurrent Idempotency-Keys, manual retries), stuck states (a slow receiver, an
endpoint deleted mid-flight, a notifier killed mid-delivery, a poison record), bad input on
every field (the API.md error body, nothing changed) and the signature, checked here with an
HMAC of our own.

The tests whose docstring starts "Fixed" each showed a defect the review of 2026-12-03 found
(the docstring says what happened); they pass since the fix. The poison-record test runs
last: before the fix it stopped the notifier's ``wallet.events`` webhook consumer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from tally import events
from tally.auth import issue_token
from tests.e2e.test_webhooks import _known_account, deliveries, holds, register
from tests.support.builders import Reseller
from tests.support.receiver import Receiver
from tests.support.stack import Tally, eventually, uid


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def hooks(tally: Tally, path: str) -> str:
    return tally.url("notifier", path)


def is_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    """The API.md error body, with this status (and code)."""
    assert r.status_code == status, (r.request.method, str(r.request.url), r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, r.text
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["details"], list)
    if code is not None:
        assert body["error"]["code"] == code, r.text


async def within(check: Callable[[], Awaitable[Any]], seconds: float) -> Any:
    """Poll ``check`` until it is truthy or ``seconds`` pass; its last value either way."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def delivery(tally: Tally, who: dict[str, str], did: str) -> dict[str, Any]:
    r = await tally.http.get(hooks(tally, f"/v1/webhook-deliveries/{did}"), headers=who)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def send_test(tally: Tally, who: dict[str, str], eid: str) -> dict[str, Any]:
    r = await tally.http.post(hooks(tally, f"/v1/webhook-endpoints/{eid}/test"), headers=who)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def my_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks v1, written here: HMAC-SHA256 of ``id.timestamp.body`` with the
    base64 key after ``whsec_``, base64 in ``v1,<sig>`` (space-separated list)."""
    key = base64.b64decode(secret[len("whsec_") :])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        part.startswith("v1,") and hmac.compare_digest(part[3:], expected)
        for part in headers["webhook-signature"].split(" ")
    )


class Recording(Receiver):
    """A receiver that also keeps every request as it came (headers, raw body), failed ones
    too, and answers ``fail_first`` requests with 503."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[tuple[dict[str, str], bytes, str]] = []
        self.fail_first = 0

    def _take(self, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.raw.append((headers, body, scope["path"]))
        if self.fail_first > 0:
            self.fail_first -= 1
            return 503, b"try later"
        return super()._take(scope, body)


# --- tenancy ------------------------------------------------------------------------------


async def test_other_tenants_ids_roles_and_tokens_on_every_route(tally: Tally, receiver: Receiver) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    hook_b = await register(tally, b, receiver, "/b", ["webhook.test"])
    sent = await send_test(tally, b.admin, hook_b["id"])
    await eventually(holds(lambda: len(receiver.ids("/b")) == 1), what="b's test event")
    done = await eventually(lambda: _succeeded(tally, b.admin, sent["id"]), what="b's delivery recorded")
    eid, did = hook_b["id"], sent["id"]
    routes: list[tuple[str, str, Any]] = [
        ("GET", f"/v1/webhook-endpoints/{eid}", None),
        ("PATCH", f"/v1/webhook-endpoints/{eid}", {"enabled": False}),
        ("PATCH", f"/v1/webhook-endpoints/{eid}", {"url": "ftp://nope"}),  # 404 before the URL check
        ("DELETE", f"/v1/webhook-endpoints/{eid}", None),
        ("POST", f"/v1/webhook-endpoints/{eid}/test", None),
        ("GET", f"/v1/webhook-endpoints/{eid}/deliveries", None),
        ("GET", f"/v1/webhook-endpoints/{eid}/deliveries?status=succeeded&limit=1", None),
        ("GET", f"/v1/webhook-deliveries/{did}", None),
        ("POST", f"/v1/webhook-deliveries/{did}/retry", None),
        ("GET", f"/v1/companies/{b.cid}/webhook-endpoints", None),
        (
            "POST",
            f"/v1/companies/{b.cid}/webhook-endpoints",
            {"url": receiver.url("/x"), "event_types": ["*"]},
        ),
    ]
    strangers = {
        "another company's admin": (a.admin, 404),
        "b's own account user": (b.user("ws-anything"), 403),
        "a product": (tally.auth("product"), 403),
        "no token": ({}, 401),
        "a token signed with another secret": (
            {"Authorization": "Bearer " + issue_token("platform_admin", secret="not-the-secret-" * 3)},
            401,
        ),
        "an expired platform admin": (
            {"Authorization": "Bearer " + issue_token("platform_admin", ttl_seconds=-60)},
            401,
        ),
    }
    for who, (headers, status) in strangers.items():
        for method, path, body in routes:
            r = await tally.http.request(method, hooks(tally, path), json=body, headers=headers)
            try:
                is_error(r, status)
            except AssertionError as exc:
                raise AssertionError(f"{who}: {exc}") from None
    # keyed: an Idempotency-Key does not turn another tenant's 404 into anything else
    r = await tally.http.post(
        hooks(tally, f"/v1/companies/{b.cid}/webhook-endpoints"),
        json={"url": receiver.url("/x"), "event_types": ["*"]},
        headers={**a.admin, "Idempotency-Key": uid("k")},
    )
    is_error(r, 404, "not_found")
    # nothing changed: b's endpoint, its one delivery, its receiver
    r = await tally.http.get(hooks(tally, f"/v1/webhook-endpoints/{eid}"), headers=b.admin)
    assert r.status_code == 200 and r.json()["status"] == "enabled", r.text
    assert (await delivery(tally, b.admin, did))["attempts"] == done["attempts"]
    r = await tally.http.get(hooks(tally, f"/v1/companies/{b.cid}/webhook-endpoints"), headers=b.admin)
    assert [e["id"] for e in r.json()["items"]] == [eid]
    await asyncio.sleep(0.3)
    assert receiver.requests == 1
    # the platform sees (and may act on) every tenant's endpoints
    admin = tally.auth("platform_admin")
    r = await tally.http.get(hooks(tally, f"/v1/webhook-deliveries/{did}"), headers=admin)
    assert r.status_code == 200 and r.json()["event_type"] == "webhook.test", r.text
    r = await tally.http.get(hooks(tally, f"/v1/companies/{b.cid}/webhook-endpoints"), headers=admin)
    assert r.status_code == 200 and "secret" not in r.json()["items"][0], r.text


async def _succeeded(tally: Tally, who: dict[str, str], did: str) -> dict[str, Any] | None:
    d = await delivery(tally, who, did)
    return d if d["status"] == "succeeded" else None


def _credited(company: str, *, account: str | None = None, wallet: str | None = None) -> dict[str, Any]:
    data = events.WalletCredited(
        wallet_id=wallet or (f"account:{account}" if account else f"company:{company}"),
        owner="account" if (account or wallet) else "company",
        company_id=company,
        account_id=account,
        currency="USD",
        transfer_id=uid("t"),
        kind="manual_credit",
        amount_micros=1_000_000,
        balance_micros=1_000_000,
    )
    return dict(events.envelope("wallet.credited", data, source="forger", id_=uid("forged")))


async def test_forged_records_naming_another_tenant_reach_no_one(tally: Tally, receiver: Receiver) -> None:
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    await register(tally, a, receiver, "/a")
    await register(tally, b, receiver, "/b")
    acct_b = await b.account()
    await eventually(lambda: _known_account(tally, b, acct_b), what="the notifier to learn b's account")

    claim = events.envelope(  # a claims b's existing account
        "account.created",
        events.AccountCreated(account_id=acct_b, company_id=a.cid, name="mine now", owner_email="x@a.test"),
        source="forger",
        id_=uid("forged"),
    )
    card_of_b = events.envelope(
        "payment_method.attached",
        events.PaymentMethodChanged(
            company_id=a.cid, account_id=acct_b, payment_method="pm_x", has_valid_card=True
        ),
        source="forger",
        id_=uid("forged"),
    )
    request_of_b = events.envelope(
        "credit_request.created",
        events.CreditRequestCreated(
            request_id="cr_x", company_id=a.cid, account_id=acct_b, amount_micros=1, currency="USD"
        ),
        source="forger",
        id_=uid("forged"),
    )
    forged = [
        (events.Topics.REBILLING_EVENTS, claim, a.cid),
        (events.Topics.RECHARGE_EVENTS, card_of_b, a.cid),
        (events.Topics.WALLET_EVENTS, request_of_b, a.cid),
        (events.Topics.WALLET_EVENTS, _credited(a.cid, account=acct_b), a.cid),
        (events.Topics.WALLET_EVENTS, _credited(b.cid), a.cid),  # b's event keyed by a
        (events.Topics.WALLET_EVENTS, _credited(a.cid), b.cid),  # a's event keyed by b
        (events.Topics.WALLET_EVENTS, _credited(a.cid), a.cid + " "),  # a near-miss key
        (events.Topics.WALLET_EVENTS, _credited(a.cid), None),  # no key
    ]
    for topic, envelope, key in forged:
        await tally.produce(topic, envelope, key=key)
    # the same (honest) record twice, then on another key's partition: one delivery
    honest = _credited(a.cid)
    for _ in range(2):
        await tally.produce(events.Topics.WALLET_EVENTS, honest, key=a.cid)
    markers = [  # one honest event per topic, after the forgeries on the same key
        (
            events.Topics.REBILLING_EVENTS,
            "license.changed",
            events.LicenseChanged(company_id=a.cid, total=1, assigned=0),
        ),
        (
            events.Topics.RECHARGE_EVENTS,
            "payment_method.detached",
            events.PaymentMethodChanged(company_id=a.cid, payment_method="pm_m", has_valid_card=False),
        ),
    ]
    marker_ids = []
    for topic, type_, data in markers:
        marker = events.envelope(type_, data, source="test", id_=uid("marker"))
        marker_ids.append(marker["id"])
        await tally.produce(topic, marker, key=a.cid)
    marker_ids.append(honest["id"])
    await eventually(
        holds(lambda: set(marker_ids) <= set(receiver.ids("/a"))), what="the markers after the forgeries"
    )
    await asyncio.sleep(0.5)
    forged_ids = {e["id"] for _, e, _ in forged}
    assert not forged_ids & set(receiver.ids("/a")), "a heard a forged record naming b"
    assert not forged_ids & set(receiver.ids("/b")), "b heard a forged record"
    assert receiver.ids("/a").count(honest["id"]) == 1 and receiver.duplicates == 0
    assert {x.body["data"]["company_id"] for x in receiver.received if x.path == "/b"} <= {b.cid}
    # b's account is still b's: b sees its alerts, a does not
    assert await _known_account(tally, b, acct_b)
    assert not await _known_account(tally, a, acct_b)


async def test_an_event_naming_another_tenants_wallet_reaches_the_forger(
    tally: Tally, receiver: Receiver
) -> None:
    """Was a defect (forged records): the tenant check at send time reads ``account_id`` only. A
    ``wallet.credited`` keyed and labelled as company a whose ``wallet_id`` is
    ``account:<b's account>`` (owner ``account``, no ``account_id``) is sent to a's endpoint.
    Every field naming an account (``wallet_id``, ``account_wallet_id``) should be checked,
    or an ``owner: account`` event without ``account_id`` refused."""
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    await register(tally, a, receiver, "/a")
    acct_b = await b.account()
    await eventually(lambda: _known_account(tally, b, acct_b), what="the notifier to learn b's account")
    naming = _credited(a.cid, wallet=f"account:{acct_b}")
    await tally.produce(events.Topics.WALLET_EVENTS, naming, key=a.cid)
    marker = _credited(a.cid)
    await tally.produce(events.Topics.WALLET_EVENTS, marker, key=a.cid)
    await eventually(holds(lambda: marker["id"] in receiver.ids("/a")), what="the marker")
    await asyncio.sleep(0.3)
    leaked = [x.body["data"] for x in receiver.received if x.id == naming["id"]]
    assert leaked == [], f"a's endpoint received an event about b's wallet: {leaked}"


async def test_a_preemptive_account_claim_leaks_the_real_owners_usage(
    tally: Tally, receiver: Receiver
) -> None:
    """Was a defect (forged records, made permanent by this feature): ``upsert_account`` now keeps
    the first company it hears for an account (``WHERE accounts.company_id =
    EXCLUDED.company_id``), while usage-meter, wallet and recharge keep the last. A record
    on ``rebilling.events`` claiming an account id for a *before* b creates it makes the
    notifier believe a forever: b's own ``account.created`` webhook is dropped ("account of
    another company"), b cannot set alerts on its account (404), and a can — a's endpoint
    then receives ``usage_alert.triggered`` with b's usage of b's account."""
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    await register(tally, a, receiver, "/a", ["usage_alert.triggered", "account.created"])
    hook_b = await register(tally, b, receiver, "/b", ["account.created"])
    x = uid("ws")
    claim = events.envelope(
        "account.created",
        events.AccountCreated(account_id=x, company_id=a.cid, name="claimed", owner_email=None),
        source="forger",
        id_=uid("forged"),
    )
    await tally.produce(events.Topics.REBILLING_EVENTS, claim, key=a.cid)
    await asyncio.sleep(1)  # the notifier asks rebilling, which never created x: not believed
    assert not await _known_account(tally, a, x)
    r = await tally.http.post(  # b creates the account x, as rebilling allows
        tally.url("rebilling", f"/v1/companies/{b.cid}/accounts"),
        json={"id": x, "name": "Client", "owner_email": f"{x}@example.com", "billing_model": "self_billing"},
        headers=b.admin,
    )
    assert r.status_code == 201, r.text
    r = await tally.http.put(
        hooks(tally, f"/v1/accounts/{x}/usage-alerts"),
        json={"enabled": True, "conditions": [{"threshold": "0.000001", "period": "daily"}]},
        headers=a.admin,
    )
    a_set_alerts_on_bs_account = r.status_code == 200
    admin = tally.auth("platform_admin")

    async def funded() -> bool:
        r = await tally.http.post(
            tally.url("wallet", f"/v1/companies/{b.cid}/wallet/credits"), json={"amount": "50"}, headers=admin
        )
        return r.status_code == 201

    await eventually(funded, what="b's wallet funded")

    async def used() -> bool:
        e = {"event_id": uid("ev"), "company_id": b.cid, "account_id": x, "service": "sms", "quantity": "3"}
        r = await tally.post_usage(e)
        return bool(r.json()["results"][0]["status"] == "accepted")

    await eventually(used, what="b's usage on its account accepted")

    async def leak() -> list[Any]:
        return [
            e.body["data"] for e in receiver.received if e.path == "/a" and e.type == "usage_alert.triggered"
        ]

    async def b_told() -> list[str]:
        return [d["status"] for d in await deliveries(tally, b, hook_b["id"]) if d["status"] != "pending"]

    leaked = await within(leak, 3)
    b_statuses = await within(b_told, 2)
    b_sees_its_account = await _known_account(tally, b, x)
    assert (leaked, b_statuses, b_sees_its_account, a_set_alerts_on_bs_account) == (
        [],
        ["succeeded"],
        True,
        False,
    ), "a heard b's usage / b's account.created not delivered / b cannot see its account / a set alerts on it"


# --- duplicates and idempotency -----------------------------------------------------------


async def test_concurrent_creations_one_key_one_endpoint_and_the_bound_holds(
    tally: Tally, receiver: Receiver
) -> None:
    c = await Reseller(tally).create(connect=False)
    first = await register(tally, c, receiver, "/c", ["wallet.credited"])
    url = hooks(tally, f"/v1/companies/{c.cid}/webhook-endpoints")
    body = {"url": receiver.url("/k"), "event_types": ["wallet.credited", "wallet.debited"]}
    keyed = {**c.admin, "Idempotency-Key": uid("key")}
    same = await asyncio.gather(*(tally.http.post(url, json=body, headers=keyed) for _ in range(8)))
    assert {r.status_code for r in same} == {201}, [r.text for r in same]
    assert len({r.content for r in same}) == 1  # the same answer, the same secret
    # another principal (sub) of the same company with the same key: its own endpoint
    other_sub = tally.auth("company_admin", sub="another-admin", company_id=c.cid)
    r = await tally.http.post(
        url, json=body, headers={**other_sub, "Idempotency-Key": keyed["Idempotency-Key"]}
    )
    assert r.status_code == 201 and r.json()["id"] != same[0].json()["id"], r.text
    # the same key for another route (another company's path) is a reused key, not a 201
    r = await tally.http.post(
        hooks(tally, f"/v1/companies/{c.cid}x/webhook-endpoints"), json=body, headers=keyed
    )
    assert r.status_code in (404, 422), r.text
    # 25 at once: exactly up to 20 endpoints, the rest 409 too_many_endpoints
    burst = await asyncio.gather(
        *(tally.http.post(url, json={**body, "event_types": ["*"]}, headers=c.admin) for _ in range(25))
    )
    created = [r for r in burst if r.status_code == 201]
    for r in burst:
        if r.status_code != 201:
            is_error(r, 409, "too_many_endpoints")
    assert len(created) == 20 - 3
    listed = (await tally.http.get(url, params={"limit": 200}, headers=c.admin)).json()["items"]
    assert len(listed) == 20 and first["id"] in {e["id"] for e in listed}
    paged, cursor = [], None  # pages of 7: every endpoint once, newest first
    while True:
        r = await tally.http.get(
            url, params={"limit": 7, **({"cursor": cursor} if cursor else {})}, headers=c.admin
        )
        paged += [e["id"] for e in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if not cursor:
            break
    assert paged == [e["id"] for e in listed]
    # a replay of the keyed request still answers its first response (and creates nothing)
    again = await tally.http.post(url, json=body, headers=keyed)
    assert again.status_code == 201 and again.content == same[0].content
    assert len((await tally.http.get(url, params={"limit": 200}, headers=c.admin)).json()["items"]) == 20


async def test_the_endpoint_bound_survives_disable_and_enable(tally: Tally, receiver: Receiver) -> None:
    """Fixed (review 2026-12-03):
    the bound of 20 endpoints per company counts *enabled* endpoints only
    (``listening_in``), and enabling one again (PATCH ``enabled: true``) checks nothing: disable
    one, create another, enable the first — 21 endpoints, all enabled (repeat for any number:
    every event then fans out to all of them). Disabled endpoints should count, or the enable
    should answer 409 ``too_many_endpoints``."""
    c = await Reseller(tally).create(connect=False)
    first = await register(tally, c, receiver, "/c", ["webhook.test"])
    url = hooks(tally, f"/v1/companies/{c.cid}/webhook-endpoints")
    body = {"url": receiver.url("/c"), "event_types": ["webhook.test"]}
    for _ in range(19):
        r = await tally.http.post(url, json=body, headers=c.admin)
        assert r.status_code == 201, r.text
    is_error(await tally.http.post(url, json=body, headers=c.admin), 409, "too_many_endpoints")
    r = await tally.http.patch(
        hooks(tally, f"/v1/webhook-endpoints/{first['id']}"), json={"enabled": False}, headers=c.admin
    )
    assert r.status_code == 200 and r.json()["status"] == "disabled", r.text
    extra = await tally.http.post(url, json=body, headers=c.admin)
    enable = await tally.http.patch(
        hooks(tally, f"/v1/webhook-endpoints/{first['id']}"), json={"enabled": True}, headers=c.admin
    )
    listed = (await tally.http.get(url, params={"limit": 200}, headers=c.admin)).json()["items"]
    enabled = [e for e in listed if e["status"] == "enabled"]
    assert len(enabled) <= 20, (
        f"{len(enabled)} endpoints enabled (create after a disable: {extra.status_code}, "
        f"enable again: {enable.status_code})"
    )


async def test_a_manual_retry_of_a_pending_delivery_keeps_its_retries(
    tally: Tally, receiver: Receiver
) -> None:
    """Fixed (review 2026-12-03):
    ``retry_now`` sets ``retry_until = now()`` whatever the delivery's state. A
    delivery still pending in its 24 h window (the receiver is down) that the company retries
    by hand is given up (``failed``) as soon as that one attempt fails: it is never sent again
    when the receiver comes back — the manual retry lost an event the automatic ones would
    have delivered. A manual retry of a pending delivery should not shorten its window."""
    c = await Reseller(tally).create(connect=False)
    hook = await register(tally, c, receiver, "/c", ["webhook.test"])
    receiver.status = 503
    sent = await send_test(tally, c.admin, hook["id"])

    async def failed_once() -> dict[str, Any] | None:
        d = await delivery(tally, c.admin, sent["id"])
        return d if d["attempts"] >= 1 else None

    before = await eventually(failed_once, what="a failed attempt")
    assert before["status"] == "pending"
    r = await tally.http.post(hooks(tally, f"/v1/webhook-deliveries/{sent['id']}/retry"), headers=c.admin)
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text

    async def retried() -> dict[str, Any] | None:
        d = await delivery(tally, c.admin, sent["id"])
        return d if d["attempts"] > before["attempts"] else None

    after = await eventually(retried, what="the manual attempt")
    receiver.status = 200
    final = await within(lambda: _succeeded(tally, c.admin, sent["id"]), 4)
    assert final, (
        f"after the manual retry failed: {after['status']}; never delivered once the receiver was back"
    )


# --- signatures ---------------------------------------------------------------------------


async def test_each_attempt_is_signed_with_the_same_id_and_body(tally: Tally) -> None:
    rec = Recording()
    await rec.start()
    try:
        c = await Reseller(tally).create(connect=False)
        d = await Reseller(tally).create(connect=False)
        hook = await register(tally, c, rec, "/c", ["webhook.test", "wallet.credited"])
        other = await register(tally, d, rec, "/d", ["webhook.test"])
        assert hook["secret"] != other["secret"]
        rec.fail_first = 2
        sent = await send_test(tally, c.admin, hook["id"])
        await eventually(holds(lambda: len(rec.received) == 1), what="the third attempt taken")
        attempts = [(h, b) for h, b, p in rec.raw if p == "/c"]
        assert len(attempts) == 3
        envelope = orjson.loads(attempts[0][1])
        assert envelope["id"] == sent["event_id"] and envelope["type"] == "webhook.test"
        assert envelope["data"] == {"company_id": c.cid, "endpoint_id": hook["id"]}
        for headers, body in attempts:
            assert headers["webhook-id"] == sent["event_id"] == envelope["id"]
            assert body == attempts[0][1]  # the same bytes every time
            assert my_verify(hook["secret"], headers, body)
            assert not my_verify(other["secret"], headers, body)  # per-endpoint secrets
            assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
            assert headers["content-type"] == "application/json"
        stamps = [int(h["webhook-timestamp"]) for h, _ in attempts]
        assert stamps == sorted(stamps)

        # the receiver has the third attempt before the notifier has written down its answer
        async def logged() -> dict[str, Any] | None:
            detail = await delivery(tally, c.admin, sent["id"])
            return detail if len(detail["attempt_log"]) == 3 else None

        detail = await eventually(logged, what="the third attempt in the delivery's log")
        assert [x["response_code"] for x in detail["attempt_log"]] == [503, 503, 200]
        assert detail["attempt_log"][0]["excerpt"] == "try later"
        # a tampered body, a replayed old timestamp: the signature no longer holds
        h, b = attempts[0]
        assert not my_verify(hook["secret"], h, b.replace(c.cid.encode(), d.cid.encode()))
        assert not my_verify(
            hook["secret"], {**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) - 1)}, b
        )
    finally:
        await rec.stop()


# --- stuck states -------------------------------------------------------------------------


async def test_a_slow_receiver_holds_up_every_other_tenants_webhooks(tally: Tally) -> None:
    """Was a defect (noisy neighbour): each round of the sender ``gather``s every endpoint it leased
    and starts the next round only when the slowest is done. One company whose receiver
    answers in 4 s (anything up to the 10 s timeout; 20 such endpoints fill every round)
    delays every other company's deliveries by as much. Another tenant's test event, queued
    while the slow attempt is in flight, should go out at once."""
    slow, fast = Receiver(delay=4.0), Receiver()
    await slow.start()
    await fast.start()
    try:
        a = await Reseller(tally).create(connect=False)
        b = await Reseller(tally).create(connect=False)
        hook_a = await register(tally, a, slow, "/a", ["webhook.test"])
        hook_b = await register(tally, b, fast, "/b", ["webhook.test"])
        await send_test(tally, a.admin, hook_a["id"])
        await eventually(holds(lambda: slow.in_flight == 1), what="a's attempt in flight")
        started = time.monotonic()
        await send_test(tally, b.admin, hook_b["id"])
        await eventually(holds(lambda: len(fast.received) == 1), timeout=15, what="b's test event")
        waited = time.monotonic() - started
        assert waited < 1.5, f"b's delivery waited {waited:.1f} s for a's slow receiver"
    finally:
        await slow.stop()
        await fast.stop()


async def test_an_endpoint_deleted_or_disabled_mid_flight_is_not_sent_to_again(tally: Tally) -> None:
    rec = Receiver(delay=1.0)
    await rec.start()
    try:
        c = await Reseller(tally).create(connect=False)
        gone = await register(tally, c, rec, "/gone", ["webhook.test"])
        paused = await register(tally, c, rec, "/paused", ["webhook.test"])
        rec.status = 500  # every attempt fails: each would be retried
        d_gone = await send_test(tally, c.admin, gone["id"])
        await eventually(holds(lambda: rec.in_flight == 1), what="the attempt in flight")
        r = await tally.http.delete(hooks(tally, f"/v1/webhook-endpoints/{gone['id']}"), headers=c.admin)
        assert r.status_code == 204
        await eventually(holds(lambda: rec.in_flight == 0), what="the attempt answered")
        d_paused = await send_test(tally, c.admin, paused["id"])
        await eventually(holds(lambda: rec.in_flight == 1), what="the attempt in flight")
        r = await tally.http.patch(
            hooks(tally, f"/v1/webhook-endpoints/{paused['id']}"), json={"enabled": False}, headers=c.admin
        )
        assert r.status_code == 200 and r.json()["status"] == "disabled"
        r = await tally.http.patch(
            hooks(tally, f"/v1/webhook-endpoints/{paused['id']}"), json={"enabled": True}, headers=c.admin
        )
        assert r.status_code == 200 and r.json()["status"] == "enabled" and r.json()["failing_since"] is None
        await eventually(holds(lambda: rec.in_flight == 0), what="the attempt answered")
        await asyncio.sleep(2.0)  # > the first backoffs (0.5 s ×4ⁿ, capped at 2 s)
        assert rec.requests == 2
        for did in (d_gone["id"], d_paused["id"]):
            d = await delivery(tally, c.admin, did)  # the log outlives its endpoint
            assert d["status"] == "dropped" and d["attempts"] == 1 and d["next_attempt_at"] is None, d
        # a dropped delivery of a deleted endpoint cannot be retried; of an enabled one it can
        r = await tally.http.post(
            hooks(tally, f"/v1/webhook-deliveries/{d_gone['id']}/retry"), headers=c.admin
        )
        is_error(r, 409, "endpoint_disabled")
        r = await tally.http.get(
            hooks(tally, f"/v1/webhook-endpoints/{gone['id']}/deliveries"), headers=c.admin
        )
        is_error(r, 404, "not_found")
        rec.status, rec.delay = 200, 0.0
        rec.secrets["/paused"] = paused["secret"]
        r = await tally.http.post(
            hooks(tally, f"/v1/webhook-deliveries/{d_paused['id']}/retry"), headers=c.admin
        )
        assert r.status_code == 202, r.text
        await eventually(holds(lambda: len(rec.ids("/paused")) == 1), what="the manual retry")
        assert rec.ids("/paused") == [d_paused["event_id"]]
    finally:
        await rec.stop()


async def test_a_credit_with_a_long_idempotency_key_is_never_delivered(
    tally: Tally, receiver: Receiver
) -> None:
    """Fixed (review 2026-12-03):
    a manual credit's ``wallet.credited`` id is ``manual:<wallet>:<digest>:<key>``;
    with an Idempotency-Key of 150+ characters (API.md allows 200) it is longer than the
    200 characters ``Message.id`` accepts, so the notifier's webhook consumer dead-letters a
    genuine event: the company never hears of the credit. (The same id is too long for every
    ``wallet.digest`` consumer too.)"""
    c = await Reseller(tally).create(connect=False)
    await register(tally, c, receiver, "/c", ["wallet.credited"])
    admin = tally.auth("platform_admin")
    url = tally.url("wallet", f"/v1/companies/{c.cid}/wallet/credits")

    async def credit(key: str) -> dict[str, Any] | None:
        r = await tally.http.post(url, json={"amount": "1"}, headers={**admin, "Idempotency-Key": key})
        return r.json() if r.status_code == 201 else None

    long = await eventually(lambda: credit("k" * 200), what="the long-keyed credit")
    short = await eventually(lambda: credit(uid("k")), what="the short-keyed credit")
    await eventually(holds(lambda: short["transfer_id"] in receiver.ids("/c")), what="the second credit")
    await asyncio.sleep(0.3)
    assert long["transfer_id"] in receiver.ids("/c"), (
        f"the credit {len(long['transfer_id'])}-character id was never delivered"
    )


async def test_a_latin1_key_or_an_idn_host_sticks_a_delivery_forever(
    tally: Tally, receiver: Receiver
) -> None:
    """Fixed (review 2026-12-03):
    a header value that is not ASCII makes httpx raise ``UnicodeEncodeError``,
    which ``WebhookSender.attempt`` does not catch: nothing is recorded, the delivery stays
    pending with 0 attempts forever (never given up, the endpoint never disabled) and every
    round of the sender raises. Two legitimate ways there: (1) a credit sent with an
    Idempotency-Key holding a latin-1 character (Starlette reads headers as latin-1; the
    key is in the event id, i.e. the ``webhook-id`` header); (2) an endpoint URL whose host
    is an IDN (it becomes the ``Host`` header unencoded) — here the fullwidth spelling of
    localhost, which resolves; ``https://bücher.example/`` would do the same."""
    c = await Reseller(tally).create(connect=False)
    hook = await register(tally, c, receiver, "/c", ["wallet.credited"])
    idn_url = f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{receiver.port}/idn"
    r = await tally.http.post(
        hooks(tally, f"/v1/companies/{c.cid}/webhook-endpoints"),
        json={"url": idn_url, "event_types": ["webhook.test"]},
        headers=c.admin,
    )
    assert r.status_code == 201, r.text
    idn = r.json()
    receiver.secrets["/idn"] = idn["secret"]
    try:
        auth = tally.auth("platform_admin")["Authorization"]
        url = tally.url("wallet", f"/v1/companies/{c.cid}/wallet/credits")

        async def credited() -> dict[str, Any] | None:
            r = await tally.http.post(
                url,
                json={"amount": "1"},
                headers=[
                    (b"authorization", auth.encode()),
                    (b"idempotency-key", b"cl\xe9-" + uid("k").encode()),
                ],
            )
            return r.json() if r.status_code == 201 else None

        await eventually(credited, what="the latin-1-keyed credit")
        test = await send_test(tally, c.admin, idn["id"])

        async def both_queued() -> list[dict[str, Any]] | None:
            items = await deliveries(tally, c, hook["id"])
            return items or None

        [latin] = await eventually(both_queued, what="the credit's delivery queued")
        await asyncio.sleep(2.5)
        got = {
            "latin-1 key": await delivery(tally, c.admin, latin["id"]),
            "idn host": await delivery(tally, c.admin, test["id"]),
        }
        stuck = {k: (d["status"], d["attempts"]) for k, d in got.items() if d["attempts"] == 0}
        assert stuck == {}, f"never attempted, never recorded: {stuck}"
    finally:
        for eid in (hook["id"], idn["id"]):  # drop the stuck deliveries: the sender recovers
            await tally.http.delete(hooks(tally, f"/v1/webhook-endpoints/{eid}"), headers=c.admin)


# --- bad input ----------------------------------------------------------------------------


async def test_bad_input_on_every_field_is_the_api_error_and_changes_nothing(
    tally: Tally, receiver: Receiver
) -> None:
    c = await Reseller(tally).create(connect=False)
    hook = await register(tally, c, receiver, "/c", ["webhook.test"])
    sent = await send_test(tally, c.admin, hook["id"])
    await eventually(lambda: _succeeded(tally, c.admin, sent["id"]), what="the test delivery")
    create = hooks(tally, f"/v1/companies/{c.cid}/webhook-endpoints")
    good = receiver.url("/new")
    bodies: list[tuple[Any, int, str | None]] = [
        ([good], 422, "validation_error"),
        ("just a string", 422, "validation_error"),
        ({}, 422, "validation_error"),
        ({"url": good}, 422, "validation_error"),
        ({"event_types": ["*"]}, 422, "validation_error"),
        ({"url": 5, "event_types": ["*"]}, 422, "validation_error"),
        ({"url": None, "event_types": ["*"]}, 422, "validation_error"),
        ({"url": [good], "event_types": ["*"]}, 422, "validation_error"),
        ({"url": good, "event_types": "*"}, 422, "validation_error"),
        ({"url": good, "event_types": [1]}, 422, "validation_error"),
        ({"url": good, "event_types": [None]}, 422, "validation_error"),
        ({"url": good, "event_types": [["*"]]}, 422, "validation_error"),
        ({"url": good, "event_types": ["*"] * 51}, 422, "validation_error"),
        ({"url": good, "event_types": ["wallet.credited"] * 10_000}, 422, "validation_error"),
        ({"url": good, "event_types": ["*"], "enabled": False}, 422, "validation_error"),
        ({"url": good, "event_types": ["*"], "secret": "whsec_mine"}, 422, "validation_error"),
        ({"url": good, "event_types": ["*"], "company_id": "other"}, 422, "validation_error"),
        ({"url": good, "event_types": ["Wallet.Credited"]}, 422, "unknown_event_type"),
        ({"url": good, "event_types": ["wallet.crédited"]}, 422, "unknown_event_type"),
        ({"url": good, "event_types": ["usage.recorded"]}, 422, "unknown_event_type"),  # not public
        ({"url": good, "event_types": ["rebilling.settings"]}, 422, "unknown_event_type"),
        ({"url": good, "event_types": ["dead_letter"]}, 422, "unknown_event_type"),
        ({"url": good, "event_types": ["**"]}, 422, "unknown_event_type"),
        ({"url": good, "event_types": [""]}, 422, "unknown_event_type"),
        ({"url": good, "event_types": ["\u0000"]}, 422, "unknown_event_type"),
        ({"url": good + "\u0000", "event_types": ["*"]}, 422, "invalid_url"),
        ({"url": "http://[::1", "event_types": ["*"]}, 422, "invalid_url"),
        ({"url": "http://127.0.0.1:0x50/", "event_types": ["*"]}, 422, "invalid_url"),
        ({"url": "http://127.0.0.1:70000/", "event_types": ["*"]}, 422, "invalid_url"),
        ({"url": "//127.0.0.1/", "event_types": ["*"]}, 422, "invalid_url"),
        ({"url": "data:text/plain,hi", "event_types": ["*"]}, 422, "invalid_url"),
        (
            {"url": "http://" + "a" * 64 + "." + "b" * 64 + ".invalid/", "event_types": ["*"]},
            422,
            "invalid_url",
        ),
        ({"url": "x" * 3_000_000, "event_types": ["*"]}, 413, None),
    ]
    for body, status, code in bodies:
        r = await tally.http.post(create, json=body, headers=c.admin)
        try:
            is_error(r, status, code)
        except AssertionError as exc:
            raise AssertionError(f"{str(body)[:120]}: {exc}") from None
    # not JSON at all, and the wrong content type
    for content, ctype in (
        (b"{", "application/json"),
        (b"url=x", "application/x-www-form-urlencoded"),
        (b"\xff\xfe", "application/json"),
    ):
        r = await tally.http.post(create, content=content, headers={**c.admin, "content-type": ctype})
        is_error(r, 422)
    # the Idempotency-Key header: 1 to 200 characters
    for key in ("", "k" * 201):
        r = await tally.http.post(
            create, json={"url": good, "event_types": ["*"]}, headers={**c.admin, "Idempotency-Key": key}
        )
        is_error(r, 422, "validation_error")
    endpoint = hooks(tally, f"/v1/webhook-endpoints/{hook['id']}")
    patches: list[tuple[Any, int, str | None]] = [
        ({"url": "ftp://example.com/"}, 422, "invalid_url"),
        ({"url": 5}, 422, "validation_error"),
        ({"event_types": []}, 422, "validation_error"),
        ({"event_types": ["nope"]}, 422, "unknown_event_type"),
        ({"event_types": ["*"] * 51}, 422, "validation_error"),
        ({"url": receiver.url("/moved"), "event_types": ["nope"]}, 422, "unknown_event_type"),
        ({"url": "gopher://x/", "event_types": ["*"]}, 422, "invalid_url"),
        ({"enabled": [True]}, 422, "validation_error"),
        ({"enabled": "maybe"}, 422, "validation_error"),
        ({"status": "enabled"}, 422, "validation_error"),
        ({"secret": "whsec_x"}, 422, "validation_error"),
        ({"company_id": "other"}, 422, "validation_error"),
        ([], 422, "validation_error"),
    ]
    for body, status, code in patches:
        r = await tally.http.patch(endpoint, json=body, headers=c.admin)
        try:
            is_error(r, status, code)
        except AssertionError as exc:
            raise AssertionError(f"PATCH {body}: {exc}") from None
    shown = (await tally.http.get(endpoint, headers=c.admin)).json()
    assert (shown["url"], shown["event_types"], shown["status"]) == (
        receiver.url("/c"),
        ["webhook.test"],
        "enabled",
    )
    # list parameters
    lists = [
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?status=bogus",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?status=PENDING",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?status=",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?limit=0",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?limit=201",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?limit=ten",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?cursor=not-a-cursor!",
        f"/v1/webhook-endpoints/{hook['id']}/deliveries?cursor=%FF",
        f"/v1/companies/{c.cid}/webhook-endpoints?cursor=abc",
        f"/v1/companies/{c.cid}/webhook-endpoints?limit=-1",
    ]
    for path in lists:
        r = await tally.http.get(hooks(tally, path), headers=c.admin)
        is_error(r, 422, "validation_error")
    # paths: ids out of pattern, unknown ids, wrong methods
    for method, path, status in [
        ("GET", f"/v1/webhook-endpoints/{'x' * 201}", 422),
        ("GET", "/v1/webhook-endpoints/we_%20x", 422),
        ("GET", "/v1/webhook-endpoints/we_doesnotexist", 404),
        ("GET", "/v1/webhook-deliveries/whd_doesnotexist", 404),
        ("POST", "/v1/webhook-deliveries/whd_doesnotexist/retry", 404),
        ("POST", "/v1/webhook-endpoints/we_doesnotexist/test", 404),
        ("PUT", f"/v1/webhook-endpoints/{hook['id']}", 405),
        ("GET", f"/v1/companies/{'c' * 65}/webhook-endpoints", 422),
    ]:
        r = await tally.http.request(method, hooks(tally, path), headers=c.admin)
        is_error(r, status)
    listed = (await tally.http.get(create, params={"limit": 200}, headers=c.admin)).json()["items"]
    assert len(listed) == 1
    assert len(await deliveries(tally, c, hook["id"])) == 1


async def test_a_cursor_out_of_range_is_a_422_not_a_500(tally: Tally, receiver: Receiver) -> None:
    """Fixed (review 2026-12-03):
    ``pagination.decode`` accepts any integer; one beyond bigint (a cursor of
    ``base64("9" * 20)``) reaches Postgres and the list answers 500 ``internal_error``. It
    should be the 422 of any other bad cursor. (Shared code: every cursor list has it.)"""
    c = await Reseller(tally).create(connect=False)
    hook = await register(tally, c, receiver, "/c", ["webhook.test"])
    cursor = base64.urlsafe_b64encode(b"9" * 20).decode()
    for path in (
        f"/v1/webhook-endpoints/{hook['id']}/deliveries",
        f"/v1/companies/{c.cid}/webhook-endpoints",
    ):
        r = await tally.http.get(hooks(tally, path), params={"cursor": cursor}, headers=c.admin)
        is_error(r, 422, "validation_error")


# --- a crash, then the poison pill (last: it stops the wallet.events webhook consumer) -----


async def test_a_notifier_killed_mid_delivery_keeps_the_delivery_and_its_lease_ends(tally: Tally) -> None:
    rec = Receiver(delay=2.0)
    await rec.start()
    try:
        c = await Reseller(tally).create(connect=False)
        hook = await register(tally, c, rec, "/c", ["webhook.test"])
        sent = await send_test(tally, c.admin, hook["id"])
        await eventually(holds(lambda: rec.in_flight == 1), what="the attempt in flight")
        tally.stack.kill("notifier")  # SIGKILL, holding the endpoint's lease
        tally.stack.spawn_service("notifier")
        await tally.stack.wait_ready("notifier")
        d = await delivery(tally, c.admin, sent["id"])
        assert d["status"] == "pending" and d["attempts"] == 0  # the attempt died with it
        # the dead process's lease on the endpoint ends by itself (2 × timeout + 10 s = 30 s
        # here; waiting for it and the delivery that follows passed, but costs 30 s)
        [lease] = await tally.sql(
            "notifier",
            "SELECT extract(epoch FROM leased_until - now()) AS left_s FROM webhook_endpoints WHERE id = $1",
            hook["id"],
        )
        assert lease["left_s"] is not None and 0 < lease["left_s"] <= 30
    finally:
        await rec.stop()


async def test_one_record_with_a_nul_stops_every_wallet_webhook(tally: Tally, receiver: Receiver) -> None:
    """Was a defect (poison pill): a readable ``wallet.events`` record keyed by a company with an
    endpoint whose event id holds a NUL is queued as is; Postgres refuses the text, the batch
    raises and is retried forever. From then on no ``wallet.events`` webhook reaches anyone:
    not the company's, not another company's (every partition of the batch rewinds). It
    should be dead-lettered like any unreadable record."""
    a = await Reseller(tally).create(connect=False)
    b = await Reseller(tally).create(connect=False)
    await register(tally, a, receiver, "/a", ["wallet.credited"])
    await register(tally, b, receiver, "/b", ["wallet.credited"])
    poison = _credited(a.cid)
    poison["id"] = "poison-\u0000-" + uid("x")
    await tally.produce(events.Topics.WALLET_EVENTS, poison, key=a.cid)
    after_a, after_b = _credited(a.cid), _credited(b.cid)
    await tally.produce(events.Topics.WALLET_EVENTS, after_a, key=a.cid)
    await tally.produce(events.Topics.WALLET_EVENTS, after_b, key=b.cid)
    await within(holds(lambda: {after_a["id"], after_b["id"]} <= set(receiver.ids())), 5)
    assert (after_a["id"] in receiver.ids("/a"), after_b["id"] in receiver.ids("/b")) == (True, True), (
        "honest events after the poison record never delivered"
    )

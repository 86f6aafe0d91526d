"""Attacks on the money paths of the auto-recharge / currency / tenancy change (docs/0008),
through the public APIs (HTTP and Kafka topic usage.ingest). A PASSING test is an attack that
held; a FAILING test is a finding. The destructive ones (that leave a partition blocked or a
system wallet full) come last."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.partitioner import murmur2

from tests.conftest import Tally, eventually, uid
from tests.integration.test_autorecharge_rule import slow_retries  # noqa: F401  (fixture)
from tests.integration.test_recharge import (
    DECLINES,
    GOOD,
    attach,
    configure,
    new_card,
    recharges,
    stripe_charges_for,
    wait_balance,
)
from tests.integration.test_wallet import Agency

pytestmark = pytest.mark.integration

THREE_DS = "4000002500003155"  # localstripe: every confirm ends in requires_action
BIGINT_MAX = 9_223_372_036_854_775_807


def micros(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    return sign * (int(whole) * 1_000_000 + int((frac + "000000")[:6]))


def fmt(m: int) -> str:
    return f"{m // 1_000_000}.{m % 1_000_000:06d}"


def partition_of(tally: Tally, key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % tally.stack.partitions


def same_partition_agency(tally: Tally, key: str) -> Agency:
    """An Agency whose company id lands on the same partition as ``key``."""
    while True:
        a = Agency(tally)
        if partition_of(tally, a.cid) == partition_of(tally, key):
            return a


async def patch_wallet(tally: Tally, headers: dict[str, str], path: str,
                       **changes: Any) -> dict[str, Any]:
    r = await tally.http.patch(tally.url("wallet", path), json=changes, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


class Co:
    """A company created through rebilling, in a given currency."""

    def __init__(self, tally: Tally, currency: str = "USD", cid: str | None = None) -> None:
        self.t = tally
        self.cid = cid or uid("atk")
        self.currency = currency
        self.admin = tally.auth("company_admin", company_id=self.cid,
                                email=f"admin-{self.cid}@example.com")

    async def create(self, connect: bool = False) -> Co:
        r = await self.t.http.post(self.t.url("rebilling", "/v1/companies"), json={
            "id": self.cid, "name": "Attack Co", "plan": "saas_pro",
            "owner_email": f"owner-{self.cid}@example.com", "currency": self.currency},
            headers=self.t.auth("platform_admin"))
        assert r.status_code == 201, r.text
        if connect:
            acct = "acct_" + uid("c").replace("-", "")
            r = await self.t.http.put(
                self.t.url("rebilling", f"/v1/companies/{self.cid}/stripe-connect"),
                json={"stripe_account_id": acct}, headers=self.admin)
            assert r.status_code == 200, r.text
        return self

    async def account(self) -> str:
        aid = uid("ws")
        r = await self.t.http.post(self.t.url("rebilling", f"/v1/companies/{self.cid}/accounts"),
                                   json={"id": aid, "name": "Client",
                                         "owner_email": f"{aid}@example.com",
                                         "billing_model": "self_billing"}, headers=self.admin)
        assert r.status_code == 201, r.text
        return aid

    def user(self, aid: str) -> dict[str, str]:
        return self.t.auth("account_user", company_id=self.cid, account_id=aid,
                           email=f"{aid}@example.com")

    async def wallet(self, aid: str | None = None) -> dict[str, Any]:
        path = f"/v1/accounts/{aid}/wallet" if aid else f"/v1/companies/{self.cid}/wallet"
        r = await self.t.http.get(self.t.url("wallet", path), headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def event(cid: str, service: str, quantity: str, account: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"event_id": uid("ev"), "company_id": cid, "service": service,
                         "quantity": quantity}
    if account:
        e["account_id"] = account
    return e


# --- attacks that should hold ----------------------------------------------------------------

async def test_held_same_event_over_http_and_kafka_debits_once(tally: Tally) -> None:
    agency = Agency(tally)
    e = event(agency.cid, "sms", "10")
    r = await tally.post_usage(e)
    assert r.json()["results"][0]["status"] == "accepted", r.text
    for _ in range(3):  # redelivered / replayed on the topic
        await tally.produce("usage.ingest", e, key=agency.cid)
    marker = await agency.use("sms", "1")
    await tally.produce("usage.ingest", event(agency.cid, "sms", "1"), key=agency.cid)
    await asyncio.sleep(2)
    lines = await tally.company_transactions(agency.cid)
    assert [t["usage_event_id"] for t in lines].count(e["event_id"]) == 1
    assert marker in {t["usage_event_id"] for t in lines}


async def test_held_concurrent_card_attaches_preload_once(tally: Tally) -> None:
    """Three cards and a settings change at once on a new wallet: one pre-load charge."""
    agency = Agency(tally)
    await configure(tally, agency, threshold="10", reload="25")
    pms = [await new_card(tally, GOOD) for _ in range(3)]
    url = tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods")
    results = await asyncio.gather(
        *[tally.http.post(url, json={"payment_method": pm}, headers=agency.admin) for pm in pms],
        tally.http.patch(tally.url("wallet", f"/v1/companies/{agency.cid}/wallet"),
                         json={"threshold": "10"}, headers=agency.admin))
    codes = [r.status_code for r in results]
    await wait_balance(agency, "25.000000")
    await asyncio.sleep(3)
    attempts = await recharges(tally, agency)
    ok = [a for a in attempts if a["status"] == "succeeded"]
    assert len(ok) == 1, attempts
    assert sum([len(await stripe_charges_for(tally, a["id"])) for a in attempts]) == 1
    assert (await agency.wallet())["balance"] == "25.000000"
    assert codes[:3] == [201, 201, 201], f"card attaches answered {codes}"


async def test_held_top_up_key_replayed_on_another_route_or_after_decline(tally: Tally) -> None:
    agency = Agency(tally)
    await patch_wallet(tally, agency.admin, f"/v1/companies/{agency.cid}/wallet",
                       auto_recharge=False)
    await attach(tally, agency, DECLINES)
    url = tally.url("recharge", f"/v1/companies/{agency.cid}/wallet/top-ups")
    key = {"Idempotency-Key": uid("k")}
    first = await tally.http.post(url, json={"amount": "9"}, headers={**agency.admin, **key})
    assert first.status_code == 201 and first.json()["status"] == "failed", first.text
    good = await attach(tally, agency, GOOD)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{good}/default"),
        headers=agency.admin)
    assert r.status_code == 200
    again = await tally.http.post(url, json={"amount": "9"}, headers={**agency.admin, **key})
    assert (again.status_code, again.json()) == (201, first.json())
    aid = await agency.add_account()
    other_route = await tally.http.post(
        tally.url("recharge", f"/v1/accounts/{aid}/wallet/top-ups"), json={"amount": "9"},
        headers={**agency.admin, **key})
    assert other_route.status_code in (409, 422), other_route.text
    await asyncio.sleep(1)
    assert (await agency.wallet())["balance"] == "0.000000"
    assert sum([len(await stripe_charges_for(tally, a["id"]))
                for a in await recharges(tally, agency)]) == 0


async def test_held_other_tenants_cards_and_top_ups_are_404(tally: Tally) -> None:
    a = await Co(tally).create(connect=True)
    b = await Co(tally).create(connect=True)
    theirs = await b.account()

    async def known() -> bool:
        r = await tally.http.get(tally.url("recharge", f"/v1/accounts/{theirs}/payment-methods"),
                                 headers=b.admin)
        return r.status_code == 200
    await eventually(known, what="recharge to learn of the account")
    pm = await new_card(tally, GOOD)
    for method, path, body in [
            ("post", f"/v1/accounts/{theirs}/payment-methods", {"payment_method": pm}),
            ("post", f"/v1/accounts/{theirs}/wallet/top-ups", {"amount": "5"}),
            ("get", f"/v1/accounts/{theirs}/wallet/recharges", None),
            ("post", f"/v1/companies/{b.cid}/wallet/top-ups", {"amount": "5"})]:
        r = await tally.http.request(method.upper(), tally.url("recharge", path), json=body,
                                     headers=a.admin)
        assert r.status_code in (403, 404), (path, r.status_code, r.text)
        r = await tally.http.request(method.upper(), tally.url("recharge", path), json=body,
                                     headers=a.user(uid("ws")))
        assert r.status_code in (403, 404), (path, r.status_code, r.text)


@pytest.mark.usefixtures("slow_retries")
async def test_held_card_swapped_while_a_retry_waits_recharges_once(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    bad = await attach(tally, agency, DECLINES)
    await agency.use("sms", "10")  # 4.931 < 5

    async def waiting() -> list[dict[str, Any]] | None:
        a = await recharges(tally, agency)
        return a if [x["status"] for x in a] == ["pending", "failed"] else None
    await eventually(waiting, timeout=40, what="a retry waiting")
    r = await tally.http.delete(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{bad}"),
        headers=agency.admin)
    assert r.status_code == 204
    await attach(tally, agency, GOOD)
    await wait_balance(agency, "14.931000")
    await asyncio.sleep(6)
    attempts = await recharges(tally, agency)
    assert sum([len(await stripe_charges_for(tally, a["id"])) for a in attempts]) == 1, attempts
    assert (await agency.wallet())["balance"] == "14.931000"


# --- findings expected ------------------------------------------------------------------------

async def test_company_id_dot_breaks_usage_ingestion_over_http(tally: Tally) -> None:
    """company_id "." matches the id pattern; the directory asks rebilling GET /v1/companies/.
    which httpx normalises to GET /v1/companies (405) -> DirectoryUnavailable -> 503 forever.
    API.md: 202 with a result per event (accepted, or rejected with a code)."""
    r = await tally.post_usage(event(".", "sms", "1"))
    assert r.status_code == 202, f"{r.status_code} {r.text}"


async def test_company_id_dot_fails_other_tenants_grouped_requests(tally: Tally) -> None:
    """The HTTP ingestion group-commits concurrent requests: one request with company "." fails
    the whole group, so other tenants' valid usage is answered 503 and not recorded."""
    victim = await Co(tally).create()
    warm = await tally.post_usage(event(victim.cid, "sms", "1"))
    assert warm.json()["results"][0]["status"] == "accepted", warm.text
    failed: list[int] = []
    for _ in range(6):
        rs = await asyncio.gather(tally.post_usage(event(".", "sms", "1")),
                                  *[tally.post_usage(event(victim.cid, "sms", "1"))
                                    for _ in range(8)])
        failed += [r.status_code for r in rs[1:] if r.status_code != 202]
    assert failed == [], f"{len(failed)} of 48 valid requests of another tenant failed: {failed}"


async def test_a_wallet_configured_right_after_company_creation_keeps_its_currency(
        tally: Tally) -> None:
    """PATCH (or a credit) on a brand-new EUR company's wallet before wallet has consumed
    company.updated creates the wallet in USD (wallet has no directory fallback); then the EUR
    pre-load is charged on the card and its credit is refused (EUR cannot pay USD)."""
    findings = []
    for _ in range(3):
        co = Co(tally, "EUR")
        await co.create()
        w = await patch_wallet(tally, co.admin, f"/v1/companies/{co.cid}/wallet",
                               threshold="10", reload_amount="25")
        findings.append((co, w["currency"]))
    bad = [(co, cur) for co, cur in findings if cur != "EUR"]
    if not bad:
        return
    co, _ = bad[0]

    async def attached() -> bool:
        r = await tally.http.post(tally.url("recharge", f"/v1/companies/{co.cid}/payment-methods"),
                                  json={"payment_method": await new_card(tally, GOOD)},
                                  headers=co.admin)
        return r.status_code == 201
    await eventually(attached, what="card attached")
    await asyncio.sleep(15)
    w = await co.wallet()
    r = await tally.http.get(tally.url("recharge", f"/v1/companies/{co.cid}/wallet/recharges"),
                             headers=co.admin)
    attempts = r.json()["items"]
    charged = [(a["id"], a["status"], a["amount"], a["currency"]) for a in attempts]
    stripe = sum([len(await stripe_charges_for(tally, a["id"])) for a in attempts])
    pytest.fail(f"{len(bad)}/3 EUR companies got a {bad[0][1]} wallet; then: wallet "
                   f"{w['currency']} balance {w['balance']}; attempts {charged}; "
                   f"succeeded Stripe charges {stripe}")


async def test_a_3ds_card_does_not_block_auto_recharge_forever(tally: Tally) -> None:
    """An off-session charge that ends in requires_action is a 'processing' try: the attempt
    stays pending and never moves on. Adding a good card, making it default, even removing the
    3DS card: the wallet (auto-recharge on, usable card, balance below threshold) is never
    recharged."""
    agency = Agency(tally)
    await configure(tally, agency, threshold="10", reload="25")
    three_ds = await attach(tally, agency, THREE_DS)  # pre-load: requires_action

    async def processing() -> list[dict[str, Any]] | None:
        a = await recharges(tally, agency)
        return a if a and a[0]["tries"] and a[0]["tries"][0]["outcome"] == "processing" else None
    await eventually(processing, timeout=40, what="the pre-load stuck in processing")
    good = await attach(tally, agency, GOOD)
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{good}/default"),
        headers=agency.admin)
    assert r.status_code == 200
    r = await tally.http.delete(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods/{three_ds}"),
        headers=agency.admin)
    assert r.status_code == 204

    async def recharged() -> dict[str, Any] | None:
        w = await agency.wallet()
        return w if micros(w["balance"]) >= 10_000_000 else None
    try:
        await eventually(recharged, timeout=80, what="the wallet recharged from the good card")
    except AssertionError:
        attempts = await recharges(tally, agency)
        pytest.fail("after 80 s (past a 60 s recheck) the wallet is "
                       f"{(await agency.wallet())['balance']}; attempts: "
                       f"{[(a['status'], a['tries']) for a in attempts]}")


async def test_an_idempotency_key_of_another_principal_does_not_swallow_a_credit(
        tally: Tally) -> None:
    """API.md: the same key *from the same principal* answers the first response again. The
    wallet keys the transfer by (wallet, key) only, so another principal's credit with the same
    key is answered 201 created=false and credits nothing."""
    agency = Agency(tally)
    aid = await agency.add_account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    key = {"Idempotency-Key": "welcome-credit"}
    r1 = await tally.http.post(url, json={"amount": "5"},
                               headers={**tally.auth("platform_admin", sub="ops"), **key})
    assert r1.status_code == 201, r1.text
    other_admin = tally.auth("company_admin", company_id=agency.cid, sub="second-admin")
    r2 = await tally.http.post(url, json={"amount": "7"}, headers={**other_admin, **key})
    assert r2.status_code == 201, r2.text
    assert (await agency.wallet(aid))["balance"] == "12.000000", (
        f"second principal's credit answered {r2.json()['created']=} and the balance is "
        f"{(await agency.wallet(aid))['balance']}")


async def test_one_products_unknown_companies_do_not_stall_other_tenants_usage(
        tally: Tally) -> None:
    """Every company id usage-meter has not heard of is looked up in rebilling, one HTTP call
    at a time, inside the group-committed ingest transaction: one request naming 1000 unknown
    companies holds up every tenant's usage posted meanwhile."""
    import time
    victim = await Co(tally).create()
    warm = await tally.post_usage(event(victim.cid, "sms", "1"))
    assert warm.json()["results"][0]["status"] == "accepted"
    t0 = time.monotonic()
    await tally.post_usage(event(victim.cid, "sms", "1"))
    baseline = time.monotonic() - t0

    async def timed_victim() -> float:
        await asyncio.sleep(0.05)
        t = time.monotonic()
        r = await tally.post_usage(event(victim.cid, "sms", "1"))
        assert r.status_code == 202, r.text
        return time.monotonic() - t
    noisy = tally.post_usage({"events": [event(uid("ghost"), "sms", "1") for _ in range(1000)]})
    t = time.monotonic()
    attack, waited = await asyncio.gather(noisy, timed_victim())
    attack_time = time.monotonic() - t
    assert waited < max(2.0, 10 * baseline), (
        f"victim's one-event POST took {waited:.2f}s (baseline {baseline:.3f}s) while another "
        f"request with 1000 unknown companies took {attack_time:.2f}s ({attack.status_code})")


# --- destructive: leave a system wallet full or a partition blocked ---------------------------

async def test_accepted_usage_of_one_tenant_is_dead_lettered_by_anothers_volume(
        tally: Tally) -> None:
    """Each event is bounded (MAX_EVENT_MICROS = 1e17) but nothing bounds the sum: one tenant's
    accepted usage fills the partition's platform-revenue system wallet, and every later
    accepted event of any company (same currency, same partition) is dead-lettered."""
    platform = tally.auth("platform_admin")
    r = await tally.http.put(tally.url("usage-meter", "/v1/prices/bigsvc"), headers=platform,
                             json={"unit": "hour", "unit_price": "100", "currency": "CHF"})
    assert r.status_code == 200, r.text
    attacker = await Co(tally, "CHF").create()
    while True:
        victim = Co(tally, "CHF")
        if partition_of(tally, victim.cid) == partition_of(tally, attacker.cid):
            break
    await victim.create()
    events = [event(attacker.cid, "bigsvc", "1000000000") for _ in range(92)]
    events.append(event(attacker.cid, "bigsvc", "233720368"))  # fills to 54.78 CHF headroom
    r = await tally.post_usage({"events": events})
    assert r.status_code == 202, r.text
    assert {x["status"] for x in r.json()["results"]} == {"accepted"}, r.text
    await tally.wait_applied(attacker.cid, events[-1]["event_id"], timeout=60)

    mine = event(victim.cid, "bigsvc", "1")  # 100 CHF, an ordinary event
    r = await tally.post_usage(mine)
    assert r.json()["results"][0]["status"] == "accepted", r.text
    try:
        await tally.wait_applied(victim.cid, mine["event_id"], timeout=30)
    except AssertionError:
        dead = await tally.find_on_topic(
            "usage.recorded.dlq", lambda m: mine["event_id"] in m.get("message", ""), timeout=10)
        pytest.fail(f"victim's accepted event dead-lettered: {dead['error'][:200]}")


async def test_a_full_wallet_credit_blocks_every_tenants_recharge_credits(tally: Tally) -> None:
    """A company admin fills its own account wallet with free manual credits to near BIGINT,
    then tops it up by 1: the wallet's recharge.events handler only dead-letters LedgerError,
    so the DataError (bigint out of range) fails the batch forever. Every later recharge/top-up
    on that partition, of any company, is charged at Stripe and never credited."""
    attacker = await Co(tally, "GBP").create(connect=True)
    aid = await attacker.account()

    async def wallet_knows() -> bool:
        r = await tally.http.patch(tally.url("wallet", f"/v1/accounts/{aid}/wallet"),
                                   json={"auto_recharge": False}, headers=attacker.admin)
        return r.status_code == 200
    await eventually(wallet_knows, what="wallet to know the account")

    async def card() -> bool:
        r = await tally.http.post(tally.url("recharge", f"/v1/accounts/{aid}/payment-methods"),
                                  json={"payment_method": await new_card(tally, GOOD)},
                                  headers=attacker.user(aid))
        return r.status_code == 201
    await eventually(card, what="account card attached")
    credit_url = tally.url("wallet", f"/v1/accounts/{aid}/wallet/credits")
    for _ in range(9):
        r = await tally.http.post(credit_url, json={"amount": "999999999999.999999"},
                                  headers=attacker.admin)
        assert r.status_code == 201, r.text
    balance = micros((await attacker.wallet(aid))["balance"])
    rest = BIGINT_MAX - 500_000 - balance
    r = await tally.http.post(credit_url, json={"amount": fmt(rest)}, headers=attacker.admin)
    assert r.status_code == 201, r.text
    r = await tally.http.post(tally.url("recharge", f"/v1/accounts/{aid}/wallet/top-ups"),
                              json={"amount": "1"}, headers=attacker.user(aid))
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text

    victim = same_partition_agency(tally, attacker.cid)
    await patch_wallet(tally, victim.admin, f"/v1/companies/{victim.cid}/wallet",
                       auto_recharge=False)
    await attach(tally, victim, GOOD)
    r = await tally.http.post(tally.url("recharge", f"/v1/companies/{victim.cid}/wallet/top-ups"),
                              json={"amount": "7"}, headers=victim.admin)
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    try:
        await wait_balance(victim, "7.000000")
    except AssertionError:
        charged = len(await stripe_charges_for(tally, r.json()["id"]))
        pytest.fail(f"victim's top-up charged at Stripe ({charged} succeeded intent) but the "
                       f"wallet still reads {(await victim.wallet())['balance']} after 40 s")


async def test_a_poison_usage_ingest_record_blocks_the_partition(tally: Tally) -> None:
    """usage.ingest: an event with company_id "." makes the directory raise; the Kafka handler
    does not dead-letter it, so the batch is redelivered forever and every event after it on
    the partition (any tenant) is never recorded."""
    victim = Agency(tally)
    await tally.produce("usage.ingest", event(".", "sms", "1"), key=victim.cid)
    mine = event(victim.cid, "sms", "1")
    await tally.produce("usage.ingest", mine, key=victim.cid)
    await tally.wait_applied(victim.cid, mine["event_id"], timeout=30)

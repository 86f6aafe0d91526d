"""Attacks (#20's sixth round, 2026-12-04) on the money path the change after 63c47d0
touched: usage-meter's in-process ``Facts`` (companies' currencies, accounts' companies), the
msgpack outbox, the msgspec-encoded ``usage.recorded`` / ``wallet.debited`` envelopes, and the
notifier's msgspec ``wallet.usage`` path with its once-per-batch rule. From the public HTTP
API, and by producing records onto the topics as an attacker inside the network could. Real
stack.

A passing test shows something that held, or a finding that was fixed (a second usage-meter
replica keeping a fact another corrected is held in tests/integration/test_usage_ingestion.py
without starting a process). Records forged onto ``rebilling.events`` contradicting a stored
company's currency or account's company are checked with rebilling since 2026-12-04 (the
seventh round, docs/0019); the notifier's daily sums saturate at BIGINT's bound since then,
so a ``wallet.usage`` total forged onto ``wallet.digest`` can no longer make genuine usage
fail to add up (it is still believed: the notifier cannot tell it from the wallet's)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.support.attacks import (
    STORES,
    after_the_forgery,
    all_store,
    announce_account,
    one_batch,
    stored,
    usage,
)
from tests.support.builders import Reseller, account_the_notifier_knows
from tests.support.stack import Tally, eventually, micros, uid

USAGE_TYPE = [("type", b"wallet.usage")]


def minute_now() -> str:
    return datetime.now(UTC).replace(second=0, microsecond=0).isoformat()


def wallet_usage(cid: str, aid: str, amount: int, *, service: str = "sms", mid: str | None = None) -> bytes:
    """A ``wallet.usage`` envelope as the wallet writes it (one total)."""
    return orjson.dumps(
        {
            "id": mid or f"usage:{uid('ev')}:0",
            "type": "wallet.usage",
            "time": datetime.now(UTC).isoformat(),
            "source": "wallet",
            "data": {
                "totals": [
                    {
                        "account_id": aid,
                        "company_id": cid,
                        "service": service,
                        "currency": "USD",
                        "minute": minute_now(),
                        "amount_micros": amount,
                        "events": 1,
                    }
                ]
            },
        }
    )


# --- the notifier's wallet.usage ----------------------------------------------------------------


async def daily_usage(tally: Tally, agency: Reseller, aid: str) -> dict[str, Any]:
    r = await tally.http.get(
        tally.url("notifier", f"/v1/accounts/{aid}/usage?period=daily"), headers=agency.admin
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def settled_total(tally: Tally, agency: Reseller, aid: str, at_least: int) -> int:
    """The account's daily total once it reached ``at_least`` micros and stopped moving."""

    async def reached() -> int | None:
        t = micros((await daily_usage(tally, agency, aid))["total"])
        return t if t >= at_least else None

    await eventually(reached, what=f"daily usage >= {at_least}")
    await asyncio.sleep(1.5)
    return micros((await daily_usage(tally, agency, aid))["total"])


async def test_a_wallet_usage_resent_in_one_batch_counts_once_with_or_without_type_headers(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """HELD: the same wallet.usage twice in one batch, both with the ``type`` header (msgspec
    path), then both without (pydantic path): each counted once."""
    agency, aid = await account_the_notifier_knows(tally)
    first = wallet_usage(agency.cid, aid, 1000)
    await one_batch(producer, "wallet.digest", agency.cid, [(first, USAGE_TYPE), (first, USAGE_TYPE)])
    assert await settled_total(tally, agency, aid, 1000) == 1000
    second = wallet_usage(agency.cid, aid, 1000)
    await one_batch(producer, "wallet.digest", agency.cid, [(second, []), (second, [])])
    assert await settled_total(tally, agency, aid, 2000) == 2000


async def test_a_wallet_usage_resent_in_one_batch_once_with_and_once_without_type_header_counts_once(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """The same wallet.usage (one id) twice in one batch: once with the ``type`` header (decoded
    by msgspec into a digest), once without it (decoded by ``take`` into a message). Both are
    claimed under one inbox id, but ``_once`` runs separately over messages and digests, so
    each copy is applied: the account's usage is summed twice."""
    from tests.support.builders import mails_about

    agency, aid = await account_the_notifier_knows(tally)
    r = await tally.http.put(  # a daily alert above the one total, below twice it
        tally.url("notifier", f"/v1/accounts/{aid}/usage-alerts"),
        json={"enabled": True, "conditions": [{"threshold": "0.0015", "period": "daily"}], "recipients": []},
        headers=agency.admin,
    )
    assert r.status_code == 200, r.text
    value = wallet_usage(agency.cid, aid, 1000)
    await one_batch(producer, "wallet.digest", agency.cid, [(value, USAGE_TYPE), (value, [])])
    total = await settled_total(tally, agency, aid, 1000)
    alerts = [str(m["Subject"]) for m in mails_about(tally, aid)]
    assert total == 1000 and not alerts, (
        f"one wallet.usage id (1000 micros) counted as {total}; usage alerts sent: {alerts}"
    )


# --- usage-meter: companies' currencies and accounts' companies ------------------------------


async def test_another_tenants_account_is_refused_before_and_after_the_facts_are_warm(tally: Tally) -> None:
    """HELD: company Y naming company X's account is ``unknown_account`` whether or not the
    process has met the account already (table lookup, then in-process facts), alone or in a
    batch with X's own events."""
    from tests.support.builders import Agency

    x, y = Agency(tally), Agency(tally)
    await x.fund("1")
    await y.fund("1")
    theirs = await x.add_account()
    await y.announce()

    async def heard() -> bool:  # usage-meter's consumer, not the wallet's: an account and a
        # company it has not heard of yet are not refused (rebilling, asked, does not know them)
        rows = await tally.sql(
            "usage_meter",
            "SELECT (SELECT count(*) FROM accounts WHERE account_id = $1)"
            " + (SELECT count(*) FROM companies WHERE company_id = $2) AS n",
            theirs,
            y.cid,
        )
        return int(rows[0]["n"]) == 2

    await eventually(heard, what="usage-meter to hear of the account and of company Y")
    cold = await usage(tally, y.cid, account=theirs)
    assert cold["status"] == "rejected" and cold["error"]["code"] == "unknown_account", cold
    assert (await usage(tally, x.cid, account=theirs))["status"] == "accepted"
    body = {
        "events": [
            {
                "event_id": uid("ev"),
                "company_id": c,
                "account_id": theirs,
                "service": "email",
                "quantity": "1",
            }
            for c in (x.cid, y.cid, x.cid, y.cid)
        ]
    }
    r = await tally.post_usage(body)
    assert [(res["status"], res.get("error", {}).get("code")) for res in r.json()["results"]] == [
        ("accepted", None),
        ("rejected", "unknown_account"),
        ("accepted", None),
        ("rejected", "unknown_account"),
    ], r.text
    warm = await usage(tally, y.cid, account=theirs)
    assert warm["status"] == "rejected" and warm["error"]["code"] == "unknown_account", warm


@pytest.mark.parametrize("created_by", ["rebilling", "an announcement alone"])
async def test_a_forged_account_created_does_not_give_a_company_another_companys_account(
    tally: Tally, created_by: str
) -> None:
    """An ``account.created`` produced onto rebilling.events naming company X's account as
    company Y's. An account's company never changes: the record contradicts what every service
    stored, so rebilling is asked. For an account created in rebilling it says X; for one only
    announced (rebilling does not know it) the first announcement stands. Y's usage naming the
    account stays ``unknown_account``, X's is accepted, and Y's token cannot read the account's
    wallet."""
    from tests.support.builders import Agency

    x: Agency | Reseller
    y: Agency | Reseller
    if created_by == "rebilling":
        x = await Reseller(tally, plan="starter").create(connect=False)
        y = await Reseller(tally, plan="starter").create(connect=False)
        theirs = await x.account()
    else:
        x, y = Agency(tally), Agency(tally)
        theirs = await x.add_account()
        await y.announce()
    await x.fund("1")
    await y.fund("1")
    await all_store(tally, "account", theirs, x.cid)

    await announce_account(tally, theirs, y.cid)
    await after_the_forgery(tally, y.cid)
    assert await stored(tally, "account", theirs) == dict.fromkeys(STORES, x.cid)
    stolen = await usage(tally, y.cid, account=theirs)
    assert stolen["status"] == "rejected" and stolen["error"]["code"] == "unknown_account", stolen
    own = await usage(tally, x.cid, account=theirs)
    assert own["status"] == "accepted", own
    r = await tally.http.get(tally.url("wallet", f"/v1/accounts/{theirs}/wallet"), headers=y.admin)
    assert r.status_code in (403, 404), r.text


async def set_price(tally: Tally, service: str, currency: str, price: str = "0.001") -> None:
    r = await tally.http.put(
        tally.url("usage-meter", f"/v1/prices/{service}"),
        json={"unit": "unit", "unit_price": price, "currency": currency},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 200, r.text


async def usd_company_with_a_eur_only_service(tally: Tally, check: bool = True) -> tuple[Reseller, str]:
    """A company rebilling created in USD, its wallet funded, and a service priced in EUR only
    (its usage is ``price_unavailable`` while the company is in USD)."""
    c = await Reseller(tally, plan="starter").create(connect=False)
    await c.fund("1")
    svc = uid("eur").lower()
    await set_price(tally, svc, "EUR")
    if check:
        res = await usage(tally, c.cid, svc)
        assert res["status"] == "rejected" and res["error"]["code"] == "price_unavailable", res
    return c, svc


async def forge_currency(tally: Tally, cid: str, currency: str) -> None:
    await tally.envelope(
        "rebilling.events",
        "company.updated",
        {"company_id": cid, "name": "Agency", "plan": "starter", "currency": currency},
        key=cid,
    )


async def test_a_forged_company_updated_does_not_change_the_currency_usage_is_priced_in(tally: Tally) -> None:
    """A ``company.updated`` produced onto rebilling.events saying a USD company (as rebilling
    created it) is in EUR. A company's currency never changes: the record contradicts what
    every service stored, rebilling is asked and says USD. Usage stays priced in USD (API.md,
    Currency): a service priced in EUR only stays ``price_unavailable``."""
    c, svc = await usd_company_with_a_eur_only_service(tally)
    await all_store(tally, "company", c.cid, "USD")
    await forge_currency(tally, c.cid, "EUR")
    await after_the_forgery(tally, c.cid)
    assert await stored(tally, "company", c.cid) == dict.fromkeys(STORES, "USD")
    res = await usage(tally, c.cid, svc)
    assert res["status"] == "rejected" and res["error"]["code"] == "price_unavailable", res


async def test_a_currency_stored_wrong_is_put_right_by_rebillings_next_announcement(tally: Tally) -> None:
    """A currency stored wrong (as a forged record left it before announcements were checked):
    rebilling's next announcement of the company (a plan change) contradicts it, rebilling is
    asked, and every service stores USD again; usage is priced in USD."""
    c, svc = await usd_company_with_a_eur_only_service(tally)
    await all_store(tally, "company", c.cid, "USD")
    for schema in STORES:
        await tally.sql(schema, "UPDATE companies SET currency = 'EUR' WHERE company_id = $1", c.cid)
    r = await tally.http.put(
        tally.url("rebilling", f"/v1/companies/{c.cid}/plan"),
        json={"plan": "unlimited"},
        headers=tally.auth("platform_admin"),
    )
    assert r.status_code == 200, r.text
    await all_store(tally, "company", c.cid, "USD")

    async def usd() -> bool:  # usage-meter believes a fact read from its table for 5 s
        res = await usage(tally, c.cid, svc)
        return bool(res["status"] == "rejected" and res["error"]["code"] == "price_unavailable")

    await eventually(usd, timeout=20, what="usage priced in USD again")


# --- the notifier's sums: a forged total with no upper bound ----------------------------------


async def test_a_forged_wallet_usage_total_cannot_stop_an_accounts_genuine_usage_being_counted(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """A ``wallet.usage`` produced with the type header whose one total is 2**63 - 2 micros (the
    decoder's rule, like the schema's, is only ``>= 0``). It is taken as is (the notifier cannot
    tell it from the wallet's). The account's genuine usage after it (posted over HTTP, debited
    by the wallet) is still added: the day's sum saturates at 2**63 - 1 instead of leaving
    bigint, which sent the wallet's record to the DLQ uncounted before 2026-12-04 (night)."""
    agency, aid = await account_the_notifier_knows(tally)
    top = 2**63 - 1
    forged = wallet_usage(agency.cid, aid, top - 1, service="email")
    await one_batch(producer, "wallet.digest", agency.cid, [(forged, USAGE_TYPE)])
    assert await settled_total(tally, agency, aid, top - 1) == top - 1
    e = {
        "event_id": uid("ev"),
        "company_id": agency.cid,
        "account_id": aid,
        "service": "email",
        "quantity": "1",
    }
    r = await tally.post_usage(e)
    assert r.json()["results"][0]["status"] == "accepted", r.text
    await tally.wait_applied(agency.cid, e["event_id"])
    assert await settled_total(tally, agency, aid, top) == top


# --- wallet.debited encoded from structs ----------------------------------------------------


ODD = [
    'q"uo\\te',
    "caf\u00e9-\u65e5\u672c",
    "line\u2028sep\u2029",
    "tab\tnl\ncr\r",
    "ctl\u0001\u001f\u007f",
    "emoji-\U0001f600",
]


def recorded(cid: str, eid: str, service: str, amount: int, **data: Any) -> dict[str, Any]:
    at = datetime.now(UTC).isoformat()
    body = {
        "event_id": eid,
        "company_id": cid,
        "service": service,
        "quantity": "1",
        "occurred_at": at,
        "recorded_at": at,
        "unit_price_micros": amount,
        "platform_amount_micros": amount,
        "currency": "USD",
        **data,
    }
    return {"id": f"usage:{eid}", "type": "usage.recorded", "time": at, "source": "attack", "data": body}


async def test_debited_envelopes_carry_strings_needing_json_escapes_verbatim(tally: Tally) -> None:
    """HELD: ``usage.recorded`` records produced with event ids and services that JSON must
    escape (a quote, a backslash, U+2028/2029, control characters, non-BMP), with no
    ``account_id``, a null one, and a rebilled account. Each ``wallet.debited`` (msgspec) is
    valid JSON naming the same strings, ``account_id`` null unless an account is named, the
    account leg only when rebilled; the ledger API shows the ids verbatim."""
    from tests.support.builders import Agency

    x = Agency(tally)
    await x.fund("1")
    aid = await x.add_account("rebill_markup", {"default": "2"})
    await x.fund("1", aid)
    sent: list[tuple[str, str, dict[str, Any]]] = []
    for n, odd in enumerate(ODD):
        eid, service = f"ev{n}-{odd}-{uid('x')}", f"svc-{odd}"
        extras: list[dict[str, Any]] = [{}, {"account_id": None}, {"account_id": aid}]
        extra = extras[n % 3]
        sent.append((eid, service, extra))
        await tally.produce("usage.recorded", recorded(x.cid, eid, service, 1000 + n, **extra), key=x.cid)
    last = sent[-1][0]
    await tally.wait_applied(x.cid, last)
    lines = {t["usage_event_id"]: t for t in await tally.company_transactions(x.cid)}
    for n, (eid, service, extra) in enumerate(sent):
        assert eid in lines and lines[eid]["service"] == service, (eid, lines.get(eid))

        def debit_of(m: dict[str, Any], eid: str = eid) -> bool:
            return bool(m["type"] == "wallet.debited" and m["data"]["usage_event_id"] == eid)

        d = await tally.find_on_topic("wallet.events", debit_of)
        assert d["id"] == f"debited:{eid}"
        data = d["data"]
        assert (data["company_id"], data["service"], data["company_amount_micros"]) == (
            x.cid,
            service,
            1000 + n,
        )
        assert "account_id" in data and data["account_id"] == extra.get("account_id")
        rebilled = extra.get("account_id") == aid
        assert ("account_wallet_id" in data) is rebilled, data
        if rebilled:
            assert data["account_wallet_id"] == f"account:{aid}" and data["account_amount_micros"] == 2 * (
                1000 + n
            )
    account_ids = {t["usage_event_id"] for t in await x.lines(aid) if t["kind"] == "usage"}
    assert account_ids == {eid for eid, _, extra in sent if extra.get("account_id") == aid}


# --- the outbox: big batches (lz4), odd traceparents ---------------------------------------


async def test_a_full_batch_and_odd_traceparents_are_each_debited_once(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """HELD: 1,000 events in one POST (one outbox row, lz4-compressed: ``COMPRESS_FROM`` is
    2 kB), one of them twice; then ``usage.ingest`` records whose traceparent header is 70,000
    bytes (past the old layout's 2-byte length), not ASCII, or empty. Each accepted event is
    debited exactly once."""
    from tests.support.builders import funded

    cid = await funded(tally, "2")
    events = [
        {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"} for _ in range(999)
    ]
    events.append(dict(events[500]))
    r = await tally.post_usage({"events": events})
    statuses = [x["status"] for x in r.json()["results"]]
    assert statuses.count("accepted") == 999 and statuses[-1] == "duplicate", statuses[-3:]
    odd = []
    for tp in (b"0" * 70_000, "00-\u00e9\u00e9-\u2603".encode(), b"", b"\xff\xfe\x00"):
        e = {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"}
        odd.append(e["event_id"])
        await producer.send_and_wait(
            "usage.ingest", orjson.dumps(e), key=cid.encode(), headers=[("traceparent", tp)]
        )
    for eid in odd:
        await tally.wait_applied(cid, eid)
    expected = 2_000_000 - 1003 * 675

    async def settled() -> dict[str, Any] | None:
        w = await tally.company_wallet(cid)
        return w if micros(w["balance"]) <= expected else None

    w = await eventually(settled, what="every debit posted")
    await asyncio.sleep(1.0)
    w = await tally.company_wallet(cid)
    assert micros(w["balance"]) == expected, w


async def test_dead_letters_of_keyless_tombstone_and_non_utf8_keyed_records_are_relayed(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """HELD: ``usage.ingest`` records with no key, with a key that is not UTF-8, and with no
    value at all (a tombstone) are dead-lettered through usage-meter's outbox (rows with a None
    key, a replaced key, an empty message) and reach ``usage.ingest.dlq``; usage after them is
    still recorded and debited."""
    from tests.support.builders import funded

    cid = await funded(tally)
    marker = uid("garbage")
    sent = []
    for key, value in (
        (None, f"{marker}-nokey".encode()),
        (b"\xff\xfe" + marker.encode(), f"{marker}-badkey".encode()),
        (marker.encode(), None),
    ):
        md = await producer.send_and_wait("usage.ingest", value, key=key)
        sent.append((md.partition, md.offset))
    for partition, offset in sent:

        def letter_of(d: dict[str, Any], p: int = partition, o: int = offset) -> bool:
            return bool(d["source_topic"] == "usage.ingest" and (d["partition"], d["offset"]) == (p, o))

        await tally.find_on_topic("usage.ingest.dlq", letter_of)
    e = {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"}
    await producer.send_and_wait("usage.ingest", orjson.dumps(e), key=cid.encode())
    await tally.wait_applied(cid, e["event_id"])


async def test_an_early_forged_account_created_is_undone_by_rebillings_own(tally: Tally) -> None:
    """HELD (one process): an ``account.created`` naming a not-yet-created account id as
    company Y's, which the process then meets (a fact learnt from its table); company X then
    creates that account in rebilling. Rebilling's record is written and the fact forgotten:
    X's usage of its account is accepted, Y's is ``unknown_account``."""
    from tests.support.builders import Agency

    y = Agency(tally)
    await y.announce()
    await y.fund("1")
    x = await Reseller(tally, plan="starter").create(connect=False)
    await x.fund("1")
    aid = uid("ws")
    await announce_account(tally, aid, y.cid)

    async def placed() -> bool:
        rows = await tally.sql("usage_meter", "SELECT company_id FROM accounts WHERE account_id = $1", aid)
        return [r["company_id"] for r in rows] == [y.cid]

    await eventually(placed, what="the forged account in usage-meter's table")
    assert (await usage(tally, y.cid, account=aid))["status"] == "accepted"  # the fact is learnt
    await x.account(aid=aid)

    async def mine() -> bool:
        return bool((await usage(tally, x.cid, account=aid))["status"] == "accepted")

    await eventually(mine, timeout=15, what="X's usage of its account accepted")
    theirs = await usage(tally, y.cid, account=aid)
    assert theirs["status"] == "rejected" and theirs["error"]["code"] == "unknown_account", theirs

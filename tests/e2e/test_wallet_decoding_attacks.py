"""Attacks on the wallet's ``usage.recorded`` path from outside: records produced straight onto
the topic (odd, poison, redelivered), the ledger lines the public API shows for them, and the
debit latency histogram. The wallet decodes these with msgspec (``tally.events.
parse_usage_recorded``) and copies ledger lines by position (``storage.post``). Real stack.

Each test's records share one partition (key: the company), and a usage event sent through
usage-meter after them is the sentinel: once it is in the ledger, every record before it on
the partition has been handled."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.support.builders import Agency, Reseller, funded
from tests.support.stack import Tally, eventually, micros, uid

TOPIC = "usage.recorded"
DLQ = "usage.recorded.dlq"
EMAIL, SMS = 675, 7900  # catalog prices in micros (USD)


def now_text() -> str:
    return datetime.now(UTC).isoformat()


def recorded(cid: str, amount: int = 1000, eid: str | None = None, **data: Any) -> dict[str, Any]:
    """A ``usage.recorded`` envelope as usage-meter writes it, with ``data`` overriding fields."""
    eid = eid or uid("ev")
    at = now_text()
    return {
        "id": f"usage:{eid}",
        "type": "usage.recorded",
        "time": at,
        "source": "attack",
        "data": {
            "event_id": eid,
            "company_id": cid,
            "account_id": None,
            "service": "email",
            "quantity": "1",
            "occurred_at": at,
            "recorded_at": at,
            "unit_price_micros": amount,
            "platform_amount_micros": amount,
            "currency": "USD",
            **data,
        },
    }


def eid_of(message: dict[str, Any]) -> str:
    return str(message["data"]["event_id"])


async def accepted(tally: Tally, cid: str, service: str = "email", quantity: str = "1") -> str:
    eid = uid("ev")
    r = await tally.post_usage({"event_id": eid, "company_id": cid, "service": service, "quantity": quantity})
    assert r.status_code == 202 and r.json()["results"][0]["status"] == "accepted", r.text
    return eid


async def dead_letter(tally: Tally, marker: str, timeout: float = 30) -> dict[str, Any]:
    """The DLQ copy of the dead record whose text holds ``marker``."""
    return await tally.find_on_topic(DLQ, lambda d: marker in d["message"], timeout=timeout)


async def post(tally: Tally, cid: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    body = {
        "events": [
            {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1", **e}
            for e in events
        ]
    }
    r = await tally.post_usage(body)
    assert r.status_code == 202, r.text
    return [{**res, "event": ev} for res, ev in zip(r.json()["results"], body["events"], strict=True)]


async def none_dead(tally: Tally, markers: list[str], timeout: float = 6) -> None:
    try:
        dead = await tally.find_on_topic(
            DLQ, lambda d: any(m in d["message"] for m in markers), timeout=timeout
        )
    except AssertionError as exc:
        assert "no matching message" in str(exc)
        return
    raise AssertionError(f"accepted usage dead-lettered: {dead}")


def assert_balanced(wallet: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """The balance is the sum of the ledger lines, and each line's balance_after is the
    running sum (lines come newest first)."""
    running = 0
    for line in reversed(lines):
        running += micros(line["amount"])
        assert micros(line["balance_after"]) == running, line
    assert micros(wallet["balance"]) == running


# --- poison in the middle of a partition -----------------------------------------------------


async def test_poison_amid_good_records_is_dead_lettered_and_every_good_one_debited_once(
    tally: Tally,
) -> None:
    cid = await funded(tally)  # 1.00
    good = [
        recorded(cid, 1001),
        recorded(cid, 1002, extra_field={"x": 1}),  # unknown fields are ignored
        recorded(cid, 1003, occurred_at="2026-03-01T10:00:00.5+05:30", recorded_at="2026-03-01T04:30:00Z"),
        recorded(cid, 1004, occurred_at="2026-03-01t10:00:00z"),
        recorded(cid, 1005),
    ]
    good[1]["extra_envelope"] = [1, 2, 3]
    # Each poison record names a marker, found again in its DLQ copy.
    poison: dict[str, bytes] = {}

    def bad(message: dict[str, Any]) -> None:
        poison[eid_of(message)] = orjson.dumps(message)

    bad(recorded(cid, platform_amount_micros=1000.0))
    bad(recorded(cid, platform_amount_micros="1000"))
    bad(recorded(cid, platform_amount_micros=True))
    bad(recorded(cid, platform_amount_micros=None))
    m = recorded(cid, 123456789)  # past BIGINT (orjson will not write it)
    poison[eid_of(m)] = orjson.dumps(m).replace(b"123456789", str(2**64).encode())
    bad(recorded(cid, occurred_at="2026-01-01T00:00:00"))  # no offset
    bad(recorded(cid, recorded_at="2026-01-01"))
    bad(recorded(cid, occurred_at=1767225600))
    bad(recorded(cid, quantity=1))
    bad(recorded(cid, company_id=None))
    bad(recorded(cid, currency=None))
    m = recorded(cid)
    m["time"] = "2026-01-01T00:00:00"
    bad(m)
    m = recorded(cid)
    m["type"] = "usage.ingested"
    bad(m)
    m = recorded(cid)
    m["id"] = ""
    bad(m)
    m = recorded(cid)
    del m["data"]["currency"]
    bad(m)
    for raw in (
        b'{"id": "%s", "type": "usage.recorded", "data": "\xff\xfe"}',
        b'["%s"]',
        b'{"id": "%s", "type": "usage.recorded"',
        b'"%s"',
    ):
        marker = uid("raw")
        poison[marker] = raw.replace(b"%s", marker.encode())

    # good, poison interleaved, the same good records again (redeliveries in the same batch
    # or the next), and an event id repeated with another amount: the first one counts
    sequence: list[bytes] = []
    bads = list(poison.values())
    for i, g in enumerate(good):
        sequence.append(orjson.dumps(g))
        sequence.extend(bads[i::5])
    sequence.append(orjson.dumps(good[0]))
    sequence.append(orjson.dumps(recorded(cid, 999_999, eid=eid_of(good[1]))))
    for raw in sequence:
        await tally.produce(TOPIC, raw, key=cid)

    sentinel = await accepted(tally, cid)
    lines = await tally.wait_applied(cid, sentinel)

    for marker in poison:
        dead = await dead_letter(tally, marker)
        assert dead["error"] and dead["source_topic"] == TOPIC, dead

    usage = [(t["usage_event_id"], -micros(t["amount"])) for t in lines if t["kind"] == "usage"]
    expected = [(eid_of(g), g["data"]["platform_amount_micros"]) for g in good] + [(sentinel, EMAIL)]
    assert sorted(usage) == sorted(expected)
    assert not {eid for eid, _ in usage} & set(poison)
    assert_balanced(await tally.company_wallet(cid), lines)
    assert micros((await tally.company_wallet(cid))["balance"]) == 1_000_000 - sum(a for _, a in expected)


async def test_a_record_no_price_could_give_is_dead_lettered_not_dropped(tally: Tally) -> None:
    """A negative amount is not usage: it goes to the DLQ with a reason, like any record the
    wallet will not post, rather than vanishing without a trace."""
    cid = await funded(tally)
    negative = recorded(cid, -5000)
    await tally.produce(TOPIC, negative, key=cid)
    sentinel = await accepted(tally, cid)
    lines = await tally.wait_applied(cid, sentinel)
    assert eid_of(negative) not in {t["usage_event_id"] for t in lines}
    assert ">= 0" in (await dead_letter(tally, eid_of(negative)))["error"]


async def test_times_outside_the_schemas_years_are_dead_lettered(tally: Tally) -> None:
    """The schema's times are RFC 3339 in the years 1900-2099 (tally.events.RFC3339_PATTERN:
    a year-1 time with an offset once stopped the notifier's consumer for good)."""
    cid = await funded(tally)
    odd = [
        recorded(cid, occurred_at="0001-01-01T00:00:00+01:00"),
        recorded(cid, occurred_at="9999-12-31T23:59:59-01:00"),
        recorded(cid, recorded_at="1850-01-01T00:00:00Z"),
    ]
    for m in odd:
        await tally.produce(TOPIC, m, key=cid)
    sentinel = await accepted(tally, cid)
    lines = await tally.wait_applied(cid, sentinel)
    assert not {t["usage_event_id"] for t in lines} & {eid_of(m) for m in odd}
    for m in odd:
        assert "1900-2099" in (await dead_letter(tally, eid_of(m)))["error"]


# --- ledger lines, column by column -----------------------------------------------------------


async def test_ledger_lines_show_each_events_amount_kind_service_and_balance(tally: Tally) -> None:
    agency = Agency(tally)
    await agency.fund("2.00")
    aid = await agency.add_account("rebill_markup", {"sms": "1.5", "email": "2"})
    await agency.fund("3.00", aid)
    sms = await agency.use("sms", "2", account=aid)  # company 0.0158, account 0.0237
    email = await agency.use("email", "3", account=aid)  # company 0.002025, account 0.00405
    own = await agency.use("email", "1")  # the company's own: no account leg

    company = await tally.company_transactions(agency.cid)
    got = [(t["kind"], t["service"], t["usage_event_id"], t["amount"], t["balance_after"]) for t in company]
    assert got == [
        ("usage", "email", own, "-0.000675", "1.981500"),
        ("usage", "email", email, "-0.002025", "1.982175"),
        ("usage", "sms", sms, "-0.015800", "1.984200"),
        (company[-1]["kind"], None, None, "2.000000", "2.000000"),
    ]
    assert company[-1]["kind"] != "usage"
    assert all(t["reference"] is None for t in company[:3])
    assert_balanced(await agency.wallet(), company)

    account = await agency.lines(aid)
    got = [(t["kind"], t["service"], t["usage_event_id"], t["amount"], t["balance_after"]) for t in account]
    assert got[:2] == [
        ("usage", "email", email, "-0.004050", "2.972250"),
        ("usage", "sms", sms, "-0.023700", "2.976300"),
    ]
    assert got[2][3:] == ("3.000000", "3.000000") and got[2][2] is None
    assert_balanced(await agency.wallet(aid), account)


async def test_a_time_out_of_range_costs_no_other_tenant_its_usage_totals(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """The wallet sums a batch's usage by account and minute into ``wallet.usage`` messages;
    one company's record with a year-1 time must not take another's totals down with it."""
    b = await Reseller(tally).create(connect=False)
    b1 = await b.account()  # self-billing: its usage is the company leg's amount
    await b.fund("100")

    async def usage() -> dict[str, Any] | None:
        r = await tally.http.get(
            tally.url("notifier", f"/v1/accounts/{b1}/usage?period=daily"), headers=b.admin
        )
        return r.json() if r.status_code == 200 else None

    await eventually(usage, what="the notifier to learn of the account")
    other = recorded(uid("co"), 5000, account_id=uid("acct"), occurred_at="0001-01-01T00:00:00+01:00")
    mine = recorded(b.cid, EMAIL, account_id=b1)
    for m in (other, mine):  # one key, one producer batch: most likely one wallet batch too
        await producer.send(TOPIC, orjson.dumps(m), key=b.cid.encode())
    await producer.flush()
    await tally.wait_applied(b.cid, eid_of(mine))

    async def counted() -> dict[str, Any] | None:
        found = await usage()
        return found if found and found["services"] else None

    totals = await eventually(counted, timeout=30, what=f"{b1}'s usage at the notifier")
    assert totals["services"] == {"email": "0.000675"}, totals
    await dead_letter(tally, eid_of(other))


# --- the debit latency histogram ---------------------------------------------------------------


def histogram(text: str) -> dict[str, float]:
    prefix = "tally_wallet_debit_latency_seconds"
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix(prefix)] = float(value)
    return out


async def test_the_debit_latency_histogram_counts_every_debit(tally: Tally) -> None:
    async def metrics() -> dict[str, float]:
        return histogram((await tally.http.get(tally.url("wallet", "/metrics"))).text)

    cid = await funded(tally)
    before = await metrics()
    # one usage-meter group of 7 (one recorded_at), then 3 records of distinct recorded_at
    body = {
        "events": [
            {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"} for _ in range(7)
        ]
    }
    r = await tally.post_usage(body)
    assert [x["status"] for x in r.json()["results"]] == ["accepted"] * 7
    for _ in range(3):
        await tally.produce(TOPIC, recorded(cid), key=cid)
    sentinel = await accepted(tally, cid)
    await tally.wait_applied(cid, sentinel)

    async def counted() -> dict[str, float] | None:
        after = await metrics()
        return after if after["_count"] - before["_count"] >= 11 else None

    after = await eventually(counted, timeout=10, what="11 debits in the latency histogram")
    assert after["_count"] - before["_count"] == 11
    assert after['_bucket{le="+Inf"}'] == after["_count"]
    assert after["_sum"] >= before["_sum"]
    buckets = [v for k, v in after.items() if k.startswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative


# --- a record the ledger's index cannot hold -------------------------------------------------


# 6,000 random bytes: past a btree entry's 2,704 bytes; 15,000: past an index row's 8,191.
# Both are Postgres class 54 ("program limit exceeded"), which held the partition for good
# until 2026-12-04 (a helper's attack, docs/0020). Before, this test gave the poison a long
# envelope id too, which the parser refuses first, so it never reached the database.
@pytest.mark.parametrize("size", [6000, 15000])
async def test_an_outsized_event_id_is_dead_lettered_and_the_partition_goes_on(
    tally: Tally, size: int
) -> None:
    """A data.event_id too long for the ledger's unique key index (the envelope id is bounded,
    the payload's is not), amid good records: the record is poison, not a failure of the
    environment, and every good record around it is debited once."""
    cid = await funded(tally)
    marker = uid("ev")
    huge = marker + secrets.token_urlsafe(size)  # incompressible
    poison = recorded(cid, eid=huge)
    poison["id"] = uid("usage")  # a short envelope id: the payload's alone is long
    around = [recorded(cid, 10) for _ in range(20)]
    for message in [*around[:10], poison, *around[10:]]:
        await tally.produce(TOPIC, message, key=cid)
    after = await accepted(tally, cid)
    lines = await tally.wait_applied(cid, after, timeout=60)
    await dead_letter(tally, marker)
    debited = sorted(t["usage_event_id"] for t in lines if t["kind"] == "usage")
    assert debited == sorted([*(eid_of(m) for m in around), after])


# --- usage-meter's edge events, redeliveries, tenants and currencies -------------------------


async def test_edge_times_accepted_by_usage_meter_are_each_debited_once_never_dead_lettered(
    tally: Tally,
) -> None:
    cid = await funded(tally, "1000000")
    times = [
        "1900-01-01T00:00:00+14:00",
        "2099-12-31T23:59:59-12:00",
        "1900-01-01T00:00:00+23:59",
        "2099-12-31T23:59:59-23:59",
        "2099-12-31T23:59:59.999999999Z",
        "2026-03-01T10:00:00.123456789+05:30",
        "2026-03-01t10:00:00z",
        "2024-02-29T23:59:59-00:00",
    ]
    results = await post(
        tally,
        cid,
        [{"occurred_at": t} for t in times]
        + [{"quantity": "1000000000"}, {"quantity": "0.000001"}, {"quantity": 3}],
    )
    assert [r["status"] for r in results] == ["accepted"] * len(results), results
    ids = [r["event_id"] for r in results]
    zero = ids[-2]  # 0.000001 x 675 micros rounds to 0: posts nothing (usage.py, by design)
    sentinel = (await post(tally, cid, [{}]))[0]["event_id"]
    lines = await tally.wait_applied(cid, sentinel)
    usage = [(t["usage_event_id"], -micros(t["amount"])) for t in lines if t["kind"] == "usage"]
    want = [(i, EMAIL) for i in ids[: len(times)]] + [
        (ids[-3], 675_000_000_000),
        (ids[-1], 3 * EMAIL),
        (sentinel, EMAIL),
    ]
    assert sorted(usage) == sorted(want)
    assert zero not in {i for i, _ in usage}
    assert_balanced(await tally.company_wallet(cid), lines)
    await none_dead(tally, ids)


async def test_rebilled_edge_events_post_both_legs_once(tally: Tally) -> None:
    agency = Agency(tally)
    await agency.fund("10")
    aid = await agency.add_account("rebill_markup", {"email": "9.99", "sms": "10"})
    results = await post(
        tally,
        agency.cid,
        [
            {"account_id": aid, "occurred_at": "1900-01-01T00:00:00+14:00"},
            {
                "account_id": aid,
                "occurred_at": "2099-12-31T23:59:59-12:00",
                "service": "sms",
                "quantity": "0.007",
            },
            {"account_id": aid, "quantity": "0.000001"},  # 0 micros: nothing to post
        ],
    )
    assert [r["status"] for r in results] == ["accepted"] * 3, results
    a, b, zero = (r["event_id"] for r in results)
    sentinel = (await post(tally, agency.cid, [{}]))[0]["event_id"]
    company = await tally.wait_applied(agency.cid, sentinel)
    got = sorted((t["usage_event_id"], -micros(t["amount"])) for t in company if t["kind"] == "usage")
    assert got == sorted([(a, 675), (b, 55), (sentinel, 675)])  # 7900 x 0.007 = 55.3 -> 55
    account = await agency.lines(aid)
    got = sorted((t["usage_event_id"], -micros(t["amount"])) for t in account if t["kind"] == "usage")
    assert got == sorted([(a, 6743), (b, 550)])  # 675 x 9.99 = 6743.25
    assert_balanced(await agency.wallet(aid), account)
    await none_dead(tally, [a, b, zero])


async def test_same_event_redelivered_with_another_account_or_amount_debits_once(tally: Tally) -> None:
    agency = Agency(tally)
    await agency.fund("5")
    aid = await agency.add_account("rebill_markup", {"email": "2"})
    other = await agency.add_account("rebill_markup", {"email": "3"})
    first = recorded(agency.cid, 1000, account_id=aid)
    eid = first["data"]["event_id"]
    again = [
        first,
        recorded(agency.cid, 9000, eid=eid, account_id=aid),
        recorded(agency.cid, 1000, eid=eid, account_id=other),
        recorded(agency.cid, 1000, eid=eid, account_id=None),
    ]
    for m in again:
        await tally.produce(TOPIC, m, key=agency.cid)
    mid = (await post(tally, agency.cid, [{}]))[0]["event_id"]
    await tally.wait_applied(agency.cid, mid)
    for m in again:  # and again, in a later batch
        await tally.produce(TOPIC, m, key=agency.cid)
    sentinel = (await post(tally, agency.cid, [{}]))[0]["event_id"]
    company = await tally.wait_applied(agency.cid, sentinel)
    legs = [(t["usage_event_id"], -micros(t["amount"])) for t in company if t["kind"] == "usage"]
    assert sorted(legs) == sorted([(eid, 1000), (mid, EMAIL), (sentinel, EMAIL)])
    assert [(t["usage_event_id"], t["amount"]) for t in await agency.lines(aid) if t["kind"] == "usage"] == [
        (eid, "-0.002000")
    ]
    assert not [t for t in await agency.lines(other) if t["kind"] == "usage"]
    assert_balanced(await agency.wallet(), company)


async def test_a_forged_record_naming_another_companys_account_never_debits_it(tally: Tally) -> None:
    a, b = Agency(tally), Agency(tally)
    await a.fund("1")
    theirs = await b.add_account("rebill_markup", {"email": "2"})
    await b.fund("1", theirs)
    forged = recorded(a.cid, 5000, account_id=theirs)
    await tally.produce(TOPIC, forged, key=a.cid)
    sentinel = (await post(tally, a.cid, [{}]))[0]["event_id"]
    lines = await tally.wait_applied(a.cid, sentinel)
    dead = await tally.find_on_topic(DLQ, lambda d: forged["data"]["event_id"] in d["message"])
    assert "belongs to another company" in dead["error"]
    assert forged["data"]["event_id"] not in {t["usage_event_id"] for t in lines}
    assert (await b.wallet(theirs))["balance"] == "1.000000"
    assert not [t for t in await b.lines(theirs) if t["kind"] == "usage"]


async def test_a_usd_record_for_a_eur_company_without_a_wallet_yet_is_dead_lettered(tally: Tally) -> None:
    """The wallet knows the company is in EUR (rebilling.events); a forged USD record must not
    open its wallet in USD (every EUR debit and credit after it would then be refused)."""
    b = Reseller(tally)
    r = await tally.http.post(
        tally.url("rebilling", "/v1/companies"),
        headers=tally.auth("platform_admin"),
        json={
            "id": b.cid,
            "name": "Agence",
            "plan": "starter",
            "currency": "EUR",
            "owner_email": f"o-{b.cid}@example.com",
        },
    )
    assert r.status_code == 201, r.text

    async def heard() -> bool:
        # the wallet's own copy of the company (rebilling.events), not the ghost wallet GET
        # answers from rebilling's directory before that copy arrives
        rows = await tally.sql("wallet", "SELECT currency FROM companies WHERE company_id = $1", b.cid)
        return [r["currency"] for r in rows] == ["EUR"]

    await eventually(heard, what="the wallet to hear the company is in EUR")
    usd = recorded(b.cid, 1000)
    good = recorded(b.cid, 600, currency="EUR")
    await tally.produce(TOPIC, usd, key=b.cid)
    await tally.produce(TOPIC, good, key=b.cid)

    async def settled() -> bool:
        lines = await tally.company_transactions(b.cid)
        if good["data"]["event_id"] in {t["usage_event_id"] for t in lines}:
            return True
        await tally.find_on_topic(DLQ, lambda d: good["data"]["event_id"] in d["message"], timeout=1)
        return True

    async def either() -> bool:
        try:
            return await settled()
        except AssertionError:
            return False

    await eventually(either, timeout=40, what="the EUR record handled")
    wallet = await b.wallet()
    lines = await tally.company_transactions(b.cid)
    usage = {t["usage_event_id"] for t in lines if t["kind"] == "usage"}
    assert wallet["currency"] == "EUR", wallet
    assert usage == {good["data"]["event_id"]}, lines
    await tally.find_on_topic(DLQ, lambda d: usd["data"]["event_id"] in d["message"])
    assert_balanced(wallet, lines)


@pytest.mark.parametrize("kind", ["redelivered", "zero"])
async def test_the_debit_latency_histogram_counts_debits_not_redeliveries(tally: Tally, kind: str) -> None:
    async def count() -> float:
        return histogram((await tally.http.get(tally.url("wallet", "/metrics"))).text)["_count"]

    cid = await funded(tally)
    first = recorded(cid, 1000)
    await tally.produce(TOPIC, first, key=cid)
    await tally.wait_applied(cid, first["data"]["event_id"])
    before = await count()
    await tally.produce(TOPIC, first if kind == "redelivered" else recorded(cid, 0), key=cid)
    sentinel = (await post(tally, cid, [{}]))[0]["event_id"]
    await tally.wait_applied(cid, sentinel)

    async def counted() -> float | None:
        n = await count()
        return n if n - before >= 1 else None

    await eventually(counted, timeout=10, what="the sentinel's debit counted")
    assert await count() - before == 1  # the sentinel only: nothing else was debited

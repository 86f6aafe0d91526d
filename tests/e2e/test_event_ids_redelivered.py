"""Event ids per company (docs/0021), redelivered: ``usage.recorded`` records of companies
sharing ids, in any grouping, order and partition, re-sent after usage-meter forgot them, with
zero amounts and poison records that must not take an id's key, and the same ids on every
partition at once. Each checks the ledger itself: one line per (company, id) at its own
amount, one holder of each id's bare key, every balance the sum of its lines. Real stack
(kept from a helper's attack on the change)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from decimal import Decimal
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from tally.money import apply_markup
from tally_wallet.storage import LEDGER_BALANCES
from tests.support.builders import Agency, funded, recorded_message, usage_event
from tests.support.stack import Tally, eventually, uid

SMS = 7900


async def group(p: AIOKafkaProducer, records: list[dict[str, Any]], partition: int) -> None:
    """One Kafka record batch on ``partition``: the wallet's handler gets it in one batch."""
    batch = p.create_batch()
    for r in records:
        args = {"key": r["data"]["company_id"].encode(), "value": orjson.dumps(r), "timestamp": None}
        if batch.append(**args) is None:  # full: send it, go on in another
            await (await p.send_batch(batch, "usage.recorded", partition=partition))
            batch = p.create_batch()
            assert batch.append(**args) is not None
    await (await p.send_batch(batch, "usage.recorded", partition=partition))


async def drain(tally: Tally, p: AIOKafkaProducer, timeout: float = 60) -> None:
    """A sentinel record on every partition, each waited for in the ledger: everything
    produced before on any partition has been applied."""
    parts = sorted(await p.partitions_for("usage.recorded"))
    sc = uid("sentinel-co")
    eids = []
    for part in parts:
        e = uid("sent")
        eids.append(e)
        await group(p, [recorded_message(sc, e, 1)], part)

    async def done() -> bool:
        rows = await tally.sql(
            "wallet", "SELECT count(*) AS n FROM transfers WHERE usage_event_id = ANY($1::text[])", eids
        )
        return bool(rows[0]["n"] == len(eids))

    await eventually(done, timeout=timeout, what="sentinels on every partition")


async def usage_lines(tally: Tally, ids: list[str]) -> list[Any]:
    return await tally.sql(
        "wallet",
        "SELECT key, debit_wallet, usage_event_id, amount FROM transfers "
        "WHERE usage_event_id = ANY($1::text[]) AND kind = 'usage'",
        ids,
    )


async def ledger_consistent(tally: Tally) -> None:
    check = await tally.sql("wallet", LEDGER_BALANCES)
    bad = [dict(r) for r in check if r["balance"] != r["derived"]]
    assert check and not bad, bad


async def company_balance(tally: Tally, cid: str) -> int:
    rows = await tally.sql("wallet", "SELECT balance FROM wallets WHERE id = $1", f"company:{cid}")
    return int(rows[0]["balance"])


async def test_redeliveries_in_any_grouping_order_and_partition(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """5 companies + 1 zero-amount company share 12 ids. First deliveries in random groups on
    random partitions, then 4 rounds of redeliveries in other groups, orders and partitions,
    concurrently: every (company, id) charged once at its own amount."""
    rng = random.Random(21)
    cs = [await funded(tally, "100") for _ in range(5)]
    zero = await funded(tally, "100")
    ids = [uid("g") for _ in range(12)]
    amount = {(c, e): rng.randint(1, 100_000) for c in cs for e in ids}
    records = [recorded_message(c, e, a) for (c, e), a in amount.items()]
    zeros = [recorded_message(zero, e, 0) for e in ids]
    parts = sorted(await producer.partitions_for("usage.recorded"))

    def groups(rs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        rs = rs[:]
        rng.shuffle(rs)
        out = []
        while rs:
            n = rng.randint(1, 9)
            out.append(rs[:n])
            rs = rs[n:]
        return out

    # zero amounts first, each in the same group ahead of a real one with its id
    first = [[z, *[r for r in records if r["data"]["event_id"] == z["data"]["event_id"]][:2]] for z in zeros]
    rest = [r for r in records if not any(r in g for g in first)]
    await asyncio.gather(*[group(producer, g, rng.choice(parts)) for g in first + groups(rest)])
    for _ in range(4):
        await asyncio.gather(*[group(producer, g, rng.choice(parts)) for g in groups(records + zeros)])
    await drain(tally, producer)
    lines = await usage_lines(tally, ids)
    got = Counter((r["debit_wallet"], r["usage_event_id"]) for r in lines)
    assert all(n == 1 for n in got.values()), [k for k, n in got.items() if n > 1]
    assert set(got) == {(f"company:{c}", e) for c in cs for e in ids}, set(got) ^ {
        (f"company:{c}", e) for c in cs for e in ids
    }
    for r in lines:
        c = r["debit_wallet"].removeprefix("company:")
        assert r["amount"] == amount[(c, r["usage_event_id"])], dict(r)
    bare = Counter(r["usage_event_id"] for r in lines if r["key"] == f"usage:{r['usage_event_id']}:company")
    assert all(bare[e] == 1 for e in ids), bare
    for c in cs:
        assert await company_balance(tally, c) == 100_000_000 - sum(amount[(c, e)] for e in ids), c
    assert await company_balance(tally, zero) == 100_000_000
    await ledger_consistent(tally)


async def test_resend_after_forget_concurrently_many_companies_rebilled(tally: Tally) -> None:
    """4 companies + a rebilled agency post 8 shared ids concurrently; then usage-meter forgets
    them 3 times and every company re-sends everything concurrently (with retries): every
    re-send round answers accepted once per (company, id), the wallet charges nothing again."""
    rng = random.Random(5)
    cs = [await funded(tally, "100") for _ in range(4)]
    ag = Agency(tally)
    acct = await ag.add_account("rebill_markup", {"default": "1.5"})
    await ag.fund("100")
    await ag.fund("100", acct)
    ids = [uid("f") for _ in range(8)]

    def bodies() -> list[list[dict[str, str]]]:
        reqs = []
        for c in cs:
            b = [usage_event(c, e) for e in ids]
            for _ in range(2):
                rng.shuffle(b)
                reqs.append(b[:])
        b = [usage_event(ag.cid, e, account_id=acct) for e in ids]
        reqs += [b[:], b[::-1]]
        rng.shuffle(reqs)
        return reqs

    for round_ in range(4):
        if round_:
            await tally.sql("usage_meter", "DELETE FROM ingested WHERE event_id = ANY($1::text[])", ids)
        reqs = bodies()
        responses = await asyncio.gather(*[tally.post_usage({"events": b}) for b in reqs])
        assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
        accepted: Counter[tuple[str, str]] = Counter()
        for b, r in zip(reqs, responses, strict=True):
            for e, res in zip(b, r.json()["results"], strict=True):
                assert res["status"] in ("accepted", "duplicate"), res
                if res["status"] == "accepted":
                    accepted[(e["company_id"], e["event_id"])] += 1
        assert len(accepted) == 5 * len(ids) and set(accepted.values()) == {1}, (round_, accepted)
    for c in [*cs, ag.cid]:
        sentinel = uid("s")
        r = await tally.post_usage(usage_event(c, sentinel, service="email"))
        assert r.json()["results"][0]["status"] == "accepted"
        await tally.wait_applied(c, sentinel)
    lines = await usage_lines(tally, ids)
    got = Counter((r["debit_wallet"], r["usage_event_id"]) for r in lines)
    want = {(f"company:{c}", e) for c in [*cs, ag.cid] for e in ids} | {(f"account:{acct}", e) for e in ids}
    assert set(got) == want and set(got.values()) == {1}, (
        set(got) ^ want,
        [k for k, n in got.items() if n > 1],
    )
    assert all(
        r["amount"] == (SMS if r["debit_wallet"].startswith("company") else apply_markup(SMS, Decimal("1.5")))
        for r in lines
    )
    for c in cs:
        assert await company_balance(tally, c) == 100_000_000 - len(ids) * SMS - 675, c
    await ledger_consistent(tally)


async def test_zero_amount_shares_id_with_real_event(tally: Tally, producer: AIOKafkaProducer) -> None:
    """A's zero-amount event (email 0.0001 -> 0 micros) with id x, then B's real x; A's
    record redelivered in one batch ahead of B's; both forgotten and re-sent; then C's x.
    B is charged once, A never, C once."""
    a, b, c = await funded(tally, "10"), await funded(tally, "10"), await funded(tally, "10")
    x = uid("z")
    r = await tally.post_usage(usage_event(a, x, service="email", quantity="0.0001"))
    assert r.json()["results"][0]["status"] == "accepted", r.text
    r = await tally.post_usage(usage_event(b, x))
    assert r.json()["results"][0]["status"] == "accepted", r.text
    await tally.wait_applied(b, x)
    # redeliver A's zero record together with B's, A's first, on one partition
    rec_a = await tally.find_on_topic("usage.recorded", lambda m: m.get("id") == f"usage:{a}/{x}")
    rec_b = await tally.find_on_topic("usage.recorded", lambda m: m.get("id") == f"usage:{b}/{x}")
    assert rec_a["data"]["platform_amount_micros"] == 0
    for part in sorted(await producer.partitions_for("usage.recorded")):
        await group(producer, [rec_a, rec_b, rec_a], part)
    await tally.sql("usage_meter", "DELETE FROM ingested WHERE event_id = $1", x)
    both = [usage_event(a, x, service="email", quantity="0.0001"), usage_event(b, x)]
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    r = await tally.post_usage(usage_event(c, x))
    assert r.json()["results"][0]["status"] == "accepted", r.text
    await tally.wait_applied(c, x)
    await drain(tally, producer)
    lines = await usage_lines(tally, [x])
    keys = sorted((r["debit_wallet"], r["key"], r["amount"]) for r in lines)
    assert keys == sorted(
        [(f"company:{b}", f"usage:{x}:company", SMS), (f"company:{c}", f"usage:{c}/{x}:company", SMS)]
    ), keys
    await ledger_consistent(tally)


async def test_same_ids_on_different_partitions_at_the_same_moment(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """4 companies, each on its own partition, post the same 400 ids in big batches at the
    same moment; then everything again with the partitions rotated, twice."""
    rng = random.Random(9)
    parts = sorted(await producer.partitions_for("usage.recorded"))
    cs = [await funded(tally, "1000") for _ in parts]
    ids = [f"{uid('p')}-{i}" for i in range(400)]
    amount = {(c, e): rng.randint(1, 50_000) for c in cs for e in ids}
    per = {c: [recorded_message(c, e, amount[(c, e)]) for e in ids] for c in cs}

    async def stream(c: str, part: int) -> None:
        rs = per[c]
        for i in range(0, len(rs), 50):
            await group(producer, rs[i : i + 50], part)

    await asyncio.gather(*[stream(c, parts[i]) for i, c in enumerate(cs)])
    for shift in (1, 2):
        await asyncio.gather(*[stream(c, parts[(i + shift) % len(parts)]) for i, c in enumerate(cs)])
    await drain(tally, producer, timeout=120)
    lines = await usage_lines(tally, ids)
    got = Counter((r["debit_wallet"], r["usage_event_id"]) for r in lines)
    assert len(got) == len(cs) * len(ids) and set(got.values()) == {1}, [k for k, n in got.items() if n != 1][
        :5
    ]
    bare = Counter(r["usage_event_id"] for r in lines if r["key"] == f"usage:{r['usage_event_id']}:company")
    assert len(bare) == len(ids) and set(bare.values()) == {1}
    for c in cs:
        assert await company_balance(tally, c) == 1_000_000_000 - sum(amount[(c, e)] for e in ids), c
    await ledger_consistent(tally)


async def test_resend_after_forget_over_topic_and_http_at_once_one_debited_each(
    tally: Tally, producer: AIOKafkaProducer
) -> None:
    """3 companies share 10 ids (posted over HTTP). Then twice: usage-meter forgets them and
    every company re-sends everything over usage.ingest and HTTP at once; the usage.recorded
    records are also redelivered mixed. Ledger once; one wallet.debited per (company, id)."""
    rng = random.Random(17)
    cs = [await funded(tally, "100") for _ in range(3)]
    ids = [uid("t") for _ in range(10)]
    r = await tally.post_usage({"events": [usage_event(c, e) for e in ids for c in rng.sample(cs, 3)]})
    assert {v["status"] for v in r.json()["results"]} == {"accepted"}, r.text
    for _ in range(2):
        await tally.sql("usage_meter", "DELETE FROM ingested WHERE event_id = ANY($1::text[])", ids)

        async def topic() -> None:
            for e in ids:
                for c in rng.sample(cs, 3):
                    await tally.produce("usage.ingest", usage_event(c, e), key=c)

        async def http() -> list[Any]:
            reqs = []
            for c in cs:
                b = [usage_event(c, e) for e in ids]
                rng.shuffle(b)
                reqs += [b[:5], b[5:], b]
            return await asyncio.gather(*[tally.post_usage({"events": b}) for b in reqs])

        _, responses = await asyncio.gather(topic(), http())
        assert all(r.status_code == 202 for r in responses)

    # the records as written, redelivered mixed across partitions
    async def all_recorded() -> list[Any] | None:
        found = await tally.topic_messages(
            "usage.recorded",
            lambda m: m.get("data", {}).get("event_id") in ids,
            until=lambda m: m.get("data", {}).get("event_id") == ids[-1],
        )
        return found if len(found) >= 3 * len(ids) * 3 else None  # first posting + two re-sends

    recs = await eventually(all_recorded, timeout=60, what="every usage.recorded")
    assert len(recs) == 3 * len(ids) * 3, len(recs)
    rng.shuffle(recs)
    parts = sorted(await producer.partitions_for("usage.recorded"))
    for i in range(0, len(recs), 6):
        await group(producer, recs[i : i + 6], rng.choice(parts))
    await drain(tally, producer)
    lines = await usage_lines(tally, ids)
    got = Counter((r["debit_wallet"], r["usage_event_id"]) for r in lines)
    assert len(got) == 3 * len(ids) and set(got.values()) == {1}, got
    for c in cs:
        assert await company_balance(tally, c) == 100_000_000 - len(ids) * SMS, c
    await ledger_consistent(tally)
    sc = uid("endco")
    await group(producer, [recorded_message(sc, "end", 5)], parts[0])
    debited = await tally.topic_messages(
        "wallet.events",
        lambda m: m.get("type") == "wallet.debited" and m["data"].get("usage_event_id") in ids,
        until=lambda m: m.get("type") == "wallet.debited" and m["data"].get("company_id") == sc,
        timeout=60,
    )
    per = Counter((m["data"]["company_id"], m["data"]["usage_event_id"]) for m in debited)
    assert len(per) == 3 * len(ids) and set(per.values()) == {1}, [k for k, n in per.items() if n != 1]
    assert len({m["id"] for m in debited}) == len(debited)


async def test_poison_record_in_a_batch_never_holds_the_key(tally: Tally, producer: AIOKafkaProducer) -> None:
    """A's x names an account of another company (LedgerError: dead-lettered) and sits ahead of
    B's x and C's x in one batch; later B's and C's x redelivered alone and together, and A's
    poison again: B and C charged once each, A never."""
    other = Agency(tally)
    foreign = await other.add_account("rebill_markup", {"default": "2"})
    a, b, c = await funded(tally, "10"), await funded(tally, "10"), await funded(tally, "10")
    parts = sorted(await producer.partitions_for("usage.recorded"))
    x = uid("px")
    poison = recorded_message(a, x, 500, foreign)
    rb, rc = recorded_message(b, x, 700), recorded_message(c, x, 900)
    await group(producer, [poison, rb, poison, rc], parts[0])
    await drain(tally, producer)
    for p_ in parts:
        await group(producer, [rc, poison, rb], p_)
        await group(producer, [rb], p_)
        await group(producer, [rc], p_)
    await drain(tally, producer)
    dead = await tally.find_on_topic("usage.recorded.dlq", lambda d: poison["id"] in d.get("message", ""))
    assert dead["failed_by"] == "wallet" and "another company" in dead["error"], dead
    lines = await usage_lines(tally, [x])
    got = sorted((r["debit_wallet"], r["amount"]) for r in lines)
    assert got == sorted([(f"company:{b}", 700), (f"company:{c}", 900)]), [dict(r) for r in lines]
    await ledger_consistent(tally)

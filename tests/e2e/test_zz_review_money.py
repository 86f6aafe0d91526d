from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson

from tests.support.attacks import all_store, one_batch
from tests.support.builders import Reseller
from tests.support.stack import Tally, eventually, uid


def ev(cid: str, eid: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"event_id": eid or uid("ev"), "company_id": cid, "service": "email", "quantity": "1", **kw}


async def fund(tally: Tally, cid: str, amount: str = "50.00") -> None:
    r = await tally.http.post(tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
                              json={"amount": amount}, headers=tally.auth("platform_admin"))
    assert r.status_code == 201, r.text


async def known_company(tally: Tally) -> str:
    k = await Reseller(tally, plan="starter").create(connect=False)
    await all_store(tally, "company", k.cid, "USD")
    await fund(tally, k.cid)
    return k.cid


async def usage_lines(tally: Tally, cid: str) -> Counter[str]:
    txs = await tally.company_transactions(cid)
    return Counter(t["usage_event_id"] for t in txs if t.get("usage_event_id"))


async def settle(tally: Tally, cid: str, expected: set[str]) -> Counter[str]:
    async def ok() -> Counter[str] | None:
        c = await usage_lines(tally, cid)
        return c if set(c) >= expected else None
    c = await eventually(ok, timeout=60, what=f"{expected} in {cid}")
    await asyncio.sleep(3)  # anything extra arrives
    return await usage_lines(tally, cid)


async def test_outage_mixed_requests_across_tenants(tally: Tally) -> None:
    k1, k2 = await known_company(tally), await known_company(tally)
    stranger = uid("co")
    shared = uid("ev")
    accepted_ids: dict[str, set[str]] = {k1: set(), k2: set()}
    await tally.stack.stop_service("rebilling")
    try:
        for rnd in range(3):
            shared = uid("ev")
            reqA = [ev(k1, shared), ev(stranger)]               # refused: names stranger
            reqB = [ev(k1, shared)]                              # accepted: same id
            reqC = [ev(k2), ev(k2)]                              # other tenant
            reqD = [ev(k2, account_id=uid("acct"))]              # known company, unknown account
            reqE = [ev(k1, account_id=uid("acct")), ev(k2)]      # unknown account + other tenant's event
            reqs = [reqA, reqB, reqC, reqD, reqE] + [[ev(k1)] for _ in range(8)]
            answers = await asyncio.gather(*[tally.post_usage({"events": r}) for r in reqs])
            codes = [a.status_code for a in answers]
            print("round", rnd, codes)
            assert codes[0] == 503, answers[0].text
            assert codes[3] == 503, answers[3].text
            assert codes[4] == 503, answers[4].text
            for i in [1, 2] + list(range(5, 13)):
                assert codes[i] == 202, (i, answers[i].text)
                for e, res in zip(reqs[i], answers[i].json()["results"], strict=True):
                    assert res["status"] == "accepted", (i, res)
                    accepted_ids[e["company_id"]].add(e["event_id"])
            # retry of A while still down: still 503, nothing recorded
            r = await tally.post_usage({"events": reqA})
            assert r.status_code == 503, r.text
        lastA = reqA
    finally:
        tally.stack.spawn_service("rebilling")
        await tally.stack.wait_ready("rebilling")
    r = await tally.post_usage({"events": lastA})
    print("retry A after", r.status_code, r.text)
    assert r.status_code == 202
    st = [x["status"] for x in r.json()["results"]]
    assert st[0] == "duplicate", st
    c1 = await settle(tally, k1, accepted_ids[k1])
    c2 = await settle(tally, k2, accepted_ids[k2])
    for cid, c in ((k1, c1), (k2, c2)):
        assert set(c) == accepted_ids[cid], (cid, set(c) ^ accepted_ids[cid])
        assert all(v == 1 for v in c.values()), c
    rows = await tally.sql("usage_meter", "SELECT count(*) FROM ingested WHERE company_id = $1", stranger)
    print("stranger rows", rows[0][0])


async def test_http_and_ingest_same_events_and_redelivery(tally: Tally) -> None:
    k = await known_company(tally)
    ids = [uid("ev") for _ in range(40)]
    events = [ev(k, i) for i in ids]
    bad = {"event_id": uid("ev"), "company_id": k, "service": "nope", "quantity": "1"}
    neg = {"event_id": uid("ev"), "company_id": k, "service": "email", "quantity": "-3"}
    # some accepted before by HTTP
    r = await tally.post_usage({"events": events[:5]})
    assert r.status_code == 202 and all(x["status"] == "accepted" for x in r.json()["results"]), r.text
    await tally.produce("ignored", b"x") if False else None
    recs = [(orjson.dumps(e), []) for e in events[:20]] + [(orjson.dumps(bad), []), (b"{not json", []), (orjson.dumps(neg), [])] + [(orjson.dumps(e), []) for e in events[20:]]
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await p.start()
    try:
        async def http_all() -> list[Any]:
            return await asyncio.gather(*[tally.post_usage(e) for e in reversed(events)])
        answers, _ = await asyncio.gather(http_all(), one_batch(p, "usage.ingest", k, recs))
        await one_batch(p, "usage.ingest", k, recs)  # redelivered
        # a batch that's all new then redelivered
        fresh = [ev(k) for _ in range(10)]
        frecs = [(orjson.dumps(e), []) for e in fresh] + [(orjson.dumps(bad), [])]
        await one_batch(p, "usage.ingest", k, frecs)
        await one_batch(p, "usage.ingest", k, frecs)
    finally:
        await p.stop()
    sts = Counter(a.json()["results"][0]["status"] for a in answers)
    print("http statuses", sts)
    assert all(a.status_code == 202 for a in answers)
    expected = set(ids) | {e["event_id"] for e in fresh}
    c = await settle(tally, k, expected)
    assert set(c) == expected, set(c) ^ expected
    assert all(v == 1 for v in c.values()), c
    w = await tally.company_wallet(k)
    print("wallet", w)
    dl = await tally.sql("usage_meter", "SELECT count(*) FROM ingested WHERE company_id=$1", k)
    print("ingested rows", dl[0][0])


async def test_sigkill_after_ingest_batch(tally: Tally) -> None:
    k = await known_company(tally)
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await p.start()
    allids: set[str] = set()
    try:
        for rnd in range(3):
            batch = [ev(k) for _ in range(50)]
            allids |= {e["event_id"] for e in batch}
            await one_batch(p, "usage.ingest", k, [(orjson.dumps(e), []) for e in batch])
            await asyncio.sleep(0.15 * (rnd + 1))
            tally.stack.kill("usage-meter")
            await one_batch(p, "usage.ingest", k, [(orjson.dumps(e), []) for e in batch[:25]])
            tally.stack.spawn_service("usage-meter")
            await tally.stack.wait_ready("usage-meter")
    finally:
        await p.stop()
    c = await settle(tally, k, allids)
    assert set(c) == allids, set(c) ^ allids
    assert all(v == 1 for v in c.values()), c

"""An event id is unique within its company (docs/0021), attacked from outside: the same ids
from many companies at once, over HTTP and ``usage.ingest``, rebilled, across suspension and
threshold crossings, ids that could read as another's key, and the records a usage-meter of
the version before writes during a rolling upgrade. Real stack."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

from tally_wallet.storage import LEDGER_BALANCES
from tests.support.builders import GOOD, Agency, attach, configure, funded, recharges, wait_balance
from tests.support.stack import Tally, eventually, uid

SMS = 7900  # micros per sms


def ev(cid: str, eid: str, service: str = "sms", quantity: str = "1", **kw: str) -> dict[str, str]:
    return {"event_id": eid, "company_id": cid, "service": service, "quantity": quantity, **kw}


async def usage_lines(tally: Tally, cid: str) -> list[dict[str, Any]]:
    return [t for t in await tally.company_transactions(cid) if t["kind"] == "usage"]


async def message(tally: Tally, topic: str, message_id: str) -> dict[str, Any]:
    return await tally.find_on_topic(topic, lambda m: m.get("id") == message_id)


async def sentinel(tally: Tally, cid: str) -> None:
    """A later event of the company in the ledger: anything before it was applied."""
    e = ev(cid, uid("sentinel"), service="email")
    r = await tally.post_usage(e)
    assert r.json()["results"][0]["status"] == "accepted", r.text
    await tally.wait_applied(cid, e["event_id"])


async def test_same_ids_many_companies_concurrent_requests(tally: Tally) -> None:
    """8 companies x 20 shared ids, each company's batch sent 3 times, all concurrently and
    shuffled, plus single-event requests: exactly one accepted per (company, id), no 5xx."""
    rng = random.Random(11)
    cs = [await funded(tally, "100") for _ in range(8)]
    ids = [uid("shared") for _ in range(20)]
    requests: list[list[dict[str, str]]] = []
    for c in cs:
        batch = [ev(c, e) for e in ids]
        for _ in range(3):
            b = batch[:]
            rng.shuffle(b)
            requests.append(b)
        requests += [[ev(c, e)] for e in rng.sample(ids, 5)]
    rng.shuffle(requests)
    responses = await asyncio.gather(*[tally.post_usage({"events": b}) for b in requests])
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    accepted: dict[tuple[str, str], int] = {}
    for b, r in zip(requests, responses, strict=True):
        for e, res in zip(b, r.json()["results"], strict=True):
            assert res["event_id"] == e["event_id"]
            assert res["status"] in ("accepted", "duplicate"), res
            if res["status"] == "accepted":
                accepted[(e["company_id"], e["event_id"])] = (
                    accepted.get((e["company_id"], e["event_id"]), 0) + 1
                )
    assert len(accepted) == 8 * 20 and set(accepted.values()) == {1}, accepted
    for c in cs:
        await sentinel(tally, c)
        lines = [t for t in await usage_lines(tally, c) if t["usage_event_id"] in ids]
        assert sorted(t["usage_event_id"] for t in lines) == sorted(ids), c
        assert all(t["amount"] == "-0.007900" for t in lines)
        assert (await tally.company_wallet(c))["balance"] == f"{100 - 20 * 0.0079 - 0.000675:.6f}"


async def test_rebilled_accounts_same_id_each_at_own_markup(tally: Tally) -> None:
    x, y = Agency(tally), Agency(tally)
    ax = await x.add_account("rebill_markup", {"default": "1.5"})
    ay = await y.add_account("rebill_markup", {"default": "2"})
    await x.fund("10")
    await y.fund("10")
    await x.fund("10", ax)
    await y.fund("10", ay)
    shared = uid("ev")
    both = [ev(x.cid, shared, account_id=ax), ev(y.cid, shared, account_id=ay)]
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["duplicate", "duplicate"], r.text
    # redeliver both usage.recorded records on the topic
    for cid in (x.cid, y.cid):
        rec = await message(tally, "usage.recorded", f"usage:{cid}/{shared}")
        assert rec["data"]["id_scope"] == "company"
        await tally.produce("usage.recorded", rec, key=cid)
    for ag in (x, y):
        await sentinel(tally, ag.cid)
    lx = [t["amount"] for t in await x.lines(ax) if t.get("usage_event_id") == shared]
    ly = [t["amount"] for t in await y.lines(ay) if t.get("usage_event_id") == shared]
    assert lx == ["-0.011850"], lx
    assert ly == ["-0.015800"], ly
    for ag in (x, y):
        lines = [t for t in await usage_lines(tally, ag.cid) if t["usage_event_id"] == shared]
        assert [t["amount"] for t in lines] == ["-0.007900"], lines
    # one wallet.debited per company, ids debited:<company>/<event>
    for ag in (x, y):
        debited = f"debited:{ag.cid}/{shared}"
        d = await message(tally, "wallet.events", debited)
        assert (d["type"], d["data"]["company_id"], d["data"]["usage_event_id"]) == (
            "wallet.debited",
            ag.cid,
            shared,
        )


async def test_colon_ids_cannot_make_ambiguous_keys(tally: Tally) -> None:
    """company 'p:q' event 'r' vs company 'p' event 'q:r', and event ids ending ':company' /
    ':account' / ':0'."""
    base = uid("amb")
    c1, c2 = f"{base}:q", base
    for c in (c1, c2):
        r = await tally.http.post(
            tally.url("wallet", f"/v1/companies/{c}/wallet/credits"),
            json={"amount": "10"},
            headers=tally.auth("platform_admin"),
        )
        assert r.status_code == 201, r.text
    e1, e2 = "r", "q:r"
    tricky = ["x", "x:company", "x:account", "x:0", "x:company:company"]
    body = [ev(c1, e1), ev(c2, e2)] + [ev(c2, t) for t in tricky]
    r = await tally.post_usage({"events": body})
    assert [v["status"] for v in r.json()["results"]] == ["accepted"] * len(body), r.text
    for c in (c1, c2):
        await sentinel(tally, c)
    assert [t["usage_event_id"] for t in await usage_lines(tally, c1) if t["usage_event_id"] == e1] == [e1]
    got = sorted(t["usage_event_id"] for t in await usage_lines(tally, c2) if t["service"] == "sms")
    assert got == sorted([e2, *tricky]), got
    r = await tally.post_usage({"events": body})
    assert [v["status"] for v in r.json()["results"]] == ["duplicate"] * len(body), r.text


async def test_other_companys_id_never_answers_duplicate_when_refused(tally: Tally) -> None:
    """Information leak: A used id x; B's x refused for B's own reason must say rejected."""
    a = await funded(tally, "10")
    shared = uid("ev")
    r = await tally.post_usage(ev(a, shared))
    assert r.json()["results"][0]["status"] == "accepted"
    b = uid("co")  # unknown service: rejected for B
    r = await tally.post_usage(ev(b, shared, service="no-such-service"))
    res = r.json()["results"][0]
    assert res["status"] == "rejected" and res["error"]["code"] == "unknown_service", res
    # B suspended (wallet below zero), then posts A's id: rejected, not duplicate
    b = await funded(tally, "0.001")
    first = ev(b, uid("ev"))
    assert (await tally.post_usage(first)).json()["results"][0]["status"] == "accepted"

    async def refused() -> dict[str, Any] | None:
        res = (await tally.post_usage(ev(b, uid("probe")))).json()["results"][0]
        return res if res["status"] == "rejected" else None

    await eventually(refused, what="B suspended")
    res = (await tally.post_usage(ev(b, shared))).json()["results"][0]
    assert res["status"] == "rejected" and res["error"]["code"] == "agency_wallet_empty", res
    # A's retry is still duplicate (A's own fact)
    r = await tally.post_usage(ev(a, shared, service="no-such-service"))
    assert r.json()["results"][0]["status"] == "duplicate", r.text


async def test_same_id_crossing_threshold_recharges_both(tally: Tally) -> None:
    x, y = Agency(tally), Agency(tally)
    for ag in (x, y):
        await configure(tally, ag, threshold="1", reload="5")
        await attach(tally, ag, GOOD)
        await wait_balance(ag, "5.000000")  # preloaded: 0 + 5 reaches 1
    shared = uid("ev")
    # 5 - 0.0079*600 = 0.26 < 1: both cross the threshold with the same event id
    both = [ev(x.cid, shared, quantity="600"), ev(y.cid, shared, quantity="600")]
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    for ag in (x, y):
        await wait_balance(ag, "5.260000")
        attempts = await recharges(tally, ag)
        assert len(attempts) == 2 and all(a["status"] == "succeeded" for a in attempts), attempts
    for ag in (x, y):  # each crossing under its own id: recharge claims each id once
        crossed = f"wallet.threshold_crossed:usage:{ag.cid}/{shared}:company"
        assert await message(tally, "wallet.digest", crossed)


def recorded(cid: str, eid: str, amount: int, *, scope: bool, account: str | None = None) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    data: dict[str, Any] = {
        "event_id": eid,
        "company_id": cid,
        "account_id": account,
        "service": "sms",
        "quantity": "1",
        "occurred_at": now,
        "recorded_at": now,
        "unit_price_micros": amount,
        "platform_amount_micros": amount,
        "currency": "USD",
    }
    if scope:
        data["id_scope"] = "company"
    key = f"{cid}/{eid}" if scope else eid
    return {"id": f"usage:{key}", "type": "usage.recorded", "time": now, "source": "test", "data": data}


async def test_old_and_new_format_records_redelivered(tally: Tally) -> None:
    a, b = await funded(tally, "10"), await funded(tally, "10")
    old_id = uid("old")
    # an old record (no id_scope), redelivered twice: charged once
    for _ in range(3):
        await tally.produce("usage.recorded", recorded(a, old_id, 1000, scope=False), key=a)
    # a new record redelivered: charged once
    new_id = uid("new")
    for _ in range(3):
        await tally.produce("usage.recorded", recorded(a, new_id, 2000, scope=True), key=a)
    await sentinel(tally, a)
    lines = await usage_lines(tally, a)
    assert [t["amount"] for t in lines if t["usage_event_id"] == old_id] == ["-0.001000"]
    assert [t["amount"] for t in lines if t["usage_event_id"] == new_id] == ["-0.002000"]
    keys = {
        r["key"]
        for r in await tally.sql(
            "wallet", "SELECT key FROM transfers WHERE usage_event_id = ANY($1::text[])", [old_id, new_id]
        )
    }
    assert keys == {f"usage:{old_id}:company", f"usage:{a}/{new_id}:company"}, keys
    # B's old-format record with A's old bare id: what an old usage-meter replica writes
    await tally.produce("usage.recorded", recorded(b, old_id, 3000, scope=False), key=b)
    await sentinel(tally, b)
    lb = [t["amount"] for t in await usage_lines(tally, b) if t["usage_event_id"] == old_id]
    assert lb == ["-0.003000"], lb  # another company's event, not a redelivery of A's
    check = await tally.sql("wallet", LEDGER_BALANCES)
    assert check and all(r["balance"] == r["derived"] for r in check)


async def test_a_replica_of_the_version_before_cannot_lose_another_companys_event(tally: Tally) -> None:
    """During a rolling upgrade a usage-meter of the version before runs against the migrated
    table: its claim (before 473ff8e, verbatim) takes another company's id as new, so it
    answers ``accepted`` and writes a record keyed by the bare id, as A's was. The wallet took
    B's for a redelivery of A's, and B was never charged; it now keys B's by its company."""
    a, b = await funded(tally, "10"), await funded(tally, "10")
    shared = uid("ev")
    old_claim = (
        "INSERT INTO ingested (event_id, company_id) "
        "SELECT * FROM unnest($1::text[], $2::text[]) AS c(e, o) ORDER BY e "
        "ON CONFLICT DO NOTHING RETURNING event_id"
    )
    for cid in (a, b):
        assert [r["event_id"] for r in await tally.sql("usage_meter", old_claim, [shared], [cid])] == [shared]
    # what the old replica then writes for each (recorded_message before 473ff8e: bare id),
    # B's first in one run of the wallet's batch and again after A's is in the ledger
    await tally.produce("usage.recorded", recorded(a, shared, 1000, scope=False), key=a)
    await tally.produce("usage.recorded", recorded(b, shared, 3000, scope=False), key=b)
    await sentinel(tally, a)
    await sentinel(tally, b)
    await tally.produce("usage.recorded", recorded(b, shared, 3000, scope=False), key=b)  # redelivered
    await sentinel(tally, b)
    la = [t["amount"] for t in await usage_lines(tally, a) if t["usage_event_id"] == shared]
    lb = [t["amount"] for t in await usage_lines(tally, b) if t["usage_event_id"] == shared]
    assert (la, lb) == (["-0.001000"], ["-0.003000"])


async def test_a_record_whose_id_would_take_another_events_key_is_dead_lettered(tally: Tally) -> None:
    """A record forged onto ``usage.recorded`` with event id ``<A>/x`` and no ``id_scope`` would
    be keyed ``<A>/x``, the key of A's real event x, which then went uncharged. ``/`` is in no
    id's pattern: such a record is dead-lettered."""
    a = await funded(tally, "10")
    x = uid("ev")
    forged = recorded(a, f"{a}/{x}", 1, scope=False)
    await tally.produce("usage.recorded", forged, key=a)
    dead = await tally.find_on_topic("usage.recorded.dlq", lambda d: forged["id"] in d.get("message", ""))
    assert dead["failed_by"] == "wallet" and "'/'" in dead["error"]
    r = await tally.post_usage(ev(a, x))
    assert r.json()["results"][0]["status"] == "accepted", r.text
    await sentinel(tally, a)
    lines = [t["amount"] for t in await usage_lines(tally, a) if t["usage_event_id"] in (x, f"{a}/{x}")]
    assert lines == ["-0.007900"], lines


async def test_http_and_ingest_topic_race_on_same_ids(tally: Tally) -> None:
    """The same ids for 5 companies through HTTP (concurrent) and usage.ingest at once."""
    cs = [await funded(tally, "100") for _ in range(5)]
    ids = [uid("race") for _ in range(30)]
    rng = random.Random(3)

    async def over_topic() -> None:
        for e in ids:
            for c in rng.sample(cs, len(cs)):
                await tally.produce("usage.ingest", ev(c, e), key=c)

    async def over_http() -> list[Any]:
        reqs = []
        for c in cs:
            b = [ev(c, e) for e in ids]
            rng.shuffle(b)
            reqs += [b[:15], b[15:], b]
        return await asyncio.gather(*[tally.post_usage({"events": b}) for b in reqs])

    _, responses = await asyncio.gather(over_topic(), over_http())
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    for c in cs:

        async def done(c: str = c) -> list[dict[str, Any]] | None:
            lines = [t for t in await usage_lines(tally, c) if t["usage_event_id"] in ids]
            return lines if len(lines) >= len(ids) else None

        await eventually(done, what=f"{c}'s {len(ids)} events")
        await sentinel(tally, c)
        lines = [t for t in await usage_lines(tally, c) if t["usage_event_id"] in ids]
        assert sorted(t["usage_event_id"] for t in lines) == sorted(ids), c


async def test_rebilled_account_suspension_with_same_id_reaches_usage_meter(tally: Tally) -> None:
    """Two agencies' rebilled accounts go below zero through the same event id: both accounts
    are refused afterwards (account_suspended), each only its own."""
    x, y = Agency(tally), Agency(tally)
    ax = await x.add_account("rebill", {})
    ay = await y.add_account("rebill", {})
    await x.fund("10")
    await y.fund("10")
    await x.fund("0.001", ax)
    await y.fund("0.001", ay)
    shared = uid("ev")
    r = await tally.post_usage(
        {"events": [ev(x.cid, shared, account_id=ax), ev(y.cid, shared, account_id=ay)]}
    )
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    for ag, aid in ((x, ax), (y, ay)):

        async def refused(ag: Agency = ag, aid: str = aid) -> dict[str, Any] | None:
            res = (await tally.post_usage(ev(ag.cid, uid("probe"), account_id=aid))).json()["results"][0]
            return res if res["status"] == "rejected" else None

        res = await eventually(refused, what=f"{aid} refused")
        assert res["error"]["code"] == "account_suspended", res
        w = await ag.wallet(aid)
        # probes accepted before the suspension landed were charged too
        assert w["status"] == "suspended" and w["balance"].startswith("-"), w
        suspended = f"wallet.suspended:usage:{ag.cid}/{shared}:account"
        assert await message(tally, "wallet.digest", suspended)
        # the company's own usage (no account) still accepted
        res = (await tally.post_usage(ev(ag.cid, uid("probe"), service="email"))).json()["results"][0]
        assert res["status"] == "accepted", res

"""An event id is unique within its company (docs/0021), attacked from outside: the same ids
from many companies at once, over HTTP and ``usage.ingest``, rebilled, across suspension and
threshold crossings, ids that could read as another's key, and the records a usage-meter of
the version before writes during a rolling upgrade. Real stack."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from tests.support.builders import (
    GOOD,
    Agency,
    attach,
    configure,
    funded,
    recharges,
    recorded_message,
    usage_event,
    wait_balance,
)
from tests.support.stack import Tally, eventually, uid

SMS = 7900  # micros per sms


async def usage_lines(tally: Tally, cid: str) -> list[dict[str, Any]]:
    return [t for t in await tally.company_transactions(cid) if t["kind"] == "usage"]


async def message(tally: Tally, topic: str, message_id: str) -> dict[str, Any]:
    return await tally.find_on_topic(topic, lambda m: m.get("id") == message_id)


async def ids_by_company(
    tally: Tally, topic: str, companies: tuple[str, ...], event_id: str, prefix: str, suffix: str = ""
) -> dict[str, str]:
    """Each company's message about its event ``event_id``, by id: the company whose event was
    posted first holds the bare id's key (``prefix + event_id + suffix``), the others their
    company's (``prefix + company/event_id + suffix``). Exactly one holds the bare one."""
    bare = f"{prefix}{event_id}{suffix}"
    found = {}
    for c in companies:
        forms = (bare, f"{prefix}{c}/{event_id}{suffix}")

        def about(m: dict[str, Any], c: str = c, forms: tuple[str, str] = forms) -> bool:
            return m.get("id") in forms and m["data"].get("company_id") == c

        found[c] = (await tally.find_on_topic(topic, about))["id"]
    assert sum(i == bare for i in found.values()) == 1, found
    return found


async def sentinel(tally: Tally, cid: str) -> None:
    """A later event of the company in the ledger: anything before it was applied."""
    e = usage_event(cid, uid("sentinel"), service="email")
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
        batch = [usage_event(c, e) for e in ids]
        for _ in range(3):
            b = batch[:]
            rng.shuffle(b)
            requests.append(b)
        requests += [[usage_event(c, e)] for e in rng.sample(ids, 5)]
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
    both = [usage_event(x.cid, shared, account_id=ax), usage_event(y.cid, shared, account_id=ay)]
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["duplicate", "duplicate"], r.text
    # redeliver both usage.recorded records on the topic
    for cid in (x.cid, y.cid):
        rec = await message(tally, "usage.recorded", f"usage:{cid}/{shared}")
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
    # one wallet.debited per company, each under its own id
    await ids_by_company(tally, "wallet.events", (x.cid, y.cid), shared, "debited:")


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
    body = [usage_event(c1, e1), usage_event(c2, e2)] + [usage_event(c2, t) for t in tricky]
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
    r = await tally.post_usage(usage_event(a, shared))
    assert r.json()["results"][0]["status"] == "accepted"
    b = uid("co")  # unknown service: rejected for B
    r = await tally.post_usage(usage_event(b, shared, service="no-such-service"))
    res = r.json()["results"][0]
    assert res["status"] == "rejected" and res["error"]["code"] == "unknown_service", res
    # B suspended (wallet below zero), then posts A's id: rejected, not duplicate
    b = await funded(tally, "0.001")
    first = usage_event(b, uid("ev"))
    assert (await tally.post_usage(first)).json()["results"][0]["status"] == "accepted"

    async def refused() -> dict[str, Any] | None:
        res = (await tally.post_usage(usage_event(b, uid("probe")))).json()["results"][0]
        return res if res["status"] == "rejected" else None

    await eventually(refused, what="B suspended")
    res = (await tally.post_usage(usage_event(b, shared))).json()["results"][0]
    assert res["status"] == "rejected" and res["error"]["code"] == "agency_wallet_empty", res
    # A's retry is still duplicate (A's own fact)
    r = await tally.post_usage(usage_event(a, shared, service="no-such-service"))
    assert r.json()["results"][0]["status"] == "duplicate", r.text


async def test_same_id_crossing_threshold_recharges_both(tally: Tally) -> None:
    x, y = Agency(tally), Agency(tally)
    for ag in (x, y):
        await configure(tally, ag, threshold="1", reload="5")
        await attach(tally, ag, GOOD)
        await wait_balance(ag, "5.000000")  # preloaded: 0 + 5 reaches 1
    shared = uid("ev")
    # 5 - 0.0079*600 = 0.26 < 1: both cross the threshold with the same event id
    both = [usage_event(x.cid, shared, quantity="600"), usage_event(y.cid, shared, quantity="600")]
    r = await tally.post_usage({"events": both})
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    for ag in (x, y):
        await wait_balance(ag, "5.260000")
        attempts = await recharges(tally, ag)
        assert len(attempts) == 2 and all(a["status"] == "succeeded" for a in attempts), attempts
    # each crossing under its own id: recharge claims each id once
    await ids_by_company(
        tally, "wallet.digest", (x.cid, y.cid), shared, "wallet.threshold_crossed:usage:", ":company"
    )


async def test_an_event_sent_again_after_usage_meter_forgot_it_is_charged_once(tally: Tally) -> None:
    """docs/0007: usage-meter forgets an id after its window; a re-send is then accepted again
    and the ledger's key catches it. Events posted before docs/0021 hold bare keys: the same
    company's re-send must find that line, and another company's event with the id must not."""
    a, b = await funded(tally, "10"), await funded(tally, "10")
    shared = uid("ev")
    for cid in (a, b, a, b):  # each company's event, then each sent again after being forgotten
        await tally.sql("usage_meter", "DELETE FROM ingested WHERE event_id = $1", shared)
        r = await tally.post_usage(usage_event(cid, shared))
        assert r.json()["results"][0]["status"] == "accepted", r.text
        await sentinel(tally, cid)
    for cid in (a, b):
        lines = [t["amount"] for t in await usage_lines(tally, cid) if t["usage_event_id"] == shared]
        assert lines == ["-0.007900"], (cid, lines)
    keys = {
        r["key"]
        for r in await tally.sql("wallet", "SELECT key FROM transfers WHERE usage_event_id = $1", shared)
    }
    assert keys == {f"usage:{shared}:company", f"usage:{b}/{shared}:company"}, keys


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
    await tally.produce("usage.recorded", recorded_message(a, shared, 1000), key=a)
    await tally.produce("usage.recorded", recorded_message(b, shared, 3000), key=b)
    await sentinel(tally, a)
    await sentinel(tally, b)
    await tally.produce("usage.recorded", recorded_message(b, shared, 3000), key=b)  # redelivered
    await sentinel(tally, b)
    la = [t["amount"] for t in await usage_lines(tally, a) if t["usage_event_id"] == shared]
    lb = [t["amount"] for t in await usage_lines(tally, b) if t["usage_event_id"] == shared]
    assert (la, lb) == (["-0.001000"], ["-0.003000"])


async def test_a_record_whose_id_would_take_another_events_key_is_dead_lettered(tally: Tally) -> None:
    """A record forged onto ``usage.recorded`` with event id ``<A>/x`` would be keyed ``<A>/x``,
    the key A's real event x takes when another company holds x, which then went uncharged. ``/`` is in no
    id's pattern: such a record is dead-lettered."""
    a = await funded(tally, "10")
    x = uid("ev")
    forged = recorded_message(a, f"{a}/{x}", 1)
    await tally.produce("usage.recorded", forged, key=a)
    dead = await tally.find_on_topic("usage.recorded.dlq", lambda d: forged["id"] in d.get("message", ""))
    assert dead["failed_by"] == "wallet" and "'/'" in dead["error"]
    r = await tally.post_usage(usage_event(a, x))
    assert r.json()["results"][0]["status"] == "accepted", r.text
    await sentinel(tally, a)
    lines = [t["amount"] for t in await usage_lines(tally, a) if t["usage_event_id"] in (x, f"{a}/{x}")]
    assert lines == ["-0.007900"], lines


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
        {"events": [usage_event(x.cid, shared, account_id=ax), usage_event(y.cid, shared, account_id=ay)]}
    )
    assert [v["status"] for v in r.json()["results"]] == ["accepted", "accepted"], r.text
    await ids_by_company(
        tally, "wallet.digest", (x.cid, y.cid), shared, "wallet.suspended:usage:", ":account"
    )
    for ag, aid in ((x, ax), (y, ay)):

        async def refused(ag: Agency = ag, aid: str = aid) -> dict[str, Any] | None:
            res = (await tally.post_usage(usage_event(ag.cid, uid("probe"), account_id=aid))).json()[
                "results"
            ][0]
            return res if res["status"] == "rejected" else None

        res = await eventually(refused, what=f"{aid} refused")
        assert res["error"]["code"] == "account_suspended", res
        w = await ag.wallet(aid)
        # probes accepted before the suspension landed were charged too
        assert w["status"] == "suspended" and w["balance"].startswith("-"), w
        # the company's own usage (no account) still accepted
        res = (await tally.post_usage(usage_event(ag.cid, uid("probe"), service="email"))).json()["results"][
            0
        ]
        assert res["status"] == "accepted", res

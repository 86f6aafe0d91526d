"""The first slice of the money path over real parts: HTTP -> usage-meter -> outbox -> Kafka ->
wallet -> ledger, and the same through the usage.ingest topic."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from tally import db
from tally.settings import get_settings
from tally_usage_meter.retention import DedupeExpiry
from tally_wallet.storage import LEDGER_BALANCES
from tests.support.builders import funded
from tests.support.stack import Tally, eventually, uid


async def accepted(tally: Tally, e: dict[str, str]) -> None:
    r = await tally.post_usage(e)
    assert r.json()["results"][0]["status"] == "accepted", r.text


def event(cid: str, service: str = "email", quantity: str = "3", **kw: str) -> dict[str, str]:
    return {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": quantity, **kw}


async def test_posted_event_debits_company_wallet_by_the_catalog_price(tally: Tally) -> None:
    cid = uid("co")
    prices = (
        await tally.http.get(tally.url("usage-meter", "/v1/prices"), headers=tally.auth("product"))
    ).json()["items"]
    email = next(p for p in prices if p["service"] == "email" and p["currency"] == "USD")
    assert email["unit_price"] == "0.000675"

    e = event(cid, quantity="3")
    r = await tally.post_usage(e)
    assert r.status_code == 202
    assert r.json() == {"results": [{"event_id": e["event_id"], "status": "accepted"}]}

    txs = await tally.wait_applied(cid, e["event_id"])
    assert [t["amount"] for t in txs] == ["-0.002025"]
    assert txs[0]["kind"] == "usage" and txs[0]["service"] == "email"
    wallet = await tally.company_wallet(cid)
    assert wallet["balance"] == "-0.002025"


async def test_same_event_posted_twice_debits_once(tally: Tally) -> None:
    cid = await funded(tally)
    e = event(cid, service="sms", quantity="2")
    await accepted(tally, e)
    await tally.wait_applied(cid, e["event_id"])
    again = await tally.post_usage({"events": [e, e]})
    assert [x["status"] for x in again.json()["results"]] == ["duplicate", "duplicate"]

    # Everything for one company is ordered on one partition: once a later event is in the
    # ledger, any debit the duplicate could have caused would be there too.
    sentinel = event(cid)
    await accepted(tally, sentinel)
    txs = await tally.wait_applied(cid, sentinel["event_id"])
    assert [t["usage_event_id"] for t in txs].count(e["event_id"]) == 1
    assert (await tally.company_wallet(cid))["balance"] == "0.982175"  # 1 - 2*0.0079 - 0.002025


async def test_concurrent_requests_each_get_their_own_results(tally: Tally) -> None:
    """Requests that arrive together share a transaction (group commit); each still gets the
    results of its own events, in order, and an event id sent in all of them is accepted once."""

    async def group_commit() -> tuple[float, float]:  # (batches submitted, calls made)
        text = (await tally.http.get(tally.url("usage-meter", "/metrics"))).text
        found = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tally_group_commit_batches_")
        }
        return (
            found.get("tally_group_commit_batches_sum", 0.0),
            found.get("tally_group_commit_batches_count", 0.0),
        )

    cid = await funded(tally)
    shared_ids: list[str] = []
    # Whether requests meet in one group depends on when they arrive: on a loaded machine
    # (another stack beside this one) twelve may still come one by one, so up to five rounds.
    for _ in range(5):
        shared = event(cid)
        shared_ids.append(shared["event_id"])
        bodies = [{"events": [event(cid), shared, event(cid)]} for _ in range(12)]
        # twelve connections open first: the requests then go out together, not each behind a
        # connection's set-up
        await asyncio.gather(*(tally.http.get(tally.url("usage-meter", "/healthz")) for _ in bodies))
        submitted, calls = await group_commit()
        responses = await asyncio.gather(*(tally.post_usage(b) for b in bodies))
        submitted_after, calls_after = await group_commit()
        assert submitted_after - submitted == 12
        for body, r in zip(bodies, responses, strict=True):
            assert r.status_code == 202, r.text
            results = r.json()["results"]
            assert [x["event_id"] for x in results] == [e["event_id"] for e in body["events"]]
            assert results[0]["status"] == results[2]["status"] == "accepted"
        shared_statuses = sorted(r.json()["results"][1]["status"] for r in responses)
        assert shared_statuses == ["accepted"] + ["duplicate"] * 11
        if calls_after - calls < 12:
            break  # some requests shared a transaction
    else:
        raise AssertionError("in five rounds of twelve concurrent requests, none shared a transaction")
    sentinel = event(cid)
    await accepted(tally, sentinel)
    txs = await tally.wait_applied(cid, sentinel["event_id"])
    usage = [t["usage_event_id"] for t in txs if t["kind"] == "usage"]
    assert len(usage) == len(shared_ids) * (12 * 2 + 1) + 1
    assert all(usage.count(shared_id) == 1 for shared_id in shared_ids)


async def test_same_message_delivered_twice_on_kafka_debits_once(tally: Tally) -> None:
    cid = await funded(tally)
    now = datetime.now(UTC).isoformat()
    eid = uid("ev")
    message = {
        "id": f"usage:{eid}",
        "type": "usage.recorded",
        "time": now,
        "source": "test",
        "data": {
            "event_id": eid,
            "company_id": cid,
            "account_id": None,
            "service": "phone",
            "quantity": "1",
            "occurred_at": now,
            "recorded_at": now,
            "unit_price_micros": 14000,
            "platform_amount_micros": 14000,
            "currency": "USD",
        },
    }
    await tally.produce("usage.recorded", message, key=cid)
    await tally.produce("usage.recorded", message, key=cid)
    sentinel = event(cid)
    await accepted(tally, sentinel)
    txs = await tally.wait_applied(cid, sentinel["event_id"])
    assert [t["usage_event_id"] for t in txs].count(eid) == 1
    assert (await tally.company_wallet(cid))["balance"] == "0.983975"  # 1 - 0.014 - 0.002025


async def test_redelivery_in_a_later_batch_debits_once(tally: Tally) -> None:
    """The wallet inserts a batch's transfers without looking up their keys first; an event
    already in the ledger makes that insert fail and the batch is posted again, skipping it."""
    cid = await funded(tally)
    first, again = event(cid), event(cid)
    await accepted(tally, first)
    await tally.wait_applied(cid, first["event_id"])
    recorded = await tally.find_on_topic(
        "usage.recorded", lambda m: m.get("id") == f"usage:{cid}/{first['event_id']}"
    )
    await tally.produce("usage.recorded", recorded, key=cid)  # a redelivery, batch of its own
    await accepted(tally, again)  # a new event after it, in the same or the next batch
    txs = await tally.wait_applied(cid, again["event_id"])
    assert [t["usage_event_id"] for t in txs].count(first["event_id"]) == 1
    assert [t["usage_event_id"] for t in txs].count(again["event_id"]) == 1


async def test_malformed_requests_change_nothing(tally: Tally) -> None:
    cid = uid("co")
    good = event(cid)
    bad_id = {**event(cid), "event_id": "has spaces!"}
    url = tally.url("usage-meter", "/v1/usage")
    product = tally.auth("product")

    r = await tally.post_usage({"events": [good, bad_id]})
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["code"] == "validation_error" and "events[1].event_id" in body["message"]

    r = await tally.http.post(url, content=b"{nope", headers={**product, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"

    r = await tally.post_usage({"events": [event(cid) for _ in range(1001)]})
    assert r.status_code == 422 and "at most 1000" in r.json()["error"]["message"]

    r = await tally.http.post(url, json=good)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await tally.http.post(url, json=good, headers={"Authorization": "Bearer not-a-jwt"})
    assert r.status_code == 401
    r = await tally.post_usage(good, role="company_admin")  # wrong role (no company claim)
    assert r.status_code == 401
    r = await tally.http.post(url, json=good, headers=tally.auth("company_admin", company_id=cid))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

    # Nothing above was taken: the good event is still new, and it is the only ledger line.
    r = await tally.post_usage(good)
    assert r.json()["results"][0]["status"] == "accepted"
    txs = await tally.wait_applied(cid, good["event_id"])
    assert len(txs) == 1


async def test_per_event_rejections_leave_the_rest_accepted(tally: Tally) -> None:
    cid = uid("co")
    ok = event(cid)
    batch = [ok, event(cid, service="fax"), event(cid, quantity="0"), event(cid, quantity="x")]
    r = await tally.post_usage({"events": batch})
    assert r.status_code == 202
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "rejected", "rejected", "rejected"]
    assert [x.get("error", {}).get("code") for x in results[1:]] == [
        "unknown_service",
        "invalid_quantity",
        "invalid_quantity",
    ]
    txs = await tally.wait_applied(cid, ok["event_id"])
    assert len(txs) == 1


async def test_usage_ingest_topic_prices_and_dead_letters_garbage(tally: Tally) -> None:
    cid = uid("co")
    marker = uid("garbage")
    await tally.produce("usage.ingest", f"{{not json {marker}".encode(), key=cid)
    await tally.produce(
        "usage.ingest",
        {"event_id": uid("ev"), "company_id": cid, "service": "nope", "quantity": "1"},
        key=cid,
    )
    good = event(cid, service="whatsapp", quantity="1")
    await tally.produce("usage.ingest", good, key=cid)

    # The partition is not blocked by the garbage: the good event reaches the ledger.
    txs = await tally.wait_applied(cid, good["event_id"])
    assert [t["amount"] for t in txs] == ["-0.058000"]
    dead = await tally.find_on_topic("usage.ingest.dlq", lambda d: marker in d.get("message", ""))
    assert dead["source_topic"] == "usage.ingest" and dead["error"]
    dead = await tally.find_on_topic(
        "usage.ingest.dlq", lambda d: cid in d.get("message", "") and "unknown_service" in d["error"]
    )
    assert dead["failed_by"] == "usage-meter"


async def test_poison_on_usage_recorded_goes_to_its_dlq(tally: Tally) -> None:
    cid = uid("co")
    marker = uid("poison")
    await tally.produce(
        "usage.recorded",
        {
            "id": marker,
            "type": "usage.recorded",
            "time": "2026-01-01T00:00:00Z",
            "source": "test",
            "data": {"event_id": marker},
        },
        key=cid,
    )
    good = event(cid)
    await tally.post_usage(good)
    await tally.wait_applied(cid, good["event_id"])
    dead = await tally.find_on_topic("usage.recorded.dlq", lambda d: marker in d.get("message", ""))
    assert dead["failed_by"] == "wallet" and "company_id" in dead["error"]


async def test_an_unpostable_event_is_dead_lettered_alone_beside_a_redelivery(tally: Tally) -> None:
    """One batch holding a redelivered event, an event priced in another currency than its
    company's wallet (a LedgerError) and a good one: the wallet posts the good one once,
    skips the redelivery and dead-letters only the unpostable event."""
    cid = await funded(tally)
    first = event(cid)
    await accepted(tally, first)
    await tally.wait_applied(cid, first["event_id"])
    redelivered = await tally.find_on_topic(
        "usage.recorded", lambda m: m.get("id") == f"usage:{cid}/{first['event_id']}"
    )
    now = datetime.now(UTC).isoformat()

    def recorded(currency: str) -> tuple[str, dict[str, Any]]:
        eid = uid("ev")
        return eid, {
            "id": f"usage:{eid}",
            "type": "usage.recorded",
            "time": now,
            "source": "test",
            "data": {
                "event_id": eid,
                "company_id": cid,
                "account_id": None,
                "service": "phone",
                "quantity": "1",
                "occurred_at": now,
                "recorded_at": now,
                "unit_price_micros": 1000,
                "platform_amount_micros": 1000,
                "currency": currency,
            },
        }

    (eur_id, eur), (usd_id, usd) = recorded("EUR"), recorded("USD")
    await asyncio.gather(*(tally.produce("usage.recorded", m, key=cid) for m in (redelivered, eur, usd)))
    txs = await tally.wait_applied(cid, usd_id)
    dead = await tally.find_on_topic(
        "usage.recorded.dlq", lambda d: f"usage:{eur_id}" in d.get("message", "")
    )
    assert dead["failed_by"] == "wallet" and "cannot pay" in dead["error"]
    usage = [t["usage_event_id"] for t in txs if t["kind"] == "usage"]
    assert usage.count(first["event_id"]) == 1 and usage.count(usd_id) == 1
    assert eur_id not in usage


async def test_negative_agency_wallet_refuses_usage_until_credited(tally: Tally) -> None:
    cid = uid("co")
    first = event(cid, service="whatsapp", quantity="1")
    await tally.post_usage(first)
    await tally.wait_applied(cid, first["event_id"])
    assert (await tally.company_wallet(cid))["status"] == "suspended"

    accepted_meanwhile = 0

    async def refused() -> bool:
        nonlocal accepted_meanwhile
        r = await tally.post_usage(event(cid))
        res = r.json()["results"][0]
        accepted_meanwhile += res["status"] == "accepted"  # before usage-meter heard of it
        return bool(res["status"] == "rejected" and res["error"]["code"] == "agency_wallet_empty")

    await eventually(refused, what="usage-meter to learn of the suspension")
    expected = 1_000_000 - 58_000 - accepted_meanwhile * 2025
    if accepted_meanwhile:

        async def all_applied() -> bool:
            txs = await tally.company_transactions(cid)
            return len(txs) == 1 + accepted_meanwhile

        await eventually(all_applied, what="the usage accepted before the refusal")
    want = f"{expected // 1_000_000}.{expected % 1_000_000:06d}"

    key = {"Idempotency-Key": uid("k")}
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
        json={"amount": "1.00", "reference": "test"},
        headers={**tally.auth("platform_admin"), **key},
    )
    assert r.status_code == 201, r.text
    assert r.json()["wallet"]["status"] == "active"
    assert r.json()["wallet"]["balance"] == want
    again = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
        json={"amount": "1.00", "reference": "test"},
        headers={**tally.auth("platform_admin"), **key},
    )
    assert (again.status_code, again.json()) == (201, r.json())  # the first answer, again
    other = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
        json={"amount": "1.00"},
        headers={**tally.auth("platform_admin"), **key},
    )
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert (await tally.company_wallet(cid))["balance"] == want

    async def accepted() -> bool:
        r = await tally.post_usage(event(cid))
        return bool(r.json()["results"][0]["status"] == "accepted")

    await eventually(accepted, what="usage-meter to learn of the reactivation")


async def test_dedupe_survives_a_usage_meter_crash(tally: Tally) -> None:
    cid = uid("co")
    e = event(cid)
    assert (await tally.post_usage(e)).json()["results"][0]["status"] == "accepted"
    await tally.stack.restart("usage-meter")  # SIGKILL, then start again
    assert (await tally.post_usage(e)).json()["results"][0]["status"] == "duplicate"
    await tally.wait_applied(cid, e["event_id"])


async def test_ledger_balances_equal_the_transfers(tally: Tally) -> None:
    cid = await funded(tally)
    for q in ("1", "2", "3"):
        await accepted(tally, event(cid, quantity=q))
    last = event(cid)
    await accepted(tally, last)
    await tally.wait_applied(cid, last["event_id"])
    rows = await tally.sql("wallet", LEDGER_BALANCES)
    assert rows, "the ledger has wallets"
    assert all(r["balance"] == r["derived"] for r in rows)
    assert sum(r["balance"] for r in rows) == 0


@pytest.mark.parametrize("service", ["usage-meter", "wallet", "recharge", "rebilling", "notifier"])
async def test_every_service_is_healthy_ready_and_measured(tally: Tally, service: str) -> None:
    for path in ("/healthz", "/readyz"):
        r = await tally.http.get(tally.url(service, path))
        assert r.status_code == 200, r.text
    metrics = await tally.http.get(tally.url(service, "/metrics"))
    sample = f'tally_http_requests_total{{route="/healthz",service="{service}",status="200"}}'
    assert sample in metrics.text  # the requests above were counted, not just declared
    openapi = await tally.http.get(tally.url(service, "/openapi.json"))
    assert openapi.json()["info"]["title"] == f"Tally {service}"


async def test_other_tenants_wallets_are_not_found(tally: Tally) -> None:
    cid = uid("co")
    r = await tally.http.get(
        tally.url("wallet", f"/v1/companies/{cid}/wallet"),
        headers=tally.auth("company_admin", company_id="someone-else"),
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await tally.http.get(tally.url("wallet", f"/v1/companies/{cid}/wallet"))
    assert r.status_code == 401


async def test_oversized_bodies_get_413(tally: Tally) -> None:
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/usage"),
        content=b"{" + b" " * 3_000_000 + b"}",
        headers={**tally.auth("product"), "content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_transactions_page_with_cursors_newest_first(tally: Tally) -> None:
    cid = uid("co")
    events = [event(cid, quantity=str(q)) for q in range(1, 6)]
    await tally.post_usage({"events": events})
    everything = await tally.wait_applied(cid, events[-1]["event_id"])
    assert len(everything) == 5
    url = tally.url("wallet", f"/v1/companies/{cid}/wallet/transactions")
    headers = tally.auth("company_admin", company_id=cid)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await tally.http.get(url, params=params, headers=headers)).json()
        seen += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == everything
    assert [int(t["id"]) for t in seen] == sorted((int(t["id"]) for t in seen), reverse=True)
    r = await tally.http.get(url, params={"cursor": "not-a-cursor!"}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


async def test_an_event_resent_after_the_dedupe_window_is_still_charged_once(tally: Tally) -> None:
    """usage-meter forgets event ids older than the dedupe window (TALLY_DEDUPE_WINDOW_DAYS);
    an event re-sent after that is answered "accepted", and the ledger, which keeps its keys,
    still charges it once. Ids inside the window are kept."""
    cid = await funded(tally)
    old, recent = event(cid), event(cid)
    await accepted(tally, old)
    await accepted(tally, recent)
    await tally.wait_applied(cid, recent["event_id"])
    balance = (await tally.company_wallet(cid))["balance"]
    await tally.sql(
        "usage_meter",
        "UPDATE ingested SET received_at = now() - interval '40 days' WHERE event_id = $1",
        old["event_id"],
    )

    pool = await db.create_pool(tally.stack.database_url, "usage_meter", size=1)
    try:  # one round of the service's own worker, with the default window
        expiry = DedupeExpiry(pool, get_settings().dedupe_window_days)
        assert await expiry.step() is False  # a partial round: nothing more waiting
    finally:
        await pool.close()
    kept = await tally.sql(
        "usage_meter",
        "SELECT event_id FROM ingested WHERE event_id = ANY($1)",
        [old["event_id"], recent["event_id"]],
    )
    assert [r["event_id"] for r in kept] == [recent["event_id"]]

    statuses = [x["status"] for x in (await tally.post_usage({"events": [old, recent]})).json()["results"]]
    assert statuses == ["accepted", "duplicate"]
    sentinel = event(cid)  # one partition per company: once it is applied, so is the re-send
    await accepted(tally, sentinel)
    txs = await tally.wait_applied(cid, sentinel["event_id"])
    assert [t["usage_event_id"] for t in txs].count(old["event_id"]) == 1
    after = (await tally.company_wallet(cid))["balance"]
    assert Decimal(balance) - Decimal(after) == Decimal("0.002025")  # the sentinel alone

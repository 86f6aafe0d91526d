"""One trace across services for a usage event that triggered a recharge, and the metrics of
every service moving under load."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from tests.support.builders import DECLINES, GOOD, Agency, attach, configure, wait_balance
from tests.support.stack import Tally, eventually, uid


def spans(tally: Tally, service: str) -> list[dict[str, Any]]:
    path = tally.stack.root / "traces" / f"{service}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_one_trace_from_the_request_to_the_recharge(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    # The card's own check of the rule must be done before the usage: evaluated after the
    # debit (a busy recharge), it makes the recharge itself, in the card's trace (white-box:
    # nothing public tells that a check found nothing to do).
    await attach(tally, agency, GOOD)

    async def card_checked() -> bool:
        q = "SELECT count(*) AS n FROM recharge_checks WHERE wallet_id = $1"
        return bool((await tally.sql("recharge", q, f"company:{agency.cid}"))[0]["n"] == 0)

    await eventually(card_checked, what="the card's check of the auto-recharge rule")
    trace_id = secrets.token_hex(16)
    event = {"event_id": uid("ev"), "company_id": agency.cid, "service": "whatsapp", "quantity": "1"}
    r = await tally.http.post(
        tally.url("usage-meter", "/v1/usage"),
        json=event,
        headers={**tally.auth("product"), "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert r.json()["results"][0]["status"] == "accepted"
    await wait_balance(agency, "14.952000")  # 5.01 - 0.058 + 10: the recharge happened

    def names(service: str) -> set[str]:
        return {s["name"] for s in spans(tally, service) if s["context"]["trace_id"] == f"0x{trace_id}"}

    async def traced() -> dict[str, set[str]] | None:
        # spans are written when they end: the charge's ends after the credit is visible
        found = {s: names(s) for s in ("usage-meter", "wallet", "recharge")}
        return found if all(found.values()) and "recharge.charge" in found["recharge"] else None

    try:
        found = await eventually(traced, what="spans of one trace in three services")
    except AssertionError:
        found = {s: names(s) for s in ("usage-meter", "wallet", "recharge")}
    assert "usage.ingest" in found["usage-meter"]
    assert "wallet.debit" in found["wallet"]
    assert {"recharge.request", "recharge.charge"} <= found["recharge"]


def samples(text: str, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


async def scrape(tally: Tally) -> dict[str, str]:
    out = {}
    for service in ("usage-meter", "wallet", "recharge", "rebilling", "notifier"):
        out[service] = (await tally.http.get(tally.url(service, "/metrics"))).text
    return out


async def test_metrics_appear_and_move_under_load(tally: Tally) -> None:
    before = await scrape(tally)
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    await attach(tally, agency, DECLINES)
    await attach(tally, agency, GOOD)
    for _ in range(3):
        await agency.use("sms", "5")
    await tally.post_usage(
        {"event_id": uid("ev"), "company_id": agency.cid, "service": "fax", "quantity": "1"}
    )
    await tally.produce("usage.ingest", b"{garbage", key=agency.cid)
    await wait_balance(agency, "14.891500")

    moved = {
        ("usage-meter", "tally_usage_events_total"),
        ("usage-meter", "tally_outbox_relayed_total"),
        ("usage-meter", "tally_dlq_total"),
        ("wallet", "tally_wallet_usage_applied_total"),
        ("wallet", "tally_wallet_debit_latency_seconds_count"),
        ("wallet", "tally_consumer_batch_size_count"),
        ("wallet", "tally_consumer_records_total"),
        ("wallet", "tally_outbox_relayed_total"),
        ("recharge", "tally_recharge_attempts_total"),
        ("recharge", "tally_recharge_declines_total"),
        ("recharge", "tally_http_requests_total"),
    }

    async def all_moved() -> set[tuple[str, str]] | None:
        after = await scrape(tally)
        stuck = {(svc, m) for svc, m in moved if samples(after[svc], m) <= samples(before[svc], m)}
        return None if stuck else moved

    await eventually(all_moved, what="every metric to move")
    after = await scrape(tally)
    for service, topic in (
        ("wallet", "usage.recorded"),
        ("usage-meter", "usage.ingest"),
        ("recharge", "wallet.digest"),
        ("notifier", "wallet.digest"),
    ):
        assert f'tally_consumer_lag{{service="{service}",topic="{topic}"}}' in after[service]
        assert f'tally_outbox_backlog{{service="{service}"}}' in after[service]


async def test_each_event_on_usage_ingest_keeps_its_own_trace(tally: Tally) -> None:
    """Two events of one record batch, each in its own trace: each ``usage.recorded`` continues
    the trace of the record it came in (not the batch's first)."""
    cid = uid("trace-co")
    traces = {uid("ev"): secrets.token_hex(16) for _ in range(2)}
    producer = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await producer.start()
    try:
        batch = producer.create_batch()
        for eid, trace_id in traces.items():
            batch.append(
                key=cid.encode(),
                timestamp=None,
                value=orjson.dumps({"event_id": eid, "company_id": cid, "service": "email", "quantity": "1"}),
                headers=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01".encode())],
            )
        await (await producer.send_batch(batch, "usage.ingest", partition=0))
    finally:
        await producer.stop()

    seen: dict[str, str] = {}
    consumer = AIOKafkaConsumer(
        "usage.recorded", bootstrap_servers=tally.stack.bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while len(seen) < len(traces) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:  # the topic also holds other tests' garbage
                    try:
                        eid = orjson.loads(r.value)["data"]["event_id"]
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue
                    if isinstance(eid, str) and eid in traces:
                        seen[eid] = dict(r.headers)["traceparent"].decode().split("-")[1]
    finally:
        await consumer.stop()
    assert seen == traces

"""usage-meter's Kafka consumers (the table is in ``app.py``): ``usage.ingest`` (products
producing usage directly), ``wallet.digest`` (to know which wallets are suspended) and
``rebilling.events`` (companies' currencies, accounts' companies). Each batch in one unit of
work; unreadable records, and usage the ingestion path rejects, to the topic's DLQ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events
from tally.consumer import dlq_row, take
from tally.telemetry import continue_trace, header
from tally_usage_meter import companies, wallet_status
from tally_usage_meter.ingestion import ingest, parse_ingest_records
from tally_usage_meter.wiring import UsageMeterWiring

SERVICE = "usage-meter"
STATUS_TYPES = ("wallet.suspended", "wallet.reactivated")
REBILLING_TYPES = ("company.updated", "account.created")


async def on_ingest(w: UsageMeterWiring, records: Sequence[Any]) -> None:
    good, dead = [], []
    for r, parsed in zip(records, parse_ingest_records([r.value for r in records]), strict=True):
        if isinstance(parsed, events.BadMessage):
            dead.append(dlq_row(r, str(parsed), service=SERVICE))
        else:
            good.append((r, parsed))
    first = header(good[0][0]) if good else None
    with continue_trace(first, "usage.ingest", {"tally.events": len(good)}):
        async with w.uow() as uow:
            # Each event continues the trace of the record it came in.
            results = await ingest(uow, [e for _, e in good], [header(r) for r, _ in good], w.directory)
            for (record, _), result in zip(good, results, strict=True):
                if result.status == "rejected":
                    dead.append(dlq_row(record, f"{result.code}: {result.message}", service=SERVICE))
            uow.publish(dead)


async def on_wallet_digest(w: UsageMeterWiring, records: Sequence[Any]) -> None:
    taken, dead = take(records, STATUS_TYPES, service=SERVICE)
    if not taken and not dead:
        return
    async with w.uow() as uow:
        uow.publish(dead)
        await wallet_status.follow(uow, [m for _, m in taken])


async def on_rebilling_events(w: UsageMeterWiring, records: Sequence[Any]) -> None:
    taken, dead = take(records, REBILLING_TYPES, service=SERVICE)
    if not taken and not dead:
        return
    payloads = [m.data for _, m in taken]
    async with w.uow() as uow:
        await companies.learn(uow, payloads, w.directory)
        uow.publish(dead)
    # what was just written is read from the tables again (it is the same, unless an
    # announcement ever corrected one)
    companies.forget(w.directory.facts, payloads)

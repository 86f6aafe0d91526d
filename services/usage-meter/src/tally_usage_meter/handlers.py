"""usage-meter's Kafka consumers (the table is in ``app.py``): ``usage.ingest`` (products
producing usage directly), ``wallet.digest`` (to know which wallets are suspended) and
``rebilling.events`` (companies' currencies, accounts' companies). Each batch in one unit of
work (a ``usage.ingest`` batch of new events in one statement); unreadable records, and usage
the ingestion path rejects, to the topic's DLQ."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from tally import events, outbox
from tally.consumer import dlq_row, note_dead_letter, take
from tally.telemetry import continue_trace, header
from tally_usage_meter import companies, wallet_status
from tally_usage_meter.deferral import Item, record_or_defer
from tally_usage_meter.ingestion import (
    DirectoryUnavailable,
    Result,
    ingest,
    ingest_at_once,
    parse_ingest_records,
)
from tally_usage_meter.wiring import UsageMeterWiring

SERVICE = "usage-meter"
STATUS_TYPES = ("wallet.suspended", "wallet.reactivated")
REBILLING_TYPES = ("company.updated", "account.created")


async def on_ingest(w: UsageMeterWiring, records: Sequence[Any]) -> None:
    """As ``POST /v1/usage`` records a group: a batch whose events are all new is recorded in
    one statement, its dead letters with it (``ingest_at_once``: plain claims, which cost
    Postgres ~60% of the ``ON CONFLICT`` ones, and no BEGIN and COMMIT); a redelivered batch,
    whose events were claimed before, is recorded in a unit of work (``ingest``). A dead
    letter is counted and logged once written, not for a write that failed and went again.
    Records rebilling cannot be asked about are set aside, not the partition held
    (``deferral``)."""
    came = datetime.now(UTC)  # what waits for rebilling is dated by when it came (``deferral``)
    good, unreadable = [], []
    for r, parsed in zip(records, parse_ingest_records([r.value for r in records]), strict=True):
        if isinstance(parsed, events.BadMessage):
            unreadable.append((r, str(parsed)))
        else:
            good.append((r, parsed))
    batch = [e for _, e in good]
    traces = [header(r) for r, _ in good]  # each event continues the trace of its record
    dead: list[tuple[Any, str]] = []  # what the last try dead-letters: (record, why)

    def letters(results: Sequence[Result]) -> list[outbox.Row]:
        """The batch's dead letters: unreadable records, and usage the ingestion refused."""
        dead[:] = unreadable + [
            (record, f"{result.code}: {result.message}")
            for (record, _), result in zip(good, results, strict=True)
            if result.status == "rejected"
        ]
        return [dlq_row(record, why, service=SERVICE, noted=False) for record, why in dead]

    with continue_trace(traces[0] if traces else None, "usage.ingest", {"tally.events": len(good)}):
        try:
            try:
                async with w.db.statements() as conn:
                    await ingest_at_once(
                        conn, batch, traces, w.directory, hand_over=w.db.hand_over, also=letters
                    )
            except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
                # an event claimed before (a redelivery), or a group racing it: nothing was written
                async with w.uow() as uow:
                    uow.publish(letters(await ingest(uow, batch, traces, w.directory)))
        except DirectoryUnavailable as failed:
            # rebilling cannot be asked about some of it: those records wait, not the partition
            items = [Item(r, e, t) for (r, e), t in zip(good, traces, strict=True)]
            dead[:] = await record_or_defer(w.db, w.directory, items, unreadable, failed, came)
    for record, why in dead:
        note_dead_letter(record, why, service=SERVICE)


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

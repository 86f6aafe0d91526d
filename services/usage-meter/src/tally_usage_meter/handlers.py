"""usage-meter's Kafka consumers: ``usage.ingest`` (products producing usage directly),
``wallet.digest`` (to know which wallets are suspended) and ``rebilling.events`` (companies'
currencies, accounts' companies)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events, inbox
from tally.consumer import dlq_row, subscribe_batch, take
from tally.events import Topics
from tally.outbox import enqueue
from tally.service import Runtime
from tally.telemetry import continue_trace, header
from tally_usage_meter import storage
from tally_usage_meter.ingestion import ingest, parse_ingest_record

SERVICE = "usage-meter"
STATUS_TYPES = ("wallet.suspended", "wallet.reactivated")


def subscribe(rt: Runtime) -> None:
    async def on_ingest(records: Sequence[Any]) -> None:
        good, dead = [], []
        for r in records:
            try:
                good.append((r, parse_ingest_record(r.value)))
            except events.BadMessage as exc:
                dead.append(dlq_row(r, str(exc), service=SERVICE))
        first = header(good[0][0]) if good else None
        with continue_trace(first, "usage.ingest", {"tally.events": len(good)}):
            async with rt.pool.acquire() as conn, conn.transaction():
                # Each event continues the trace of the record it came in.
                results = await ingest(
                    conn, [e for _, e in good], [header(r) for r, _ in good], rt.state["directory"]
                )
                for (record, _), result in zip(good, results, strict=True):
                    if result.status == "rejected":
                        dead.append(dlq_row(record, f"{result.code}: {result.message}", service=SERVICE))
                await enqueue(conn, dead)
        rt.relay.wake()

    async def on_wallet_digest(records: Sequence[Any]) -> None:
        taken, dead = take(records, STATUS_TYPES, service=SERVICE)
        changes = [m for _, m in taken]
        if not changes and not dead:
            return
        async with rt.pool.acquire() as conn, conn.transaction():
            await enqueue(conn, dead)
            fresh = await inbox.claim(conn, "wallet-status", [m.id for m in changes])
            for m in changes:
                if m.id not in fresh:
                    continue
                payload = m.data
                assert isinstance(payload, events.WalletSuspended | events.WalletReactivated)
                owner_id = payload.company_id if payload.owner == "company" else payload.account_id
                assert owner_id is not None
                await storage.set_suspended(conn, payload.owner, owner_id, m.type == "wallet.suspended")

    async def on_rebilling_events(records: Sequence[Any]) -> None:
        """Each company's currency and each account's company: usage is priced in the
        company's currency and refused for an account that is not the company's."""
        taken, dead = take(records, ("company.updated", "account.created"), service=SERVICE)
        if not taken and not dead:
            return
        async with rt.pool.acquire() as conn, conn.transaction():
            for _, m in taken:
                p = m.data
                if isinstance(p, events.CompanyUpdated):
                    await storage.upsert_company(conn, p.company_id, p.currency)
                elif isinstance(p, events.AccountCreated):
                    await storage.upsert_account(conn, p.account_id, p.company_id)
            await enqueue(conn, dead)
        if dead:
            rt.relay.wake()

    subscribe_batch(
        rt.broker,
        Topics.USAGE_INGEST,
        service=SERVICE,
        group_id="usage-meter",
        handler=on_ingest,
        max_records=rt.settings.kafka_max_batch,
        money_path=True,
    )
    subscribe_batch(
        rt.broker,
        Topics.WALLET_DIGEST,
        service=SERVICE,
        group_id="usage-meter-wallet-status",
        handler=on_wallet_digest,
    )
    subscribe_batch(
        rt.broker,
        Topics.REBILLING_EVENTS,
        service=SERVICE,
        group_id="usage-meter-rebilling",
        handler=on_rebilling_events,
    )

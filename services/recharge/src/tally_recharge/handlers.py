"""recharge's Kafka consumers: ``wallet.digest`` (threshold crossings queue automatic recharges,
at most one in flight per wallet, each crossing event once) and ``rebilling.events`` (which
company has connected which Stripe account; which company an account belongs to)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events, inbox
from tally.consumer import subscribe_batch, take
from tally.events import Topics
from tally.outbox import enqueue
from tally.service import Runtime
from tally.telemetry import child_traceparent, header
from tally_recharge import storage
from tally_recharge.charging import Recharger

SERVICE = "recharge"


def subscribe(rt: Runtime) -> None:
    def recharger() -> Recharger:
        r: Recharger = rt.state["recharger"]
        return r

    async def on_wallet_digest(records: Sequence[Any]) -> None:
        taken, dead = take(records, ("wallet.threshold_crossed",), service=SERVICE)
        crossings: list[tuple[str, events.WalletThresholdCrossed, str | None]] = []
        for r, message in taken:
            assert isinstance(message.data, events.WalletThresholdCrossed)
            crossings.append((message.id, message.data, header(r)))
        if not crossings and not dead:
            return
        queued = False
        async with rt.pool.acquire() as conn, conn.transaction():
            fresh = await inbox.claim(conn, "recharge-thresholds", [c[0] for c in crossings])
            for msg_id, crossed, traceparent in crossings:
                if msg_id in fresh:
                    tp = child_traceparent(traceparent, "recharge.request",
                                           {"tally.wallet_id": crossed.wallet_id})
                    queued = await recharger().request_auto(conn, crossed, tp) or queued
            await enqueue(conn, dead)
        if queued:
            recharger().wake()

    async def on_rebilling_events(records: Sequence[Any]) -> None:
        taken, dead = take(records, ("company.updated", "account.created"), service=SERVICE)
        updates = [m.data for _, m in taken]
        async with rt.pool.acquire() as conn, conn.transaction():
            for p in updates:
                if isinstance(p, events.CompanyUpdated):
                    await storage.upsert_company(
                        conn, p.company_id, p.currency,
                        p.stripe_account_id if p.stripe_connected else None)
                elif isinstance(p, events.AccountCreated):
                    await storage.upsert_account(conn, p.account_id, p.company_id)
            await enqueue(conn, dead)

    subscribe_batch(rt.broker, Topics.WALLET_DIGEST, service=SERVICE, group_id="recharge-wallet",
                    handler=on_wallet_digest)
    subscribe_batch(rt.broker, Topics.REBILLING_EVENTS, service=SERVICE,
                    group_id="recharge-rebilling", handler=on_rebilling_events)

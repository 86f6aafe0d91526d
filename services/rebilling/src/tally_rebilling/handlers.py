"""rebilling's consumer of ``recharge.events``: whether each account has a valid card. A card
arriving activates settings that were waiting for it (e.g. a SaaS plan's markup); the last
card removed deactivates them. Either way the full settings are republished."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events, inbox
from tally.consumer import dlq_row, subscribe_batch
from tally.events import Topics
from tally.outbox import enqueue
from tally.service import Runtime
from tally_rebilling import publish, storage

SERVICE = "rebilling"


def subscribe(rt: Runtime) -> None:
    async def on_recharge_events(records: Sequence[Any]) -> None:
        changes: list[tuple[str, events.PaymentMethodChanged]] = []
        dead = []
        for r in records:
            try:
                env = events.parse_envelope(r.value)
                if env.type in ("payment_method.attached", "payment_method.detached"):
                    p = events.typed(env)
                    assert isinstance(p, events.PaymentMethodChanged)
                    if p.account_id:
                        changes.append((env.id, p))
            except events.BadMessage as exc:
                dead.append(dlq_row(r, str(exc), service=SERVICE))
        if not changes and not dead:
            return
        async with rt.pool.acquire() as conn, conn.transaction():
            fresh = await inbox.claim(conn, "rebilling-cards", [c[0] for c in changes])
            for msg_id, p in changes:
                if msg_id not in fresh or p.account_id is None:
                    continue
                before = await storage.account(conn, p.account_id)
                if before is None or before["has_valid_card"] == p.has_valid_card:
                    continue
                await storage.set_card(conn, p.account_id, p.has_valid_card)
                if (await storage.rebilling(conn, p.account_id))[2]:
                    await storage.bump_rebilling(conn, p.account_id)
                    await publish.settings(conn, p.account_id)
            await enqueue(conn, dead)
        rt.relay.wake()

    subscribe_batch(rt.broker, Topics.RECHARGE_EVENTS, service=SERVICE,
                    group_id="rebilling-cards", handler=on_recharge_events)

"""rebilling's consumer of ``recharge.events``: whether each account has a valid card. A card
arriving activates settings that were waiting for it (e.g. a SaaS plan's markup); the last
card removed deactivates them. Either way the full settings are republished. A card saved or
made default (a company's or an account's) also brings that payer's failed period charges
forward: the runner tries them at once."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tally import events, inbox
from tally.consumer import dlq_row, subscribe_batch
from tally.events import Topics
from tally.outbox import enqueue
from tally.service import Runtime
from tally_rebilling import publish, storage
from tally_rebilling.billing import Biller

SERVICE = "rebilling"
CARD_TYPES = ("payment_method.attached", "payment_method.detached", "payment_method.defaulted")


def subscribe(rt: Runtime) -> None:
    async def on_recharge_events(records: Sequence[Any]) -> None:
        changes: list[tuple[str, events.PaymentMethodChanged]] = []
        cards: list[tuple[str, datetime, events.PaymentMethodChanged]] = []  # saved, defaulted
        dead = []
        for r in records:
            try:
                env = events.parse_envelope(r.value)
                if env.type in CARD_TYPES:
                    p = events.typed(env)
                    assert isinstance(p, events.PaymentMethodChanged)
                    changes.append((env.id, p))
                    if env.type != "payment_method.detached":
                        cards.append((env.id, env.time, p))
            except events.BadMessage as exc:
                dead.append(dlq_row(r, str(exc), service=SERVICE))
        if not changes and not dead:
            return
        async with rt.pool.acquire() as conn, conn.transaction():
            fresh = await inbox.claim(conn, "rebilling-cards", [c[0] for c in changes])
            retried = 0
            for msg_id, when, p in cards:
                if msg_id in fresh:  # each card event once
                    retried += await storage.retry_now(
                        conn, p.company_id, p.account_id, datetime.now(UTC), when
                    )
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
        if retried:
            biller: Biller = rt.state["biller"]
            biller.wake()

    subscribe_batch(
        rt.broker,
        Topics.RECHARGE_EVENTS,
        service=SERVICE,
        group_id="rebilling-cards",
        handler=on_recharge_events,
    )

"""Whether each account has a valid card, from recharge's ``payment_method.*`` events. A card
arriving activates settings that were waiting for it (e.g. a SaaS plan's markup); the last
card removed deactivates them. Either way the full settings are republished. A card saved or
made default (a company's or an account's) also brings that payer's failed period charges
forward: the runner tries them at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from tally import events, inbox
from tally.uow import UnitOfWork
from tally_rebilling import publish, storage

INBOX = "rebilling-cards"  # each card event once


@dataclass(frozen=True)
class CardEvent:
    id: str  # the envelope's id
    time: datetime  # when the card was saved, made default or removed
    saved: bool  # attached or defaulted (False: detached)
    change: events.PaymentMethodChanged


async def follow_cards(uow: UnitOfWork, cards: Sequence[CardEvent]) -> int:
    """In the consumer's unit of work: apply each card event once. Returns how many period
    legs are due now because a card was saved (the caller wakes the runner after commit)."""
    conn = uow.conn
    fresh = await inbox.claim(conn, INBOX, [c.id for c in cards])
    retried = 0
    for c in cards:
        if c.saved and c.id in fresh:  # each card event once
            p = c.change
            retried += await storage.retry_now(
                conn, p.company_id, p.account_id, datetime.now(UTC), c.time, p.payment_method
            )
    for c in cards:
        p = c.change
        if c.id not in fresh or p.account_id is None:
            continue
        before = await storage.account(conn, p.account_id)
        if before is None or before["has_valid_card"] == p.has_valid_card:
            continue
        await storage.set_card(conn, p.account_id, p.has_valid_card)
        if (await storage.rebilling(conn, p.account_id)).version:
            await storage.bump_rebilling(conn, p.account_id)
            await publish.settings(uow, p.account_id)
    return retried

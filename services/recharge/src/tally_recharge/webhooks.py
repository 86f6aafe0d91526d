"""Stripe's word on a payment (webhooks, signature checked by the route): an attempt still
pending here is settled from what Stripe says, each event once."""

from __future__ import annotations

from typing import Literal

import stripe

from tally import inbox
from tally.uow import Database
from tally_recharge.charging import Recharger

SETTLING = ("payment_intent.succeeded", "payment_intent.payment_failed")


async def receive(
    db: Database, recharger: Recharger, event: stripe.Event
) -> Literal["ignored", "duplicate", "processed"]:
    if event.type not in SETTLING:
        return "ignored"
    intent = event.data.object.to_dict()
    attempt_id = (intent.get("metadata") or {}).get("tally_attempt")
    async with db.unit() as uow:
        if not await inbox.claim(uow.conn, "stripe-webhooks", [event.id]):
            return "duplicate"
    if attempt_id:  # still pending here: settle it from what Stripe says
        await recharger.resume(attempt_id)
    return "processed"

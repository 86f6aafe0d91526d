"""Stripe's word on a payment (webhooks, signature checked by the route): an attempt still
pending here is settled from what Stripe says, each event once."""

from __future__ import annotations

from typing import Literal

import stripe

from tally import inbox
from tally.errors import ApiError
from tally.uow import Database
from tally_recharge.charging import Recharger

SETTLING = ("payment_intent.succeeded", "payment_intent.payment_failed")


async def receive(
    db: Database, recharger: Recharger, event: stripe.Event
) -> Literal["ignored", "duplicate", "processed"]:
    # read as a mapping: a signed event need not have every field (a missing one answered 500)
    if event.get("type") not in SETTLING:
        return "ignored"
    intent = (event.get("data") or {}).get("object")
    if not isinstance(intent, dict) or not isinstance(event.get("id"), str):
        raise ApiError(400, "invalid_event", f"a {event.get('type')} event needs an id and data.object")
    metadata = intent.get("metadata")
    attempt_id = metadata.get("tally_attempt") if isinstance(metadata, dict) else None
    if not isinstance(attempt_id, str):
        attempt_id = None
    async with db.unit() as uow:
        if not await inbox.claim(uow.conn, "stripe-webhooks", [event.id]):
            return "duplicate"
    if attempt_id:  # still pending here: settle it from what Stripe says
        await recharger.resume(attempt_id)
    return "processed"

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
    # read as plain data: a signed event need not have every field (a missing one answered 500)
    body = event.to_dict()
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in SETTLING:
        return "ignored"
    data = body.get("data")
    intent = data.get("object") if isinstance(data, dict) else None
    event_id = body.get("id")
    if not isinstance(intent, dict) or not isinstance(event_id, str):
        raise ApiError(400, "invalid_event", f"a {kind} event needs an id and data.object")
    metadata = intent.get("metadata")
    attempt_id = metadata.get("tally_attempt") if isinstance(metadata, dict) else None
    if not isinstance(attempt_id, str):
        attempt_id = None
    async with db.unit() as uow:
        if not await inbox.claim(uow.conn, "stripe-webhooks", [event_id]):
            return "duplicate"
    if attempt_id:  # still pending here: settle it from what Stripe says
        await recharger.resume(attempt_id)
    return "processed"

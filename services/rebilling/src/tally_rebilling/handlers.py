"""rebilling's Kafka consumer (the table is in ``app.py``), each batch in one unit of work,
poison to the topic's DLQ:

- ``recharge.events``: the ``payment_method.*`` events, whether each account has a valid card
  and which failed period charges to try at once (``cards``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events
from tally.consumer import take
from tally_rebilling.cards import CardEvent, follow_cards
from tally_rebilling.wiring import RebillingWiring

SERVICE = "rebilling"
CARD_TYPES = ("payment_method.attached", "payment_method.detached", "payment_method.defaulted")


async def on_recharge_events(w: RebillingWiring, records: Sequence[Any]) -> None:
    taken, dead = take(records, CARD_TYPES, service=SERVICE)
    cards = [
        CardEvent(m.id, m.time, m.type != "payment_method.detached", m.data)
        for _, m in taken
        if isinstance(m.data, events.PaymentMethodChanged)
    ]
    if not cards and not dead:
        return
    async with w.uow() as uow:
        retried = await follow_cards(uow, cards)
        uow.publish(dead)
    if retried:
        w.biller.wake()

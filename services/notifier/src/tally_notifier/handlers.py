"""notifier's Kafka consumers (the table is in ``app.py``): ``wallet.digest`` (usage totals,
suspensions, credit requests), ``recharge.events`` (failures, cancellations, tier raises) and
``rebilling.events`` (who owns which account, company time zones, subscriptions dunning gave
up on). Each batch: the records of the consumer's types decoded (unreadable ones to the DLQ),
applied in one unit of work (``notices.take_in``), then the mailer woken for what it queued.
Outbound webhooks read the three public topics (``wallet.events``, ``recharge.events``,
``rebilling.events``) in groups of their own (``webhook_events.take_in``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally.consumer import take
from tally_notifier import notices, webhook_events
from tally_notifier.wiring import NotifierWiring

SERVICE = "notifier"
WALLET_TYPES = ("wallet.usage", "wallet.suspended", "credit_request.created")
RECHARGE_TYPES = ("recharge.failed", "recharge.tier_raised")
REBILLING_TYPES = ("company.updated", "account.created", "subscription.cancelled")


async def _take_in(w: NotifierWiring, records: Sequence[Any], types: tuple[str, ...], group: str) -> None:
    """``group`` is the consumer group and the inbox name its messages are claimed under."""
    taken, dead = take(records, types, service=SERVICE)
    if not taken and not dead:
        return
    async with w.uow() as uow:
        await notices.take_in(uow, group, [m for _, m in taken], w.directory)
        uow.publish(dead)
    w.mailer.wake()


async def on_wallet_digest(w: NotifierWiring, records: Sequence[Any]) -> None:
    await _take_in(w, records, WALLET_TYPES, "notifier-wallet")


async def on_recharge_events(w: NotifierWiring, records: Sequence[Any]) -> None:
    await _take_in(w, records, RECHARGE_TYPES, "notifier-recharge")


async def on_rebilling_events(w: NotifierWiring, records: Sequence[Any]) -> None:
    await _take_in(w, records, REBILLING_TYPES, "notifier-rebilling")


async def on_webhook_events(w: NotifierWiring, records: Sequence[Any]) -> None:
    """Any of the three public topics: queue its events for the endpoints of their company."""
    # most of wallet.events is wallet.debited of companies without endpoints: look first,
    # open a transaction only for a batch someone listens to
    async with w.db.reading() as conn:
        listening = await webhook_events.listeners(conn)
    if not webhook_events.heard(records, listening):
        return
    async with w.uow() as uow:
        queued = await webhook_events.take_in(uow, records, service=SERVICE, listening=listening)
    if queued:
        w.webhooks.wake()

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

from tally import events, outbox
from tally.consumer import dlq_row, take
from tally.telemetry import header
from tally_notifier import notices, webhook_events
from tally_notifier.wiring import NotifierWiring

SERVICE = "notifier"
WALLET_TYPES = ("wallet.usage", "wallet.suspended", "credit_request.created")
RECHARGE_TYPES = ("recharge.failed", "recharge.tier_raised")
REBILLING_TYPES = ("company.updated", "account.created", "subscription.cancelled")


async def _take_in(
    w: NotifierWiring,
    records: Sequence[Any],
    types: tuple[str, ...],
    group: str,
    digests: Sequence[events.UsageDigest] = (),
    dead: Sequence[outbox.Row] = (),
) -> None:
    """``group`` is the consumer group and the inbox name its messages are claimed under."""
    taken, unreadable = take(records, types, service=SERVICE)
    if not taken and not unreadable and not digests and not dead:
        return
    async with w.uow() as uow:
        await notices.take_in(uow, group, [m for _, m in taken], w.directory, digests)
        uow.publish([*dead, *unreadable])
    w.mailer.wake()


async def on_wallet_digest(w: NotifierWiring, records: Sequence[Any]) -> None:
    """``wallet.usage`` (about one total per usage event) is decoded by msgspec
    (``events.parse_wallet_usage``); the rest, and records without a type header, by ``take``."""
    rest, digests, dead = [], [], []
    for r in records:
        if header(r, "type") != "wallet.usage":
            rest.append(r)
            continue
        try:
            digests.append(events.parse_wallet_usage(r.value))
        except events.BadMessage as exc:
            dead.append(dlq_row(r, str(exc), service=SERVICE))
    await _take_in(w, rest, WALLET_TYPES, "notifier-wallet", digests, dead)


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

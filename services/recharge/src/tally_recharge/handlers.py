"""recharge's Kafka consumers (the table is in ``app.py``), each batch in one unit of work, each
event once (inbox), poison to the topic's DLQ:

- ``wallet.digest``: threshold crossings, credits and settings changes queue a check of the
  auto-recharge rule for their wallet (``checks.wallets_changed``);
- ``rebilling.events``: which company has connected which Stripe account; which company an
  account belongs to (``companies.learn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events, inbox
from tally.consumer import take
from tally.telemetry import header
from tally_recharge import checks, companies
from tally_recharge.wiring import RechargeWiring

SERVICE = "recharge"


async def on_wallet_digest(w: RechargeWiring, records: Sequence[Any]) -> None:
    """Every wallet change that may make the auto-recharge rule hold (or stop holding)
    queues a check of that wallet; a credit of a recharge also ends its flight."""
    taken, dead = take(records, checks.WALLET_TRIGGERS, service=SERVICE)
    if not taken and not dead:
        return
    changes = []
    for record, message in taken:
        assert isinstance(message.data, events.WalletRef)
        changes.append(checks.WalletChange(message.id, message.data, header(record)))
    async with w.uow() as uow:
        fresh = await inbox.claim(uow.conn, "recharge-wallet", [c.id for c in changes])
        await checks.wallets_changed(uow.conn, [c for c in changes if c.id in fresh])
        uow.publish(dead)
    if taken:
        w.recharger.wake()


async def on_rebilling_events(w: RechargeWiring, records: Sequence[Any]) -> None:
    taken, dead = take(records, ("company.updated", "account.created"), service=SERVICE)
    async with w.uow() as uow:
        # each company.updated once: a redelivered old one (a crash between the commit and
        # the offset commit) must not take the company back to the Stripe account it left.
        # An account.created is applied every time (the same write again): claimed, a record
        # forged early under rebilling's own message id would make rebilling's be skipped.
        fresh = await inbox.claim(
            uow.conn, "recharge-rebilling", [m.id for _, m in taken if m.type == "company.updated"]
        )
        updates = [m.data for _, m in taken if m.id in fresh or m.type != "company.updated"]
        queued = await companies.learn(uow, updates, w.directory)
        uow.publish(dead)
    if queued:
        w.recharger.wake()

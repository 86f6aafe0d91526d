"""wallet's Kafka consumers (the table is in ``app.py``), each batch in one unit of work,
poison to the topic's DLQ:

- ``usage.recorded``: debit the company and, where rebilled, the account wallet;
- ``rebilling.settings`` (compacted): the wallet's own copy of each account's rebilling;
- ``rebilling.events``: companies (Stripe connected?), accounts and their licenses;
- ``recharge.events``: credit successful recharges; follow tier raises and cancellations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg
from prometheus_client import Histogram

from tally import events, inbox, outbox
from tally.consumer import dlq_row, failing_alone, wanted
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.events import RecordedUsage
from tally.telemetry import header, observe_many
from tally_wallet import storage
from tally_wallet.credits import credit
from tally_wallet.domain import SYSTEM_STRIPE_CLEARING, LedgerError, RatedOnOldSettings, Wallet
from tally_wallet.rerating import store_settings
from tally_wallet.storage import UNPOSTABLE
from tally_wallet.usage import apply_usage
from tally_wallet.wallet_settings import change_settings, raise_tier
from tally_wallet.wiring import WalletWiring

SERVICE = "wallet"
# What one usage record can never post (``storage.UNPOSTABLE``) goes to the DLQ with the
# reason and the partition goes on; anything else (a lost connection) retries the batch.
# The optimistic batch also falls back on a transfer key the ledger already has (a redelivery).
CAREFULLY: tuple[type[Exception], ...] = (asyncpg.UniqueViolationError, RatedOnOldSettings, *UNPOSTABLE)
DEBIT_LATENCY = Histogram(
    "tally_wallet_debit_latency_seconds",
    "From usage accepted to ledger commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def _transactional(
    apply: Callable[[Conn, Any], Awaitable[None]], parse: Callable[[Any], Any]
) -> Callable[[WalletWiring, Sequence[Any]], Awaitable[None]]:
    """A batch handler: parse every record (poison -> DLQ), then apply each parsed record in
    one unit of work; a record whose apply breaks a ledger rule or a database bound (a balance
    out of range) is dead-lettered alone (savepoint)."""

    async def handle(w: WalletWiring, records: Sequence[Any]) -> None:
        parsed = []
        async with w.uow() as uow:
            for r in records:
                try:
                    item = parse(r)
                except (events.BadMessage, LedgerError) as exc:
                    uow.publish([dlq_row(r, str(exc), service=SERVICE)])
                    continue
                if item is not None:
                    parsed.append((r, item))
            for record, item in parsed:
                try:
                    async with uow.savepoint():
                        await apply(uow.conn, item)
                except UNPOSTABLE as exc:  # this record alone; the partition goes on
                    uow.publish([dlq_row(record, f"{type(exc).__name__}: {exc}", service=SERVICE)])

    return handle


# --- usage.recorded ------------------------------------------------------------------------


async def on_usage(w: WalletWiring, records: Sequence[Any]) -> None:
    good: list[tuple[Any, RecordedUsage]] = []
    dead = []
    for r in records:
        try:
            good.append((r, events.parse_usage_recorded(r.value)))
        except events.BadMessage as exc:
            dead.append(dlq_row(r, str(exc), service=SERVICE))
    traces = {(u.company_id, u.event_id): header(r) for r, u in good}
    partitions = {(u.company_id, u.event_id): r.partition for r, u in good}
    try:
        # The common batch: all new, all postable. No lookup of what the ledger has and no
        # savepoint (two round trips fewer); a redelivered event fails the unique transfer key
        # and the batch goes again, carefully.
        async with w.uow() as uow:
            outcome = await apply_usage(
                uow.conn, [u for _, u in good], traces, partitions=partitions, optimistic=True
            )
            uow.publish(outcome.messages)
            uow.publish(dead)
        recorded = list(outcome.recorded)
    except CAREFULLY:
        recorded = []
        async with w.uow() as uow:

            async def post(part: Sequence[tuple[Any, RecordedUsage]]) -> None:
                async with uow.savepoint():
                    outcome = await apply_usage(uow.conn, [u for _, u in part], traces, partitions=partitions)
                    uow.publish(outcome.messages)  # taken back with the savepoint if it fails
                recorded.extend(outcome.recorded)

            # Skip what the ledger already has; if some event cannot be posted, post the batch
            # in halves (a savepoint each) down to the events that cannot, and dead-letter
            # those: one among 8,000 costs ~27 savepoints, not 8,000.
            async def unpostable(item: tuple[Any, RecordedUsage], exc: Exception) -> None:
                dead.append(dlq_row(item[0], f"{type(exc).__name__}: {exc}", service=SERVICE))

            await failing_alone(good, post, lambda exc: isinstance(exc, UNPOSTABLE), unpostable)
            uow.publish(dead)
    committed = datetime.now(UTC)
    # accepted by usage-meter -> committed to the ledger, for the events this batch posted
    # (not redeliveries, zero amounts or dead letters); a group's events share recorded_at
    for recorded_at, n in Counter(recorded).items():
        observe_many(DEBIT_LATENCY, max((committed - recorded_at).total_seconds(), 0.0), n)


# --- rebilling.settings: key account_id, full state; a null value deletes ------------------


def parse_settings(r: Any) -> tuple[str, events.RebillingSettings | None]:
    key = r.key.decode() if r.key else None
    if r.value is None:
        if not key:
            raise events.BadMessage("tombstone without a key")
        return key, None
    message = events.parse_message(r.value)  # the markup rule is the model's: BadMessage -> DLQ
    if not isinstance(message.data, events.RebillingSettings):
        raise events.BadMessage(f"unexpected event type {message.type!r} on rebilling.settings")
    return message.data.account_id, message.data


async def apply_settings(
    directory: CompanyDirectory, conn: Conn, item: tuple[str, events.RebillingSettings | None]
) -> None:
    """An account's rebilling settings, unless they name another company than the account's
    (``CompanyDirectory.believed``). A company first heard of here is stored in its currency
    as rebilling says (USD if it does not know it): never a default that would refuse its
    accounts' usage in its real currency."""
    account_id, settings = item
    if settings is None:
        await storage.delete_rebilling(conn, account_id)
        return
    if not await directory.believed(conn, [settings]):
        return
    currency = await storage.company_currency(conn, settings.company_id)
    if currency is None:
        currency = await directory.rebilling_says("company", settings.company_id) or "USD"
    await outbox.enqueue(conn, await store_settings(conn, settings, currency))


# --- rebilling.events ----------------------------------------------------------------------


def parse_rebilling_event(r: Any) -> events.Payload | None:
    message = wanted(r, ("company.updated", "account.created", "license.changed"))
    return message.data if message else None  # None: not the wallet's business


async def apply_rebilling_event(directory: CompanyDirectory, conn: Conn, p: events.Payload) -> None:
    """A company's state, an account's company and its licenses; a record that contradicts
    what the wallet stored is believed only as far as rebilling says the same (a forged one
    must not hand a company another's account wallet, nor open wallets in another currency)."""
    believed = await directory.believed(conn, [p])
    if not believed:
        return
    p = believed[0]
    if isinstance(p, events.CompanyUpdated):
        await storage.upsert_company(conn, p)
    elif isinstance(p, events.AccountCreated):
        await storage.upsert_account(conn, p.account_id, p.company_id)
    elif isinstance(p, events.LicenseChanged) and p.account_id is not None:
        await storage.upsert_account(conn, p.account_id, p.company_id, licenses=p.account_assigned or 0)


# --- recharge.events -----------------------------------------------------------------------


def parse_recharge_event(r: Any) -> tuple[str, events.Payload] | None:
    message = wanted(r, ("recharge.succeeded", "recharge.failed", "recharge.tier_raised"))
    return (message.id, message.data) if message else None


async def apply_recharge_event(conn: Conn, item: tuple[str, events.Payload]) -> None:
    msg_id, p = item
    if isinstance(p, events.RechargeSucceeded):
        wallet = Wallet(p.wallet_id, p.owner, p.currency, company_id=p.company_id, account_id=p.account_id)
        await credit(
            conn,
            wallet,
            amount=p.amount_micros,
            kind="recharge" if p.trigger == "auto" else "top_up",
            key=f"recharge:{p.recharge_id}",
            system=SYSTEM_STRIPE_CLEARING,
            reference=p.payment_intent,
        )
        return
    if not await inbox.claim(conn, "wallet-recharge-settings", [msg_id]):
        return
    if isinstance(p, events.RechargeTierRaised | events.RechargeFailed):
        wallet = Wallet(p.wallet_id, p.owner, p.currency, company_id=p.company_id, account_id=p.account_id)
        if isinstance(p, events.RechargeTierRaised):
            await raise_tier(conn, wallet, cause=msg_id)
        elif p.auto_recharge_disabled:
            await change_settings(conn, wallet, {"auto_recharge": False}, cause=msg_id)


on_recharge_events = _transactional(apply_recharge_event, parse_recharge_event)


async def on_rebilling_settings(w: WalletWiring, records: Sequence[Any]) -> None:
    await _transactional(partial(apply_settings, w.directory), parse_settings)(w, records)


async def on_rebilling_events(w: WalletWiring, records: Sequence[Any]) -> None:
    await _transactional(partial(apply_rebilling_event, w.directory), parse_rebilling_event)(w, records)

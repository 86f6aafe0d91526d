"""recharge's Kafka consumers: ``wallet.digest`` (threshold crossings, credits and settings
changes queue a check of the auto-recharge rule for their wallet, each event once) and
``rebilling.events`` (which company has connected which Stripe account; which company an
account belongs to)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events, inbox, outbox
from tally.consumer import subscribe_batch, take
from tally.db import Conn
from tally.events import Topics
from tally.outbox import enqueue
from tally.service import Runtime
from tally.telemetry import child_traceparent, header
from tally_recharge import storage
from tally_recharge.charging import Recharger

SERVICE = "recharge"
# The id of the wallet's settings event for an applied cancellation (wallet_settings: its cause
# is the recharge.failed event that disabled auto-recharge).
CANCELLATION_APPLIED = "wallet.settings_changed:recharge.failed:"
TRIGGERS = ("wallet.threshold_crossed", "wallet.credited", "wallet.settings_changed")


def _wallet_of(message: events.Message) -> str:
    data = message.data
    assert isinstance(data, events.WalletRef)
    return data.wallet_id


async def connection_changed(conn: Conn, p: events.CompanyUpdated) -> bool:
    """A company's Stripe connection as rebilling tells it. Its accounts' cards are usable only
    while it is connected; a change (connected, disconnected, another account) re-evaluates the
    auto-recharge rule of every account wallet it may flip: reconnecting reloads a wallet that
    fell below its threshold meanwhile; disconnecting drops a retry waiting for its time. Cards
    saved on a previous account are forgotten (they cannot be charged through the new one).
    Returns whether checks were queued."""
    stripe_account = p.stripe_account_id if p.stripe_connected else None
    if not await storage.upsert_company(conn, p.company_id, p.currency, stripe_account):
        return False
    if stripe_account is not None:
        for card in await storage.forget_other_accounts_cards(conn, p.company_id, stripe_account):
            await outbox.publish(
                conn,
                Topics.RECHARGE_EVENTS,
                p.company_id,
                events.envelope(
                    "payment_method.detached",
                    events.PaymentMethodChanged(
                        company_id=p.company_id,
                        account_id=card["owner_id"],
                        payment_method=card["id"],
                        has_valid_card=bool(await storage.payment_methods(conn, "account", card["owner_id"])),
                    ),
                    source=SERVICE,
                ),
            )
    accounts = await storage.accounts_to_check(conn, p.company_id)
    for account_id in accounts:  # sorted: the lock order of checks
        await storage.queue_check(conn, "account", p.company_id, account_id)
    return bool(accounts)


def subscribe(rt: Runtime) -> None:
    def recharger() -> Recharger:
        r: Recharger = rt.state["recharger"]
        return r

    async def on_wallet_digest(records: Sequence[Any]) -> None:
        """Every wallet change that may make the auto-recharge rule hold (or stop holding)
        queues a check of that wallet; a credit of a recharge also ends its flight."""
        taken, dead = take(records, TRIGGERS, service=SERVICE)
        if not taken and not dead:
            return
        async with rt.pool.acquire() as conn, conn.transaction():
            fresh = await inbox.claim(conn, "recharge-wallet", [m.id for _, m in taken])
            # Lock order, as the charger's: wallets by id; per wallet its check row, then its
            # policy and attempts (replicas and the charger never wait on each other in a ring).
            for record, message in sorted(taken, key=lambda t: _wallet_of(t[1])):
                if message.id not in fresh:
                    continue
                p = message.data
                assert isinstance(p, events.WalletRef)
                traceparent = child_traceparent(
                    header(record), "recharge.request", {"tally.wallet_id": p.wallet_id}
                )
                await storage.queue_check(conn, p.owner, p.company_id, p.account_id, traceparent)
                if isinstance(p, events.WalletCredited) and p.transfer_id.startswith("recharge:"):
                    await storage.mark_credited(conn, p.transfer_id.removeprefix("recharge:"))
                if isinstance(p, events.WalletSettingsChanged) and message.id.startswith(
                    CANCELLATION_APPLIED
                ):
                    # the wallet applied the cancellation itself (not an older "off" that
                    # arrived late): from now on its live settings are the truth
                    await storage.set_policy(conn, p.wallet_id, cancelling=False)
            await enqueue(conn, dead)
        if taken:
            recharger().wake()

    async def on_rebilling_events(records: Sequence[Any]) -> None:
        taken, dead = take(records, ("company.updated", "account.created"), service=SERVICE)
        checks = False
        async with rt.pool.acquire() as conn, conn.transaction():
            # each message once: a redelivered old company.updated (a crash between the commit
            # and the offset commit) must not take the company back to the account it left
            fresh = await inbox.claim(conn, "recharge-rebilling", [m.id for _, m in taken])
            updates = [m.data for _, m in taken if m.id in fresh]
            for p in updates:
                if isinstance(p, events.CompanyUpdated):
                    checks |= await connection_changed(conn, p)
                elif isinstance(p, events.AccountCreated):
                    await storage.upsert_account(conn, p.account_id, p.company_id)
            await enqueue(conn, dead)
        if taken:
            rt.relay.wake()
        if checks:
            recharger().wake()

    subscribe_batch(
        rt.broker, Topics.WALLET_DIGEST, service=SERVICE, group_id="recharge-wallet", handler=on_wallet_digest
    )
    subscribe_batch(
        rt.broker,
        Topics.REBILLING_EVENTS,
        service=SERVICE,
        group_id="recharge-rebilling",
        handler=on_rebilling_events,
    )

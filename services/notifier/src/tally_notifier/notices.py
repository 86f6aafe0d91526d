"""What the notifier makes of the events it hears (the consumers in ``handlers`` decode them):
usage totals summed per account and day, then usage alerts checked (``alerts``); suspended
wallets, failed recharges, raised reload tiers and subscriptions dunning gave up on told by
email and in-app; credit requests told in-app; companies and accounts remembered (who owns
them, the company's time zone). Each message is claimed once (inbox) in the unit of work that
records its effects, so redelivery or a restart never notifies twice."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from tally import events, inbox
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.money import format_micros
from tally.uow import UnitOfWork
from tally_notifier import alerts, storage
from tally_notifier.domain import simple

log = logging.getLogger(__name__)

_Claimed = TypeVar("_Claimed", events.Message, events.UsageDigest)


async def take_in(
    uow: UnitOfWork,
    consumer: str,
    messages: Sequence[events.Message],
    owners: CompanyDirectory | None = None,
    digests: Sequence[events.UsageDigest] = (),
) -> None:
    """Apply ``messages`` not yet seen by ``consumer`` (an inbox name: the consumer group), in
    the caller's open unit of work. An ``account.created`` is believed only when rebilling
    (``owners``), where accounts are created, says the account is that company's: a record on
    the topic alone never gives a company another's account."""
    conn = uow.conn
    fresh = await inbox.claim(conn, consumer, [m.id for m in messages] + [d.id for d in digests])
    # each new id once, whichever way it was decoded: a relay's re-send can put a message
    # twice in one batch (one copy may lack the type header and be read by ``take``)
    left = set(fresh)
    todo = _once(messages, left)
    usage: list[alerts.Counted] = []
    for m in todo:
        if isinstance(m.data, events.WalletUsage):
            usage += m.data.totals
            usage += m.data.corrections
    for d in _once(digests, left):
        usage += d.totals
        usage += d.corrections
    if usage:
        touched = await alerts.add_usage(conn, usage)
        await alerts.check_alerts(conn, touched)
    for m in todo:
        p = m.data
        if isinstance(p, events.CompanyUpdated):
            await storage.upsert_company(conn, p.company_id, p.name, p.owner_email, p.timezone)
        elif isinstance(p, events.AccountCreated):
            if owners is not None:
                owner = (await owners.account_companies([p.account_id])).get(p.account_id)
                if owner != p.company_id:
                    log.warning(
                        "account.created not believed",
                        extra={"account": p.account_id, "claimed": p.company_id, "rebilling_says": owner},
                    )
                    continue
            await storage.upsert_account(conn, p.account_id, p.company_id, p.name, p.owner_email)
        elif isinstance(p, events.SubscriptionCancelled):
            await _subscription_cancelled(conn, m, p)
        elif isinstance(p, events.RechargeFailed | events.RechargeTierRaised):
            await _recharge_event(conn, m, p)
        elif isinstance(p, events.WalletSuspended | events.CreditRequestCreated):
            await _wallet_event(conn, m, p)


def _once(items: Sequence[_Claimed], left: set[str]) -> list[_Claimed]:
    """The items whose id is in ``left`` (claimed just now and not applied yet), the first of
    each id only; each id taken is removed from ``left``."""
    out = []
    for item in items:
        if item.id in left:
            left.discard(item.id)
            out.append(item)
    return out


async def _owner_emails(conn: Conn, company_id: str, account_id: str | None, owner: str) -> list[str]:
    """The wallet owner's address: the account owner for account wallets, the company owner
    for company wallets."""
    if owner == "account" and account_id:
        a = await storage.account(conn, account_id)
        return [a["owner_email"]] if a and a["owner_email"] else []
    c = await storage.company(conn, company_id)
    return [c["owner_email"]] if c and c["owner_email"] else []


async def _wallet_event(
    conn: Conn, env: events.Message, p: events.WalletSuspended | events.CreditRequestCreated
) -> None:
    if isinstance(p, events.WalletSuspended):
        to = await _owner_emails(conn, p.company_id, p.account_id, p.owner)
        mail = simple(
            f"Service paused: wallet {p.wallet_id} is below zero",
            [
                f"The wallet {p.wallet_id} reached {format_micros(p.balance_micros)} {p.currency}.",
                "Platform services are paused until a successful payment reloads it.",
            ],
        )
        if to:
            await storage.queue_email(conn, env.id, to, mail.subject, mail.text, mail.html)
    else:
        await storage.notify(
            conn,
            env.id,
            p.company_id,
            "credit_request",
            f"Credit request from {p.account_id}",
            f"{p.account_id} asks for {format_micros(p.amount_micros)} {p.currency}"
            + (f" (reference {p.reference})" if p.reference else ""),
            {"request_id": p.request_id, "account_id": p.account_id},
        )


async def _recharge_event(
    conn: Conn, env: events.Message, p: events.RechargeFailed | events.RechargeTierRaised
) -> None:
    if isinstance(p, events.RechargeFailed):
        to = await _owner_emails(conn, p.company_id, p.account_id, p.owner)
        declines = ", ".join(t.decline_code or t.outcome for t in p.tries) or "no card"
        if p.auto_recharge_disabled:
            subject = f"Auto-recharge turned off for {p.wallet_id}"
            lines = [
                f"After {p.consecutive_failures} failed attempts to reload "
                f"{format_micros(p.amount_micros)} {p.currency}, auto-recharge is off.",
                f"Card results: {declines}.",
                "Update the card on file, then turn auto-recharge back on.",
            ]
        else:
            subject = f"Wallet reload failed for {p.wallet_id}"
            lines = [
                f"We could not charge {format_micros(p.amount_micros)} {p.currency} to any "
                f"saved card ({declines}).",
                "Check the card with your bank or add another one.",
            ]
            if p.retry_at:
                lines.append(f"We will try again at {p.retry_at.isoformat()}.")
        mail = simple(subject, lines)
        if to:
            await storage.queue_email(conn, env.id, to, mail.subject, mail.text, mail.html)
        await storage.notify(
            conn,
            env.id,
            p.company_id,
            "recharge_failed",
            subject,
            lines[0],
            {
                "wallet_id": p.wallet_id,
                "recharge_id": p.recharge_id,
                "auto_recharge_disabled": p.auto_recharge_disabled,
            },
        )
    else:
        to = await _owner_emails(conn, p.company_id, p.account_id, p.owner)
        subject = f"Reload amount raised for {p.wallet_id}"
        lines = [
            f"Your wallet reloaded three times within 24 hours, so smart adjustment raised "
            f"its reload amount from {format_micros(p.previous_reload_amount_micros)} to "
            f"{format_micros(p.reload_amount_micros)} {p.currency}."
        ]
        mail = simple(subject, lines)
        if to:
            await storage.queue_email(conn, env.id, to, mail.subject, mail.text, mail.html)
        await storage.notify(
            conn, env.id, p.company_id, "tier_raised", subject, lines[0], {"wallet_id": p.wallet_id}
        )


async def _subscription_cancelled(conn: Conn, env: events.Message, p: events.SubscriptionCancelled) -> None:
    """Dunning gave up: the company hears it in-app and by email (a cancellation the customer
    asked for is not news)."""
    if p.reason != "payment_failed":
        return
    subject = f"Subscription {p.product} of {p.account_id} cancelled: payment failed"
    lines = [
        f"After repeated failed charges, the {p.product} subscription of {p.account_id} "
        f"({p.deployment}) is cancelled.",
        f"Still outstanding: {format_micros(p.outstanding_micros)} {p.currency}.",
        "Update the card on file and subscribe again to restore the service.",
    ]
    to = await _owner_emails(conn, p.company_id, None, "company")
    mail = simple(subject, lines)
    if to:
        await storage.queue_email(conn, env.id, to, mail.subject, mail.text, mail.html)
    await storage.notify(
        conn,
        env.id,
        p.company_id,
        "subscription_cancelled",
        subject,
        lines[0],
        {"subscription_id": p.subscription_id, "account_id": p.account_id},
    )

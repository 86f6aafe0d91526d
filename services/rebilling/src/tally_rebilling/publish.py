"""What rebilling tells the others, always through the outbox in the deciding transaction (each
message is queued on the unit of work and written with the state at its commit):
``company.updated`` / ``account.created`` / ``license.changed`` / ``subscription.charged`` /
``subscription.cancelled`` on
``rebilling.events`` and each account's full settings on the compacted ``rebilling.settings``."""

from __future__ import annotations

import asyncpg

from tally import events
from tally.events import Topics
from tally.uow import UnitOfWork
from tally_rebilling import storage

SOURCE = "rebilling"


async def company_updated(uow: UnitOfWork, c: asyncpg.Record) -> None:
    uow.emit(
        Topics.REBILLING_EVENTS,
        c["id"],
        events.envelope(
            "company.updated",
            events.CompanyUpdated(
                company_id=c["id"],
                name=c["name"],
                plan=c["plan"],
                currency=c["currency"],
                owner_email=c["owner_email"],
                stripe_connected=c["stripe_account_id"] is not None,
                stripe_account_id=c["stripe_account_id"],
            ),
            source=SOURCE,
        ),
    )


async def account_created(uow: UnitOfWork, a: asyncpg.Record) -> None:
    uow.emit(
        Topics.REBILLING_EVENTS,
        a["company_id"],
        events.envelope(
            "account.created",
            events.AccountCreated(
                account_id=a["id"],
                company_id=a["company_id"],
                name=a["name"],
                owner_email=a["owner_email"],
                billing_model=a["billing_model"],
            ),
            source=SOURCE,
            id_=f"account.created:{a['id']}",
        ),
    )


async def settings(uow: UnitOfWork, aid: str) -> None:
    """Publish the account's full current settings (the compacted topic keeps the last)."""
    a = await storage.account(uow.conn, aid)
    assert a is not None
    c = await storage.company(uow.conn, a["company_id"])
    assert c is not None
    mode, markups, version, effective_at = await storage.rebilling(uow.conn, aid)
    payload = events.RebillingSettings(
        account_id=aid,
        company_id=a["company_id"],
        mode=mode,
        markups=markups,
        active=bool(a["has_valid_card"]),
        company_stripe_connected=c["stripe_account_id"] is not None,
        version=version,
        effective_at=effective_at,
    )
    uow.emit(
        Topics.REBILLING_SETTINGS,
        aid,
        events.envelope(
            "rebilling.settings", payload, source=SOURCE, id_=f"rebilling.settings:{aid}:{version}"
        ),
    )


async def license_changed(uow: UnitOfWork, cid: str, aid: str | None) -> None:
    total, assigned = await storage.pool(uow.conn, cid)
    account_assigned = await storage.account_assigned(uow.conn, aid) if aid else None
    uow.emit(
        Topics.REBILLING_EVENTS,
        cid,
        events.envelope(
            "license.changed",
            events.LicenseChanged(
                company_id=cid,
                account_id=aid,
                total=total,
                assigned=assigned,
                account_assigned=account_assigned,
            ),
            source=SOURCE,
        ),
    )


async def leg_charged(uow: UnitOfWork, leg: asyncpg.Record) -> None:
    c = await storage.company(uow.conn, leg["company_id"])
    platform = leg["leg"].startswith("platform")
    uow.emit(
        Topics.REBILLING_EVENTS,
        leg["company_id"],
        events.envelope(
            "subscription.charged",
            events.SubscriptionCharged(
                subscription_id=leg["subscription_id"],
                company_id=leg["company_id"],
                account_id=leg["account_id"],
                product=leg["product"],
                deployment=leg["deployment"],
                period=leg["period"],
                platform_amount_micros=leg["amount"] if platform else 0,
                company_amount_micros=0 if platform else leg["amount"],
                currency=c["currency"] if c else "USD",
                leg="platform" if platform else "account",
            ),
            source=SOURCE,
            id_=f"subscription.charged:{leg['subscription_id']}:{leg['period']}:{leg['leg']}",
        ),
    )


async def subscription_cancelled(uow: UnitOfWork, sub: asyncpg.Record, reason: str, outstanding: int) -> None:
    c = await storage.company(uow.conn, sub["company_id"])
    uow.emit(
        Topics.REBILLING_EVENTS,
        sub["company_id"],
        events.envelope(
            "subscription.cancelled",
            events.SubscriptionCancelled(
                subscription_id=sub["id"],
                company_id=sub["company_id"],
                account_id=sub["account_id"],
                product=sub["product"],
                deployment=sub["deployment"],
                reason=reason,
                outstanding_micros=outstanding,
                currency=c["currency"] if c else "USD",
            ),
            source=SOURCE,
            id_=f"subscription.cancelled:{sub['id']}",
        ),
    )

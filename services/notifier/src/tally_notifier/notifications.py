"""A company's in-app notifications: listed newest first (all, or the unread ones), and
marked read (once: the first time it was read is kept)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from tally import pagination
from tally.auth import Principal
from tally.errors import not_found
from tally.uow import Database, UnitOfWork
from tally_notifier import storage


@dataclass(frozen=True)
class Page:
    items: list[asyncpg.Record]
    next_cursor: str | None


async def list_notifications(
    db: Database, company_id: str, *, unread: bool, limit: int, cursor: str | None
) -> Page:
    async with db.reading() as conn:
        rows = await storage.notifications(
            conn, company_id, unread=unread, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["seq"] if len(rows) > limit else None)
    return Page(items, nxt)


async def mark_read(uow: UnitOfWork, principal: Principal, notification_id: str) -> asyncpg.Record:
    """404 for a notification of a company the principal may not see."""
    async with uow:
        cid = await storage.notification_company(uow.conn, notification_id)
        if cid is None or not principal.can_see_company(cid):
            raise not_found("notification")
        row = await storage.mark_read(uow.conn, notification_id)
    if row is None:  # notifications are never deleted: not reached
        raise not_found("notification")
    return row

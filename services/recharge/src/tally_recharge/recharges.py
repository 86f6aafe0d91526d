"""A wallet's recharge history, as its owners see it: automatic recharges and top-ups, newest
first, a page at a time."""

from __future__ import annotations

from dataclasses import dataclass

from tally import pagination
from tally.auth import Principal
from tally.directory import CompanyDirectory
from tally.uow import Database
from tally_recharge import storage, targets
from tally_recharge.storage import Attempt
from tally_recharge.targets import Owner


@dataclass(frozen=True)
class Page:
    items: list[Attempt]
    next_cursor: str | None


async def history(
    db: Database,
    directory: CompanyDirectory,
    principal: Principal,
    owner: Owner,
    *,
    limit: int,
    cursor: str | None,
) -> Page:
    target = await targets.find(db, directory, principal, owner)
    async with db.reading() as conn:
        rows = await storage.list_attempts(
            conn, target.wallet_id, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1].seq if len(rows) > limit else None)
    return Page(items, nxt)

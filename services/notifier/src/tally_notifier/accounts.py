"""The accounts the notifier knows (from ``rebilling.events``), as a principal may see them."""

from __future__ import annotations

import asyncpg

from tally.auth import Principal
from tally.db import Conn
from tally.errors import not_found
from tally_notifier import storage


async def visible(conn: Conn, principal: Principal, account_id: str) -> asyncpg.Record:
    """The account (with its company's time zone), or 404 when it is unknown or not the
    principal's to see."""
    a = await storage.account(conn, account_id)
    if a is None or not principal.can_see_account(a["company_id"], account_id):
        raise not_found("account")
    return a

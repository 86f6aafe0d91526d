"""Who may see which company and account: the lookups every use case starts with. Someone who
may not see it is told it does not exist (404), as for one that does not."""

from __future__ import annotations

import asyncpg

from tally.auth import Principal, require_company
from tally.db import Conn
from tally.errors import not_found
from tally_rebilling import storage


async def company_for(conn: Conn, principal: Principal, cid: str, *, lock: bool = False) -> asyncpg.Record:
    require_company(principal, cid, "company")
    c = await storage.company(conn, cid, lock=lock)
    if c is None:
        raise not_found("company")
    return c


async def account_for(conn: Conn, principal: Principal, aid: str, *, lock: bool = False) -> asyncpg.Record:
    a = await storage.account(conn, aid, lock=lock)
    if a is None or not principal.can_see_account(a["company_id"], aid):
        raise not_found("account")
    return a

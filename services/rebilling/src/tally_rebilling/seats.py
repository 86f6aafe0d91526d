"""Seats of ``stripe_connect_automated`` workspaces: a subscription, not licenses. They never
draw on the pool; each member seat is charged monthly to the account's card through the
company's connected Stripe at the company's seat price (a ``seats`` subscription per workspace,
its quantity the seats, charged by ``billing`` every period and dunned); a seat added by an
accepted invitation is charged for the current period at once (one more leg of the period)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from tally.auth import Principal
from tally.db import Conn
from tally.errors import money_field
from tally.money import format_micros
from tally.uow import Database, UnitOfWork
from tally_rebilling import storage
from tally_rebilling.access import company_for
from tally_rebilling.domain import current_period, next_period
from tally_rebilling.schemas import SeatPriceOut


async def add_seat(conn: Conn, account: asyncpg.Record, invitation_id: str) -> str | None:
    """In the accepting transaction: the workspace's seat subscription grows by one from the
    next period, and the current period's seat is a leg due now. Returns the subscription to
    charge now (None when the company charges nothing for seats)."""
    price = await storage.seat_price(conn, account["company_id"])
    now = datetime.now(UTC)
    period = current_period(now)
    before = await storage.seat_subscription(conn, account["id"], lock=True)
    if before is not None and before["first_period"] <= period:
        # this period's seats are charged with the seats held before (the new one is its own
        # leg): opened now, if the runner has not yet
        await storage.open_legs(conn, before, period, now)
    members = [m for m in await storage.members(conn, account["id"]) if not m["is_agency"]]
    sub = await storage.add_seat_to_plan(
        conn, account["id"], account["company_id"], price, next_period(period), len(members) + 1
    )
    if price == 0:
        return None
    await storage.add_leg(conn, sub, period, f"account:{invitation_id}", price, now)
    return str(sub["id"])


async def set_price(uow: UnitOfWork, principal: Principal, cid: str, amount_text: str) -> SeatPriceOut:
    """What the company charges its stripe_connect_automated workspaces per seat and month:
    from the next period for seats held, at once for seats added."""
    async with uow:
        c = await company_for(uow.conn, principal, cid, lock=True)
        amount = money_field(amount_text, "amount", allow_zero=True)  # after the tenant check
        await storage.set_seat_price(uow.conn, cid, amount)
    return SeatPriceOut(amount=format_micros(amount), currency=c["currency"])


async def price(db: Database, principal: Principal, cid: str) -> SeatPriceOut:
    async with db.reading() as conn:
        c = await company_for(conn, principal, cid)
        return SeatPriceOut(amount=format_micros(await storage.seat_price(conn, cid)), currency=c["currency"])

"""The platform price catalog: a price per service and currency (a company's usage is priced
in its currency). A price set applies to the events that come after it."""

from __future__ import annotations

from tally.uow import Database, UnitOfWork
from tally_usage_meter import storage
from tally_usage_meter.domain import Price


async def catalog(db: Database) -> list[Price]:
    """Every price, by service then currency."""
    async with db.reading() as conn:
        prices = await storage.load_prices(conn)
    return [prices[k] for k in sorted(prices)]


async def set_price(uow: UnitOfWork, price: Price) -> Price:
    async with uow:
        await storage.upsert_price(uow.conn, price)
    return price

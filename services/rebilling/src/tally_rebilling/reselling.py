"""Reselling: the catalog with the company's prices, and the company's monthly report of what
its resold subscriptions brought in, cost and still owe. Subscribing is ``subscriptions``, the
period billing ``billing``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from tally.auth import Principal
from tally.errors import ApiError, money_field
from tally.money import format_micros
from tally.uow import Database, UnitOfWork
from tally_rebilling import storage
from tally_rebilling.access import company_for
from tally_rebilling.domain import CATALOG, Product
from tally_rebilling.schemas import CatalogRow, ReportLine, ReportOut


def catalog_row(p: Product, price: int) -> CatalogRow:
    """A product at the company's ``price`` (micros per month); the profit may be negative."""
    return CatalogRow(
        product=p.id,
        name=p.name,
        platform_price=format_micros(p.platform_price_micros),
        company_price=format_micros(price),
        profit=format_micros(price - p.platform_price_micros),
    )


async def catalog(db: Database, principal: Principal, cid: str) -> list[CatalogRow]:
    """Every product, at the company's price (the platform's until it sets one)."""
    async with db.reading() as conn:
        await company_for(conn, principal, cid)
        prices = await storage.company_prices(conn, cid)
    return [catalog_row(p, prices.get(p.id, p.platform_price_micros)) for p in CATALOG.values()]


async def set_price(
    uow: UnitOfWork, principal: Principal, cid: str, product: str, company_price: str
) -> CatalogRow:
    """The company's monthly price of a catalog product (decimal string >= 0), for
    subscriptions made from now on."""
    p = CATALOG.get(product)
    if p is None:
        raise ApiError(404, "unknown_product", f"no product {product!r} in the reselling catalog")
    async with uow:
        await company_for(uow.conn, principal, cid)
        price = money_field(company_price, "company_price", allow_zero=True)  # after the tenant check
        await storage.set_company_price(uow.conn, cid, product, price)
    return catalog_row(p, price)


class Row(Protocol):
    """A leg as ``storage.period_legs`` reads it (a record, or any mapping with its fields)."""

    def __getitem__(self, key: str) -> Any: ...


def summarise(legs: Iterable[Row]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A period's legs of product subscriptions as report lines (micros per subscription) and
    totals. An account leg charged is revenue, one not charged yet is outstanding; a platform
    leg charged is the company's cost, one not charged yet the company's platform outstanding
    (a line shows its cost charged only)."""
    lines: dict[str, dict[str, Any]] = {}
    totals = {"revenue": 0, "platform_cost": 0, "outstanding": 0, "platform_outstanding": 0}
    for leg in legs:
        line = lines.setdefault(
            leg["subscription_id"],
            {
                "subscription_id": leg["subscription_id"],
                "account_id": leg["account_id"],
                "product": leg["product"],
                "deployment": leg["deployment"],
                "revenue": 0,
                "platform_cost": 0,
                "outstanding": 0,
            },
        )
        charged = leg["status"] == "charged"
        if leg["leg"] == "platform":
            field = "platform_cost" if charged else "platform_outstanding"
            line["platform_cost"] += leg["amount"] if charged else 0
        else:
            field = "revenue" if charged else "outstanding"
            line[field] += leg["amount"]
        totals[field] += leg["amount"]
    return list(lines.values()), totals


async def report(db: Database, principal: Principal, cid: str, period: str) -> ReportOut:
    async with db.reading() as conn:
        c = await company_for(conn, principal, cid)
        legs = await storage.period_legs(conn, cid, period)
    lines, totals = summarise(legs)
    return ReportOut(
        period=period,
        currency=c["currency"],
        revenue=format_micros(totals["revenue"]),
        platform_cost=format_micros(totals["platform_cost"]),
        profit=format_micros(totals["revenue"] - totals["platform_cost"]),
        outstanding=format_micros(totals["outstanding"]),
        platform_outstanding=format_micros(totals["platform_outstanding"]),
        lines=[
            ReportLine(
                **{
                    **x,
                    "revenue": format_micros(x["revenue"]),
                    "platform_cost": format_micros(x["platform_cost"]),
                    "outstanding": format_micros(x["outstanding"]),
                    "profit": format_micros(x["revenue"] - x["platform_cost"]),
                }
            )
            for x in lines
        ],
    )

"""Reselling: the catalog with the company's prices, subscriptions, the period runner and the
monthly report."""

from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from tally.auth import CurrentPrincipal, require_role
from tally.errors import ApiError, money_field
from tally.ids import PathId, PathKey
from tally.money import format_micros
from tally.service import runtime
from tally_rebilling import storage
from tally_rebilling.api_companies import account_for, company_for
from tally_rebilling.billing import Biller, current_period
from tally_rebilling.domain import CATALOG, parse_period

router = APIRouter(prefix="/v1", tags=["reselling"])


class CatalogRow(BaseModel):
    product: str
    name: str
    platform_price: str
    company_price: str
    period: Literal["month"] = "month"
    profit: str


class CatalogOut(BaseModel):
    items: list[CatalogRow]
    next_cursor: str | None = None


class PriceIn(BaseModel):
    company_price: str = Field(description="decimal string >= 0 per month")


class SubscriptionIn(BaseModel):
    product: str
    deployment: Literal["direct", "resell"]


class SubscriptionOut(BaseModel):
    id: str
    account_id: str
    product: str
    deployment: str
    platform_price: str
    company_price: str
    period: str
    charge: str = Field(description="this period's charge: charged, failed or pending")


class ReportLine(BaseModel):
    subscription_id: str
    account_id: str
    product: str
    deployment: str
    revenue: str
    platform_cost: str
    profit: str


class ReportOut(BaseModel):
    period: str
    currency: str
    revenue: str
    platform_cost: str
    profit: str
    lines: list[ReportLine]


class RunOut(BaseModel):
    period: str
    outcomes: dict[str, int]


def _biller(request: Request) -> Biller:
    biller: Biller = runtime(request).state["biller"]
    return biller


def _period(text: str) -> str:
    try:
        return parse_period(text)
    except ValueError as exc:
        raise ApiError(422, "validation_error", "period must be YYYY-MM",
                       [{"field": "period", "message": "YYYY-MM"}]) from exc


@router.get("/companies/{cid}/reselling", response_model=CatalogOut)
async def catalog(cid: PathId, request: Request, principal: CurrentPrincipal) -> CatalogOut:
    async with runtime(request).pool.acquire() as conn:
        await company_for(conn, principal, cid)
        prices = await storage.company_prices(conn, cid)
    rows = []
    for p in CATALOG.values():
        price = prices.get(p.id, p.platform_price_micros)
        rows.append(CatalogRow(product=p.id, name=p.name,
                               platform_price=format_micros(p.platform_price_micros),
                               company_price=format_micros(price),
                               profit=format_micros(price - p.platform_price_micros)))
    return CatalogOut(items=rows)


@router.put("/companies/{cid}/reselling/{product}", response_model=CatalogRow)
async def set_price(cid: PathId, product: PathKey, body: PriceIn, request: Request,
                    principal: CurrentPrincipal) -> CatalogRow:
    require_role(principal, "company_admin", "platform_admin")
    p = CATALOG.get(product)
    if p is None:
        raise ApiError(404, "unknown_product", f"no product {product!r} in the reselling catalog")
    price = money_field(body.company_price, "company_price", allow_zero=True)
    async with runtime(request).pool.acquire() as conn:
        await company_for(conn, principal, cid)
        await storage.set_company_price(conn, cid, product, price)
    return CatalogRow(product=p.id, name=p.name, platform_price=format_micros(p.platform_price_micros),
                      company_price=format_micros(price),
                      profit=format_micros(price - p.platform_price_micros))


@router.post("/accounts/{aid}/subscriptions", status_code=201, response_model=SubscriptionOut)
async def subscribe(aid: PathId, body: SubscriptionIn, request: Request,
                    principal: CurrentPrincipal) -> SubscriptionOut:
    require_role(principal, "company_admin", "account_user", "platform_admin")
    p = CATALOG.get(body.product)
    if p is None:
        raise ApiError(422, "unknown_product", f"no product {body.product!r} in the catalog",
                       [{"field": "product", "message": f"one of {sorted(CATALOG)}"}])
    if principal.role == "account_user" and body.deployment == "direct":
        raise ApiError(403, "forbidden", "direct deployment is the company's decision")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        a = await account_for(conn, principal, aid)
        c = await storage.company(conn, a["company_id"])
        assert c is not None
        if body.deployment == "resell" and c["stripe_account_id"] is None:
            raise ApiError(409, "company_stripe_not_connected",
                           "reselling charges the account through the company's Stripe")
        price = (await storage.company_prices(conn, c["id"])).get(p.id, p.platform_price_micros)
        sub = await storage.insert_subscription(conn, {
            "id": f"sub_{uuid.uuid4().hex[:20]}", "account_id": aid, "company_id": c["id"],
            "product": p.id, "deployment": body.deployment,
            "platform_price": p.platform_price_micros, "company_price": price})
    period = current_period()
    outcome = await _biller(request).charge_period(sub, period)  # the current period at once
    rt.relay.wake()
    return SubscriptionOut(id=sub["id"], account_id=aid, product=p.id,
                           deployment=body.deployment,
                           platform_price=format_micros(p.platform_price_micros),
                           company_price=format_micros(price), period=period, charge=outcome)


@router.post("/reselling/periods/{period}/run", response_model=RunOut,
             summary="Charge every active subscription for a period (idempotent; platform admins "
                     "and the scheduler)")
async def run_period(period: PathKey, request: Request, principal: CurrentPrincipal) -> RunOut:
    require_role(principal, "platform_admin")
    period = _period(period)
    outcomes = await _biller(request).run_period(period)
    runtime(request).relay.wake()
    return RunOut(period=period, outcomes=outcomes)


@router.get("/companies/{cid}/reselling/report", response_model=ReportOut)
async def report(cid: PathId, request: Request, principal: CurrentPrincipal,
                 period: str = Query(..., description="YYYY-MM")) -> ReportOut:
    require_role(principal, "company_admin", "platform_admin")
    period = _period(period)
    async with runtime(request).pool.acquire() as conn:
        c = await company_for(conn, principal, cid)
        rows = await storage.period_charges(conn, cid, period)
    lines = []
    revenue = cost = 0
    for r in rows:
        revenue += r["company_amount"]
        cost += r["platform_amount"]
        lines.append(ReportLine(
            subscription_id=r["subscription_id"], account_id=r["account_id"], product=r["product"],
            deployment=r["deployment"], revenue=format_micros(r["company_amount"]),
            platform_cost=format_micros(r["platform_amount"]),
            profit=format_micros(r["company_amount"] - r["platform_amount"])))
    return ReportOut(period=period, currency=c["currency"], revenue=format_micros(revenue),
                     platform_cost=format_micros(cost), profit=format_micros(revenue - cost),
                     lines=lines)

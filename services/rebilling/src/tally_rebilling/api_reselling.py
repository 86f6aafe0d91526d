"""Reselling: the catalog with the company's prices, subscriptions, the period runner and the
monthly report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from tally import idempotency
from tally.auth import CurrentPrincipal, require_role
from tally.errors import ApiError, JsonResponse, money_field
from tally.idempotency import IdempotencyKey
from tally.ids import PathId, PathKey
from tally.money import format_micros
from tally.service import runtime
from tally_rebilling import storage, subscriptions
from tally_rebilling.api_companies import account_for, company_for
from tally_rebilling.billing import Biller, subscription_view
from tally_rebilling.domain import CATALOG, current_period, parse_period, period_start

router = APIRouter(prefix="/v1", tags=["reselling"])
Limit = Annotated[int, Query(ge=1, le=500)]


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
    account_id: str | None = Field(description="null for a company's license pool")
    product: str
    deployment: str
    status: Literal["active", "past_due", "cancelled"]
    platform_price: str
    company_price: str
    quantity: int = Field(1, description="seats, or licenses in the pool")
    outstanding: str = Field(description="charged for but not yet collected (failed legs)")
    next_retry_at: str | None = Field(None, description="when a failed charge is tried again")
    cancel_at_period_end: bool
    created_period: str
    period: str | None = Field(None, description="on subscribe: the period charged at once")
    charge: str | None = Field(
        None, description="on subscribe: this period's charge: charged, failed (past_due, dunned) or pending"
    )


class SubscriptionPage(BaseModel):
    items: list[SubscriptionOut]
    next_cursor: str | None


class ReportLine(BaseModel):
    subscription_id: str
    account_id: str
    product: str
    deployment: str
    revenue: str
    platform_cost: str
    profit: str
    outstanding: str = Field(description="the account's price for the period not collected yet")


class ReportOut(BaseModel):
    period: str
    currency: str
    revenue: str = Field(description="collected from accounts (charged account legs)")
    platform_cost: str = Field(description="charged to the company (charged platform legs)")
    profit: str
    outstanding: str = Field(description="accounts' charges for the period not collected yet")
    platform_outstanding: str = Field(
        description="the company's platform charges for the period not collected yet"
    )
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
        raise ApiError(
            422, "validation_error", "period must be YYYY-MM", [{"field": "period", "message": "YYYY-MM"}]
        ) from exc


@router.get("/companies/{cid}/reselling", response_model=CatalogOut)
async def catalog(cid: PathId, request: Request, principal: CurrentPrincipal) -> CatalogOut:
    async with runtime(request).pool.acquire() as conn:
        await company_for(conn, principal, cid)
        prices = await storage.company_prices(conn, cid)
    rows = []
    for p in CATALOG.values():
        price = prices.get(p.id, p.platform_price_micros)
        rows.append(
            CatalogRow(
                product=p.id,
                name=p.name,
                platform_price=format_micros(p.platform_price_micros),
                company_price=format_micros(price),
                profit=format_micros(price - p.platform_price_micros),
            )
        )
    return CatalogOut(items=rows)


@router.put("/companies/{cid}/reselling/{product}", response_model=CatalogRow)
async def set_price(
    cid: PathId, product: PathKey, body: PriceIn, request: Request, principal: CurrentPrincipal
) -> CatalogRow:
    require_role(principal, "company_admin", "platform_admin")
    p = CATALOG.get(product)
    if p is None:
        raise ApiError(404, "unknown_product", f"no product {product!r} in the reselling catalog")
    price = money_field(body.company_price, "company_price", allow_zero=True)
    async with runtime(request).pool.acquire() as conn:
        await company_for(conn, principal, cid)
        await storage.set_company_price(conn, cid, product, price)
    return CatalogRow(
        product=p.id,
        name=p.name,
        platform_price=format_micros(p.platform_price_micros),
        company_price=format_micros(price),
        profit=format_micros(price - p.platform_price_micros),
    )


@router.post("/accounts/{aid}/subscriptions", status_code=201, response_model=SubscriptionOut)
async def subscribe(
    aid: PathId,
    body: SubscriptionIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> SubscriptionOut | JsonResponse:
    require_role(principal, "company_admin", "account_user", "platform_admin")
    if principal.role == "account_user" and body.deployment == "direct":
        raise ApiError(403, "forbidden", "direct deployment is the company's decision")
    rt = runtime(request)
    started = await subscriptions.subscribe(
        rt.pool,
        _biller(request),
        principal,
        aid,
        body.product,
        body.deployment,
        idempotency_key=idempotency_key,
        fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
    )
    rt.relay.wake()
    if isinstance(started, subscriptions.Replayed):
        return JsonResponse(started.response, status_code=started.status_code)
    return SubscriptionOut(**started)


@router.get("/accounts/{aid}/subscriptions", response_model=SubscriptionPage)
async def list_subscriptions(
    aid: PathId, request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> SubscriptionPage:
    async with runtime(request).pool.acquire() as conn:
        await account_for(conn, principal, aid)
        rows = await storage.account_subscriptions(
            conn, aid, limit=limit + 1, after=cursor, tries=len(_biller(request).delays)
        )
    items = [
        SubscriptionOut(**subscription_view(r, storage.Dunning(r["outstanding"], r["next_retry_at"])))
        for r in rows[:limit]
    ]
    return SubscriptionPage(items=items, next_cursor=rows[limit - 1]["id"] if len(rows) > limit else None)


@router.delete(
    "/subscriptions/{sid}", response_model=SubscriptionOut, summary="Cancel at the end of the paid period"
)
async def cancel_subscription(sid: PathKey, request: Request, principal: CurrentPrincipal) -> SubscriptionOut:
    require_role(principal, "company_admin", "account_user", "platform_admin")
    return SubscriptionOut(
        **await subscriptions.cancel(runtime(request).pool, principal, sid, len(_biller(request).delays))
    )


class RunIn(BaseModel):
    at: datetime | None = Field(None, description="the instant to run as (default: now)")
    company_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="only this company's subscriptions"
    )
    period: str | None = Field(
        None, description="the period to open (YYYY-MM; default: the one `at` falls in)"
    )


@router.post(
    "/reselling/run",
    response_model=RunOut,
    summary="Open the period and charge everything due at an instant (platform admins "
    "and the scheduler; idempotent)",
)
async def run_now(body: RunIn, request: Request, principal: CurrentPrincipal) -> RunOut:
    require_role(principal, "platform_admin")
    at = body.at or datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    period = _period(body.period) if body.period else current_period(at)
    outcomes = await _biller(request).run(at, period, company_id=body.company_id)
    runtime(request).relay.wake()
    return RunOut(period=period, outcomes=outcomes)


@router.post(
    "/reselling/periods/{period}/run",
    response_model=RunOut,
    summary="Charge every active subscription for a period (idempotent; platform admins and the scheduler)",
)
async def run_period(period: PathKey, request: Request, principal: CurrentPrincipal) -> RunOut:
    require_role(principal, "platform_admin")
    period = _period(period)
    now = datetime.now(UTC)
    outcomes = await _biller(request).run(max(now, period_start(period)), period)
    runtime(request).relay.wake()
    return RunOut(period=period, outcomes=outcomes)


@router.get("/companies/{cid}/reselling/report", response_model=ReportOut)
async def report(
    cid: PathId,
    request: Request,
    principal: CurrentPrincipal,
    period: str = Query(..., description="YYYY-MM"),
) -> ReportOut:
    require_role(principal, "company_admin", "platform_admin")
    period = _period(period)
    async with runtime(request).pool.acquire() as conn:
        c = await company_for(conn, principal, cid)
        legs = await storage.period_legs(conn, cid, period)
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
            for x in lines.values()
        ],
    )

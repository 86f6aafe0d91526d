"""Reselling: the catalog with the company's prices, subscriptions, the period runner and the
monthly report. Routes parse, authorise, call one use case (``reselling``, ``subscriptions``,
``billing.Biller.run``) and render (``schemas``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from tally import idempotency
from tally.auth import CurrentPrincipal, require_role
from tally.errors import ApiError, JsonResponse
from tally.idempotency import IdempotencyKey, Stored
from tally.ids import PathId, PathKey
from tally.openapi import answers
from tally.pagination import IdCursor
from tally_rebilling import reselling, storage, subscriptions
from tally_rebilling.domain import current_period, parse_period, period_start
from tally_rebilling.schemas import (
    PERIOD_PATTERN,
    CatalogOut,
    CatalogRow,
    ReportOut,
    ResoldPriceIn,
    RunIn,
    RunOut,
    SubscriptionIn,
    SubscriptionOut,
    SubscriptionPage,
    subscription_out,
)
from tally_rebilling.wiring import Wired

router = APIRouter(prefix="/v1", tags=["reselling"])
Limit = Annotated[int, Query(ge=1, le=500)]
PeriodPath = Annotated[str, Path(pattern=PERIOD_PATTERN, description="YYYY-MM")]


def _period(text: str) -> str:
    try:
        return parse_period(text)
    except ValueError as exc:
        raise ApiError(
            422, "validation_error", "period must be YYYY-MM", [{"field": "period", "message": "YYYY-MM"}]
        ) from exc


@router.get("/companies/{cid}/reselling", response_model=CatalogOut)
async def catalog(cid: PathId, principal: CurrentPrincipal, w: Wired) -> CatalogOut:
    return CatalogOut(items=await reselling.catalog(w.db, principal, cid))


@router.put("/companies/{cid}/reselling/{product}", response_model=CatalogRow)
async def set_price(
    cid: PathId, product: PathKey, body: ResoldPriceIn, principal: CurrentPrincipal, w: Wired
) -> CatalogRow:
    require_role(principal, "company_admin", "platform_admin")
    return await reselling.set_price(w.uow(), principal, cid, product, body.company_price)


@router.post(
    "/accounts/{aid}/subscriptions", status_code=201, response_model=SubscriptionOut, responses=answers(409)
)
async def subscribe(
    aid: PathId,
    body: SubscriptionIn,
    request: Request,
    principal: CurrentPrincipal,
    w: Wired,
    idempotency_key: IdempotencyKey = None,
) -> SubscriptionOut | JsonResponse:
    require_role(principal, "company_admin", "account_user", "platform_admin")
    started = await subscriptions.subscribe(
        w.db,
        w.biller,
        principal,
        aid,
        body.product,
        body.deployment,
        idempotency_key=idempotency_key,
        fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
    )
    if isinstance(started, Stored):  # the first response to this Idempotency-Key, again
        return started.replay()
    return started


@router.get("/accounts/{aid}/subscriptions", response_model=SubscriptionPage)
async def list_subscriptions(
    aid: PathId, principal: CurrentPrincipal, w: Wired, limit: Limit = 50, cursor: IdCursor = None
) -> SubscriptionPage:
    page = await subscriptions.list_for_account(
        w.db, principal, aid, limit=limit, cursor=cursor, tries=len(w.biller.delays)
    )
    items = [
        subscription_out(r, storage.Dunning(r["outstanding"], r["next_retry_at"], r["failed_attempts"]))
        for r in page.items
    ]
    return SubscriptionPage(items=items, next_cursor=page.next_cursor)


@router.delete(
    "/subscriptions/{sid}",
    response_model=SubscriptionOut,
    summary="Cancel at the end of the paid period",
    responses=answers(409),
)
async def cancel_subscription(sid: PathKey, principal: CurrentPrincipal, w: Wired) -> SubscriptionOut:
    require_role(principal, "company_admin", "account_user", "platform_admin")
    return await subscriptions.cancel(w.uow(), principal, sid, len(w.biller.delays))


@router.post(
    "/reselling/run",
    response_model=RunOut,
    summary="Open the period and charge everything due at an instant (platform admins "
    "and the scheduler; idempotent)",
)
async def run_now(body: RunIn, principal: CurrentPrincipal, w: Wired) -> RunOut:
    require_role(principal, "platform_admin")
    at = body.at or datetime.now(UTC)  # RFC 3339: always with its offset
    period = _period(body.period) if body.period else current_period(at)
    outcomes = await w.biller.run(at, period, company_id=body.company_id, wait=True)
    return RunOut(period=period, outcomes=outcomes)


@router.post(
    "/reselling/periods/{period}/run",
    response_model=RunOut,
    summary="Charge every active subscription for a period (idempotent; platform admins and the scheduler)",
)
async def run_period(period: PeriodPath, principal: CurrentPrincipal, w: Wired) -> RunOut:
    require_role(principal, "platform_admin")
    period = _period(period)
    now = datetime.now(UTC)
    outcomes = await w.biller.run(max(now, period_start(period)), period, wait=True)
    return RunOut(period=period, outcomes=outcomes)


@router.get("/companies/{cid}/reselling/report", response_model=ReportOut)
async def report(
    cid: PathId,
    principal: CurrentPrincipal,
    w: Wired,
    period: Annotated[str, Query(pattern=PERIOD_PATTERN, description="YYYY-MM")],
) -> ReportOut:
    require_role(principal, "company_admin", "platform_admin")
    return await reselling.report(w.db, principal, cid, _period(period))

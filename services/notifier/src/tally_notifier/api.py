"""notifier HTTP API: usage alert rules, usage per period, in-app notifications."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, EmailStr, Field

from tally import pagination
from tally.auth import CurrentPrincipal, Principal, require_company, require_role
from tally.db import Conn
from tally.errors import money_field, not_found
from tally.ids import PathId, PathKey
from tally.money import format_micros
from tally.service import runtime
from tally_notifier import storage
from tally_notifier.alerts import period_usage
from tally_notifier.domain import MAX_RECIPIENTS

router = APIRouter(prefix="/v1", tags=["notifications"])
PeriodName = Literal["daily", "weekly", "biweekly", "monthly"]


class ConditionIn(BaseModel):
    threshold: str = Field(description="decimal string > 0")
    period: PeriodName


class AlertsIn(BaseModel):
    enabled: bool = True
    conditions: list[ConditionIn] = Field(default_factory=list, max_length=20)
    recipients: list[EmailStr] = Field(default_factory=list, max_length=MAX_RECIPIENTS)


class AlertsOut(BaseModel):
    account_id: str
    enabled: bool
    conditions: list[ConditionIn]
    recipients: list[str]


class UsageOut(BaseModel):
    account_id: str
    period: PeriodName
    start: str
    currency: str
    services: dict[str, str]
    total: str


class NotificationOut(BaseModel):
    id: str
    kind: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: str
    read: bool


class NotificationPage(BaseModel):
    items: list[NotificationOut]
    next_cursor: str | None


async def _account(conn: Conn, principal: Principal, aid: PathId) -> Any:
    a = await storage.account(conn, aid)
    if a is None or not principal.can_see_account(a["company_id"], aid):
        raise not_found("account")
    return a


@router.put("/accounts/{aid}/usage-alerts", response_model=AlertsOut)
async def put_alerts(aid: PathId, body: AlertsIn, request: Request, principal: CurrentPrincipal) -> AlertsOut:
    require_role(principal, "company_admin", "platform_admin")
    stored: list[dict[str, Any]] = [
        {"threshold_micros": money_field(c.threshold, f"conditions[{i}].threshold"), "period": c.period}
        for i, c in enumerate(body.conditions)
    ]
    recipients = sorted({str(r).lower() for r in body.recipients})
    async with runtime(request).pool.acquire() as conn:
        a = await _account(conn, principal, aid)
        await storage.save_rules(conn, aid, a["company_id"], body.enabled, stored, recipients)
    return AlertsOut(
        account_id=aid,
        enabled=body.enabled,
        recipients=recipients,
        conditions=[
            ConditionIn(threshold=format_micros(c["threshold_micros"]), period=c["period"]) for c in stored
        ],
    )


@router.get("/accounts/{aid}/usage-alerts", response_model=AlertsOut)
async def get_alerts(aid: PathId, request: Request, principal: CurrentPrincipal) -> AlertsOut:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        await _account(conn, principal, aid)
        r = await storage.rules(conn, aid)
    if r is None:
        return AlertsOut(account_id=aid, enabled=False, conditions=[], recipients=[])
    return AlertsOut(
        account_id=aid,
        enabled=r["enabled"],
        recipients=orjson.loads(r["recipients"]),
        conditions=[
            ConditionIn(threshold=format_micros(c["threshold_micros"]), period=c["period"])
            for c in orjson.loads(r["conditions"])
        ],
    )


@router.get("/accounts/{aid}/usage", response_model=UsageOut)
async def usage(
    aid: PathId, request: Request, principal: CurrentPrincipal, period: PeriodName = "monthly"
) -> UsageOut:
    async with runtime(request).pool.acquire() as conn:
        a = await _account(conn, principal, aid)
        start, by_service, currency = await period_usage(conn, aid, period, a["timezone"])
    return UsageOut(
        account_id=aid,
        period=period,
        start=start.isoformat(),
        currency=currency,
        services={k: format_micros(v) for k, v in sorted(by_service.items())},
        total=format_micros(sum(by_service.values())),
    )


def _note(r: Any) -> NotificationOut:
    return NotificationOut(
        id=r["id"],
        kind=r["kind"],
        title=r["title"],
        body=r["body"],
        data=orjson.loads(r["data"]),
        created_at=r["created_at"].isoformat(),
        read=r["read_at"] is not None,
    )


@router.get("/companies/{cid}/notifications", response_model=NotificationPage)
async def list_notifications(
    cid: PathId,
    request: Request,
    principal: CurrentPrincipal,
    unread: bool = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> NotificationPage:
    require_role(principal, "company_admin", "platform_admin")
    require_company(principal, cid)
    async with runtime(request).pool.acquire() as conn:
        rows = await storage.notifications(
            conn, cid, unread=unread, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["seq"] if len(rows) > limit else None)
    return NotificationPage(items=[_note(r) for r in items], next_cursor=nxt)


@router.post("/notifications/{nid}/read", response_model=NotificationOut)
async def read(nid: PathKey, request: Request, principal: CurrentPrincipal) -> NotificationOut:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        cid = await storage.notification_company(conn, nid)
        if cid is None or not principal.can_see_company(cid):
            raise not_found("notification")
        r = await storage.mark_read(conn, nid)
    return _note(r)

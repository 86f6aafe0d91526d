"""notifier HTTP API: usage alert rules, usage per period, in-app notifications.
Routes parse, authorise, call one use case and render (``schemas``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tally.auth import CurrentPrincipal, require_company, require_role
from tally.ids import PathId, PathKey
from tally_notifier import account_usage, alert_settings, notifications
from tally_notifier.schemas import (
    AlertsIn,
    AlertsOut,
    NotificationOut,
    NotificationPage,
    PeriodName,
    UsageOut,
    alerts_out,
    notification_out,
    usage_out,
)
from tally_notifier.wiring import Wired

router = APIRouter(prefix="/v1", tags=["notifications"])


@router.put("/accounts/{aid}/usage-alerts", response_model=AlertsOut)
async def put_alerts(aid: PathId, body: AlertsIn, principal: CurrentPrincipal, w: Wired) -> AlertsOut:
    require_role(principal, "company_admin", "platform_admin")
    return alerts_out(aid, await alert_settings.replace(w.uow(), principal, aid, body.rules))


@router.get("/accounts/{aid}/usage-alerts", response_model=AlertsOut)
async def get_alerts(aid: PathId, principal: CurrentPrincipal, w: Wired) -> AlertsOut:
    require_role(principal, "company_admin", "platform_admin")
    return alerts_out(aid, await alert_settings.show(w.db, principal, aid))


@router.get("/accounts/{aid}/usage", response_model=UsageOut)
async def usage(
    aid: PathId, principal: CurrentPrincipal, w: Wired, period: PeriodName = "monthly"
) -> UsageOut:
    return usage_out(await account_usage.in_period(w.db, principal, aid, period))


@router.get("/companies/{cid}/notifications", response_model=NotificationPage)
async def list_notifications(
    cid: PathId,
    principal: CurrentPrincipal,
    w: Wired,
    unread: bool = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> NotificationPage:
    require_role(principal, "company_admin", "platform_admin")
    require_company(principal, cid)
    page = await notifications.list_notifications(w.db, cid, unread=unread, limit=limit, cursor=cursor)
    return NotificationPage(items=[notification_out(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/notifications/{nid}/read", response_model=NotificationOut)
async def read(nid: PathKey, principal: CurrentPrincipal, w: Wired) -> NotificationOut:
    require_role(principal, "company_admin", "platform_admin")
    return notification_out(await notifications.mark_read(w.uow(), principal, nid))

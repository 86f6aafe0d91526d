"""notifier HTTP API: usage alert rules, usage per period, in-app notifications.
Routes parse, authorise, call one use case and render (``schemas``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from tally import idempotency
from tally.auth import CurrentPrincipal, require_company, require_role
from tally.errors import JsonResponse
from tally.idempotency import IdempotencyKey, Stored
from tally.ids import PathId, PathKey
from tally.openapi import answers
from tally.pagination import Cursor
from tally_notifier import account_usage, alert_settings, notifications, webhook_endpoints
from tally_notifier.schemas import (
    AlertsIn,
    AlertsOut,
    DeliveryDetail,
    DeliveryOut,
    DeliveryPage,
    EndpointCreated,
    EndpointIn,
    EndpointOut,
    EndpointPage,
    EndpointPatch,
    NotificationOut,
    NotificationPage,
    PeriodName,
    UsageOut,
    alerts_out,
    delivery_detail,
    delivery_out,
    endpoint_created,
    endpoint_out,
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
    cursor: Cursor = None,
) -> NotificationPage:
    require_role(principal, "company_admin", "platform_admin")
    require_company(principal, cid)
    page = await notifications.list_notifications(w.db, cid, unread=unread, limit=limit, cursor=cursor)
    return NotificationPage(items=[notification_out(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/notifications/{nid}/read", response_model=NotificationOut)
async def read(nid: PathKey, principal: CurrentPrincipal, w: Wired) -> NotificationOut:
    require_role(principal, "company_admin", "platform_admin")
    return notification_out(await notifications.mark_read(w.uow(), principal, nid))


# --- outbound webhooks ---------------------------------------------------------------------

hooks = APIRouter(prefix="/v1", tags=["webhooks"])
DeliveryStatus = Literal["pending", "succeeded", "failed", "dropped"]


@hooks.post(
    "/companies/{cid}/webhook-endpoints",
    status_code=201,
    response_model=EndpointCreated,
    summary="Register a webhook endpoint (the secret is shown only in this answer)",
    responses=answers(409),
)
async def create_endpoint(
    cid: PathId,
    body: EndpointIn,
    request: Request,
    principal: CurrentPrincipal,
    w: Wired,
    idempotency_key: IdempotencyKey = None,
) -> EndpointCreated | JsonResponse:
    require_role(principal, "company_admin", "platform_admin")
    out = await webhook_endpoints.register(
        w.uow(),
        principal,
        cid,
        url=body.url,
        event_types=body.event_types,
        allow_private=w.settings.webhook_allow_private,
        idempotency_key=idempotency_key,
        fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
    )
    return out.replay() if isinstance(out, Stored) else endpoint_created(out.endpoint, out.secret)


@hooks.get("/companies/{cid}/webhook-endpoints", response_model=EndpointPage)
async def list_endpoints(
    cid: PathId,
    principal: CurrentPrincipal,
    w: Wired,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> EndpointPage:
    require_role(principal, "company_admin", "platform_admin")
    page = await webhook_endpoints.list_endpoints(w.db, principal, cid, limit=limit, cursor=cursor)
    return EndpointPage(items=[endpoint_out(r) for r in page.items], next_cursor=page.next_cursor)


@hooks.get("/webhook-endpoints/{eid}", response_model=EndpointOut)
async def get_endpoint(eid: PathKey, principal: CurrentPrincipal, w: Wired) -> EndpointOut:
    require_role(principal, "company_admin", "platform_admin")
    return endpoint_out(await webhook_endpoints.show(w.db, principal, eid))


@hooks.patch("/webhook-endpoints/{eid}", response_model=EndpointOut)
async def patch_endpoint(
    eid: PathKey, body: EndpointPatch, principal: CurrentPrincipal, w: Wired
) -> EndpointOut:
    require_role(principal, "company_admin", "platform_admin")
    row = await webhook_endpoints.change(
        w.db,
        principal,
        eid,
        url=body.url,
        event_types=body.event_types,
        enabled=body.enabled,
        allow_private=w.settings.webhook_allow_private,
    )
    return endpoint_out(row)


@hooks.delete("/webhook-endpoints/{eid}", status_code=204)
async def delete_endpoint(eid: PathKey, principal: CurrentPrincipal, w: Wired) -> Response:
    require_role(principal, "company_admin", "platform_admin")
    await webhook_endpoints.delete(w.uow(), principal, eid)
    return Response(status_code=204)


@hooks.post(
    "/webhook-endpoints/{eid}/test",
    status_code=202,
    response_model=DeliveryOut,
    summary="Send a webhook.test event to this endpoint",
    responses=answers(409),
)
async def test_endpoint(eid: PathKey, principal: CurrentPrincipal, w: Wired) -> DeliveryOut:
    require_role(principal, "company_admin", "platform_admin")
    row = await webhook_endpoints.send_test(w.uow(), principal, eid, wake=w.webhooks.wake)
    return delivery_out(row)


@hooks.get("/webhook-endpoints/{eid}/deliveries", response_model=DeliveryPage)
async def list_deliveries(
    eid: PathKey,
    principal: CurrentPrincipal,
    w: Wired,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> DeliveryPage:
    require_role(principal, "company_admin", "platform_admin")
    page = await webhook_endpoints.list_deliveries(
        w.db, principal, eid, status=status, limit=limit, cursor=cursor
    )
    return DeliveryPage(items=[delivery_out(r) for r in page.items], next_cursor=page.next_cursor)


@hooks.get("/webhook-deliveries/{did}", response_model=DeliveryDetail)
async def get_delivery(did: PathKey, principal: CurrentPrincipal, w: Wired) -> DeliveryDetail:
    require_role(principal, "company_admin", "platform_admin")
    row, attempts = await webhook_endpoints.show_delivery(w.db, principal, did)
    return delivery_detail(row, attempts)


@hooks.post(
    "/webhook-deliveries/{did}/retry",
    status_code=202,
    response_model=DeliveryOut,
    summary="Attempt a delivery once more, now",
    responses=answers(409),
)
async def retry_delivery(did: PathKey, principal: CurrentPrincipal, w: Wired) -> DeliveryOut:
    require_role(principal, "company_admin", "platform_admin")
    return delivery_out(await webhook_endpoints.retry(w.uow(), principal, did, wake=w.webhooks.wake))

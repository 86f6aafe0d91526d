"""License pools and seats: buy into the pool, assign to workspaces, invitations with the
provisional handoff, members. Routes parse, authorise, call one use case (``licenses``,
``accounts``, ``seats``) and render (``schemas``)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from tally import idempotency
from tally.auth import CurrentPrincipal, require_role
from tally.errors import JsonResponse
from tally.idempotency import IdempotencyKey
from tally.ids import PathId, PathKey
from tally.openapi import answers
from tally_rebilling import accounts, licenses, seats
from tally_rebilling.schemas import (
    AccountLicensesOut,
    BoughtOut,
    InvitationIn,
    InvitationOut,
    MemberList,
    MemberOut,
    PoolOut,
    QuantityIn,
    SeatPriceIn,
    SeatPriceOut,
    pool_out,
)
from tally_rebilling.wiring import RebillingWiring, Wired

router = APIRouter(prefix="/v1", tags=["licenses and seats"])


def _held(w: RebillingWiring, aid: str, held: licenses.Held) -> AccountLicensesOut:
    pool = pool_out(held.total, held.pool_assigned, w.license_price)
    return AccountLicensesOut(account_id=aid, assigned=held.assigned, pool=pool)


@router.post(
    "/companies/{cid}/licenses",
    status_code=201,
    response_model=BoughtOut,
    responses={
        202: {
            "model": BoughtOut,
            "description": "the payment is processing: the pool grows once it succeeds",
        },
        402: {"description": "payment_failed: the pool is unchanged"},
        **answers(409),
    },
)
async def buy(
    cid: PathId,
    body: QuantityIn,
    request: Request,
    principal: CurrentPrincipal,
    w: Wired,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    require_role(principal, "company_admin", "platform_admin")
    bought = await licenses.buy(
        w.db,
        w.biller,
        principal,
        cid,
        body.quantity,
        idempotency_key=idempotency_key,
        fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
    )
    return JsonResponse(bought.body, status_code=bought.status_code)


@router.get("/companies/{cid}/licenses", response_model=PoolOut)
async def get_pool(cid: PathId, principal: CurrentPrincipal, w: Wired) -> PoolOut:
    total, assigned = await licenses.show_pool(w.db, principal, cid)
    return pool_out(total, assigned, w.license_price)


@router.post(
    "/accounts/{aid}/licenses", status_code=201, response_model=AccountLicensesOut, responses=answers(409)
)
async def assign(aid: PathId, body: QuantityIn, principal: CurrentPrincipal, w: Wired) -> AccountLicensesOut:
    require_role(principal, "company_admin", "platform_admin")
    return _held(w, aid, await licenses.assign(w.uow(), principal, aid, body.quantity))


@router.delete("/accounts/{aid}/licenses", response_model=AccountLicensesOut, responses=answers(409))
async def free(
    aid: PathId, principal: CurrentPrincipal, w: Wired, quantity: int = Query(1, ge=1, le=100_000)
) -> AccountLicensesOut:
    """Give licenses back to the pool (never below the workspace's billable members)."""
    require_role(principal, "company_admin", "platform_admin")
    return _held(w, aid, await licenses.free(w.uow(), principal, aid, quantity))


@router.post(
    "/accounts/{aid}/invitations", status_code=201, response_model=InvitationOut, responses=answers(409)
)
async def invite(aid: PathId, body: InvitationIn, principal: CurrentPrincipal, w: Wired) -> InvitationOut:
    require_role(principal, "company_admin", "platform_admin")
    return await accounts.invite(w.uow(), principal, aid, str(body.email), body.role)


@router.post("/invitations/{iid}/accept", response_model=InvitationOut, responses=answers(409))
async def accept(iid: PathKey, principal: CurrentPrincipal, w: Wired) -> InvitationOut:
    return await accounts.accept(w.uow(), w.biller, principal, iid)


@router.put("/companies/{cid}/seat-price", response_model=SeatPriceOut)
async def put_seat_price(
    cid: PathId, body: SeatPriceIn, principal: CurrentPrincipal, w: Wired
) -> SeatPriceOut:
    """What the company charges its stripe_connect_automated workspaces per seat and month:
    from the next period for seats held, at once for seats added."""
    require_role(principal, "company_admin", "platform_admin")
    return await seats.set_price(w.uow(), principal, cid, body.amount)


@router.get("/companies/{cid}/seat-price", response_model=SeatPriceOut)
async def get_seat_price(cid: PathId, principal: CurrentPrincipal, w: Wired) -> SeatPriceOut:
    return await seats.price(w.db, principal, cid)


@router.get("/accounts/{aid}/members", response_model=MemberList)
async def list_members(aid: PathId, principal: CurrentPrincipal, w: Wired) -> MemberList:
    rows = await accounts.members(w.db, principal, aid)
    return MemberList(items=[MemberOut(email=m["email"], role=m["role"]) for m in rows])

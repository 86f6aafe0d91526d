"""License pools and seats: buy into the pool, assign to workspaces, invitations with the
provisional handoff, members."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, EmailStr, Field

from tally import idempotency
from tally.auth import CurrentPrincipal, require_role
from tally.errors import ApiError, JsonResponse, money_field, not_found
from tally.idempotency import IdempotencyKey
from tally.ids import PathId, PathKey
from tally.money import format_micros
from tally.service import runtime
from tally_rebilling import licenses, publish, seats, storage
from tally_rebilling.api_companies import account_for, company_for
from tally_rebilling.billing import Biller
from tally_rebilling.domain import Seats, invite_needs_license
from tally_rebilling.licenses import pool_view

router = APIRouter(prefix="/v1", tags=["licenses and seats"])


class QuantityIn(BaseModel):
    quantity: int = Field(ge=1, le=100_000)


class PoolOut(BaseModel):
    total: int
    assigned: int
    available: int
    unit_price: str = Field(description="the platform's monthly price per license")


class PurchaseOut(BaseModel):
    id: str
    quantity: int
    amount: str
    status: Literal["pending", "charged", "failed"]


class BoughtOut(PoolOut):
    purchase: PurchaseOut


class AccountLicensesOut(BaseModel):
    account_id: str
    assigned: int
    pool: PoolOut


class InvitationIn(BaseModel):
    email: EmailStr
    role: Literal["user"] = "user"


class InvitationOut(BaseModel):
    id: str
    account_id: str
    email: str
    role: str
    status: Literal["pending", "accepted"]
    handoff: bool = Field(
        description="the provisional handoff: on acceptance the invitee "
        "becomes the owner and the agency admin's seat goes away"
    )


class MemberOut(BaseModel):
    email: str
    role: Literal["owner", "user", "agency_admin"]


class MemberList(BaseModel):
    items: list[MemberOut]
    next_cursor: str | None = None


def _pool(total: int, assigned: int) -> PoolOut:
    return PoolOut(**pool_view(total, assigned))


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
    },
)
async def buy(
    cid: PathId,
    body: QuantityIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    biller: Biller = rt.state["biller"]
    bought = await licenses.buy(
        rt.pool,
        biller,
        principal,
        cid,
        body.quantity,
        idempotency_key=idempotency_key,
        fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
    )
    rt.relay.wake()
    return JsonResponse(bought.body, status_code=bought.status_code)


@router.get("/companies/{cid}/licenses", response_model=PoolOut)
async def get_pool(cid: PathId, request: Request, principal: CurrentPrincipal) -> PoolOut:
    async with runtime(request).pool.acquire() as conn:
        await company_for(conn, principal, cid)
        return PoolOut(**pool_view(*await storage.pool(conn, cid)))


@router.post("/accounts/{aid}/licenses", status_code=201, response_model=AccountLicensesOut)
async def assign(
    aid: PathId, body: QuantityIn, request: Request, principal: CurrentPrincipal
) -> AccountLicensesOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        a = await account_for(conn, principal, aid, lock=True)
        cid = a["company_id"]
        total, assigned = await storage.pool(conn, cid, lock=True)
        if total - assigned < body.quantity:
            raise ApiError(
                409,
                "no_license_available",
                f"the pool has {total - assigned} available, {body.quantity} asked",
            )
        held = await storage.change_assigned(conn, aid, cid, body.quantity)
        await publish.license_changed(conn, cid, aid)
        pool = _pool(*await storage.pool(conn, cid))
    rt.relay.wake()
    return AccountLicensesOut(account_id=aid, assigned=held, pool=pool)


@router.delete("/accounts/{aid}/licenses", response_model=AccountLicensesOut)
async def free(
    aid: PathId, request: Request, principal: CurrentPrincipal, quantity: int = Query(1, ge=1, le=100_000)
) -> AccountLicensesOut:
    """Give licenses back to the pool (never below the workspace's billable members)."""
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        a = await account_for(conn, principal, aid, lock=True)
        held = await storage.account_assigned(conn, aid)
        seated = len(await storage.members(conn, aid)) if a["billing_model"] == "self_billing" else 0
        if held - quantity < max(seated, 0):
            raise ApiError(409, "licenses_in_use", f"the workspace holds {held} and {seated} seats are taken")
        held = await storage.change_assigned(conn, aid, a["company_id"], -quantity)
        await publish.license_changed(conn, a["company_id"], aid)
        pool = _pool(*await storage.pool(conn, a["company_id"]))
    rt.relay.wake()
    return AccountLicensesOut(account_id=aid, assigned=held, pool=pool)


@router.post("/accounts/{aid}/invitations", status_code=201, response_model=InvitationOut)
async def invite(
    aid: PathId, body: InvitationIn, request: Request, principal: CurrentPrincipal
) -> InvitationOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    email = str(body.email).lower()
    async with rt.pool.acquire() as conn, conn.transaction():
        a = await account_for(conn, principal, aid, lock=True)
        current = await storage.members(conn, aid)
        if any(m["email"] == email for m in current):
            raise ApiError(409, "already_member", f"{email} is already a member")
        seats = Seats(
            assigned=await storage.account_assigned(conn, aid),
            members=len(current),
            pending_invites=await storage.pending_invitations(conn, aid),
            agency_admin_only=len(current) == 1 and current[0]["is_agency"],
        )
        handoff = seats.agency_admin_only and seats.pending_invites == 0
        if a["billing_model"] == "self_billing" and invite_needs_license(seats):
            total, assigned = await storage.pool(conn, a["company_id"], lock=True)
            if total - assigned < 1:
                raise ApiError(
                    409,
                    "license_required",
                    "another user needs another license; buy or free one in the pool first",
                )
            await storage.change_assigned(conn, aid, a["company_id"], 1)  # the new seat
            await publish.license_changed(conn, a["company_id"], aid)
        inv = await storage.insert_invitation(
            conn, f"inv_{uuid.uuid4().hex[:20]}", aid, email, body.role, handoff
        )
        if inv is None:
            raise ApiError(409, "invitation_pending", f"{email} is already invited")
    rt.relay.wake()
    return InvitationOut(
        id=inv["id"], account_id=aid, email=email, role=body.role, status="pending", handoff=handoff
    )


@router.post("/invitations/{iid}/accept", response_model=InvitationOut)
async def accept(iid: PathKey, request: Request, principal: CurrentPrincipal) -> InvitationOut:
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        inv = await storage.invitation(conn, iid, lock=True)
        if inv is None:
            raise not_found("invitation")
        a = await storage.account(conn, inv["account_id"], lock=True)
        assert a is not None
        invitee = (
            principal.role == "account_user"
            and principal.account_id == a["id"]
            and (principal.email or "").lower() == inv["email"]
        )
        if not (invitee or principal.can_see_company(a["company_id"])):
            raise not_found("invitation")
        if inv["status"] != "pending":
            raise ApiError(409, "invitation_not_pending", "this invitation was already accepted")
        await storage.accept_invitation(conn, iid)
        charge = None
        if a["billing_model"] == "stripe_connect_automated":
            charge = await seats.add_seat(conn, a, iid)
        if inv["handoff"]:
            # Ownership moves to the client; the agency admin's seat is removed.
            await storage.remove_agency_members(conn, a["id"])
            await storage.add_member(conn, a["id"], inv["email"], "owner", is_agency=False)
        else:
            await storage.add_member(conn, a["id"], inv["email"], inv["role"], is_agency=False)
    if charge is not None:  # the new seat, for the current period, now (dunned if it fails)
        biller: Biller = rt.state["biller"]
        await biller.charge_due(datetime.now(UTC), subscription_id=charge, wait=True)
    rt.relay.wake()
    return InvitationOut(
        id=iid,
        account_id=inv["account_id"],
        email=inv["email"],
        role="owner" if inv["handoff"] else inv["role"],
        status="accepted",
        handoff=inv["handoff"],
    )


class SeatPriceIn(BaseModel):
    amount: str = Field(description="decimal string >= 0: the monthly price per seat")


class SeatPriceOut(BaseModel):
    amount: str
    currency: str


@router.put("/companies/{cid}/seat-price", response_model=SeatPriceOut)
async def put_seat_price(
    cid: PathId, body: SeatPriceIn, request: Request, principal: CurrentPrincipal
) -> SeatPriceOut:
    """What the company charges its stripe_connect_automated workspaces per seat and month:
    from the next period for seats held, at once for seats added."""
    require_role(principal, "company_admin", "platform_admin")
    amount = money_field(body.amount, "amount", allow_zero=True)
    async with runtime(request).pool.acquire() as conn, conn.transaction():
        c = await company_for(conn, principal, cid, lock=True)
        await storage.set_seat_price(conn, cid, amount)
    return SeatPriceOut(amount=format_micros(amount), currency=c["currency"])


@router.get("/companies/{cid}/seat-price", response_model=SeatPriceOut)
async def get_seat_price(cid: PathId, request: Request, principal: CurrentPrincipal) -> SeatPriceOut:
    async with runtime(request).pool.acquire() as conn:
        c = await company_for(conn, principal, cid)
        return SeatPriceOut(amount=format_micros(await storage.seat_price(conn, cid)), currency=c["currency"])


@router.get("/accounts/{aid}/members", response_model=MemberList)
async def list_members(aid: PathId, request: Request, principal: CurrentPrincipal) -> MemberList:
    async with runtime(request).pool.acquire() as conn:
        await account_for(conn, principal, aid)
        rows = await storage.members(conn, aid)
    return MemberList(items=[MemberOut(email=m["email"], role=m["role"]) for m in rows])

"""Companies, accounts, Stripe Connect, plans, rebilling settings and SaaS plans."""

from __future__ import annotations

from typing import Annotated, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, EmailStr, Field

from tally.auth import CurrentPrincipal, Principal, require_company, require_role
from tally.db import Conn
from tally.errors import ApiError, not_found
from tally.ids import Id, PathId
from tally.service import runtime
from tally.settings import get_settings
from tally_rebilling import publish, storage
from tally_rebilling.domain import (
    InvalidMarkup,
    Mode,
    best_allowed,
    known_services,
    plan_allows,
    validate_markups,
)

router = APIRouter(prefix="/v1", tags=["companies and accounts"])

PlanName = Literal["starter", "unlimited", "saas_pro"]


class CompanyIn(BaseModel):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    plan: PlanName
    owner_email: EmailStr
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")


class CompanyOut(BaseModel):
    id: str
    name: str
    plan: PlanName
    owner_email: str
    currency: str
    stripe_connected: bool
    stripe_account_id: str | None
    created_at: str


class PlanIn(BaseModel):
    plan: PlanName


class PlanChangeOut(BaseModel):
    company: CompanyOut
    changed_accounts: list[dict[str, str]] = Field(
        description="accounts whose rebilling the new plan no longer allows: {account_id, from, to}"
    )


class ConnectIn(BaseModel):
    stripe_account_id: str = Field(pattern=r"^acct_[A-Za-z0-9_]{1,100}$")


class AccountIn(BaseModel):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    owner_email: EmailStr
    billing_model: Literal["self_billing", "stripe_connect_automated"] = "self_billing"
    saas_plan_id: Id | None = None


class AccountOut(BaseModel):
    id: str
    company_id: str
    name: str
    owner_email: str
    billing_model: str
    saas_plan_id: str | None
    has_valid_card: bool
    created_at: str


class RebillingIn(BaseModel):
    mode: Literal["off", "rebill", "rebill_markup"]
    markups: dict[str, str] = {}


class RebillingOut(BaseModel):
    account_id: str
    mode: Literal["off", "rebill", "rebill_markup"]
    markups: dict[str, str]
    active: bool = Field(description="false while the account has no valid card (pending)")
    version: int


class SaasPlanIn(BaseModel):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    rebilling: RebillingIn


class SaasPlanOut(BaseModel):
    id: str
    name: str
    rebilling: RebillingIn


def company_out(c: asyncpg.Record) -> CompanyOut:
    return CompanyOut(
        id=c["id"],
        name=c["name"],
        plan=c["plan"],
        owner_email=c["owner_email"],
        currency=c["currency"],
        stripe_connected=c["stripe_account_id"] is not None,
        stripe_account_id=c["stripe_account_id"],
        created_at=c["created_at"].isoformat(),
    )


def account_out(a: asyncpg.Record) -> AccountOut:
    return AccountOut(
        id=a["id"],
        company_id=a["company_id"],
        name=a["name"],
        owner_email=a["owner_email"],
        billing_model=a["billing_model"],
        saas_plan_id=a["saas_plan_id"],
        has_valid_card=a["has_valid_card"],
        created_at=a["created_at"].isoformat(),
    )


async def company_for(conn: Conn, principal: Principal, cid: PathId, *, lock: bool = False) -> asyncpg.Record:
    require_company(principal, cid, "company")
    c = await storage.company(conn, cid, lock=lock)
    if c is None:
        raise not_found("company")
    return c


async def account_for(conn: Conn, principal: Principal, aid: PathId, *, lock: bool = False) -> asyncpg.Record:
    a = await storage.account(conn, aid, lock=lock)
    if a is None or not principal.can_see_account(a["company_id"], aid):
        raise not_found("account")
    return a


def _markups(markups: dict[str, str]) -> dict[str, str]:
    try:
        return validate_markups(markups, known_services(get_settings().services))
    except InvalidMarkup as exc:
        raise ApiError(
            422,
            "invalid_markup",
            f"{exc.field}: {exc.message}",
            [{"field": exc.field, "message": exc.message}],
        ) from exc


def check_mode(plan: str, mode: Mode) -> None:
    if not plan_allows(plan, mode):
        need = (
            "the $497 (saas_pro) plan"
            if mode == "rebill_markup"
            else "the $297 (unlimited) or $497 (saas_pro) plan"
        )
        raise ApiError(403, "plan_upgrade_required", f"{mode} needs {need}")


# --- companies -----------------------------------------------------------------------------


@router.post("/companies", status_code=201, response_model=CompanyOut)
async def create_company(body: CompanyIn, request: Request, principal: CurrentPrincipal) -> CompanyOut:
    require_role(principal, "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        c = await storage.insert_company(conn, body.model_dump())
        if c is None:
            raise ApiError(409, "already_exists", f"company {body.id} already exists")
        await publish.company_updated(conn, c)
    rt.relay.wake()
    return company_out(c)


class CompanyPage(BaseModel):
    items: list[CompanyOut]
    next_cursor: str | None


class AccountPage(BaseModel):
    items: list[AccountOut]
    next_cursor: str | None


Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("/companies", response_model=CompanyPage)
async def list_companies(
    request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> CompanyPage:
    require_role(principal, "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        rows = await storage.companies(conn, after=cursor, limit=limit + 1)
    return CompanyPage(
        items=[company_out(c) for c in rows[:limit]],
        next_cursor=rows[limit - 1]["id"] if len(rows) > limit else None,
    )


@router.get("/companies/{cid}/accounts", response_model=AccountPage)
async def list_accounts(
    cid: PathId, request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> AccountPage:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        await company_for(conn, principal, cid)
        rows = await storage.company_accounts(conn, cid, after=cursor, limit=limit + 1)
    return AccountPage(
        items=[account_out(a) for a in rows[:limit]],
        next_cursor=rows[limit - 1]["id"] if len(rows) > limit else None,
    )


@router.get("/companies/{cid}", response_model=CompanyOut)
async def get_company(cid: PathId, request: Request, principal: CurrentPrincipal) -> CompanyOut:
    async with runtime(request).pool.acquire() as conn:
        return company_out(await company_for(conn, principal, cid))


async def _apply_allowed(conn: Conn, cid: PathId, plan: str, connected: bool) -> list[dict[str, str]]:
    """Turn off (or down) what the company's plan or Stripe connection no longer allows."""
    changed = []
    for a in await storage.company_accounts(conn, cid):
        mode, markups, _ = await storage.rebilling(conn, a["id"])
        new: Mode = best_allowed(plan, mode) if connected else "off"  # type: ignore[arg-type]
        if new != mode:
            await storage.save_rebilling(conn, a["id"], new, markups if new == "rebill_markup" else {})
            await publish.settings(conn, a["id"])
            changed.append({"account_id": a["id"], "from": mode, "to": new})
    return changed


@router.put("/companies/{cid}/plan", response_model=PlanChangeOut)
async def change_plan(
    cid: PathId, body: PlanIn, request: Request, principal: CurrentPrincipal
) -> PlanChangeOut:
    require_role(principal, "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        c = await company_for(conn, principal, cid, lock=True)
        c = await storage.update_company(conn, cid, plan=body.plan)
        changed = await _apply_allowed(conn, cid, body.plan, c["stripe_account_id"] is not None)
        await publish.company_updated(conn, c)
    rt.relay.wake()
    return PlanChangeOut(company=company_out(c), changed_accounts=changed)


@router.put("/companies/{cid}/stripe-connect", response_model=CompanyOut)
async def connect_stripe(
    cid: PathId, body: ConnectIn, request: Request, principal: CurrentPrincipal
) -> CompanyOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        await company_for(conn, principal, cid, lock=True)
        c = await storage.update_company(conn, cid, stripe_account_id=body.stripe_account_id)
        await publish.company_updated(conn, c)
        for a in await storage.company_accounts(conn, cid):
            if (await storage.rebilling(conn, a["id"]))[2]:
                await storage.bump_rebilling(conn, a["id"])
                await publish.settings(conn, a["id"])
    rt.relay.wake()
    return company_out(c)


@router.delete("/companies/{cid}/stripe-connect", response_model=PlanChangeOut)
async def disconnect_stripe(cid: PathId, request: Request, principal: CurrentPrincipal) -> PlanChangeOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        await company_for(conn, principal, cid, lock=True)
        c = await storage.update_company(conn, cid, stripe_account_id=None)
        changed = await _apply_allowed(conn, cid, c["plan"], connected=False)
        await publish.company_updated(conn, c)
    rt.relay.wake()
    return PlanChangeOut(company=company_out(c), changed_accounts=changed)


# --- accounts ------------------------------------------------------------------------------


@router.post("/companies/{cid}/accounts", status_code=201, response_model=AccountOut)
async def create_account(
    cid: PathId, body: AccountIn, request: Request, principal: CurrentPrincipal
) -> AccountOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        c = await company_for(conn, principal, cid, lock=True)
        plan = None
        if body.saas_plan_id:
            plan = await storage.saas_plan(conn, cid, body.saas_plan_id)
            if plan is None:
                raise ApiError(422, "unknown_saas_plan", f"no SaaS plan {body.saas_plan_id!r}")
        a = await storage.insert_account(
            conn, {**body.model_dump(), "company_id": cid, "owner_email": str(body.owner_email)}
        )
        if a is None:
            raise ApiError(409, "already_exists", f"account {body.id} already exists")
        await publish.account_created(conn, a)
        # The agency admin holds the workspace's seat as its owner until the client accepts.
        admin = principal.email or c["owner_email"]
        await storage.add_member(conn, a["id"], admin, "owner", is_agency=True)
        if body.billing_model == "self_billing":
            total, assigned = await storage.pool(conn, cid, lock=True)
            await storage.change_assigned(conn, a["id"], cid, 1 if total - assigned >= 1 else 0)
            await publish.license_changed(conn, cid, a["id"])
        if plan is not None:
            # what the company's plan and connection allow now (a plan made on saas_pro
            # before a downgrade, or while Stripe is disconnected, does not bypass gating)
            mode = best_allowed(c["plan"], plan["mode"]) if c["stripe_account_id"] else "off"
            markups = orjson.loads(plan["markups"]) if mode == "rebill_markup" else {}
            await storage.save_rebilling(conn, a["id"], mode, markups)
            await publish.settings(conn, a["id"])  # active only once a card is saved
    rt.relay.wake()
    return account_out(a)


@router.get("/accounts/{aid}", response_model=AccountOut)
async def get_account(aid: PathId, request: Request, principal: CurrentPrincipal) -> AccountOut:
    async with runtime(request).pool.acquire() as conn:
        return account_out(await account_for(conn, principal, aid))


# --- rebilling -----------------------------------------------------------------------------


async def _rebilling_out(conn: Conn, a: asyncpg.Record) -> RebillingOut:
    mode, markups, version = await storage.rebilling(conn, a["id"])
    return RebillingOut(
        account_id=a["id"], mode=mode, markups=markups, active=bool(a["has_valid_card"]), version=version
    )


@router.get("/accounts/{aid}/rebilling", response_model=RebillingOut)
async def get_rebilling(aid: PathId, request: Request, principal: CurrentPrincipal) -> RebillingOut:
    async with runtime(request).pool.acquire() as conn:
        return await _rebilling_out(conn, await account_for(conn, principal, aid))


@router.put("/accounts/{aid}/rebilling", response_model=RebillingOut)
async def put_rebilling(
    aid: PathId, body: RebillingIn, request: Request, principal: CurrentPrincipal
) -> RebillingOut:
    require_role(principal, "company_admin", "platform_admin")
    markups = _markups(body.markups) if body.mode == "rebill_markup" else {}
    if body.mode == "rebill_markup" and not markups:
        raise ApiError(
            422, "invalid_markup", 'rebill_markup needs at least one markup (a service or "default")'
        )
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        # The company's lock first, as plan changes and Stripe (dis)connection take it: what
        # is checked below (plan, connection) cannot change until this write commits, so two
        # admins at once never leave markup on a starter plan or rebilling without Stripe.
        owner = await account_for(conn, principal, aid)
        c = await storage.company(conn, owner["company_id"], lock=True)
        assert c is not None
        a = await account_for(conn, principal, aid, lock=True)
        if body.mode != "off":
            check_mode(c["plan"], body.mode)
            if c["stripe_account_id"] is None:
                raise ApiError(
                    409,
                    "company_stripe_not_connected",
                    "connect the company's Stripe before rebilling accounts",
                )
            if not a["has_valid_card"]:
                raise ApiError(
                    409,
                    "account_card_required",
                    "the account needs a valid card before rebilling can be enabled",
                )
        await storage.save_rebilling(conn, aid, body.mode, markups)
        await publish.settings(conn, aid)
        out = await _rebilling_out(conn, a)
    rt.relay.wake()
    return out


@router.post("/companies/{cid}/saas-plans", status_code=201, response_model=SaasPlanOut)
async def create_saas_plan(
    cid: PathId, body: SaasPlanIn, request: Request, principal: CurrentPrincipal
) -> SaasPlanOut:
    require_role(principal, "company_admin", "platform_admin")
    markups = _markups(body.rebilling.markups) if body.rebilling.mode == "rebill_markup" else {}
    async with runtime(request).pool.acquire() as conn, conn.transaction():
        c = await company_for(conn, principal, cid, lock=True)  # as a plan change does
        if c["plan"] != "saas_pro":
            raise ApiError(
                403, "plan_upgrade_required", "the SaaS configurator needs the $497 (saas_pro) plan"
            )
        r = await storage.insert_saas_plan(conn, cid, body.id, body.name, body.rebilling.mode, markups)
        if r is None:
            raise ApiError(409, "already_exists", f"SaaS plan {body.id} already exists")
    return SaasPlanOut(
        id=body.id, name=body.name, rebilling=RebillingIn(mode=body.rebilling.mode, markups=markups)
    )

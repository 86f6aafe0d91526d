"""Companies, accounts, Stripe Connect, plans, rebilling settings and SaaS plans. Routes parse,
authorise, call one use case (``companies``, ``accounts``, ``rebilling_settings``) and render
(``schemas``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tally.auth import CurrentPrincipal, require_role
from tally.ids import PathId
from tally.openapi import answers
from tally.pagination import IdCursor
from tally_rebilling import accounts, companies, rebilling_settings
from tally_rebilling.schemas import (
    AccountIn,
    AccountOut,
    AccountPage,
    CompanyIn,
    CompanyOut,
    CompanyPage,
    ConnectIn,
    CurrencyPinOut,
    PlanChangeOut,
    PlanIn,
    RebillingIn,
    RebillingOut,
    SaasPlanIn,
    SaasPlanOut,
    account_out,
    company_out,
)
from tally_rebilling.wiring import Wired

router = APIRouter(prefix="/v1", tags=["companies and accounts"])

Limit = Annotated[int, Query(ge=1, le=500)]


# --- companies -----------------------------------------------------------------------------


@router.post("/companies", status_code=201, response_model=CompanyOut, responses=answers(409))
async def create_company(body: CompanyIn, principal: CurrentPrincipal, w: Wired) -> CompanyOut:
    require_role(principal, "platform_admin")
    return company_out(await companies.create(w.uow(), body))


@router.get("/companies", response_model=CompanyPage)
async def list_companies(
    principal: CurrentPrincipal, w: Wired, limit: Limit = 50, cursor: IdCursor = None
) -> CompanyPage:
    require_role(principal, "platform_admin")
    page = await companies.list_all(w.db, limit=limit, cursor=cursor)
    return CompanyPage(items=[company_out(c) for c in page.items], next_cursor=page.next_cursor)


@router.get("/companies/{cid}/accounts", response_model=AccountPage)
async def list_accounts(
    cid: PathId, principal: CurrentPrincipal, w: Wired, limit: Limit = 50, cursor: IdCursor = None
) -> AccountPage:
    require_role(principal, "company_admin", "platform_admin")
    page = await companies.list_accounts(w.db, principal, cid, limit=limit, cursor=cursor)
    return AccountPage(items=[account_out(a) for a in page.items], next_cursor=page.next_cursor)


@router.get("/companies/{cid}", response_model=CompanyOut)
async def get_company(cid: PathId, principal: CurrentPrincipal, w: Wired) -> CompanyOut:
    return company_out(await companies.show(w.db, principal, cid))


@router.post("/companies/{cid}/currency-pin", response_model=CurrencyPinOut)
async def pin_currency(cid: PathId, principal: CurrentPrincipal, w: Wired) -> CurrencyPinOut:
    """Asked by a service about to record money for a company it has not heard of."""
    require_role(principal, "platform_admin")
    return CurrencyPinOut(company_id=cid, currency=await companies.pin_currency(w.uow(), cid))


@router.put("/companies/{cid}/plan", response_model=PlanChangeOut)
async def change_plan(cid: PathId, body: PlanIn, principal: CurrentPrincipal, w: Wired) -> PlanChangeOut:
    require_role(principal, "platform_admin")
    change = await companies.change_plan(w.uow(), principal, cid, body.plan)
    return PlanChangeOut(company=company_out(change.company), changed_accounts=change.changed_accounts)


@router.put("/companies/{cid}/stripe-connect", response_model=CompanyOut)
async def connect_stripe(cid: PathId, body: ConnectIn, principal: CurrentPrincipal, w: Wired) -> CompanyOut:
    require_role(principal, "company_admin", "platform_admin")
    return company_out(await companies.connect_stripe(w.uow(), principal, cid, body.stripe_account_id))


@router.delete("/companies/{cid}/stripe-connect", response_model=PlanChangeOut)
async def disconnect_stripe(cid: PathId, principal: CurrentPrincipal, w: Wired) -> PlanChangeOut:
    require_role(principal, "company_admin", "platform_admin")
    change = await companies.disconnect_stripe(w.uow(), principal, cid)
    return PlanChangeOut(company=company_out(change.company), changed_accounts=change.changed_accounts)


# --- accounts ------------------------------------------------------------------------------


@router.post("/companies/{cid}/accounts", status_code=201, response_model=AccountOut, responses=answers(409))
async def create_account(cid: PathId, body: AccountIn, principal: CurrentPrincipal, w: Wired) -> AccountOut:
    require_role(principal, "company_admin", "platform_admin")
    return account_out(await accounts.create(w.uow(), principal, cid, body))


@router.get("/accounts/{aid}", response_model=AccountOut)
async def get_account(aid: PathId, principal: CurrentPrincipal, w: Wired) -> AccountOut:
    return account_out(await accounts.show(w.db, principal, aid))


# --- rebilling -----------------------------------------------------------------------------


@router.get("/accounts/{aid}/rebilling", response_model=RebillingOut)
async def get_rebilling(aid: PathId, principal: CurrentPrincipal, w: Wired) -> RebillingOut:
    # the company's business (API.md): its markups are not its client's to read
    require_role(principal, "company_admin", "platform_admin")
    return await rebilling_settings.show(w.db, principal, aid)


@router.put("/accounts/{aid}/rebilling", response_model=RebillingOut, responses=answers(409))
async def put_rebilling(
    aid: PathId, body: RebillingIn, principal: CurrentPrincipal, w: Wired
) -> RebillingOut:
    require_role(principal, "company_admin", "platform_admin")
    return await rebilling_settings.change(
        w.uow(), principal, aid, body.mode, body.markups, w.markup_services
    )


@router.post(
    "/companies/{cid}/saas-plans", status_code=201, response_model=SaasPlanOut, responses=answers(409)
)
async def create_saas_plan(
    cid: PathId, body: SaasPlanIn, principal: CurrentPrincipal, w: Wired
) -> SaasPlanOut:
    require_role(principal, "company_admin", "platform_admin")
    return await companies.create_saas_plan(
        w.uow(),
        principal,
        cid,
        plan_id=body.id,
        name=body.name,
        mode=body.rebilling.mode,
        markups=body.rebilling.markups,
        known=w.markup_services,
    )

"""Companies (agencies): creating them, their plan, their Stripe Connect account and their SaaS
plans. A plan change or a Stripe disconnection turns off (or down) the rebilling it no longer
allows, in the same transaction (``rebilling_settings.follow_company``); every change of the
company is published (``company.updated``)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from tally.auth import Principal
from tally.errors import ApiError
from tally.uow import Database, UnitOfWork
from tally_rebilling import publish, storage
from tally_rebilling.access import company_for
from tally_rebilling.domain import Mode
from tally_rebilling.rebilling_settings import checked_markups, follow_company, republish_company
from tally_rebilling.schemas import CompanyIn, PlanName, RebillingIn, SaasPlanOut

UNCREATED_CURRENCY = "USD"  # of money recorded for a company before it is created


@dataclass(frozen=True)
class PlanChange:
    company: asyncpg.Record
    changed_accounts: list[dict[str, str]]  # {account_id, from, to}


async def create(uow: UnitOfWork, company: CompanyIn) -> asyncpg.Record:
    async with uow:
        c = await storage.insert_company(uow.conn, company.model_dump())
        if c is None:
            raise ApiError(409, "already_exists", f"company {company.id} already exists")
        pinned = await storage.pin_currency(uow.conn, company.id, company.currency)
        if pinned != company.currency:  # rolled back: the company is not created
            raise ApiError(
                409,
                "currency_conflict",
                f"money in {pinned} was recorded for company {company.id} before it was created; "
                f"create it in {pinned}",
            )
        await publish.company_updated(uow, c)
    return c


async def pin_currency(uow: UnitOfWork, cid: str) -> str:
    """The currency money of company ``cid`` is charged in, fixed for good (docs/0027): a
    service asks before it records money for a company it has not heard of. A company no one
    created yet is charged in USD, and may then only be created in USD."""
    async with uow:
        return await storage.pin_currency(uow.conn, cid, UNCREATED_CURRENCY)


async def list_all(db: Database, *, limit: int, cursor: str | None) -> storage.Page:
    async with db.reading() as conn:
        rows = await storage.companies(conn, after=cursor, limit=limit + 1)
    return storage.page(rows, limit)


async def show(db: Database, principal: Principal, cid: str) -> asyncpg.Record:
    async with db.reading() as conn:
        return await company_for(conn, principal, cid)


async def list_accounts(
    db: Database, principal: Principal, cid: str, *, limit: int, cursor: str | None
) -> storage.Page:
    async with db.reading() as conn:
        await company_for(conn, principal, cid)
        rows = await storage.company_accounts(conn, cid, after=cursor, limit=limit + 1)
    return storage.page(rows, limit)


async def change_plan(uow: UnitOfWork, principal: Principal, cid: str, plan: PlanName) -> PlanChange:
    async with uow:
        await company_for(uow.conn, principal, cid, lock=True)
        c = await storage.update_company(uow.conn, cid, plan=plan)
        changed = await follow_company(uow, cid, plan, c["stripe_account_id"] is not None)
        await publish.company_updated(uow, c)
    return PlanChange(c, changed)


async def connect_stripe(
    uow: UnitOfWork, principal: Principal, cid: str, stripe_account_id: str
) -> asyncpg.Record:
    """The company's Stripe account: every account's settings are published again with it."""
    async with uow:
        await company_for(uow.conn, principal, cid, lock=True)
        c = await storage.update_company(uow.conn, cid, stripe_account_id=stripe_account_id)
        await publish.company_updated(uow, c)
        await republish_company(uow, cid)
    return c


async def disconnect_stripe(uow: UnitOfWork, principal: Principal, cid: str) -> PlanChange:
    """No Stripe, no rebilling: every account's rebilling is turned off."""
    async with uow:
        await company_for(uow.conn, principal, cid, lock=True)
        c = await storage.update_company(uow.conn, cid, stripe_account_id=None)
        changed = await follow_company(uow, cid, c["plan"], connected=False)
        await publish.company_updated(uow, c)
    return PlanChange(c, changed)


async def create_saas_plan(
    uow: UnitOfWork,
    principal: Principal,
    cid: str,
    *,
    plan_id: str,
    name: str,
    mode: Mode,
    markups: dict[str, str],
    known: set[str],
) -> SaasPlanOut:
    """A SaaS plan (the $497 plan's configurator): rebilling settings that accounts created on
    it start with, as far as the company's plan and connection allow then (``accounts.create``)."""
    markups = checked_markups(markups, known) if mode == "rebill_markup" else {}
    async with uow:
        c = await company_for(uow.conn, principal, cid, lock=True)  # as a plan change does
        if c["plan"] != "saas_pro":
            raise ApiError(
                403, "plan_upgrade_required", "the SaaS configurator needs the $497 (saas_pro) plan"
            )
        r = await storage.insert_saas_plan(uow.conn, cid, plan_id, name, mode, markups)
        if r is None:
            raise ApiError(409, "already_exists", f"SaaS plan {plan_id} already exists")
    return SaasPlanOut(id=plan_id, name=name, rebilling=RebillingIn(mode=mode, markups=markups))

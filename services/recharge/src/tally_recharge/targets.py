"""Whose wallet and cards a request names, as recharge knows them: a company's or an account's
(the tenant check included), in the company's currency, and the Stripe account its cards live
on. A company's wallet and an account's wallet are the same use cases on an ``Owner``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import httpx

from tally.auth import Principal, require_company
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.errors import ApiError, not_found, rebilling_unavailable
from tally.uow import Database
from tally_recharge import storage
from tally_recharge.domain import WalletTarget

OwnerKind = Literal["company", "account"]


@dataclass(frozen=True)
class Owner:
    """An owner as a route names it: ``/companies/{cid}/…`` or ``/accounts/{aid}/…``."""

    kind: OwnerKind
    id: str


async def pinned_currency(conn: Conn, directory: CompanyDirectory, company_id: str) -> str:
    """The company's currency, money about to be charged in it: as rebilling.events told us,
    else pinned at rebilling (a company no one created yet is USD, and is never created in
    another: docs/0027). Raises ``httpx.HTTPError`` when rebilling cannot answer."""
    known = await storage.known_currency(conn, company_id)
    return known or await directory.currency_of(company_id, pin=True)


async def pinned(conn: Conn, directory: CompanyDirectory, target: WalletTarget) -> WalletTarget:
    """``target`` about to be charged, in its company's currency pinned (``pinned_currency``): only
    once everything else about the charge is checked, so a refused request pins nothing."""
    try:
        held = await pinned_currency(conn, directory, target.company_id)
    except httpx.HTTPError as exc:
        raise rebilling_unavailable() from exc
    return target if held == target.currency else replace(target, currency=held)


async def find(db: Database, directory: CompanyDirectory, principal: Principal, owner: Owner) -> WalletTarget:
    """The wallet ``principal`` names; 404 for other tenants, and for an account neither this
    service nor rebilling knows (a token does not vouch for an account's company: the account
    may be created later in another one). Rebilling is asked with no database connection held
    (a slow rebilling must not hold the pool); 503 when it cannot answer."""
    try:
        if owner.kind == "company":
            cid = owner.id
            require_company(principal, cid)
            async with db.reading() as conn:
                stored = await storage.known_currency(conn, cid)
            held = stored or await directory.currency_of(cid)
            return WalletTarget(f"company:{cid}", "company", cid, None, held)
        aid = owner.id
        async with db.reading() as conn:
            company = await storage.account_company(conn, aid)
            stored = await storage.known_currency(conn, company) if company else None
        if company is None:
            company = await directory.rebilling_says("account", aid)
        if company is None or not principal.can_see_account(company, aid):
            raise not_found("account")
        held = stored or await directory.currency_of(company)
    except httpx.HTTPError as exc:
        raise rebilling_unavailable() from exc
    return WalletTarget(f"account:{aid}", "account", company, aid, held)


async def stripe_account(conn: Conn, target: WalletTarget) -> str | None:
    """None for company wallets (platform Stripe); the company's connected account for
    account wallets, or 409 when the company has not connected Stripe."""
    if target.owner == "company":
        return None
    _, acct = await storage.company(conn, target.company_id)
    if not acct:
        raise ApiError(
            409,
            "company_stripe_not_connected",
            "the company has not connected Stripe: this account uses credit requests",
        )
    return acct

"""Whose wallet and cards a request names, as recharge knows them: a company's or an account's
(the tenant check included), in the company's currency, and the Stripe account its cards live
on. A company's wallet and an account's wallet are the same use cases on an ``Owner``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tally.auth import Principal, require_company
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.errors import ApiError, not_found
from tally_recharge import storage
from tally_recharge.domain import WalletTarget

OwnerKind = Literal["company", "account"]


@dataclass(frozen=True)
class Owner:
    """An owner as a route names it: ``/companies/{cid}/…`` or ``/accounts/{aid}/…``."""

    kind: OwnerKind
    id: str


async def currency(conn: Conn, directory: CompanyDirectory | None, company_id: str) -> str:
    """The company's currency: as rebilling.events told us, else as rebilling answers now (a
    company created a moment ago), else USD (a company rebilling does not know)."""
    known = await storage.known_currency(conn, company_id)
    if known is not None:
        return known
    if directory is not None:
        return (await directory.currencies([company_id])).get(company_id, "USD")
    return "USD"


async def find(
    conn: Conn, directory: CompanyDirectory | None, principal: Principal, owner: Owner
) -> WalletTarget:
    """The wallet ``principal`` names; 404 for other tenants (and for an account no one has
    heard of, unless it is the principal's own: its token vouches for its company)."""
    if owner.kind == "company":
        cid = owner.id
        require_company(principal, cid)
        return WalletTarget(f"company:{cid}", "company", cid, None, await currency(conn, directory, cid))
    aid = owner.id
    company = await storage.account_company(conn, aid)
    if company is None and principal.role == "account_user" and principal.account_id == aid:
        company = principal.company_id
    if company is None or not principal.can_see_account(company, aid):
        raise not_found("account")
    return WalletTarget(f"account:{aid}", "account", company, aid, await currency(conn, directory, company))


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

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


async def currency(
    conn: Conn, directory: CompanyDirectory | None, company_id: str, *, pin: bool = False
) -> str:
    """The company's currency: as rebilling.events told us, else as rebilling answers now (a
    company created a moment ago), else USD (a company rebilling does not know). ``pin``: money
    is about to be charged in it, so a company no one created yet has its USD pinned at
    rebilling, and is never created in another currency (docs/0027)."""
    known = await storage.known_currency(conn, company_id)
    if known is not None:
        return known
    if directory is None:
        return "USD"
    found = await directory.currencies([company_id])
    if company_id not in found and pin:
        found = await directory.pinned_currencies([company_id])
    return found.get(company_id, "USD")


async def find(
    conn: Conn, directory: CompanyDirectory | None, principal: Principal, owner: Owner, *, pin: bool = False
) -> WalletTarget:
    """The wallet ``principal`` names; 404 for other tenants (and for an account no one has
    heard of, unless it is the principal's own: its token vouches for its company). ``pin``:
    for charging it (``currency``)."""
    if owner.kind == "company":
        cid = owner.id
        require_company(principal, cid)
        held = await currency(conn, directory, cid, pin=pin)
        return WalletTarget(f"company:{cid}", "company", cid, None, held)
    aid = owner.id
    company = await storage.account_company(conn, aid)
    if company is None and principal.role == "account_user" and principal.account_id == aid:
        company = principal.company_id
    if company is None or not principal.can_see_account(company, aid):
        raise not_found("account")
    held = await currency(conn, directory, company, pin=pin)
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

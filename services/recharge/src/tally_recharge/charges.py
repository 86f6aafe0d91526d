"""Card charges for another service (rebilling's subscriptions and licenses): a company's or an
account's cards charged at most once per key, nothing credited to a wallet."""

from __future__ import annotations

from typing import Literal

import httpx

from tally.directory import CompanyDirectory
from tally.errors import ApiError, not_found, rebilling_unavailable
from tally.uow import Database
from tally_recharge import storage, targets
from tally_recharge.charging import Recharger
from tally_recharge.domain import WalletTarget
from tally_recharge.storage import Attempt


async def charge(
    db: Database,
    recharger: Recharger,
    directory: CompanyDirectory,
    *,
    key: str,
    owner: Literal["company", "account"],
    company_id: str,
    account_id: str | None,
    amount: int,
    description: str,
) -> Attempt:
    """Charge the owner's cards ``amount`` (in the company's currency) once per ``key``: a
    repeated call answers the first call's attempt. 404 for a company rebilling does not know
    (period charges are rebilling's, for its companies: a charge for an id no one created would
    fix a currency the company may later be created in another of); 409 when an account's
    company has not connected Stripe; 503 when rebilling cannot be asked (with no database
    connection held)."""
    if owner == "account" and not account_id:
        raise ApiError(422, "validation_error", "account_id is required for an account")
    async with db.reading() as conn:
        currency = await storage.known_currency(conn, company_id)
    if currency is None:
        try:
            currency = await directory.rebilling_says("company", company_id)
        except httpx.HTTPError as exc:
            raise rebilling_unavailable() from exc
        if currency is None:
            raise not_found("company")
    if owner == "account" and account_id:
        target = WalletTarget(f"account:{account_id}", "account", company_id, account_id, currency)
    else:
        target = WalletTarget(f"company:{company_id}", "company", company_id, None, currency)
    async with db.reading() as conn:
        stripe_account = await targets.stripe_account(conn, target)
    return await recharger.charge_once(key, target, amount, stripe_account, description)

"""Card charges for another service (rebilling's subscriptions and licenses): a company's or an
account's cards charged at most once per key, nothing credited to a wallet."""

from __future__ import annotations

from typing import Literal

from tally.directory import CompanyDirectory
from tally.errors import ApiError
from tally.uow import Database
from tally_recharge import targets
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
    repeated call answers the first call's attempt. 409 when an account's company has not
    connected Stripe."""
    async with db.reading() as conn:
        currency = await targets.currency(conn, directory, company_id, pin=True)
        if owner == "account":
            if not account_id:
                raise ApiError(422, "validation_error", "account_id is required for an account")
            target = WalletTarget(f"account:{account_id}", "account", company_id, account_id, currency)
        else:
            target = WalletTarget(f"company:{company_id}", "company", company_id, None, currency)
        stripe_account = await targets.stripe_account(conn, target)
    return await recharger.charge_once(key, target, amount, stripe_account, description)

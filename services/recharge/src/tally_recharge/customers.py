"""An owner's Stripe customer: created at Stripe the first time a card is saved, on the Stripe
account the owner's cards live on (the platform's for a company, the company's connected one
for an account), and kept (``storage.save_customer``: concurrent creations, one wins)."""

from __future__ import annotations

from tally.uow import Database
from tally_recharge import storage
from tally_recharge.domain import WalletTarget
from tally_recharge.gateway import StripeGateway


async def ensure(
    db: Database, gateway: StripeGateway, target: WalletTarget, stripe_account: str | None, email: str | None
) -> str:
    """The owner's customer on ``stripe_account`` (created if none). Raises
    ``StripeUnavailable`` when Stripe cannot be reached."""
    async with db.reading() as conn:
        existing = await storage.customer(conn, target.owner, target.owner_id, stripe_account)
    if existing:
        return existing
    created = await gateway.create_customer(
        email=email,
        name=f"{target.owner}:{target.owner_id}",
        stripe_account=stripe_account,
        idempotency_key=f"customer:{target.owner}:{target.owner_id}:{stripe_account or ''}",
    )
    async with db.unit() as uow:
        return await storage.save_customer(
            uow.conn, target.owner, target.owner_id, target.company_id, stripe_account, created
        )

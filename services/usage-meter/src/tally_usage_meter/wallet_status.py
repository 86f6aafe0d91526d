"""Which wallets are suspended, as ``wallet.digest`` tells: usage of an account whose wallet,
or whose agency's wallet, is suspended is refused until it is reactivated."""

from __future__ import annotations

from collections.abc import Sequence

from tally import events, inbox
from tally.uow import UnitOfWork
from tally_usage_meter import storage

INBOX = "wallet-status"


async def follow(uow: UnitOfWork, changes: Sequence[events.Message]) -> None:
    """Apply ``wallet.suspended`` / ``wallet.reactivated`` messages not seen before, in the
    caller's open unit of work."""
    conn = uow.conn
    fresh = await inbox.claim(conn, INBOX, [m.id for m in changes])
    for m in changes:
        if m.id not in fresh:
            continue
        payload = m.data
        assert isinstance(payload, events.WalletSuspended | events.WalletReactivated)
        owner_id = payload.company_id if payload.owner == "company" else payload.account_id
        assert owner_id is not None
        await storage.set_suspended(conn, payload.owner, owner_id, m.type == "wallet.suspended")

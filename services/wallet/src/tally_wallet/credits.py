"""Crediting a wallet (manual credits, approved credit requests, recharges, top-ups): one
transfer from a system wallet, idempotent by key, with ``wallet.credited`` (and
``wallet.reactivated`` when it lifts a suspended wallet back to zero or above)."""

from __future__ import annotations

from tally import events, outbox
from tally.db import Conn
from tally_wallet import storage
from tally_wallet.domain import Posted, Transfer, TransferKind, Wallet, system_wallet_id
from tally_wallet.messages import SOURCE, edge_event_rows, wallet_rows


async def credit(
    conn: Conn,
    wallet: Wallet,
    *,
    amount: int,
    kind: TransferKind,
    key: str,
    system: str,
    reference: str | None = None,
) -> tuple[Posted | None, Wallet]:
    """Credit ``wallet`` (created with defaults if new) from system wallet ``system``.
    Returns ``(None, wallet)`` when ``key`` was already posted: nothing changes twice."""
    if await storage.existing_keys(conn, [key]):
        current = await storage.get_wallet(conn, wallet.id)
        assert current is not None
        return None, current
    source = Wallet(system_wallet_id(system, wallet.currency), "system", wallet.currency)
    posting = await storage.post(
        conn, [wallet, source], [Transfer(key, source.id, wallet.id, amount, kind, reference=reference)]
    )
    locked, posted = posting.wallets[wallet.id], posting.posted[0]
    credited = events.WalletCredited(
        **locked.ref(),
        transfer_id=key,
        kind=kind,
        amount_micros=amount,
        balance_micros=posted.credit_after,
        reference=reference,
    )
    rows = wallet_rows(
        locked.company_id, events.envelope("wallet.credited", credited, source=SOURCE, id_=key)
    )
    rows.extend(edge_event_rows(posting))
    await outbox.enqueue(conn, rows)
    return posted, locked

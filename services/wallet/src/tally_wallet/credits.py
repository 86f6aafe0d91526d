"""Crediting a wallet (manual credits, approved credit requests, recharges, top-ups): one
transfer from a system wallet, idempotent by key, with ``wallet.credited`` (and
``wallet.reactivated`` when it lifts a suspended wallet back to zero or above)."""

from __future__ import annotations

import uuid

from tally import events, idempotency, outbox
from tally.auth import Principal
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.errors import invalid, money_field, not_found
from tally.idempotency import Stored
from tally.money import format_micros
from tally.uow import Database
from tally_wallet import storage
from tally_wallet.domain import (
    SYSTEM_MANUAL_CREDITS,
    BalanceOutOfRange,
    Posted,
    Transfer,
    TransferKind,
    Wallet,
    system_wallet_id,
)
from tally_wallet.messages import SOURCE, edge_event_rows, wallet_rows
from tally_wallet.schemas import CreditOut, wallet_out
from tally_wallet.wallets import Target, find, pinned, view


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
    # Each company's credits come from its own system wallet: a shared one would let one
    # company's credits take it to the end of its range and stop every other company's.
    source_id = system_wallet_id(system, wallet.currency, wallet.company_id)
    source = Wallet(source_id, "system", wallet.currency)
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


async def grant(
    db: Database,
    directory: CompanyDirectory,
    principal: Principal,
    target: Target,
    *,
    amount: str,
    reference: str | None,
    idempotency_key: str | None,
    fingerprint: str,
) -> CreditOut | Stored:
    """A manual credit (the company's credits button on an account wallet; a platform admin's
    grant to a company wallet). With an Idempotency-Key the first response is answered again
    (``Stored``), and the transfer is keyed by the principal and the key: another principal's
    key never swallows this credit, and the same principal's key never credits twice, even
    after the 24 hours in which the first response is answered again."""
    who = idempotency.principal_key(principal)
    wallet = await find(db, directory, principal, target)
    if wallet.company_id is None:
        raise not_found("account")  # never heard of it: its company is not known yet
    micros = money_field(amount, "amount")  # after the tenant check: others' wallets are 404
    async with db.unit() as uow:
        if idempotency_key is not None:
            stored = await uow.claim_key(who, idempotency_key, fingerprint)
            if stored is not None and stored.response is not None:
                return stored
            key = f"manual:{wallet.id}:{idempotency.principal_digest(who)}:{idempotency_key}"
        else:
            key = f"manual:{wallet.id}:{uuid.uuid4()}"
        wallet = await pinned(uow.conn, directory, wallet)  # all checked: money moves now
        try:
            posted, current = await credit(
                uow.conn,
                wallet,
                amount=micros,
                kind="manual_credit",
                key=key,
                system=SYSTEM_MANUAL_CREDITS,
                reference=reference,
            )
        except BalanceOutOfRange as exc:
            raise invalid("amount", "the credit would take the wallet beyond what it can hold") from exc
        out = CreditOut(
            transfer_id=key,
            amount=format_micros(micros),
            created=posted is not None,  # False: already posted, nothing moved twice
            wallet=wallet_out(await view(uow.conn, principal, current)),
        )
        uow.remember(201, out.model_dump(mode="json"))
        return out

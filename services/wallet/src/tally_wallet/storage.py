"""The wallet's tables: wallets and the transfers ledger. Writes are batched: one COPY for the
ledger lines and one UPDATE for every touched wallet, whatever the batch size."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
from tally.db import Conn

from tally_wallet.domain import Posting, Wallet

_WALLET_COLS = ("id, kind, company_id, account_id, currency, balance, threshold, reload_amount, "
                "auto_recharge, smart_adjustment, status")
_TRANSFER_COLS = ("key", "debit_wallet", "credit_wallet", "amount", "kind", "service",
                  "usage_event_id", "reference", "debit_balance_after", "credit_balance_after")


def _wallet(r: asyncpg.Record) -> Wallet:
    return Wallet(id=r["id"], kind=r["kind"], currency=r["currency"], company_id=r["company_id"],
                  account_id=r["account_id"], balance=r["balance"], threshold=r["threshold"],
                  reload_amount=r["reload_amount"], auto_recharge=r["auto_recharge"],
                  smart_adjustment=r["smart_adjustment"], status=r["status"])


async def existing_keys(conn: Conn, keys: Sequence[str]) -> set[str]:
    if not keys:
        return set()
    rows = await conn.fetch("SELECT key FROM transfers WHERE key = ANY($1::text[])", list(keys))
    return {r["key"] for r in rows}


async def lock_wallets(conn: Conn, wanted: Iterable[Wallet]) -> dict[str, Wallet]:
    """Create the wallets that do not exist yet (with defaults), then lock all of them in id
    order (no deadlocks between concurrent batches) and return their current state."""
    by_id = {w.id: w for w in wanted}
    if not by_id:
        return {}
    ws = list(by_id.values())
    await conn.execute(
        "INSERT INTO wallets (id, kind, company_id, account_id, currency) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) "
        "ON CONFLICT (id) DO NOTHING",
        [w.id for w in ws], [w.kind for w in ws], [w.company_id for w in ws],
        [w.account_id for w in ws], [w.currency for w in ws],
    )
    rows = await conn.fetch(
        f"SELECT {_WALLET_COLS} FROM wallets WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
        sorted(by_id),
    )
    return {r["id"]: _wallet(r) for r in rows}


async def write_posting(conn: Conn, posting: Posting) -> None:
    if not posting.posted:
        return
    await conn.copy_records_to_table("transfers", columns=_TRANSFER_COLS, records=[
        (p.transfer.key, p.transfer.debit, p.transfer.credit, p.transfer.amount, p.transfer.kind,
         p.transfer.service, p.transfer.usage_event_id, p.transfer.reference, p.debit_after,
         p.credit_after) for p in posting.posted])
    touched = [posting.wallets[i] for i in sorted(posting.touched)]
    await conn.execute(
        "UPDATE wallets SET balance = v.balance, status = v.status, updated_at = now() "
        "FROM unnest($1::text[], $2::bigint[], $3::text[]) AS v(id, balance, status) "
        "WHERE wallets.id = v.id",
        [w.id for w in touched], [w.balance for w in touched], [w.status for w in touched],
    )


async def get_wallet(conn: Conn, wallet_id: str) -> Wallet | None:
    r = await conn.fetchrow(f"SELECT {_WALLET_COLS} FROM wallets WHERE id = $1", wallet_id)
    return _wallet(r) if r else None


async def list_transfers(conn: Conn, wallet_id: str, *, limit: int,
                         before_id: int | None) -> list[dict[str, Any]]:
    """Ledger lines of one wallet, newest first, signed from the wallet's side."""
    before = before_id if before_id is not None else 2**62
    rows = await conn.fetch(
        "(SELECT id, kind, -amount AS amount, debit_balance_after AS balance_after, service, "
        "        usage_event_id, reference, created_at FROM transfers "
        "  WHERE debit_wallet = $1 AND id < $2 ORDER BY id DESC LIMIT $3) "
        "UNION ALL "
        "(SELECT id, kind, amount, credit_balance_after, service, usage_event_id, reference, "
        "        created_at FROM transfers "
        "  WHERE credit_wallet = $1 AND id < $2 ORDER BY id DESC LIMIT $3) "
        "ORDER BY id DESC LIMIT $3",
        wallet_id, before, limit,
    )
    return [dict(r) for r in rows]


async def ledger_totals(conn: Conn) -> list[asyncpg.Record]:
    """Per wallet: materialised balance next to what the transfers say (for audits/tests)."""
    return await conn.fetch(
        "SELECT w.id, w.balance, "
        "  COALESCE((SELECT sum(amount) FROM transfers WHERE credit_wallet = w.id), 0) - "
        "  COALESCE((SELECT sum(amount) FROM transfers WHERE debit_wallet = w.id), 0) AS derived "
        "FROM wallets w ORDER BY w.id")

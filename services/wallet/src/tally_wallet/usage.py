"""Applying ``usage.recorded`` batches: each event debits the company wallet at the platform
price (credit: platform revenue). One transaction per batch; idempotent by transfer key, so a
redelivered event changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from tally import events, outbox
from tally.db import Conn
from tally.events import Topics, UsageRecorded

from tally_wallet import storage
from tally_wallet.domain import (
    SYSTEM_PLATFORM_REVENUE,
    Posting,
    Transfer,
    Wallet,
    company_wallet_id,
    system_wallet_id,
)

SOURCE = "wallet"
APPLIED = Counter("tally_wallet_usage_applied_total", "Usage legs posted to the ledger", ["leg"])
SKIPPED = Counter("tally_wallet_usage_duplicates_total", "Usage events already in the ledger")


def edge_event_rows(posting: Posting) -> list[outbox.Row]:
    """Outbox rows for the threshold/suspension/reactivation edges a posting crossed."""
    rows = []
    for e in posting.events:
        w = posting.wallets[e.wallet_id]
        model = events.PAYLOADS[e.type].model_validate(e.data)
        rows.append(outbox.row(Topics.WALLET_EVENTS, w.company_id, events.envelope(
            e.type, model, source=SOURCE, id_=f"{e.type}:{e.cause}")))
    return rows


@dataclass(frozen=True)
class Outcome:
    posted: int
    duplicates: int


def company_leg_key(event_id: str) -> str:
    return f"usage:{event_id}:company"


async def apply_usage(conn: Conn, batch: Sequence[UsageRecorded]) -> Outcome:
    """Post a batch of recorded usage in the caller's transaction."""
    keys = [company_leg_key(u.event_id) for u in batch]
    seen = await storage.existing_keys(conn, keys)
    fresh: list[UsageRecorded] = []
    for u, key in zip(batch, keys, strict=True):
        if key not in seen:
            seen.add(key)  # also dedupes repeats inside this batch
            fresh.append(u)
    SKIPPED.inc(len(batch) - len(fresh))
    if not fresh:
        return Outcome(0, len(batch))

    wanted: list[Wallet] = []
    for u in fresh:
        wanted.append(Wallet(company_wallet_id(u.company_id), "company", u.currency,
                             company_id=u.company_id))
        wanted.append(Wallet(system_wallet_id(SYSTEM_PLATFORM_REVENUE, u.currency), "system",
                             u.currency))
    posting = Posting(await storage.lock_wallets(conn, wanted))

    rows: list[outbox.Row] = []
    for u in fresh:
        if u.platform_amount_micros <= 0:
            continue  # a free service leaves no ledger line
        company = company_wallet_id(u.company_id)
        p = posting.apply(Transfer(
            company_leg_key(u.event_id), company,
            system_wallet_id(SYSTEM_PLATFORM_REVENUE, u.currency),
            u.platform_amount_micros, "usage", service=u.service, usage_event_id=u.event_id))
        w = posting.wallets[company]
        debited = events.WalletDebited(
            **{**w.ref(), "account_id": u.account_id}, transfer_id=p.transfer.key,
            usage_event_id=u.event_id, service=u.service, amount_micros=p.transfer.amount,
            balance_micros=p.debit_after)
        rows.append(outbox.row(Topics.WALLET_EVENTS, u.company_id, events.envelope(
            "wallet.debited", debited, source=SOURCE, id_=p.transfer.key)))
    APPLIED.labels("company").inc(len(posting.posted))

    rows.extend(edge_event_rows(posting))
    await storage.write_posting(conn, posting)
    await outbox.enqueue(conn, rows)
    return Outcome(len(posting.posted), len(batch) - len(fresh))

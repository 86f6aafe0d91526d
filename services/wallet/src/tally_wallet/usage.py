"""Applying ``usage.recorded`` batches. Each event debits the company wallet at the platform
price (credit: platform revenue); then, where the account is rebilled, the account wallet at
the company price (credit: the company's revenue). Both legs go in the same transaction as the
rest of the batch; both are keyed by the event's id, or by its company and its id when another
company's event holds that id (``_fresh``, docs/0021), so a redelivered event changes nothing.
Usage that already happened is always recorded, even when it takes a balance below zero."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import Counter

from tally import outbox
from tally.db import Conn
from tally.events import RecordedUsage, usage_key
from tally.telemetry import child_traceparent
from tally_wallet import storage
from tally_wallet.domain import (
    SYSTEM_COMPANY_REVENUE,
    Kind,
    LedgerError,
    RatedOnOldSettings,
    Transfer,
    Wallet,
    account_wallet_id,
    company_wallet_id,
    platform_revenue_wallet_id,
    system_wallet_id,
)
from tally_wallet.messages import UsageTotals, debited_row, edge_event_rows

APPLIED = Counter("tally_wallet_usage_applied_total", "Usage legs posted to the ledger", ["leg"])
SKIPPED = Counter("tally_wallet_usage_duplicates_total", "Usage events already in the ledger")


@dataclass(frozen=True)
class Outcome:
    posted: int
    duplicates: int
    recorded: tuple[datetime, ...] = ()  # when usage-meter accepted each event posted
    # what the posting publishes (wallet.debited, edges, usage totals), for the caller's unit
    # of work: written at its commit and handed to its relay
    messages: Sequence[outbox.Row] = ()


def company_leg_key(key: str) -> str:
    """The company leg's transfer key; ``key`` is the event's ``RecordedUsage.key``."""
    return f"usage:{key}:company"


def account_leg_key(key: str) -> str:
    return f"usage:{key}:account"


def _fresh(batch: Sequence[RecordedUsage], seen: dict[str, str]) -> list[tuple[RecordedUsage, str]]:
    """The records to post, each once, with the key each is posted under. ``seen`` maps the
    company-leg keys posted (in the ledger, then in this batch) to the company they charged.
    Zero amounts post nothing and claim no key (a tiny quantity rounded down).

    An event is keyed by its id, as every event was before docs/0021, unless that key is
    already another company's: then the event is another company's with the same id, and it
    is keyed by its company and its id (``usage_key``). Which company holds an id's bare key
    is settled by the first posting of it, and lines are never deleted, so every later
    delivery of either event finds its own line: a redelivery, or a re-send after usage-meter
    forgot the id (docs/0007), is never charged again, whenever the event was first posted."""
    fresh = []
    for u in batch:
        if u.platform_amount_micros <= 0:
            continue
        key = u.event_id
        leg = company_leg_key(key)
        holder = seen.get(leg)
        if holder is not None and holder != u.company_id:  # another company's event has this id
            key = usage_key(u.company_id, u.event_id)
            leg = company_leg_key(key)
            holder = seen.get(leg)
        if holder is None:
            seen[leg] = u.company_id  # also dedupes repeats inside this batch
            fresh.append((u, key))
    return fresh


def _looked_up(batch: Sequence[RecordedUsage]) -> list[str]:
    """The company-leg keys a batch's records may have been posted under (``_fresh``)."""
    keys = [company_leg_key(u.event_id) for u in batch]
    return keys + [company_leg_key(usage_key(u.company_id, u.event_id)) for u in batch]


def _want(
    wanted: dict[str, Wallet], wallet_id: str, kind: Kind, u: RecordedUsage, *, account_id: str | None = None
) -> None:
    """Add the wallet a leg of ``u`` needs (created with defaults if new), once per batch."""
    if wallet_id not in wanted:
        wanted[wallet_id] = Wallet(
            wallet_id,
            kind,
            u.currency,
            company_id=None if kind == "system" else u.company_id,
            account_id=account_id,
        )


async def apply_usage(
    conn: Conn,
    batch: Sequence[RecordedUsage],
    traceparents: Mapping[tuple[str, str], str | None] | None = None,
    *,
    partitions: Mapping[tuple[str, str], int] | None = None,
    optimistic: bool = False,
) -> Outcome:
    """Post a batch of recorded usage in the caller's transaction. ``traceparents`` maps an
    event's ``(company_id, event_id)`` to the trace it arrived in; what the event causes
    continues that trace. ``partitions`` maps an event's ``(company_id, event_id)`` to the
    ``usage.recorded`` partition it came from (0 when
    absent): the platform's revenue goes to that partition's revenue wallet, so batches of
    different partitions share no wallet and commit side by side.

    ``optimistic``: skip looking up which events the ledger already has; if one was posted
    before, the unique transfer key makes the insert fail (``asyncpg.UniqueViolationError``)
    and the caller rolls back and posts again without ``optimistic``. Redeliveries are rare,
    so the common batch saves a lookup per event.

    The messages the posting causes come back in ``Outcome.messages``, for the caller to
    publish in the same transaction (``UnitOfWork.publish``)."""
    seen = {} if optimistic else await storage.usage_holders(conn, _looked_up(batch))
    fresh = _fresh(batch, seen)
    SKIPPED.inc(len(batch) - len(fresh))
    if not fresh:
        return Outcome(0, len(batch))

    account_ids = list({u.account_id for u, _ in fresh if u.account_id})
    accounts = await storage.load_accounts(conn, account_ids)
    # An event is rated by the settings in effect when usage-meter recorded it: the newest
    # heard, unless it was recorded before they took effect (then the version before). Checked
    # per account against the batch's oldest event first: usually no account's settings are
    # newer than that, and no event needs the check.
    oldest = min(u.recorded_at for u, _ in fresh)
    newer = {a for a, k in accounts.items() if k.effective_at is not None and k.effective_at > oldest}
    earlier = {
        (u.account_id, u.recorded_at)
        for u, _ in fresh
        if u.account_id in newer and u.recorded_at < accounts[u.account_id].effective_at  # type: ignore[operator]
    }
    past = await storage.rebilling_at(conn, list(earlier)) if earlier else {}
    shard = partitions or {}
    plan: list[tuple[RecordedUsage, str, bool]] = []  # (event, its key, has an account leg)
    transfers: list[Transfer] = []
    wanted: dict[str, Wallet] = {}  # one per distinct wallet, not four per event
    # A batch names few companies and partitions: each one's wallets are named (and wanted)
    # once, not once or twice per event.
    # (company, currency) -> (its wallet, its revenue wallet in that currency)
    companies: dict[tuple[str, str], tuple[str, str]] = {}
    platforms: dict[tuple[str, int], str] = {}  # (currency, partition) -> platform revenue wallet
    for u, key in fresh:
        account_id, company_id = u.account_id, u.company_id
        known = accounts.get(account_id) if account_id else None
        if known is not None and known.company_id != company_id:
            # usage-meter refuses these; never debit one company's account for another's usage
            raise LedgerError(
                f"usage {u.event_id}: account {account_id!r} belongs to another company than {company_id!r}"
            )
        settings = known.rebilling if known is not None else None
        if earlier and (account_id, u.recorded_at) in earlier:
            settings = past.get((account_id, u.recorded_at))  # type: ignore[arg-type]
        account_amount = settings.account_amount(u.service, u.platform_amount_micros) if settings else None
        # Each leg's two wallets, checked separately: a company (or account) may see usage in
        # another currency than its wallet's, which posting refuses (LedgerError), never a
        # missing wallet.
        named = companies.get((company_id, u.currency))
        if named is None:
            named = companies[(company_id, u.currency)] = (
                company_wallet_id(company_id),
                system_wallet_id(SYSTEM_COMPANY_REVENUE, u.currency, company_id),
            )
            _want(wanted, named[0], "company", u)
        company_wallet, revenue = named
        where = (u.currency, shard.get((company_id, u.event_id), 0))
        platform = platforms.get(where)
        if platform is None:
            platform = platforms[where] = platform_revenue_wallet_id(*where)
            _want(wanted, platform, "system", u)
        transfers.append(
            Transfer(
                company_leg_key(key),
                company_wallet,
                platform,
                u.platform_amount_micros,
                "usage",
                u.service,
                u.event_id,
                None,
                account_id,
                u.recorded_at,
                u.occurred_at,
            )
        )
        rebilled = False
        if account_amount and account_id:
            rebilled = True
            account_wallet = account_wallet_id(account_id)
            _want(wanted, account_wallet, "account", u, account_id=account_id)
            _want(wanted, revenue, "system", u)
            transfers.append(
                Transfer(
                    account_leg_key(key),
                    account_wallet,
                    revenue,
                    account_amount,
                    "usage",
                    u.service,
                    u.event_id,
                )
            )
        plan.append((u, key, rebilled))
    posting = await storage.post(conn, wanted.values(), transfers)
    if account_ids:
        # Now that the company wallets are locked: settings stored since they were read
        # would have re-rated nothing of this batch (``rerating`` locks the company wallet
        # before it stores them), so the batch goes again under them.
        used = {a: k.changes for a, k in accounts.items() if k.changes is not None}
        if await storage.rebilling_changes(conn, account_ids) != used:
            raise RatedOnOldSettings("an account's rebilling settings changed while the batch was rated")

    rows: list[outbox.Row] = []
    time = datetime.now(UTC).isoformat()
    incoming = traceparents or {}
    traced: list[str | None] = []  # each event's trace, in ``plan``'s order
    totals = UsageTotals()
    legs = iter(posting.posted)
    for u, key, rebilled in plan:
        traceparent = child_traceparent(
            incoming.get((u.company_id, u.event_id)), "wallet.debit", {"tally.usage_event_id": u.event_id}
        )
        company = next(legs)
        account = next(legs) if rebilled else None
        rows.append(debited_row(u, key, company, account, time, traceparent))
        totals.add(u, key, account.transfer.amount if account is not None else company.transfer.amount)
        traced.append(traceparent)
    APPLIED.labels("company").inc(len(plan))
    APPLIED.labels("account").inc(len(posting.posted) - len(plan))

    if posting.events:  # edges are rare: each continues the trace of the leg that crossed it
        caused: dict[str, str | None] = {}
        for (_, key, rebilled), traceparent in zip(plan, traced, strict=True):
            caused[company_leg_key(key)] = traceparent
            if rebilled:
                caused[account_leg_key(key)] = traceparent
        rows.extend(edge_event_rows(posting, caused))
    rows.extend(totals.rows(time))
    return Outcome(
        len(posting.posted), len(batch) - len(fresh), tuple(u.recorded_at for u, _, _ in plan), rows
    )

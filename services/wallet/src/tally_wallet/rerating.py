"""Storing an account's rebilling settings, and re-rating the usage they apply to (docs/0025).

Usage is rated by the settings in effect when usage-meter recorded it, whichever the wallet
hears first: the settings come on ``rebilling.settings`` and the usage on ``usage.recorded``,
and nothing orders the two. Usage heard first is posted by the settings the wallet knew; when
the settings arrive, each of the account's events recorded since they took effect is charged
to the account's wallet what they say, less what it was charged already:

- no account leg yet and one due: the leg, as it would have been posted (kind ``usage``);
- a leg of another amount (a markup changed, rebilling turned off): the difference, kind
  ``adjustment``, keyed by the event and the settings version (given back when negative).

The company's leg never changes: the platform's price does not depend on rebilling.

Ordering against usage batches: the company wallet is locked before the settings are stored.
A batch that locked it first has committed by then and is re-rated here; a batch that locks it
after finds the settings changed since it read them and is rated again (``apply_usage``)."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta

from prometheus_client import Counter

from tally import events, outbox
from tally.db import Conn
from tally.events import Topics
from tally_wallet import storage
from tally_wallet.domain import (
    SYSTEM_COMPANY_REVENUE,
    Rebilling,
    Transfer,
    Wallet,
    account_wallet_id,
    company_wallet_id,
    parse_markups,
    system_wallet_id,
)
from tally_wallet.messages import SOURCE, edge_event_rows, minute_text, wallet_rows
from tally_wallet.usage import account_leg_key

log = logging.getLogger(__name__)
FAILED = Counter(
    "tally_wallet_rerating_failed_total", "Settings stored whose re-rating could not post (logged)"
)

# A company leg is posted after usage-meter recorded its event; this covers the two
# services' clocks (and a posting transaction's start) when walking back from the newest line.
CLOCK_SLACK = timedelta(seconds=30)
_COMPANY_LEG = (len("usage:"), -len(":company"))


async def store_settings(conn: Conn, s: events.RebillingSettings, currency: str) -> list[outbox.Row]:
    """Store ``s`` (the newer version wins) in the caller's transaction and re-rate the usage it
    applies to; returns the messages to publish with it."""
    company = Wallet(company_wallet_id(s.company_id), "company", currency, company_id=s.company_id)
    account = Wallet(
        account_wallet_id(s.account_id), "account", currency, company_id=s.company_id, account_id=s.account_id
    )
    await storage.lock_for_rating(conn, company, account.id)
    stored = await storage.upsert_rebilling(conn, s, currency)
    if not stored.new or stored.superseded:
        return []  # a redelivery, or a version that governs nothing
    try:
        async with conn.transaction():  # a savepoint: the settings stand if re-rating cannot
            return await _rerate(conn, s, stored.effective_at, stored.until, company, account)
    except storage.UNPOSTABLE as exc:
        # Dead-lettering the settings would leave the account under the old ones for good:
        # they are stored, and the usage before them stays as first posted (as before 0025).
        FAILED.inc()
        log.error(
            "re-rating could not post",
            extra={"account_id": s.account_id, "version": s.version, "error": f"{type(exc).__name__}: {exc}"},
        )
        return []


async def _rerate(
    conn: Conn,
    s: events.RebillingSettings,
    since: datetime,
    until: datetime | None,
    company: Wallet,
    account: Wallet,
) -> list[outbox.Row]:
    """Re-rate the account's usage recorded from ``since`` until ``until`` (when a later
    version took over; None: none has) by ``s``."""
    before, legs = await storage.usage_recorded_since(
        conn, company.id, s.account_id, since, CLOCK_SLACK, until
    )
    if not legs:
        return []
    settings = Rebilling(s.mode, parse_markups(s.markups), s.active)
    charged: dict[str, int] = defaultdict(int)  # event key -> what the account paid for it
    for line in await storage.account_usage_lines(conn, account.id, before):
        key = line["key"]
        event_key = key[len("usage:") : key.rfind(":account")]
        charged[event_key] += line["amount"] if line["debit_wallet"] == account.id else -line["amount"]
    revenue = Wallet(
        system_wallet_id(SYSTEM_COMPANY_REVENUE, company.currency, s.company_id), "system", company.currency
    )
    transfers = []
    # (service, minute it occurred) -> the change in the account's usage (``UsageTotals``)
    counted: dict[tuple[str, str], int] = defaultdict(int)
    for leg in legs:
        event_key = leg["key"][_COMPANY_LEG[0] : _COMPANY_LEG[1]]
        due = settings.account_amount(leg["service"], leg["amount"]) or 0
        paid = charged.get(event_key)
        change = due - (paid or 0)
        if change == 0:
            continue
        # the account's usage counts what it pays, or the platform's price when not rebilled
        counted_then, counted_now = paid or leg["amount"], due or leg["amount"]
        counted[(leg["service"], minute_text(leg["occurred_at"]))] += counted_now - counted_then
        first = paid is None and change > 0
        key = account_leg_key(event_key) if first else f"{account_leg_key(event_key)}:v{s.version}"
        debit, credit = (account.id, revenue.id) if change > 0 else (revenue.id, account.id)
        transfers.append(
            Transfer(
                key,
                debit,
                credit,
                abs(change),
                "usage" if first else "adjustment",
                service=leg["service"],
                usage_event_id=leg["usage_event_id"],
            )
        )
    if not transfers:
        return []
    posting = await storage.post(conn, [account, revenue], transfers)
    moved = sum(-t.amount if t.debit == account.id else t.amount for t in transfers)
    after = posting.wallets[account.id]
    rerated = events.WalletUsageRerated(
        **after.ref(),
        version=s.version,
        effective_at=since,
        events=len(transfers),
        amount_micros=-moved,
        balance_micros=after.balance,
    )
    message = events.envelope(
        "wallet.usage_rerated",
        rerated,
        source=SOURCE,
        id_=f"wallet.usage_rerated:{s.account_id}:{s.version}",
    )
    corrections = events.WalletUsage(
        totals=[],
        corrections=[
            events.UsageCorrection(
                account_id=s.account_id,
                company_id=s.company_id,
                service=service,
                currency=company.currency,
                minute=datetime.fromisoformat(minute),
                amount_micros=amount,
            )
            for (service, minute), amount in sorted(counted.items())
            if amount
        ],
    )
    usage = events.envelope(
        "wallet.usage", corrections, source=SOURCE, id_=f"usage_rerated:{s.account_id}:{s.version}"
    )
    return [
        *wallet_rows(s.company_id, message),
        *edge_event_rows(posting),
        outbox.row(Topics.WALLET_DIGEST, s.company_id, usage),
    ]

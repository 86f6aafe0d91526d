"""The wallet's tables: wallets and the transfers ledger. Writes are batched: one UPDATE for
every touched wallet and one COPY for the ledger lines, whatever the batch size (``post``)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg
import orjson

from tally.db import Conn
from tally.events import CompanyUpdated, RebillingSettings
from tally_wallet.domain import (
    BalanceOutOfRange,
    LedgerError,
    Posting,
    Rebilling,
    Transfer,
    Wallet,
    account_wallet_id,
    parse_markups,
)

# In the order of ``Wallet``'s fields (``threshold_armed`` is ``armed``): a row is
# ``Wallet(*row)``, a third of the cost of reading each column by name (~1 µs per wallet;
# a batch over many accounts returns ~2 wallets per event).
_WALLET_COLS = (
    "id, kind, currency, company_id, account_id, balance, threshold, reload_amount, "
    "auto_recharge, smart_adjustment, status, threshold_armed"
)
# Every wallet's materialised balance beside the one its ledger lines derive (credits - debits):
# the audit that chaos runs and the tests use (a wallet is right when balance = derived).
LEDGER_BALANCES = (
    "SELECT w.id, w.balance, COALESCE(c.total, 0) - COALESCE(d.total, 0) AS derived "
    "FROM wallets w "
    "LEFT JOIN (SELECT credit_wallet AS id, sum(amount) AS total FROM transfers GROUP BY 1) c "
    "USING (id) "
    "LEFT JOIN (SELECT debit_wallet AS id, sum(amount) AS total FROM transfers GROUP BY 1) d "
    "USING (id)"
)

# What a posting can never do, whatever the retries: break a ledger rule, or give the
# database a value it refuses (a balance out of range).
UNPOSTABLE: tuple[type[Exception], ...] = (
    LedgerError,
    asyncpg.DataError,
    asyncpg.CheckViolationError,
    asyncpg.ProgramLimitExceededError,  # an id too long for an index row (a forged record)
)

_TRANSFER_COLS = (  # domain.Transfer's fields, then the balances after
    "key",
    "debit_wallet",
    "credit_wallet",
    "amount",
    "kind",
    "service",
    "usage_event_id",
    "reference",
    "account_id",
    "recorded_at",
    "occurred_at",
    "debit_balance_after",
    "credit_balance_after",
)


def _wallet(r: asyncpg.Record) -> Wallet:
    return Wallet(*r)


async def existing_keys(conn: Conn, keys: Sequence[str]) -> set[str]:
    if not keys:
        return set()
    rows = await conn.fetch("SELECT key FROM transfers WHERE key = ANY($1::text[])", list(keys))
    return {r["key"] for r in rows}


async def usage_holders(conn: Conn, keys: Sequence[str]) -> dict[str, str]:
    """The usage lines among ``keys`` (company legs): the company each one charged."""
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT t.key, w.company_id FROM transfers t JOIN wallets w ON w.id = t.debit_wallet "
        "WHERE t.key = ANY($1::text[])",
        list(keys),
    )
    return {r["key"]: r["company_id"] for r in rows}


async def lock_wallets(conn: Conn, wanted: Iterable[Wallet]) -> dict[str, Wallet]:
    """Create the wallets that do not exist yet (with defaults), then lock all of them in id
    order and return their current state. Off the money path (settings changes); postings
    use ``post``."""
    by_id = {w.id: w for w in wanted}
    if not by_id:
        return {}
    await _create(conn, list(by_id.values()))
    rows = await conn.fetch(
        f"SELECT {_WALLET_COLS} FROM wallets WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
        sorted(by_id),
    )
    return {r["id"]: _wallet(r) for r in rows}


_MOVE = (
    f"UPDATE wallets SET balance = wallets.balance + v.delta, updated_at = now() "
    f"FROM unnest($1::text[], $2::bigint[]) AS v(id, delta) WHERE wallets.id = v.id "
    f"RETURNING {', '.join('wallets.' + c for c in _WALLET_COLS.split(', '))}"
)


async def _create(conn: Conn, ws: list[Wallet]) -> None:
    """Open wallets that never moved. A company's or account's wallet opens in its company's
    currency when the wallet has heard it (rebilling.events): a record in another currency
    must not open it in its own, after which the company's real usage could never post."""
    users = {w.company_id for w in ws if w.kind != "system" and w.company_id}
    if users:
        rows = await conn.fetch(
            "SELECT company_id, currency FROM companies WHERE company_id = ANY($1::text[])", list(users)
        )
        known = {r["company_id"]: r["currency"] for r in rows}
        for w in ws:
            if w.kind != "system" and known.get(w.company_id, w.currency) != w.currency:
                currency = known[w.company_id]
                raise LedgerError(f"wallet {w.id} would open in {w.currency}; its company's is {currency}")
    if ws:
        await conn.execute(
            "INSERT INTO wallets (id, kind, company_id, account_id, currency) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) "
            "ON CONFLICT (id) DO NOTHING",
            [w.id for w in ws],
            [w.kind for w in ws],
            [w.company_id for w in ws],
            [w.account_id for w in ws],
            [w.currency for w in ws],
        )


async def post(conn: Conn, wanted: Iterable[Wallet], transfers: Sequence[Transfer]) -> Posting:
    """Post ``transfers`` in order, in the caller's transaction; ``wanted`` are the wallets they
    move (created with defaults if new). Three statements whatever the batch size:

    1. one ``UPDATE … RETURNING`` moves every wallet by its net delta and returns its state,
       which locks the rows (in id order: ids are sorted, so concurrent postings do not
       deadlock in the plans Postgres picks for it; if one ever did, Postgres aborts one
       transaction and its batch is redelivered, unchanged). Wallets it does not find have
       never moved: they are created with defaults and moved by a second UPDATE (two more
       statements, once in each wallet's life; nothing to remember between batches, so a
       restarted wallet pays nothing for the wallets it has not seen yet);
    2. the posting replays the transfers from the balances before, giving each ledger line its
       balances after and noting the edges crossed (``domain.Posting``), and must end on the
       balances the database returned; COPY writes the lines;
    3. a second UPDATE writes status and threshold arming, only for wallets whose edges moved.

    This replaced locking every wallet (``SELECT … FOR UPDATE``) and then updating it."""
    if not transfers:
        return Posting({})
    by_id = {w.id: w for w in wanted}
    delta = dict.fromkeys(by_id, 0)
    for t in transfers:
        delta[t.debit] -= t.amount
        delta[t.credit] += t.amount
    ids = sorted(delta)
    try:
        rows = await conn.fetch(_MOVE, ids, [delta[i] for i in ids])
        if len(rows) < len(ids):  # wallets that never moved before: create them, then move them
            missing = sorted(by_id.keys() - {r["id"] for r in rows})
            await _create(conn, [by_id[i] for i in missing])
            rows += await conn.fetch(_MOVE, missing, [delta[i] for i in missing])
    except asyncpg.NumericValueOutOfRangeError as exc:  # the database's own bound (BIGINT)
        raise BalanceOutOfRange(f"{exc}: a balance would leave what a wallet can hold") from exc
    wallets: dict[str, Wallet] = {}
    moved: list[tuple[Wallet, int]] = []  # each wallet and the balance the database ended on
    for r in rows:
        w = _wallet(r)
        moved.append((w, w.balance))
        w.balance -= delta[w.id]
        wallets[w.id] = w
    before = {i: (w.status, w.armed) for i, w in wallets.items()}
    posting = Posting(wallets)
    for t in transfers:
        posting.apply(t)
    for w, balance in moved:
        if w.balance != balance:
            raise RuntimeError(f"posting diverged from the ledger on {w.id}")
    await conn.copy_records_to_table(
        "transfers",
        columns=_TRANSFER_COLS,
        # a Transfer's fields are the first eleven columns, in order
        records=[(*p.transfer, p.debit_after, p.credit_after) for p in posting.posted],
    )
    edged = [w for i, w in wallets.items() if (w.status, w.armed) != before[i]]
    if edged:
        await conn.execute(
            "UPDATE wallets SET status = v.status, threshold_armed = v.armed "
            "FROM unnest($1::text[], $2::text[], $3::bool[]) AS v(id, status, armed) "
            "WHERE wallets.id = v.id",
            [w.id for w in edged],
            [w.status for w in edged],
            [w.armed for w in edged],
        )
    return posting


async def get_wallet(conn: Conn, wallet_id: str) -> Wallet | None:
    r = await conn.fetchrow(f"SELECT {_WALLET_COLS} FROM wallets WHERE id = $1", wallet_id)
    return _wallet(r) if r else None


async def list_transfers(
    conn: Conn, wallet_id: str, *, limit: int, before_id: int | None
) -> list[dict[str, Any]]:
    """Ledger lines of one user wallet, newest first, signed from the wallet's side (system
    wallets' sides are not indexed: migration 0005)."""
    before = before_id if before_id is not None else 2**62
    rows = await conn.fetch(
        "(SELECT id, kind, -amount AS amount, debit_balance_after AS balance_after, service, "
        "        usage_event_id, reference, created_at FROM transfers "
        "  WHERE debit_wallet = $1 AND debit_wallet NOT LIKE 'system:%' AND id < $2 "
        "  ORDER BY id DESC LIMIT $3) "
        "UNION ALL "
        "(SELECT id, kind, amount, credit_balance_after, service, usage_event_id, reference, "
        "        created_at FROM transfers "
        "  WHERE credit_wallet = $1 AND credit_wallet NOT LIKE 'system:%' AND id < $2 "
        "  ORDER BY id DESC LIMIT $3) "
        "ORDER BY id DESC LIMIT $3",
        wallet_id,
        before,
        limit,
    )
    return [dict(r) for r in rows]


# --- what other services decide, as the wallet knows it ----------------------------------


async def load_rebilling(conn: Conn, account_ids: Sequence[str]) -> dict[str, Rebilling]:
    if not account_ids:
        return {}
    rows = await conn.fetch(
        "SELECT account_id, mode, markups::text AS markups, active FROM rebilling_settings "
        "WHERE account_id = ANY($1::text[])",
        list(set(account_ids)),
    )
    return {r["account_id"]: Rebilling(r["mode"], _markups(r["markups"]), r["active"]) for r in rows}


class KnownAccount(NamedTuple):
    company_id: str
    rebilling: Rebilling | None  # the newest settings heard (None: never rebilled)
    changes: int | None  # versions stored so far (None: none), read again before commit
    effective_at: datetime | None  # when they took effect (None: since ever)


async def load_accounts(conn: Conn, account_ids: Sequence[str]) -> dict[str, KnownAccount]:
    """Each known account's company, and its newest rebilling settings."""
    if not account_ids:
        return {}
    rows = await conn.fetch(
        "SELECT a.account_id, a.company_id, r.mode, r.markups::text AS markups, r.active, "
        "       r.changes, r.effective_at "
        "FROM accounts a LEFT JOIN rebilling_settings r USING (account_id) "
        "WHERE a.account_id = ANY($1::text[])",
        list(set(account_ids)),
    )
    return {
        r["account_id"]: KnownAccount(
            r["company_id"],
            Rebilling(r["mode"], _markups(r["markups"]), r["active"]) if r["mode"] else None,
            r["changes"],
            r["effective_at"],
        )
        for r in rows
    }


async def rebilling_changes(conn: Conn, account_ids: Sequence[str]) -> dict[str, int]:
    """How many settings versions were stored of each account that has any."""
    rows = await conn.fetch(
        "SELECT account_id, changes FROM rebilling_settings WHERE account_id = ANY($1::text[])",
        list(set(account_ids)),
    )
    return {r[0]: r[1] for r in rows}


async def rebilling_at(
    conn: Conn, wanted: Sequence[tuple[str, datetime]]
) -> dict[tuple[str, datetime], Rebilling]:
    """The settings each (account, instant) was under (``wanted`` distinct): the newest version
    that had taken effect by then. Left out: an instant before every version the wallet kept."""
    if not wanted:
        return {}
    pairs = list(wanted)
    rows = await conn.fetch(
        "SELECT DISTINCT ON (v.account_id, v.at) v.account_id, v.at, h.mode, "
        "       h.markups::text AS markups, h.active "
        "FROM unnest($1::text[], $2::timestamptz[]) AS v(account_id, at) "
        "JOIN rebilling_history h ON h.account_id = v.account_id AND h.effective_at <= v.at "
        "ORDER BY v.account_id, v.at, h.version DESC",
        [a for a, _ in pairs],
        [at for _, at in pairs],
    )
    return {(r[0], r[1]): Rebilling(r["mode"], _markups(r["markups"]), r["active"]) for r in rows}


async def lock_for_rating(conn: Conn, company: Wallet, account_wallet: str) -> None:
    """Lock the company's wallet (opened if it never moved) and the account's (if it exists),
    in id order as postings lock them, so usage batches of the company wait for the caller."""
    await _create(conn, [company])
    await conn.execute(
        "SELECT 1 FROM wallets WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
        sorted([company.id, account_wallet]),
    )


async def usage_recorded_since(
    conn: Conn,
    company_wallet: str,
    account_id: str,
    since: datetime,
    slack: timedelta,
    until: datetime | None = None,
) -> tuple[int, list[asyncpg.Record]]:
    """The company legs of ``account_id``'s usage recorded at or after ``since`` (and before
    ``until``), and the id of
    the line the walk started after. Only the company's lines posted from ``since - slack``
    on are read: a line is posted after its event was recorded, and ``slack`` covers the
    clocks of usage-meter and the wallet, so what a company posted long before is not read."""
    before: int = (
        await conn.fetchval(
            "SELECT id FROM transfers WHERE debit_wallet = $1 AND debit_wallet NOT LIKE 'system:%' "
            "AND created_at < $2 ORDER BY id DESC LIMIT 1",
            company_wallet,
            since - slack,
        )
        or 0
    )
    legs = await conn.fetch(
        "SELECT key, usage_event_id, service, amount, occurred_at FROM transfers "
        "WHERE debit_wallet = $1 AND debit_wallet NOT LIKE 'system:%' AND id > $2 "
        "AND kind = 'usage' AND account_id = $3 AND recorded_at >= $4 "
        "AND ($5::timestamptz IS NULL OR recorded_at < $5) ORDER BY id",
        company_wallet,
        before,
        account_id,
        since,
        until,
    )
    return before, legs


async def account_usage_lines(conn: Conn, account_wallet: str, after_id: int) -> list[asyncpg.Record]:
    """The account's usage legs and their adjustments posted after line ``after_id`` (an
    event's account lines are never posted before its company leg)."""
    return await conn.fetch(
        "SELECT key, debit_wallet, amount FROM transfers WHERE debit_wallet = $1 "
        "AND debit_wallet NOT LIKE 'system:%' AND id > $2 AND kind IN ('usage', 'adjustment') "
        "AND usage_event_id IS NOT NULL "
        "UNION ALL "
        "SELECT key, debit_wallet, amount FROM transfers WHERE credit_wallet = $1 "
        "AND credit_wallet NOT LIKE 'system:%' AND id > $2 AND kind = 'adjustment' "
        "AND usage_event_id IS NOT NULL",
        account_wallet,
        after_id,
    )


@functools.lru_cache(maxsize=4096)
def _markups(text: str) -> dict[str, Decimal]:
    """Parsed markups by their JSON text (most accounts share a few): not re-parsed per batch.
    Callers never mutate the dict."""
    return parse_markups(orjson.loads(text))


class Stored(NamedTuple):
    new: bool  # a version not stored before (the newest, or one heard late)
    effective_at: datetime  # when it took effect
    until: datetime | None  # when a later version took over (None: none has)
    superseded: bool  # a later version took effect since ever: this one governs nothing


async def upsert_rebilling(conn: Conn, s: RebillingSettings, currency: str) -> Stored:
    """An account's settings (the newer version wins), its company, and its company in
    ``currency`` if the wallet has not heard of the company yet. Every version is kept in
    ``rebilling_history`` with when it took effect: its ``effective_at``, or, for a version
    that does not say (an older publisher), when the wallet heard it, as before docs/0025."""
    effective: datetime = s.effective_at or await conn.fetchval("SELECT clock_timestamp()")
    markups = orjson.dumps(s.markups).decode()
    new = await conn.fetchval(
        "INSERT INTO rebilling_history (account_id, version, mode, markups, active, effective_at) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6) "
        "ON CONFLICT DO NOTHING RETURNING true",
        s.account_id,
        s.version,
        s.mode,
        markups,
        s.active,
        effective,
    )
    await conn.execute(
        "INSERT INTO rebilling_settings "
        "(account_id, company_id, mode, markups, active, version, effective_at, changes) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, 1) ON CONFLICT (account_id) DO UPDATE SET "
        "company_id = EXCLUDED.company_id, mode = EXCLUDED.mode, markups = EXCLUDED.markups, "
        "active = EXCLUDED.active, version = EXCLUDED.version, "
        "effective_at = EXCLUDED.effective_at, updated_at = now(), "
        "changes = rebilling_settings.changes + $8::int "
        "WHERE rebilling_settings.version <= EXCLUDED.version",
        s.account_id,
        s.company_id,
        s.mode,
        markups,
        s.active,
        s.version,
        effective,
        1 if new else 0,
    )
    later = None
    if new:  # a version heard late counts as a change too
        await conn.execute(
            "UPDATE rebilling_settings SET changes = changes + 1 WHERE account_id = $1 AND version > $2",
            s.account_id,
            s.version,
        )
        later = await conn.fetchrow(
            "SELECT bool_or(effective_at = '-infinity') AS since_ever, "
            "min(effective_at) FILTER (WHERE effective_at > '-infinity') AS until "
            "FROM rebilling_history WHERE account_id = $1 AND version > $2",
            s.account_id,
            s.version,
        )
    await upsert_account(conn, s.account_id, s.company_id)
    await conn.execute(
        "INSERT INTO companies (company_id, stripe_connected, currency) VALUES ($1, $2, $3) "
        "ON CONFLICT (company_id) DO NOTHING",
        s.company_id,
        s.company_stripe_connected,
        currency,
    )
    return Stored(
        bool(new),
        effective,
        later["until"] if later else None,
        bool(later["since_ever"]) if later else False,
    )


async def delete_rebilling(conn: Conn, account_id: str) -> None:
    await conn.execute("DELETE FROM rebilling_settings WHERE account_id = $1", account_id)


async def upsert_company(conn: Conn, c: CompanyUpdated) -> None:
    await conn.execute(
        "INSERT INTO companies (company_id, currency, stripe_connected) VALUES ($1, $2, $3) "
        "ON CONFLICT (company_id) DO UPDATE SET currency = EXCLUDED.currency, "
        "stripe_connected = EXCLUDED.stripe_connected, updated_at = now()",
        c.company_id,
        c.currency,
        c.stripe_connected,
    )


async def upsert_account(conn: Conn, account_id: str, company_id: str, licenses: int | None = None) -> None:
    """An account's company (and licenses, when told). If a record naming another company came
    first (and rebilling has since said otherwise), the account's wallet follows its company,
    and rebilling settings under the other company are dropped (whatever their version, they
    are not this company's)."""
    await conn.execute(
        "UPDATE wallets SET company_id = $2, updated_at = now() WHERE id = $1 AND company_id <> $2",
        account_wallet_id(account_id),
        company_id,
    )
    dropped = await conn.fetchval(
        "DELETE FROM rebilling_settings WHERE account_id = $1 AND company_id <> $2 RETURNING 1",
        account_id,
        company_id,
    )
    if dropped:
        await conn.execute("DELETE FROM rebilling_history WHERE account_id = $1", account_id)
    await conn.execute(
        "INSERT INTO accounts (account_id, company_id, licenses) VALUES ($1, $2, $3) "
        "ON CONFLICT (account_id) DO UPDATE SET company_id = EXCLUDED.company_id, "
        "licenses = COALESCE(EXCLUDED.licenses, accounts.licenses), updated_at = now()",
        account_id,
        company_id,
        licenses,
    )


@dataclass(frozen=True)
class AccountInfo:
    account_id: str
    company_id: str | None
    licenses: int | None


async def account_info(conn: Conn, account_id: str) -> AccountInfo:
    """Which company an account belongs to, from whatever the wallet has heard of it."""
    r = await conn.fetchrow("SELECT company_id, licenses FROM accounts WHERE account_id = $1", account_id)
    if r:
        return AccountInfo(account_id, r["company_id"], r["licenses"])
    company = await conn.fetchval(
        "SELECT company_id FROM wallets WHERE id = $1", account_wallet_id(account_id)
    )
    return AccountInfo(account_id, company, None)


async def company_currency(conn: Conn, company_id: str) -> str | None:
    """The company's currency as rebilling.events told it (None: not heard of yet)."""
    value = await conn.fetchval("SELECT currency FROM companies WHERE company_id = $1", company_id)
    return str(value) if value is not None else None


async def company_funding(conn: Conn, company_id: str) -> tuple[str, bool]:
    """(currency, stripe_connected) of a company; USD and not connected when unknown."""
    r = await conn.fetchrow(
        "SELECT currency, stripe_connected FROM companies WHERE company_id = $1", company_id
    )
    return (r["currency"], r["stripe_connected"]) if r else ("USD", False)


async def update_wallet_settings(conn: Conn, wallet_id: str, changes: dict[str, Any]) -> None:
    allowed = {"threshold", "reload_amount", "auto_recharge", "smart_adjustment"}
    assert set(changes) <= allowed
    if not changes:
        return
    cols = list(changes)
    sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(cols, start=2))
    threshold = f"${cols.index('threshold') + 2}" if "threshold" in changes else "threshold"
    # Armed means "the next debit below the threshold is a crossing": true exactly when the
    # balance is at or above the threshold now. A wallet disarmed by a crossing while
    # auto-recharge was off, then credited to between the new and the old threshold, would
    # otherwise never cross again (found by the lifecycle model); one below its new threshold
    # is re-evaluated by the settings event itself.
    await conn.execute(
        f"UPDATE wallets SET {sets}, threshold_armed = balance >= {threshold}, "
        f"updated_at = now() WHERE id = $1",
        wallet_id,
        *changes.values(),
    )


# --- credit requests -----------------------------------------------------------------------

_CR_COLS = (
    "id, account_id, company_id, amount, currency, reference, status, requested_by, "
    "resolved_by, created_at, resolved_at, seq"
)


async def insert_credit_request(
    conn: Conn,
    *,
    id_: str,
    account_id: str,
    company_id: str,
    amount: int,
    currency: str,
    reference: str | None,
    requested_by: str,
) -> asyncpg.Record | None:
    """None when the account already has a pending request (one at a time)."""
    return await conn.fetchrow(
        f"INSERT INTO credit_requests (id, account_id, company_id, amount, currency, reference, "
        f"status, requested_by) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7) "
        f"ON CONFLICT (account_id) WHERE status = 'pending' DO NOTHING RETURNING {_CR_COLS}",
        id_,
        account_id,
        company_id,
        amount,
        currency,
        reference,
        requested_by,
    )


async def get_credit_request(conn: Conn, rid: str, *, lock: bool = False) -> asyncpg.Record | None:
    suffix = " FOR UPDATE" if lock else ""
    return await conn.fetchrow(f"SELECT {_CR_COLS} FROM credit_requests WHERE id = $1{suffix}", rid)


async def resolve_credit_request(conn: Conn, rid: str, status: str, by: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"UPDATE credit_requests SET status = $2, resolved_by = $3, resolved_at = now() "
        f"WHERE id = $1 RETURNING {_CR_COLS}",
        rid,
        status,
        by,
    )
    assert row is not None
    return row


async def list_credit_requests(
    conn: Conn, company_id: str, status: str | None, *, limit: int, before_seq: int | None
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_CR_COLS} FROM credit_requests WHERE company_id = $1 "
        f"AND ($2::text IS NULL OR status = $2) AND seq < $3 ORDER BY seq DESC LIMIT $4",
        company_id,
        status,
        before_seq if before_seq is not None else 2**62,
        limit,
    )

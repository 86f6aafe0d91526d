"""usage-meter's tables: prices, ingestion dedupe, suspended wallets, usage waiting for rebilling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from tally import outbox
from tally.db import Conn
from tally.directory import Facts
from tally_usage_meter.domain import Price


async def load_prices(conn: Conn) -> dict[tuple[str, str], Price]:
    """The catalog by (service, currency)."""
    rows = await conn.fetch("SELECT service, unit, unit_price_micros, currency FROM prices")
    return {
        (r["service"], r["currency"]): Price(r["service"], r["unit"], r["unit_price_micros"], r["currency"])
        for r in rows
    }


async def upsert_price(conn: Conn, price: Price) -> None:
    await conn.execute(
        "INSERT INTO prices (service, unit, unit_price_micros, currency) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (service, currency) DO UPDATE SET unit = EXCLUDED.unit, "
        "unit_price_micros = EXCLUDED.unit_price_micros, updated_at = now()",
        price.service,
        price.unit,
        price.unit_price_micros,
        price.currency,
    )


async def claim_event_ids(
    conn: Conn, event_ids: Sequence[str], company_ids: Sequence[str]
) -> set[tuple[str, str]]:
    """Record first sightings of each company's event ids; returns the ``(company_id,
    event_id)`` of those that are new (the others are duplicates). An event id is unique
    within its company: the same id from another company is another event (migration 0004)."""
    if not event_ids:
        return set()
    rows = await conn.fetch(
        "INSERT INTO ingested (event_id, company_id) "
        "SELECT * FROM unnest($1::text[], $2::text[]) AS c(e, o) ORDER BY e, o "
        "ON CONFLICT DO NOTHING RETURNING company_id, event_id",
        list(event_ids),
        list(company_ids),
    )
    return {(r["company_id"], r["event_id"]) for r in rows}


# Claims go in key order (event id, then company: migration 0004): two groups claiming the
# same ids wait for each other in one order, never in a ring (a deadlock that aborted a
# whole group: #20's review).
_CLAIM_ALL = (
    "claimed AS (INSERT INTO ingested (event_id, company_id) "
    "SELECT * FROM unnest($1::text[], $2::text[]) AS c(e, o) ORDER BY e, o)"
)


async def record_all_new(
    conn: Conn, event_ids: Sequence[str], company_ids: Sequence[str], rows: Sequence[outbox.Row]
) -> int:
    """Claim ``event_ids``, all new, and write their messages ``rows`` in one statement: it
    commits whole or not at all, so it needs no transaction (two round trips fewer than
    ``claim_event_ids`` and ``outbox.enqueue`` in one). Returns the outbox row's id.
    ``asyncpg.UniqueViolationError`` when any was claimed before: then nothing is written,
    and the caller takes that way instead."""
    written: int = await conn.fetchval(
        outbox.written_with(_CLAIM_ALL, 3), list(event_ids), list(company_ids), *outbox.packed(rows)
    )
    return written


async def forget_ingested(conn: Conn, older_than: timedelta, limit: int) -> int:
    """Forget up to ``limit`` event ids received more than ``older_than`` ago; returns how many
    (BRIN on received_at finds them: migration 0002)."""
    status = await conn.execute(
        "DELETE FROM ingested WHERE ctid = ANY(ARRAY("
        "  SELECT ctid FROM ingested WHERE received_at < now() - $1::interval LIMIT $2))",
        older_than,
        limit,
    )
    return int(status.split()[-1])


async def seen(conn: Conn, event_ids: Sequence[str], company_ids: Sequence[str]) -> set[tuple[str, str]]:
    """The ``(company_id, event_id)`` of the events accepted before, in any earlier batch."""
    if not event_ids:
        return set()
    rows = await conn.fetch(
        "SELECT i.company_id, i.event_id FROM ingested i "
        "JOIN unnest($1::text[], $2::text[]) AS c(e, o) ON i.event_id = c.e AND i.company_id = c.o",
        list(event_ids),
        list(company_ids),
    )
    return {(r["company_id"], r["event_id"]) for r in rows}


@dataclass(frozen=True)
class Known:
    """What this service knows of a batch's companies and accounts."""

    suspended: set[tuple[str, str]]  # (owner, owner_id) of suspended wallets
    currencies: dict[str, str]  # company -> currency, for companies rebilling announced
    owners: dict[str, str]  # account -> company, for accounts rebilling announced
    prices: dict[tuple[str, str], Price] = field(default_factory=dict)  # the catalog, now


async def known(
    conn: Conn,
    company_ids: Sequence[str],
    account_ids: Sequence[str],
    facts: Facts | None = None,
) -> Known:
    """Suspensions, currencies and accounts' companies for a batch, and the price catalog, in
    one round trip (the catalog was a round trip of its own per batch: #20). With ``facts``,
    the currencies and companies already known are not looked up again (they never change),
    and what the tables tell is added to them."""
    companies, accounts = list(set(company_ids)), list(set(account_ids))
    if facts is None:
        currencies: dict[str, str] = {}
        owners: dict[str, str] = {}
        ask_companies, ask_accounts = companies, accounts
    else:
        currencies, ask_companies = facts.recall("company", companies)
        owners, ask_accounts = facts.recall("account", accounts)
    rows = await conn.fetch(
        "SELECT 's' AS k, owner AS a, owner_id AS b, NULL AS c, NULL::bigint AS d "
        "FROM suspended_wallets "
        "WHERE (owner = 'company' AND owner_id = ANY($1::text[])) "
        "   OR (owner = 'account' AND owner_id = ANY($2::text[])) "
        "UNION ALL SELECT 'c', company_id, currency, NULL, NULL FROM companies "
        "WHERE company_id = ANY($3::text[]) "
        "UNION ALL SELECT 'a', account_id, company_id, NULL, NULL FROM accounts "
        "WHERE account_id = ANY($4::text[]) "
        "UNION ALL SELECT 'p', service, currency, unit, unit_price_micros FROM prices",
        companies,
        accounts,
        ask_companies,
        ask_accounts,
    )
    out = Known(set(), {}, {})
    for r in rows:
        k = r["k"]
        if k == "p":
            out.prices[(r["a"], r["b"])] = Price(r["a"], r["c"], r["d"], r["b"])
        elif k == "s":
            out.suspended.add((r["a"], r["b"]))
        elif k == "c":
            out.currencies[r["a"]] = r["b"]
        else:
            out.owners[r["a"]] = r["b"]
    if facts is not None:
        facts.learn("company", out.currencies)
        facts.learn("account", out.owners)
        out.currencies.update(currencies)
        out.owners.update(owners)
    return out


async def set_suspended(conn: Conn, owner: str, owner_id: str, suspended: bool) -> None:
    if suspended:
        await conn.execute(
            "INSERT INTO suspended_wallets (owner, owner_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            owner,
            owner_id,
        )
    else:
        await conn.execute(
            "DELETE FROM suspended_wallets WHERE owner = $1 AND owner_id = $2", owner, owner_id
        )


# --- what rebilling tells us ---------------------------------------------------------------


async def upsert_company(conn: Conn, company_id: str, currency: str) -> None:
    await conn.execute(
        "INSERT INTO companies (company_id, currency) VALUES ($1, $2) ON CONFLICT (company_id) "
        "DO UPDATE SET currency = EXCLUDED.currency, updated_at = now()",
        company_id,
        currency,
    )


async def upsert_account(conn: Conn, account_id: str, company_id: str) -> None:
    await conn.execute(
        "INSERT INTO accounts (account_id, company_id) VALUES ($1, $2) ON CONFLICT (account_id) "
        "DO UPDATE SET company_id = EXCLUDED.company_id",
        account_id,
        company_id,
    )


# --- usage.ingest records waiting for rebilling (migration 0005) ---------------------------


class Deferred(NamedTuple):
    """A ``usage.ingest`` record as it came (what ``tally.consumer.dlq_row`` reads of a
    record), kept until rebilling answers about its company or account."""

    company_id: str
    event_id: str
    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    traceparent: str | None
    prices: str  # its service's prices when it came: JSON [[currency, unit, micros], ...]
    deferred_at: datetime  # when it came: its batch's first try, before rebilling was waited for


_KEPT = Deferred._fields


async def defer(conn: Conn, waiting: Sequence[Deferred]) -> int:
    """Keep ``waiting``; an event already waiting keeps its first record. Returns how many
    were added."""
    if not waiting:
        return 0
    status = await conn.execute(
        "INSERT INTO ingest_deferred (company_id, event_id, value, record_key, topic, "
        "source_partition, source_offset, traceparent, prices, deferred_at) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[], "
        "$6::int[], $7::bigint[], $8::text[], $9::text[], $10::timestamptz[]) ON CONFLICT DO NOTHING",
        *([getattr(d, field) for d in waiting] for field in _KEPT),
    )
    return int(status.split()[-1])


async def take_deferred(conn: Conn, limit: int) -> list[Deferred]:
    """The oldest waiting records, up to ``limit``, locked for the caller's transaction (a
    replica taking the others skips these)."""
    rows = await conn.fetch(
        "SELECT company_id, event_id, value, record_key, topic, source_partition, source_offset, "
        "traceparent, prices, deferred_at FROM ingest_deferred ORDER BY deferred_at, company_id, event_id "
        "LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return [Deferred(*r) for r in rows]


async def forget_deferred(conn: Conn, done: Sequence[Deferred]) -> None:
    if not done:
        return
    await conn.execute(
        "DELETE FROM ingest_deferred d USING unnest($1::text[], $2::text[]) AS v(c, e) "
        "WHERE d.company_id = v.c AND d.event_id = v.e",
        [d.company_id for d in done],
        [d.event_id for d in done],
    )


async def deferred_count(conn: Conn) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM ingest_deferred")
    return count

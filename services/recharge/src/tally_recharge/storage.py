"""recharge's tables: customers, payment methods, attempts (with their tries), the companies and
accounts it has heard of, and per-wallet policy state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from tally.db import Conn
from tally_recharge.domain import Card

_ATTEMPT_COLS = (
    "id, wallet_id, owner, company_id, account_id, trigger, amount_micros, currency, "
    "status, tries::text AS tries, stripe_account, charged_minor, payment_intent, "
    "payment_method, fee_micros, reload_micros, smart_adjustment, round, not_before, "
    "error, created_at, updated_at, seq, purpose, description, traceparent"
)


@dataclass
class Attempt:
    id: str
    wallet_id: str
    owner: str
    company_id: str
    account_id: str | None
    trigger: str
    amount_micros: int
    currency: str
    status: str
    tries: list[dict[str, Any]]
    stripe_account: str | None
    payment_intent: str | None
    payment_method: str | None
    fee_micros: int | None
    reload_micros: int | None
    smart_adjustment: bool
    round: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    seq: int
    purpose: str = "wallet"
    description: str | None = None
    traceparent: str | None = None
    charged_minor: int | None = None  # what the card was charged, in the currency's minor unit


def _attempt(r: asyncpg.Record) -> Attempt:
    return Attempt(
        id=r["id"],
        wallet_id=r["wallet_id"],
        owner=r["owner"],
        company_id=r["company_id"],
        account_id=r["account_id"],
        trigger=r["trigger"],
        amount_micros=r["amount_micros"],
        currency=r["currency"],
        status=r["status"],
        tries=orjson.loads(r["tries"]),
        stripe_account=r["stripe_account"],
        payment_intent=r["payment_intent"],
        payment_method=r["payment_method"],
        fee_micros=r["fee_micros"],
        reload_micros=r["reload_micros"],
        smart_adjustment=r["smart_adjustment"],
        round=r["round"],
        error=r["error"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        seq=r["seq"],
        purpose=r["purpose"],
        description=r["description"],
        traceparent=r["traceparent"],
        charged_minor=r["charged_minor"],
    )


async def insert_attempt(conn: Conn, a: dict[str, Any]) -> Attempt | None:
    """None when the wallet already has a recharge in flight (one at a time). With
    ``lease_token`` (and ``lease_seconds``) the attempt is created leased to its creator, who
    runs it at once: the background charger never takes it from under them."""
    r = await conn.fetchrow(
        f"INSERT INTO recharge_attempts (id, wallet_id, owner, company_id, account_id, trigger, "
        f"amount_micros, currency, status, stripe_account, reload_micros, smart_adjustment, "
        f"round, not_before, purpose, description, traceparent, lease_token, leased_until) "
        f"VALUES ($1, $2, $3, $4, $5, "
        f"$6, $7, $8, 'pending', $9, $10, $11, $12, COALESCE($13, now()), $14, $15, $16, $17, "
        f"CASE WHEN $17::text IS NULL THEN NULL "
        f"ELSE now() + make_interval(secs => $18::int) END) "
        f"ON CONFLICT (wallet_id) WHERE status = 'pending' AND trigger = 'auto' "
        f"DO NOTHING "
        f"RETURNING {_ATTEMPT_COLS}",
        a["id"],
        a["wallet_id"],
        a["owner"],
        a["company_id"],
        a.get("account_id"),
        a["trigger"],
        a["amount_micros"],
        a["currency"],
        a.get("stripe_account"),
        a.get("reload_micros"),
        a.get("smart_adjustment", False),
        a.get("round", 1),
        a.get("not_before"),
        a.get("purpose", "wallet"),
        a.get("description"),
        a.get("traceparent"),
        a.get("lease_token"),
        a.get("lease_seconds", 0),
    )
    return _attempt(r) if r else None


async def lease_due_attempt(conn: Conn, lease_seconds: int, token: str) -> Attempt | None:
    """Take the next due pending attempt for ``lease_seconds`` (other replicas skip it); only
    the holder of ``token`` may settle it (``finish_attempt``)."""
    r = await conn.fetchrow(
        f"UPDATE recharge_attempts SET leased_until = now() + make_interval(secs => $1), "
        f"lease_token = $2 "
        f"WHERE id = (SELECT id FROM recharge_attempts WHERE status = 'pending' "
        f"  AND not_before <= now() AND (leased_until IS NULL OR leased_until < now()) "
        f"  ORDER BY not_before LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {_ATTEMPT_COLS}",
        lease_seconds,
        token,
    )
    return _attempt(r) if r else None


async def lease_attempt(conn: Conn, attempt_id: str, lease_seconds: int, token: str) -> Attempt | None:
    r = await conn.fetchrow(
        f"UPDATE recharge_attempts SET leased_until = now() + make_interval(secs => $2), "
        f"lease_token = $3 "
        f"WHERE id = $1 AND status = 'pending' AND (leased_until IS NULL OR leased_until < now()) "
        f"RETURNING {_ATTEMPT_COLS}",
        attempt_id,
        lease_seconds,
        token,
    )
    return _attempt(r) if r else None


async def renew_lease(conn: Conn, attempt_id: str, lease_seconds: int, token: str) -> bool:
    """Extend a lease still held; False when it was lost (another replica may run it now)."""
    status = await conn.execute(
        "UPDATE recharge_attempts SET leased_until = now() + make_interval(secs => $2) "
        "WHERE id = $1 AND status = 'pending' AND lease_token = $3",
        attempt_id,
        lease_seconds,
        token,
    )
    return status.endswith(" 1")


async def get_attempt(conn: Conn, attempt_id: str) -> Attempt | None:
    r = await conn.fetchrow(f"SELECT {_ATTEMPT_COLS} FROM recharge_attempts WHERE id = $1", attempt_id)
    return _attempt(r) if r else None


class LeaseLost(Exception):
    """The attempt is no longer pending under this lease: another run settled or took it."""


async def save_tries(conn: Conn, attempt_id: str, tries: list[dict[str, Any]], token: str) -> None:
    status = await conn.execute(
        "UPDATE recharge_attempts SET tries = $2::jsonb, updated_at = now() "
        "WHERE id = $1 AND status = 'pending' AND lease_token = $3",
        attempt_id,
        orjson.dumps(tries).decode(),
        token,
    )
    if not status.endswith(" 1"):
        raise LeaseLost(attempt_id)


async def finish_attempt(
    conn: Conn,
    attempt_id: str,
    token: str,
    *,
    status: str,
    tries: list[dict[str, Any]],
    payment_intent: str | None = None,
    payment_method: str | None = None,
    charged_minor: int | None = None,
    fee_micros: int | None = None,
    error: str | None = None,
) -> None:
    """Settle an attempt, only while it is pending and leased with ``token`` (LeaseLost
    otherwise: the caller's transaction rolls back and publishes nothing)."""
    done = await conn.execute(
        "UPDATE recharge_attempts SET status = $2, tries = $3::jsonb, payment_intent = $4, "
        "payment_method = $5, charged_minor = $6, fee_micros = $7, error = $8, "
        "leased_until = NULL, updated_at = now() "
        "WHERE id = $1 AND status = 'pending' AND lease_token = $9",
        attempt_id,
        status,
        orjson.dumps(tries).decode(),
        payment_intent,
        payment_method,
        charged_minor,
        fee_micros,
        error,
        token,
    )
    if not done.endswith(" 1"):
        raise LeaseLost(attempt_id)


async def postpone_attempt(
    conn: Conn,
    attempt_id: str,
    token: str,
    seconds: int,
    error: str,
    tries: list[dict[str, Any]] | None = None,
) -> None:
    """Give the lease back and run the attempt again in ``seconds`` (only its holder may: a
    run that lost its lease must not free one another replica holds)."""
    await conn.execute(
        "UPDATE recharge_attempts SET not_before = now() + make_interval(secs => $2), "
        "leased_until = NULL, error = $3, tries = COALESCE($4::jsonb, tries), updated_at = now() "
        "WHERE id = $1 AND status = 'pending' AND lease_token = $5",
        attempt_id,
        seconds,
        error,
        orjson.dumps(tries).decode() if tries is not None else None,
        token,
    )


async def reprice_attempt(
    conn: Conn, attempt_id: str, token: str, *, amount_micros: int, reload_micros: int, smart_adjustment: bool
) -> None:
    """The amount of an automatic recharge, computed when it is charged."""
    done = await conn.execute(
        "UPDATE recharge_attempts SET amount_micros = $2, reload_micros = $3, "
        "smart_adjustment = $4, updated_at = now() "
        "WHERE id = $1 AND status = 'pending' AND lease_token = $5 AND tries = '[]'::jsonb",
        attempt_id,
        amount_micros,
        reload_micros,
        smart_adjustment,
        token,
    )
    if not done.endswith(" 1"):
        raise LeaseLost(attempt_id)


async def cancel_attempt(conn: Conn, attempt_id: str, reason: str) -> bool:
    """Drop a pending recharge no card was charged for yet."""
    status = await conn.execute(
        "UPDATE recharge_attempts SET status = 'cancelled', error = $2, leased_until = NULL, "
        "updated_at = now() WHERE id = $1 AND status = 'pending' AND tries = '[]'::jsonb",
        attempt_id,
        reason,
    )
    return status.endswith(" 1")


async def mark_credited(conn: Conn, attempt_id: str) -> None:
    await conn.execute(
        "UPDATE recharge_attempts SET credited_at = now() WHERE id = $1 AND credited_at IS NULL", attempt_id
    )


async def in_flight(conn: Conn, wallet_id: str) -> list[Attempt]:
    """The wallet's recharges in flight: pending (waiting, running or a retry to come), or
    succeeded and not yet credited by the wallet."""
    rows = await conn.fetch(
        f"SELECT {_ATTEMPT_COLS} FROM recharge_attempts WHERE wallet_id = $1 "
        f"AND purpose = 'wallet' AND (status = 'pending' OR "
        f"(status = 'succeeded' AND credited_at IS NULL))",
        wallet_id,
    )
    return [_attempt(r) for r in rows]


async def bring_forward(conn: Conn, wallet_id: str) -> None:
    """A new or newly default card: a retry waiting for its time runs now."""
    await conn.execute(
        "UPDATE recharge_attempts SET not_before = now() WHERE wallet_id = $1 "
        "AND status = 'pending' AND trigger = 'auto' AND not_before > now()",
        wallet_id,
    )


# --- checks of the auto-recharge rule --------------------------------------------------------


@dataclass(frozen=True)
class Check:
    wallet_id: str
    owner: str
    company_id: str
    account_id: str | None
    traceparent: str | None = None


async def queue_check(
    conn: Conn, owner: str, company_id: str, account_id: str | None, traceparent: str | None = None
) -> None:
    """Evaluate the rule for this wallet soon (one queued check per wallet; it continues the
    trace of the latest trigger that has one: the one that makes the rule hold)."""
    wallet_id = f"account:{account_id}" if owner == "account" else f"company:{company_id}"
    await conn.execute(
        "INSERT INTO recharge_checks (wallet_id, owner, company_id, account_id, traceparent) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (wallet_id) DO UPDATE SET not_before = now(), "
        "traceparent = COALESCE(EXCLUDED.traceparent, recharge_checks.traceparent)",
        wallet_id,
        owner,
        company_id,
        account_id,
        traceparent,
    )


async def take_due_check(conn: Conn) -> Check | None:
    """In the caller's transaction: lock the next due check (others skip it); delete it with
    ``done_check`` in the same transaction once evaluated."""
    r = await conn.fetchrow(
        "SELECT wallet_id, owner, company_id, account_id, traceparent FROM recharge_checks "
        "WHERE not_before <= now() ORDER BY not_before LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
    return (
        Check(r["wallet_id"], r["owner"], r["company_id"], r["account_id"], r["traceparent"]) if r else None
    )


async def done_check(conn: Conn, wallet_id: str) -> None:
    await conn.execute("DELETE FROM recharge_checks WHERE wallet_id = $1", wallet_id)


async def postpone_check(conn: Conn, wallet_id: str, seconds: int) -> None:
    await conn.execute(
        "UPDATE recharge_checks SET not_before = now() + make_interval(secs => $2) WHERE wallet_id = $1",
        wallet_id,
        seconds,
    )


async def list_attempts(conn: Conn, wallet_id: str, *, limit: int, before_seq: int | None) -> list[Attempt]:
    rows = await conn.fetch(
        f"SELECT {_ATTEMPT_COLS} FROM recharge_attempts WHERE wallet_id = $1 AND seq < $2 "
        f"ORDER BY seq DESC LIMIT $3",
        wallet_id,
        before_seq if before_seq is not None else 2**62,
        limit,
    )
    return [_attempt(r) for r in rows]


async def recent_auto_successes(conn: Conn, wallet_id: str, since: datetime) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM recharge_attempts r, wallet_policy p WHERE r.wallet_id = $1 "
            "AND p.wallet_id = r.wallet_id AND r.trigger = 'auto' AND r.status = 'succeeded' "
            "AND r.updated_at > $2 AND r.updated_at > p.tier_since",
            wallet_id,
            since,
        )
    )


async def policy(conn: Conn, wallet_id: str) -> tuple[int, datetime, bool]:
    """(consecutive failures, tier raised at, cancelling) of a wallet, its row locked: checks
    and settlements of one wallet go one at a time."""
    await conn.execute("INSERT INTO wallet_policy (wallet_id) VALUES ($1) ON CONFLICT DO NOTHING", wallet_id)
    r = await conn.fetchrow(
        "SELECT consecutive_failures, tier_since, cancelling FROM "
        "wallet_policy WHERE wallet_id = $1 FOR UPDATE",
        wallet_id,
    )
    assert r is not None
    return r["consecutive_failures"], r["tier_since"], r["cancelling"]


async def set_policy(
    conn: Conn,
    wallet_id: str,
    *,
    failures: int | None = None,
    tier_raised: bool = False,
    cancelling: bool | None = None,
) -> None:
    if failures is not None:
        await conn.execute(
            "UPDATE wallet_policy SET consecutive_failures = $2 WHERE wallet_id = $1", wallet_id, failures
        )
    if tier_raised:
        await conn.execute("UPDATE wallet_policy SET tier_since = now() WHERE wallet_id = $1", wallet_id)
    if cancelling is not None:
        await conn.execute(
            "UPDATE wallet_policy SET cancelling = $2 WHERE wallet_id = $1", wallet_id, cancelling
        )


# --- customers and cards -------------------------------------------------------------------


async def customer(
    conn: Conn, owner: str, owner_id: str, stripe_account: str | bool | None = False
) -> str | None:
    """The owner's Stripe customer; with ``stripe_account`` given (None: the platform's), only
    one on that account (an account's customer on a Stripe account its company left is none)."""
    r = await conn.fetchrow(
        "SELECT stripe_customer_id, stripe_account FROM customers WHERE owner = $1 AND owner_id = $2",
        owner,
        owner_id,
    )
    if r is None or (stripe_account is not False and r["stripe_account"] != stripe_account):
        return None
    return str(r["stripe_customer_id"])


async def save_customer(
    conn: Conn, owner: str, owner_id: str, company_id: str, stripe_account: str | None, customer_id: str
) -> str:
    """Keeps the first customer recorded for an owner on one Stripe account (concurrent
    creations: one wins); one on another account is replaced."""
    value = await conn.fetchval(
        "INSERT INTO customers (owner, owner_id, company_id, stripe_account, stripe_customer_id) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, owner_id) DO UPDATE "
        "SET stripe_account = EXCLUDED.stripe_account, "
        "stripe_customer_id = EXCLUDED.stripe_customer_id "
        "WHERE customers.stripe_account IS DISTINCT FROM EXCLUDED.stripe_account "
        "RETURNING stripe_customer_id",
        owner,
        owner_id,
        company_id,
        stripe_account,
        customer_id,
    )
    if value is None:  # the same account's customer was there first: keep it
        value = await conn.fetchval(
            "SELECT stripe_customer_id FROM customers WHERE owner = $1 AND owner_id = $2", owner, owner_id
        )
    return str(value)


async def connected_account(conn: Conn, company_id: str) -> str | None:
    """In the caller's transaction: the company's connected Stripe account, share-locked so a
    change of connection (``upsert_company`` locks the row for update) waits for the caller."""
    value = await conn.fetchval(
        "SELECT stripe_account_id FROM companies WHERE company_id = $1 FOR SHARE", company_id
    )
    return str(value) if value else None


_PM_COLS = (
    "id, owner, owner_id, company_id, stripe_account, customer_id, brand, last4, "
    "is_default, attached_at, last_succeeded_at, seq"
)


async def lock_owner_cards(conn: Conn, owner: str, owner_id: str) -> None:
    """In the caller's transaction: the owner's cards change one at a time (held to commit)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"payment-methods:{owner}:{owner_id}"
    )


async def has_default(conn: Conn, owner: str, owner_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM payment_methods WHERE owner = $1 AND owner_id = $2 AND is_default)",
            owner,
            owner_id,
        )
    )


async def insert_payment_method(
    conn: Conn,
    *,
    pm: str,
    owner: str,
    owner_id: str,
    company_id: str,
    stripe_account: str | None,
    customer_id: str,
    brand: str | None,
    last4: str | None,
    is_default: bool,
) -> asyncpg.Record:
    """A card saved (again: only its brand is refreshed, ``is_default`` is not touched)."""
    r = await conn.fetchrow(
        f"INSERT INTO payment_methods (id, owner, owner_id, company_id, stripe_account, "
        f"customer_id, brand, last4, is_default) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
        f"ON CONFLICT (id) DO UPDATE SET brand = EXCLUDED.brand RETURNING {_PM_COLS}",
        pm,
        owner,
        owner_id,
        company_id,
        stripe_account,
        customer_id,
        brand,
        last4,
        is_default,
    )
    assert r is not None
    return r


async def payment_methods(conn: Conn, owner: str, owner_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_PM_COLS} FROM payment_methods WHERE owner = $1 AND owner_id = $2 "
        f"ORDER BY is_default DESC, seq DESC",
        owner,
        owner_id,
    )


def cards(rows: list[asyncpg.Record]) -> list[Card]:
    return [Card(r["id"], r["is_default"], r["last_succeeded_at"], r["seq"]) for r in rows]


async def delete_payment_method(conn: Conn, pm: str) -> asyncpg.Record | None:
    """The card removed (its ``owner``, ``owner_id`` and ``is_default``), or None."""
    r: asyncpg.Record | None = await conn.fetchrow(
        "DELETE FROM payment_methods WHERE id = $1 RETURNING owner, owner_id, is_default", pm
    )
    return r


async def default_to_newest(conn: Conn, owner: str, owner_id: str) -> None:
    await conn.execute(
        "UPDATE payment_methods SET is_default = true WHERE id = (SELECT id FROM "
        "payment_methods WHERE owner = $1 AND owner_id = $2 ORDER BY seq DESC LIMIT 1)",
        owner,
        owner_id,
    )


async def make_default(conn: Conn, pm: str, owner: str, owner_id: str) -> None:
    await conn.execute(
        "UPDATE payment_methods SET is_default = false WHERE owner = $1 AND owner_id = $2 AND is_default",
        owner,
        owner_id,
    )
    await conn.execute("UPDATE payment_methods SET is_default = true WHERE id = $1", pm)


async def card_succeeded(conn: Conn, pm: str) -> None:
    await conn.execute("UPDATE payment_methods SET last_succeeded_at = now() WHERE id = $1", pm)


# --- what rebilling tells us ---------------------------------------------------------------


async def upsert_company(conn: Conn, company_id: str, currency: str, stripe_account_id: str | None) -> bool:
    """In the caller's transaction; returns whether the company's connected Stripe account
    changed (connected, disconnected or another account)."""
    before = await conn.fetchrow(
        "SELECT stripe_account_id FROM companies WHERE company_id = $1 FOR UPDATE", company_id
    )
    await conn.execute(
        "INSERT INTO companies (company_id, currency, stripe_account_id) VALUES ($1, $2, $3) "
        "ON CONFLICT (company_id) DO UPDATE SET currency = EXCLUDED.currency, "
        "stripe_account_id = EXCLUDED.stripe_account_id, updated_at = now()",
        company_id,
        currency,
        stripe_account_id,
    )
    previous = before["stripe_account_id"] if before else None
    return bool(previous != stripe_account_id)


async def forget_other_accounts_cards(
    conn: Conn, company_id: str, stripe_account: str
) -> list[asyncpg.Record]:
    """A company that connected another Stripe account: its accounts' customers and cards on
    the previous one cannot be charged through the new one, so they are forgotten (the owners
    save cards again). Returns the removed cards (``id``, ``owner_id``)."""
    await conn.execute(
        "DELETE FROM customers WHERE company_id = $1 AND owner = 'account' "
        "AND stripe_account IS DISTINCT FROM $2",
        company_id,
        stripe_account,
    )
    return await conn.fetch(
        "DELETE FROM payment_methods WHERE company_id = $1 AND owner = 'account' "
        "AND stripe_account IS DISTINCT FROM $2 RETURNING id, owner_id",
        company_id,
        stripe_account,
    )


async def accounts_to_check(conn: Conn, company_id: str) -> list[str]:
    """The company's accounts whose auto-recharge rule a change of connection may flip: those
    with a card or a recharge in flight."""
    rows = await conn.fetch(
        "SELECT owner_id AS account_id FROM payment_methods WHERE company_id = $1 "
        "AND owner = 'account' UNION SELECT account_id FROM recharge_attempts "
        "WHERE company_id = $1 AND owner = 'account' AND status = 'pending' "
        "ORDER BY account_id",
        company_id,
    )
    return [r["account_id"] for r in rows]


async def known_currency(conn: Conn, company_id: str) -> str | None:
    """The company's currency as rebilling.events told us (None: not heard of yet)."""
    r = await conn.fetchval("SELECT currency FROM companies WHERE company_id = $1", company_id)
    return str(r) if r is not None else None


async def company(conn: Conn, company_id: str) -> tuple[str, str | None]:
    """(currency, connected Stripe account) of a company; USD and None when unknown."""
    r = await conn.fetchrow(
        "SELECT currency, stripe_account_id FROM companies WHERE company_id = $1", company_id
    )
    return (r["currency"], r["stripe_account_id"]) if r else ("USD", None)


async def upsert_account(conn: Conn, account_id: str, company_id: str) -> None:
    await conn.execute(
        "INSERT INTO accounts (account_id, company_id) VALUES ($1, $2) ON CONFLICT (account_id) "
        "DO UPDATE SET company_id = EXCLUDED.company_id",
        account_id,
        company_id,
    )


async def has_other_companies_cards(conn: Conn, account_id: str, company_id: str) -> bool:
    """Whether the account has a customer or a card saved under another company."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM customers WHERE owner = 'account' AND owner_id = $1 "
            "AND company_id <> $2) OR EXISTS (SELECT 1 FROM payment_methods WHERE owner = 'account' "
            "AND owner_id = $1 AND company_id <> $2)",
            account_id,
            company_id,
        )
    )


async def forget_other_companies_cards(conn: Conn, account_id: str, company_id: str) -> None:
    """An account's customer and cards saved under another company than ``company_id``, which
    rebilling says is the account's: saved while a record naming that other company was
    believed, they belong to its Stripe account."""
    await conn.execute(
        "DELETE FROM customers WHERE owner = 'account' AND owner_id = $1 AND company_id <> $2",
        account_id,
        company_id,
    )
    await conn.execute(
        "DELETE FROM payment_methods WHERE owner = 'account' AND owner_id = $1 AND company_id <> $2",
        account_id,
        company_id,
    )


async def account_company(conn: Conn, account_id: str) -> str | None:
    value = await conn.fetchval("SELECT company_id FROM accounts WHERE account_id = $1", account_id)
    return str(value) if value else None

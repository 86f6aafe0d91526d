"""rebilling's tables: companies, accounts, rebilling settings, SaaS plans, reselling, licenses,
members and invitations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from tally.db import Conn

_COMPANY = "id, name, plan, owner_email, currency, stripe_account_id, created_at"
_ACCOUNT = "id, company_id, name, owner_email, billing_model, saas_plan_id, has_valid_card, created_at"


async def insert_company(conn: Conn, c: dict[str, Any]) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"INSERT INTO companies (id, name, plan, owner_email, currency) VALUES ($1, $2, $3, $4, $5) "
        f"ON CONFLICT (id) DO NOTHING RETURNING {_COMPANY}",
        c["id"],
        c["name"],
        c["plan"],
        c["owner_email"],
        c["currency"],
    )


async def pin_currency(conn: Conn, cid: str, currency: str) -> str:
    """The currency money of company ``cid`` is in: the one pinned before (by its creation or
    by money that came first), else ``currency``, pinned now (docs/0027). Writers of one id
    are ordered by the row: a creation and a first charge never both win."""
    pinned = await conn.fetchval(
        "INSERT INTO currency_pins (company_id, currency) VALUES ($1, $2) "
        "ON CONFLICT (company_id) DO UPDATE SET company_id = EXCLUDED.company_id RETURNING currency",
        cid,
        currency,
    )
    assert isinstance(pinned, str)
    return pinned


async def company(conn: Conn, cid: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_COMPANY} FROM companies WHERE id = $1" + (" FOR UPDATE" if lock else ""), cid
    )


async def update_company(conn: Conn, cid: str, **fields: Any) -> asyncpg.Record:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
    r = await conn.fetchrow(
        f"UPDATE companies SET {sets}, updated_at = now() WHERE id = $1 RETURNING {_COMPANY}",
        cid,
        *fields.values(),
    )
    assert r is not None
    return r


async def insert_account(conn: Conn, a: dict[str, Any]) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"INSERT INTO accounts (id, company_id, name, owner_email, billing_model, saas_plan_id) "
        f"VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING {_ACCOUNT}",
        a["id"],
        a["company_id"],
        a["name"],
        a["owner_email"],
        a["billing_model"],
        a.get("saas_plan_id"),
    )


async def account(conn: Conn, aid: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_ACCOUNT} FROM accounts WHERE id = $1" + (" FOR UPDATE" if lock else ""), aid
    )


async def company_accounts(
    conn: Conn, cid: str, *, after: str | None = None, limit: int | None = None
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_ACCOUNT} FROM accounts WHERE company_id = $1 AND ($2::text IS NULL OR "
        f"id > $2) ORDER BY id LIMIT $3",
        cid,
        after,
        limit,
    )


async def companies(conn: Conn, *, after: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_COMPANY} FROM companies WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2",
        after,
        limit,
    )


@dataclass(frozen=True)
class Page:
    """Rows in id order and the cursor to the next page (None: the last page)."""

    items: list[asyncpg.Record]
    next_cursor: str | None


def page(rows: list[asyncpg.Record], limit: int) -> Page:
    """``limit`` rows of the ``limit + 1`` fetched; the cursor is the last one's id when more follow."""
    return Page(rows[:limit], rows[limit - 1]["id"] if len(rows) > limit else None)


async def set_card(conn: Conn, aid: str, has_valid_card: bool) -> bool:
    """Returns whether the account exists."""
    status = await conn.execute("UPDATE accounts SET has_valid_card = $2 WHERE id = $1", aid, has_valid_card)
    return status.endswith(" 1")


# --- rebilling settings --------------------------------------------------------------------


class Settings(NamedTuple):
    """An account's rebilling settings as stored (``off``, version 0: never set)."""

    mode: str
    markups: dict[str, str]
    version: int
    effective_at: datetime | None = None  # when this version took effect


async def rebilling(conn: Conn, aid: str) -> Settings:
    r = await conn.fetchrow(
        "SELECT mode, markups::text AS markups, version, updated_at FROM rebilling WHERE account_id = $1",
        aid,
    )
    if r is None:
        return Settings("off", {}, 0)
    return Settings(r["mode"], orjson.loads(r["markups"]), r["version"], r["updated_at"])


async def save_rebilling(conn: Conn, aid: str, mode: str, markups: dict[str, str]) -> int:
    """Store the settings; returns the new version. A version takes effect when its row is
    written (``clock_timestamp()``, after the row's lock): versions take effect in order."""
    version = await conn.fetchval(
        "INSERT INTO rebilling (account_id, mode, markups, updated_at) "
        "VALUES ($1, $2, $3::jsonb, clock_timestamp()) "
        "ON CONFLICT (account_id) DO UPDATE SET mode = EXCLUDED.mode, markups = EXCLUDED.markups, "
        "version = rebilling.version + 1, updated_at = clock_timestamp() RETURNING version",
        aid,
        mode,
        orjson.dumps(markups).decode(),
    )
    return int(version)


async def bump_rebilling(conn: Conn, aid: str) -> int:
    """A new version with the same settings (e.g. the card arrived: ``active`` changes)."""
    version = await conn.fetchval(
        "UPDATE rebilling SET version = version + 1, updated_at = clock_timestamp() WHERE account_id = $1 "
        "RETURNING version",
        aid,
    )
    return int(version or 0)


async def insert_saas_plan(
    conn: Conn, cid: str, pid: str, name: str, mode: str, markups: dict[str, str]
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "INSERT INTO saas_plans (company_id, id, name, mode, markups) VALUES ($1, $2, $3, $4, "
        "$5::jsonb) ON CONFLICT DO NOTHING RETURNING id, name, mode, markups::text AS markups",
        cid,
        pid,
        name,
        mode,
        orjson.dumps(markups).decode(),
    )


async def saas_plan(conn: Conn, cid: str, pid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, name, mode, markups::text AS markups FROM saas_plans WHERE company_id = $1 AND id = $2",
        cid,
        pid,
    )


# --- reselling -----------------------------------------------------------------------------


async def company_prices(conn: Conn, cid: str) -> dict[str, int]:
    rows = await conn.fetch("SELECT product, price FROM company_prices WHERE company_id = $1", cid)
    return {r["product"]: r["price"] for r in rows}


async def set_company_price(conn: Conn, cid: str, product: str, price: int) -> None:
    await conn.execute(
        "INSERT INTO company_prices (company_id, product, price) VALUES ($1, $2, $3) "
        "ON CONFLICT (company_id, product) DO UPDATE SET price = EXCLUDED.price",
        cid,
        product,
        price,
    )


async def insert_subscription(conn: Conn, s: dict[str, Any]) -> asyncpg.Record:
    r = await conn.fetchrow(
        "INSERT INTO subscriptions (id, account_id, company_id, product, deployment, "
        "platform_price, company_price, first_period) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "RETURNING *",
        s["id"],
        s["account_id"],
        s["company_id"],
        s["product"],
        s["deployment"],
        s["platform_price"],
        s["company_price"],
        s["first_period"],
    )
    assert r is not None
    return r


async def subscription(conn: Conn, sid: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM subscriptions WHERE id = $1" + (" FOR UPDATE" if lock else ""), sid
    )


async def cancel_at_period_end(conn: Conn, sid: str) -> None:
    await conn.execute("UPDATE subscriptions SET cancel_at_period_end = true WHERE id = $1", sid)


async def account_subscriptions(
    conn: Conn, aid: str, *, limit: int, after: str | None, tries: int
) -> list[asyncpg.Record]:
    """An account's subscriptions with what is still owed on them (``outstanding``)."""
    return await conn.fetch(
        "SELECT s.*, COALESCE((SELECT sum(amount) FROM period_legs l WHERE l.subscription_id = "
        "s.id AND l.status <> 'charged'), 0)::bigint AS outstanding, (SELECT min(next_try_at) "
        "FROM period_legs l WHERE l.subscription_id = s.id AND l.status = 'failed' "
        "AND l.failures <= $4) AS next_retry_at, COALESCE((SELECT sum(failures) FROM period_legs l "
        "WHERE l.subscription_id = s.id AND l.status <> 'charged'), 0)::int AS failed_attempts "
        "FROM subscriptions s "
        "WHERE s.account_id = $1 AND ($2::text IS NULL OR s.id > $2) ORDER BY s.id LIMIT $3",
        aid,
        after,
        limit,
        tries,
    )


async def outstanding(conn: Conn, sid: str, tries: int = 1 << 30) -> Dunning:
    """What is still owed on a subscription, and when its next failed leg is tried again
    (legs past their last try, ``tries``, are not)."""
    r = await conn.fetchrow(
        "SELECT COALESCE(sum(amount) FILTER (WHERE status <> 'charged'), 0)::bigint AS owed, "
        "min(next_try_at) FILTER (WHERE status = 'failed' AND failures <= $2) AS retry, "
        "COALESCE(sum(failures) FILTER (WHERE status <> 'charged'), 0)::int AS failed "
        "FROM period_legs WHERE subscription_id = $1",
        sid,
        tries,
    )
    assert r is not None
    return Dunning(int(r["owed"]), r["retry"], r["failed"])


@dataclass(frozen=True)
class Dunning:
    outstanding: int
    next_retry_at: datetime | None
    failed_attempts: int = 0  # failed tries of what is still outstanding


async def open_legs(conn: Conn, sub: asyncpg.Record, period: str, at: Any) -> None:
    """The period's legs of ``sub`` (idempotent): the platform leg (a license pool: the pool's
    total), and the account's leg of a resold subscription with a price; a workspace's seats
    are the account's leg alone (the company's seat price x seats)."""
    if sub["kind"] == "seats":
        if sub["company_price"] * sub["quantity"] > 0:
            await conn.execute(
                "INSERT INTO period_legs (subscription_id, period, leg, company_id, account_id, "
                "amount, status, next_try_at) VALUES ($1, $2, 'account', $3, $4, $5, 'due', $6) "
                "ON CONFLICT DO NOTHING",
                sub["id"],
                period,
                sub["company_id"],
                sub["account_id"],
                sub["company_price"] * sub["quantity"],
                at,
            )
        return
    await conn.execute(
        "INSERT INTO period_legs (subscription_id, period, leg, company_id, account_id, amount, "
        "status, next_try_at) VALUES ($1, $2, 'platform', $3, $4, $5, 'due', $6) "
        "ON CONFLICT DO NOTHING",
        sub["id"],
        period,
        sub["company_id"],
        sub["account_id"],
        sub["platform_price"] * sub["quantity"],
        at,
    )
    if sub["deployment"] == "resell" and sub["company_price"] > 0:
        await conn.execute(
            "INSERT INTO period_legs (subscription_id, period, leg, company_id, account_id, "
            "amount, status, next_try_at) VALUES ($1, $2, 'account', $3, $4, $5, 'due', $6) "
            "ON CONFLICT DO NOTHING",
            sub["id"],
            period,
            sub["company_id"],
            sub["account_id"],
            sub["company_price"],
            at,
        )


async def license_subscription(conn: Conn, cid: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM subscriptions WHERE company_id = $1 "
        "AND kind = 'licenses'" + (" FOR UPDATE" if lock else ""),
        cid,
    )


async def grow_license_subscription(
    conn: Conn, cid: str, quantity: int, unit_price: int, next_period: str
) -> None:
    """The pool's monthly charge covers ``quantity`` more licenses from the next period (the
    current one was charged by the purchase)."""
    await conn.execute(
        "INSERT INTO subscriptions (id, account_id, company_id, product, deployment, "
        "platform_price, company_price, first_period, kind, quantity) VALUES ($1, NULL, $2, "
        "'licenses', 'direct', $3, 0, $4, 'licenses', $5) ON CONFLICT (company_id) "
        "WHERE kind = 'licenses' DO UPDATE SET quantity = subscriptions.quantity + $5, "
        "platform_price = EXCLUDED.platform_price, cancel_at_period_end = false",
        f"lic_{cid}",
        cid,
        unit_price,
        next_period,
        quantity,
    )


async def seat_subscription(conn: Conn, aid: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM subscriptions WHERE account_id = $1 "
        "AND kind = 'seats'" + (" FOR UPDATE" if lock else ""),
        aid,
    )


async def add_seat_to_plan(
    conn: Conn, aid: str, cid: str, seat_price: int, next_period: str, seats: int
) -> asyncpg.Record:
    """One more seat in the workspace's monthly charge, from ``next_period``. A workspace's
    first seat starts its seat subscription; one dunning gave up on starts again with the
    ``seats`` held now (its unpaid periods stay outstanding)."""
    r = await conn.fetchrow(
        "INSERT INTO subscriptions (id, account_id, company_id, product, deployment, "
        "platform_price, company_price, first_period, kind, quantity) VALUES ($1, $2, $3, "
        "'seats', 'resell', 0, $4, $5, 'seats', $6) ON CONFLICT (account_id) "
        "WHERE kind = 'seats' DO UPDATE SET quantity = CASE WHEN subscriptions.status = "
        "'cancelled' THEN $6 ELSE subscriptions.quantity + 1 END, status = CASE WHEN "
        "subscriptions.status = 'cancelled' THEN 'active' ELSE subscriptions.status END, "
        "cancel_reason = NULL, cancelled_at = NULL, cancel_at_period_end = false, "
        "first_period = CASE WHEN subscriptions.status = 'cancelled' THEN $5 "
        "ELSE subscriptions.first_period END RETURNING *",
        f"seats_{aid}",
        aid,
        cid,
        seat_price,
        next_period,
        seats,
    )
    assert r is not None
    return r


async def add_leg(conn: Conn, sub: asyncpg.Record, period: str, leg: str, amount: int, at: Any) -> None:
    await conn.execute(
        "INSERT INTO period_legs (subscription_id, period, leg, company_id, account_id, amount, "
        "status, next_try_at) VALUES ($1, $2, $3, $4, $5, $6, 'due', $7) ON CONFLICT DO NOTHING",
        sub["id"],
        period,
        leg,
        sub["company_id"],
        sub["account_id"],
        amount,
        at,
    )


async def set_seat_price(conn: Conn, cid: str, amount: int) -> None:
    """The company's seat price, for every workspace's seats from the next period opened."""
    await conn.execute("UPDATE companies SET seat_price = $2, updated_at = now() WHERE id = $1", cid, amount)
    await conn.execute(
        "UPDATE subscriptions SET company_price = $2 WHERE company_id = $1 AND kind = 'seats'", cid, amount
    )


async def seat_price(conn: Conn, cid: str) -> int:
    return int(await conn.fetchval("SELECT seat_price FROM companies WHERE id = $1", cid) or 0)


async def insert_purchase(conn: Conn, p: dict[str, Any]) -> asyncpg.Record:
    r = await conn.fetchrow(
        "INSERT INTO license_purchases (id, company_id, quantity, amount, period, status) "
        "VALUES ($1, $2, $3, $4, $5, 'pending') ON CONFLICT (id) DO UPDATE SET id = "
        "EXCLUDED.id RETURNING *",
        p["id"],
        p["company_id"],
        p["quantity"],
        p["amount"],
        p["period"],
    )
    assert r is not None
    return r


async def lock_purchase(conn: Conn, pid: str, *, wait: bool = True) -> asyncpg.Record | None:
    """The purchase, locked, while it is pending (None once settled or taken by another)."""
    return await conn.fetchrow(
        "SELECT * FROM license_purchases WHERE id = $1 AND status = 'pending' FOR UPDATE"
        + ("" if wait else " SKIP LOCKED"),
        pid,
    )


async def purchase(conn: Conn, pid: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM license_purchases WHERE id = $1", pid)


async def settle_purchase(conn: Conn, pid: str, status: str, error: str | None) -> None:
    await conn.execute(
        "UPDATE license_purchases SET status = $2, error = $3, settled_at = now() WHERE id = $1",
        pid,
        status,
        error,
    )


async def pending_purchases(conn: Conn, company_id: str | None = None) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM license_purchases WHERE status = 'pending' "
        "AND ($1::text IS NULL OR company_id = $1) "
        "ORDER BY created_at LIMIT 1000",
        company_id,
    )
    return [r["id"] for r in rows]


async def subscriptions_to_open(
    conn: Conn, period: str, company_id: str | None = None
) -> list[asyncpg.Record]:
    """Subscriptions that run in ``period`` and have no legs for it yet."""
    return await conn.fetch(
        "SELECT * FROM subscriptions s WHERE s.status <> 'cancelled' AND s.first_period <= $1 "
        "AND ($2::text IS NULL OR s.company_id = $2) AND NOT EXISTS (SELECT 1 FROM period_legs "
        "l WHERE l.subscription_id = s.id AND l.period = $1) ORDER BY s.id",
        period,
        company_id,
    )


async def end_subscription(conn: Conn, sid: str, reason: str) -> asyncpg.Record | None:
    """Cancel (once); None when it was already cancelled."""
    return await conn.fetchrow(
        "UPDATE subscriptions SET status = 'cancelled', cancelled_at = now(), cancel_reason = $2 "
        "WHERE id = $1 AND status <> 'cancelled' RETURNING *",
        sid,
        reason,
    )


async def due_legs(
    conn: Conn,
    at: Any,
    *,
    subscription_id: str | None = None,
    company_id: str | None = None,
    limit: int = 100,
) -> list[asyncpg.Record]:
    """Legs to try at ``at``: due or failed, their time come, unless dunning gave up on their
    subscription (one cancelled by its customer still owes what it used)."""
    return await conn.fetch(
        "SELECT l.subscription_id, l.period, l.leg FROM period_legs l JOIN subscriptions s "
        "ON s.id = l.subscription_id WHERE l.status <> 'charged' AND l.next_try_at <= $1 "
        "AND s.cancel_reason IS DISTINCT FROM 'payment_failed' "
        "AND ($2::text IS NULL OR l.subscription_id = $2) "
        "AND ($4::text IS NULL OR l.company_id = $4) "
        "ORDER BY l.next_try_at, l.subscription_id, l.period, l.leg DESC LIMIT $3",
        at,
        subscription_id,
        limit,
        company_id,
    )


async def lock_leg(
    conn: Conn, sid: str, period: str, leg: str, *, wait: bool = False
) -> asyncpg.Record | None:
    """In the caller's transaction: the leg, locked, when it still needs charging; one being
    charged by someone else is skipped (``wait``: waited for, then seen as it ends)."""
    return await conn.fetchrow(
        "SELECT l.*, s.product, s.deployment, s.cancel_reason, s.kind FROM period_legs l "
        "JOIN subscriptions s ON s.id = l.subscription_id WHERE l.subscription_id = $1 "
        "AND l.period = $2 AND l.leg = $3 AND l.status <> 'charged' "
        "FOR UPDATE OF l" + ("" if wait else " SKIP LOCKED"),
        sid,
        period,
        leg,
    )


async def settle_leg(
    conn: Conn,
    leg: asyncpg.Record,
    *,
    status: str,
    failures: int,
    next_try_at: Any,
    error: str | None,
    tried_at: Any,
    cards: Sequence[str] = (),
) -> None:
    await conn.execute(
        "UPDATE period_legs SET status = $4, failures = $5, next_try_at = $6, last_error = $7, "
        "last_try_at = $8, charged_at = CASE WHEN $4 = 'charged' THEN now() END, "
        "tried_cards = $9 WHERE subscription_id = $1 "
        "AND period = $2 AND leg = $3",
        leg["subscription_id"],
        leg["period"],
        leg["leg"],
        status,
        failures,
        next_try_at,
        error,
        tried_at,
        list(cards),
    )


async def set_subscription_status(conn: Conn, sid: str) -> str:
    """``past_due`` while one of its legs has failed and is not charged yet, else ``active``
    (a cancelled subscription stays cancelled)."""
    return str(
        await conn.fetchval(
            "UPDATE subscriptions SET status = CASE WHEN EXISTS (SELECT 1 FROM period_legs WHERE "
            "subscription_id = $1 AND status = 'failed') THEN 'past_due' ELSE 'active' END "
            "WHERE id = $1 AND status <> 'cancelled' RETURNING status",
            sid,
        )
        or "cancelled"
    )


async def retry_now(
    conn: Conn, company_id: str, account_id: str | None, at: Any, card_at: Any, card: str
) -> int:
    """A payer saved or defaulted ``card`` at ``card_at``. Its failed legs whose last try did
    not charge that card are tried at once; a leg whose last try charged it (and saw it decline)
    keeps its schedule, so making the same card default again does not spend the dunning tries.
    Which cards a try charged is recharge's answer (``tried_cards``), not the time: a card saved
    while a try was reading the payer's cards is caught whatever the two services' clocks say.
    A leg being tried or processing now remembers the card (``card_saved_at``), so that if that
    try fails the next follows at once; a leg being tried right now is matched too: its row lock
    makes this wait for the try, then the condition is checked again on its outcome. A leg's
    time only ever comes forward: one already due keeps it (moving it to ``at`` would hide it
    from a caller charging what is due at an earlier instant, e.g. a subscribe charging its
    first period). Returns how many legs are due now."""
    rows = await conn.fetch(
        "UPDATE period_legs SET card_saved_at = GREATEST(card_saved_at, $4), "
        "next_try_at = CASE WHEN status = 'failed' OR next_try_at <= $3 "
        "THEN LEAST(next_try_at, $3) ELSE next_try_at END "
        "WHERE company_id = $1 AND status <> 'charged' AND NOT $5 = ANY(tried_cards) "
        "AND (CASE WHEN $2::text IS NULL THEN leg LIKE 'platform%' ELSE leg LIKE 'account%' "
        "AND account_id = $2 END) RETURNING next_try_at <= $3 AS due",
        company_id,
        account_id,
        at,
        card_at,
        card,
    )
    return sum(1 for r in rows if r["due"])


async def subscription_legs(conn: Conn, sid: str, period: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM period_legs WHERE subscription_id = $1 AND period = $2 ORDER BY leg DESC", sid, period
    )


async def period_legs(conn: Conn, cid: str, period: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT l.*, s.account_id, s.product, s.deployment FROM period_legs l "
        "JOIN subscriptions s ON s.id = l.subscription_id WHERE l.company_id = $1 "
        "AND l.period = $2 AND s.kind = 'product' "
        "ORDER BY s.account_id, s.product, l.subscription_id, l.leg",
        cid,
        period,
    )


# --- licenses, members, invitations --------------------------------------------------------


async def pool(conn: Conn, cid: str, *, lock: bool = False) -> tuple[int, int]:
    """(total, assigned) of the company's license pool."""
    await conn.execute("INSERT INTO license_pools (company_id) VALUES ($1) ON CONFLICT DO NOTHING", cid)
    total = await conn.fetchval(
        "SELECT total FROM license_pools WHERE company_id = $1" + (" FOR UPDATE" if lock else ""), cid
    )
    assigned = await conn.fetchval(
        "SELECT COALESCE(sum(assigned), 0) FROM account_licenses WHERE company_id = $1", cid
    )
    return int(total), int(assigned)


async def add_to_pool(conn: Conn, cid: str, quantity: int) -> None:
    await conn.execute("UPDATE license_pools SET total = total + $2 WHERE company_id = $1", cid, quantity)


async def account_assigned(conn: Conn, aid: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT COALESCE((SELECT assigned FROM account_licenses WHERE account_id = $1), 0)", aid
        )
    )


async def change_assigned(conn: Conn, aid: str, cid: str, delta: int) -> int:
    value = await conn.fetchval(
        "INSERT INTO account_licenses (account_id, company_id, assigned) VALUES ($1, $2, $3) "
        "ON CONFLICT (account_id) DO UPDATE SET assigned = account_licenses.assigned + $3 "
        "RETURNING assigned",
        aid,
        cid,
        delta,
    )
    return int(value)


async def members(conn: Conn, aid: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT email, role, is_agency, joined_at FROM members WHERE account_id = $1 "
        "ORDER BY joined_at, email",
        aid,
    )


async def add_member(conn: Conn, aid: str, email: str, role: str, is_agency: bool) -> None:
    await conn.execute(
        "INSERT INTO members (account_id, email, role, is_agency) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (account_id, email) DO UPDATE SET role = EXCLUDED.role",
        aid,
        email,
        role,
        is_agency,
    )


async def remove_agency_members(conn: Conn, aid: str) -> None:
    await conn.execute("DELETE FROM members WHERE account_id = $1 AND is_agency", aid)


async def pending_invitations(conn: Conn, aid: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM invitations WHERE account_id = $1 AND status = 'pending'", aid
        )
    )


async def insert_invitation(
    conn: Conn, iid: str, aid: str, email: str, role: str, handoff: bool
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "INSERT INTO invitations (id, account_id, email, role, status, handoff) VALUES "
        "($1, $2, $3, $4, 'pending', $5) ON CONFLICT DO NOTHING RETURNING *",
        iid,
        aid,
        email,
        role,
        handoff,
    )


async def invitation(conn: Conn, iid: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM invitations WHERE id = $1" + (" FOR UPDATE" if lock else ""), iid
    )


async def accept_invitation(conn: Conn, iid: str) -> None:
    await conn.execute("UPDATE invitations SET status = 'accepted', accepted_at = now() WHERE id = $1", iid)

"""The notifier's daily usage sums against the real Postgres: rows go in as one JSON parameter
(``storage.add_usage``), so amounts beyond a double's 53 bits and ids with characters JSON
escapes must come out exactly as they went in."""

from __future__ import annotations

from datetime import date

from tally import db
from tally_notifier import storage
from tests.support.stack import Tally, uid


async def test_daily_sums_are_exact_and_ids_arrive_verbatim(tally: Tally) -> None:
    pool = await db.create_pool(tally.stack.database_url, "notifier_usagetest", size=1)
    try:
        await db.migrate(pool, "notifier_usagetest", "tally")
        await db.migrate(pool, "notifier_usagetest", "tally_notifier")
        aid = uid('acc"\\é')  # a quote, a backslash and a non-ASCII letter
        day = date(2026, 11, 21)
        big = 2**53 + 1  # a float would round this to 2**53
        async with pool.acquire() as conn:
            await storage.add_usage(
                conn, [(aid, "co", day, "sms", "USD", big), (aid, "co", day, "ai", "USD", 7)]
            )
            await storage.add_usage(conn, [(aid, "co", day, "sms", "USD", big)])
            by_service, currency = await storage.usage_since(conn, aid, day, day)
            stored = await conn.fetchval(
                "SELECT array_agg(DISTINCT account_id) FROM usage_daily WHERE account_id = $1", aid
            )
        assert by_service == {"sms": 2 * big, "ai": 7}
        assert currency == "USD"
        assert stored == [aid]
    finally:
        await pool.close()


async def test_corrections_subtract_and_neither_bound_overflows(tally: Tally) -> None:
    """A re-rating's corrections are signed (docs/0025): they subtract, and a sum saturates at
    either end of BIGINT instead of failing the batch."""
    pool = await db.create_pool(tally.stack.database_url, "notifier_usagetest", size=1)
    try:
        await db.migrate(pool, "notifier_usagetest", "tally")
        await db.migrate(pool, "notifier_usagetest", "tally_notifier")
        aid, day, top = uid("acc"), date(2026, 12, 5), storage.BIGINT_MAX
        async with pool.acquire() as conn:
            await storage.add_usage(conn, [(aid, "co", day, "sms", "USD", 5)])
            await storage.add_usage(conn, [(aid, "co", day, "sms", "USD", -3)])
            assert (await storage.usage_since(conn, aid, day, day))[0] == {"sms": 2}
            await storage.add_usage(conn, [(aid, "co", day, "ai", "USD", -top)])
            await storage.add_usage(conn, [(aid, "co", day, "ai", "USD", -5)])
            assert (await storage.usage_since(conn, aid, day, day))[0]["ai"] == -top
            await storage.add_usage(conn, [(aid, "co", day, "email", "USD", top)])
            await storage.add_usage(conn, [(aid, "co", day, "email", "USD", 5)])
            assert (await storage.usage_since(conn, aid, day, day))[0]["email"] == top
    finally:
        await pool.close()

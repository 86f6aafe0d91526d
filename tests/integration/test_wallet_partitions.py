"""Wallet replicas share the usage.recorded partitions. Every batch credits the platform's
revenue, so with one revenue wallet each batch's transaction would hold its row until commit
and replicas would commit one at a time. Revenue goes to one wallet per partition instead:
batches of different partitions touch no common wallet (checked with a lock timeout, which
fires only when a transaction has to wait for another's row)."""

from __future__ import annotations

import asyncpg
import pytest

from tally import db
from tally.events import RecordedUsage
from tally_wallet.domain import platform_revenue_wallet_id
from tally_wallet.usage import apply_usage
from tests.support.builders import recorded_usage
from tests.support.stack import Infra, uid

SCHEMA = "wallet_partitions"


def usage(company: str, amount: int) -> RecordedUsage:
    return recorded_usage(company, uid("ev"), amount)


async def test_batches_of_different_partitions_share_no_wallet(infra: Infra) -> None:
    pool = await db.create_pool(infra.stack.database_url, SCHEMA, size=2)
    try:
        await db.migrate(pool, SCHEMA, "tally")
        await db.migrate(pool, SCHEMA, "tally_wallet")
        first = [usage(uid("co"), 700), usage(uid("co"), 300)]
        second = [usage(uid("co"), 5)]
        async with pool.acquire() as one, pool.acquire() as two:
            held = one.transaction()
            await held.start()  # partition 3's batch: its rows stay locked until it commits
            await apply_usage(one, first, partitions={(u.company_id, u.event_id): 3 for u in first})

            async with two.transaction():  # partition 4's batch goes through meanwhile
                await two.execute("SET LOCAL lock_timeout = '2s'")
                await apply_usage(two, second, partitions={(u.company_id, u.event_id): 4 for u in second})

            # The check can fail: another batch of partition 3 has to wait for the first.
            again = [usage(uid("co"), 1)]
            with pytest.raises(asyncpg.LockNotAvailableError):
                async with two.transaction():
                    await two.execute("SET LOCAL lock_timeout = '200ms'")
                    await apply_usage(two, again, partitions={(u.company_id, u.event_id): 3 for u in again})
            await held.commit()

        rows = await pool.fetch(
            "SELECT credit_wallet, sum(amount)::bigint AS amount FROM transfers "
            "WHERE usage_event_id = ANY($1::text[]) GROUP BY 1",
            [u.event_id for u in first + second],
        )
        credited = {r["credit_wallet"]: r["amount"] for r in rows}
        assert credited == {
            platform_revenue_wallet_id("USD", 3): 1000,
            platform_revenue_wallet_id("USD", 4): 5,
        }
    finally:
        await pool.close()

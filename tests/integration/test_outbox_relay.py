"""The outbox relay over the real Postgres and broker: a commit in another process (another
replica) wakes the leading relay through Postgres ``NOTIFY``, without waiting for its poll."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest
from aiokafka import AIOKafkaProducer

from tally import db, outbox
from tests.conftest import Tally, eventually, uid

pytestmark = pytest.mark.integration

OTHER_REPLICA = textwrap.dedent("""
    import asyncio, sys
    from tally import db, outbox

    async def main(dsn, schema, message_id):
        pool = await db.create_pool(dsn, schema, size=1)
        async with pool.acquire() as conn, conn.transaction():
            await outbox.enqueue(conn, [outbox.row("wallet.events", "k", {
                "id": message_id, "type": "test.ping", "time": "2026-01-01T00:00:00+00:00",
                "source": "test", "data": {}})])
        await pool.close()

    asyncio.run(main(*sys.argv[1:]))
""")


async def test_a_commit_in_another_replica_wakes_the_leading_relay(tally: Tally) -> None:
    schema = f"relay_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(tally.stack.database_url, schema, size=2)
    await db.migrate(pool, schema, "tally")
    producer = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await producer.start()
    # An hour between polls: only a notification can make this relay send within the test.
    relay = outbox.OutboxRelay(pool, producer, service=schema, poll_interval=3600)
    relay.start()
    try:
        async def leading() -> bool:
            return outbox._LEADER_HERE.is_set()
        await eventually(leading, what="the relay to take the lead")
        message_id = uid("ping")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", OTHER_REPLICA, tally.stack.database_url, schema, message_id)
        assert await child.wait() == 0
        relayed = await tally.find_on_topic("wallet.events", lambda m: m["id"] == message_id)
        assert relayed["type"] == "test.ping"
        left = await tally.sql(schema, "SELECT count(*) AS n FROM outbox")
        assert left[0]["n"] == 0
    finally:
        await relay.stop()
        await producer.stop()
        await pool.close()

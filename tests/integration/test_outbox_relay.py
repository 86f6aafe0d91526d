"""The outbox relay over the real Postgres and broker: a commit in another process (another
replica) wakes the leading relay through Postgres ``NOTIFY``, without waiting for its poll."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import lz4.frame
from aiokafka import AIOKafkaProducer

from tally import db, outbox
from tests.support.databases import advisory_lock_free
from tests.support.outbox_layouts import length_prefixed
from tests.support.stack import Infra, eventually, uid

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


async def test_a_commit_in_another_replica_wakes_the_leading_relay(infra: Infra) -> None:
    schema = f"relay_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    await db.migrate(pool, schema, "tally")
    producer = AIOKafkaProducer(bootstrap_servers=infra.stack.bootstrap)
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
            sys.executable, "-c", OTHER_REPLICA, infra.stack.database_url, schema, message_id
        )
        assert await child.wait() == 0
        relayed = await infra.find_on_topic("wallet.events", lambda m: m["id"] == message_id)
        assert relayed["type"] == "test.ping"
        left = await infra.sql(schema, "SELECT count(*) AS n FROM outbox")
        assert left[0]["n"] == 0
    finally:
        await relay.stop()
        await producer.stop()
        await pool.close()


async def test_a_large_batch_is_stored_compressed_and_relayed_whole_and_in_order(infra: Infra) -> None:
    schema = f"relay_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    await db.migrate(pool, schema, "tally")
    batch = uid("batch")

    def ping(n: int) -> outbox.Row:
        return outbox.row(
            "wallet.events",
            batch,
            {
                "id": f"{batch}-{n}",
                "type": "test.ping",
                "time": "2026-01-01T00:00:00+00:00",
                "source": "test",
                "data": {"batch": batch, "n": n},
            },
            inherit=False,
        )

    async with pool.acquire() as conn, conn.transaction():
        # rows the previous version wrote, still waiting when this one took over
        old = length_prefixed([ping(n) for n in range(100)])
        old_lz4 = lz4.frame.compress(old)
        await conn.execute("INSERT INTO outbox (messages_lz4, count) VALUES ($1, 100)", old_lz4)
        old = length_prefixed([ping(100)])
        await conn.execute("INSERT INTO outbox (messages, count) VALUES ($1, 1)", old)
        await outbox.enqueue(conn, [ping(n) for n in range(101, 300)])  # ~27 KB packed
        await outbox.enqueue(conn, [ping(300)])  # small: kept as it is
    stored = await infra.sql(
        schema,
        "SELECT rows_mp IS NOT NULL AS plain, rows_mp_lz4 IS NOT NULL AS compressed, count "
        "FROM outbox ORDER BY id",
    )
    assert [tuple(r) for r in stored][2:] == [(False, True, 199), (True, False, 1)]
    producer = AIOKafkaProducer(bootstrap_servers=infra.stack.bootstrap)
    await producer.start()
    relay = outbox.OutboxRelay(pool, producer, service=schema)
    relay.start()
    try:
        relayed = await infra.topic_messages(
            "wallet.events",
            lambda m: m.get("data", {}).get("batch") == batch,
            until=lambda m: m["id"] == f"{batch}-300",
        )
        assert [m["data"]["n"] for m in relayed] == list(range(301))  # one key: one partition

        async def emptied() -> bool:  # deleted once Kafka has acknowledged them
            left = await infra.sql(schema, "SELECT count(*) AS n FROM outbox")
            return bool(left[0]["n"] == 0)

        await eventually(emptied, what="the relayed rows to be deleted")
    finally:
        await relay.stop()
        await producer.stop()
        await pool.close()


async def test_leadership_passes_on_and_a_stopped_relay_leaves_no_lock_or_listen_behind(infra: Infra) -> None:
    """The relay's lock and LISTEN live on a session of their own (db.session): stopped, it
    leaves neither on the pool's connections (which go back without a reset), and a replica
    waiting for the lead takes it within its second."""
    schema = f"relay_{uid('t').replace('-', '_')}"
    first_pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    second_pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    await db.migrate(first_pool, schema, "tally")
    producer = AIOKafkaProducer(bootstrap_servers=infra.stack.bootstrap)
    await producer.start()
    first = outbox.OutboxRelay(first_pool, producer, service=schema, poll_interval=3600)
    second = outbox.OutboxRelay(second_pool, producer, service=schema, poll_interval=3600)
    lock = f"tally-outbox:{schema}"

    async def lock_free() -> bool:
        return await advisory_lock_free(infra.stack.database_url, lock)

    async def leading() -> bool:
        return outbox._LEADER_HERE.is_set()

    try:
        first.start()
        await eventually(leading, what="the first relay to take the lead")
        second.start()  # waits, asking each second
        await asyncio.sleep(1.5)
        await first.stop()
        await eventually(leading, what="the waiting relay to take the lead")
        await second.stop()
        await eventually(lock_free, what="the lock to go with the sessions")
        for pool in (first_pool, second_pool):
            async with pool.acquire() as a, pool.acquire() as b:
                for conn in (a, b):
                    assert await conn.fetch("SELECT pg_listening_channels()") == []
    finally:
        await first.stop()
        await second.stop()
        await producer.stop()
        await first_pool.close()
        await second_pool.close()

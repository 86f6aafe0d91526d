"""What ``make run``'s drained stop and live view read from the real broker and Postgres
(tally_devstack.broker, tally_devstack.drain): a group's lag, the records held, a fetch's
time, an outbox's messages and what a database has relayed."""

from __future__ import annotations

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tally_devstack.broker import BrokerProbe, rss_bytes
from tally_devstack.drain import StackGauges, relayed
from tally_devstack.stack import Stack
from tests.support.stack import uid


async def test_lag_counts_what_a_group_has_not_committed(stack: Stack) -> None:
    topic, group = uid("drain-probe"), uid("drain-group")
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        for i in range(7):
            await producer.send_and_wait(topic, b"x", partition=i % 2)  # 4 on 0, 3 on 1
    finally:
        await producer.stop()
    probe = BrokerProbe(stack.bootstrap)
    await probe.start()
    try:
        assert await probe.lag(group, topic) == 7  # never committed: everything from the start
        committer = AIOKafkaConsumer(
            bootstrap_servers=stack.bootstrap, group_id=group, enable_auto_commit=False
        )
        await committer.start()
        try:
            committer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
            await committer.commit({TopicPartition(topic, 0): 3})
            assert await probe.lag(group, topic) == 1 + 3
            await committer.commit({TopicPartition(topic, 0): 4, TopicPartition(topic, 1): 3})
            assert await probe.lag(group, topic) == 0
        finally:
            await committer.stop()
        assert await probe.held([topic]) == {topic: 7}
        fetched = await probe.fetch_seconds(topic)
        assert fetched is not None and fetched[1] == 4 and 0 < fetched[0] < 5
        assert await probe.lag(group, uid("no-such-topic")) == 0
    finally:
        await probe.close()
    assert (rss_bytes(stack.pid("broker")) or 0) > 1_000_000


async def test_outboxes_and_what_a_database_has_relayed(stack: Stack) -> None:
    name = uid("drain-schema").replace("-", "_")
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(
            f"CREATE SCHEMA {name}; "
            f"CREATE TABLE {name}.outbox (id bigserial PRIMARY KEY, count integer NOT NULL DEFAULT 1)"
        )
        assert await relayed(stack.database_url, [name]) == (0, 0)  # a fresh database relayed nothing
        await conn.execute(f"INSERT INTO {name}.outbox (count) VALUES (5), (2), (4)")
        await conn.execute(f"DELETE FROM {name}.outbox WHERE count = 5")  # relayed
        assert await relayed(stack.database_url, [name]) == (1, 6)
        probe = BrokerProbe(stack.bootstrap)
        gauges = StackGauges(probe, stack.database_url)
        try:
            assert await gauges.outbox(name.replace("_", "-")) == 6
            assert await gauges.outbox("no-such-service") == 0  # never started here
        finally:
            await gauges.close()
    finally:
        await conn.execute(f"DROP SCHEMA {name} CASCADE")
        await conn.close()

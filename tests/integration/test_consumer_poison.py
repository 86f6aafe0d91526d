"""A poison record over the real broker and Postgres (tally.consumer.subscribe_batch with
tally.dead_letters): a handler that fails on one record's content, every time, no longer blocks
its partition. The batch is applied again in halves down to the record, the poison is dead-lettered once
(its row in ``dead_letters``, its DLQ message in the outbox) and every other record is applied,
in order; the group's offsets move past it. A failure of the environment dead-letters nothing
and the batch is retried until it passes. The poison budget is shared by every replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tally import db, dead_letters, outbox
from tally.consumer import subscribe_batch
from tally.dead_letters import DeadLetters
from tally.kafka import make_broker
from tally.settings import Settings, get_settings
from tally.uow import Database
from tests.support.stack import Infra, eventually, uid


@pytest.fixture(autouse=True)
def quick_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The stack's group timings (a join takes about half the session timeout here)."""
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "3000")
    monkeypatch.setenv("KAFKA_HEARTBEAT_INTERVAL_MS", "500")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


async def _topic(infra: Infra) -> str:
    topic = uid("poison")
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.stack.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    return topic


async def _produce(infra: Infra, topic: str, values: Sequence[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=infra.stack.bootstrap)
    await producer.start()
    try:
        for v in values:  # one by one: batches of every shape, as the consumer fetches them
            await producer.send_and_wait(topic, v, key=b"k")
    finally:
        await producer.stop()


async def _database(infra: Infra) -> Database:
    schema = f"poison_{uid('s').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    await db.migrate(pool, schema, "tally")
    return Database(pool)


async def _consume(infra: Infra, topic: str, handler: Any, letters: DeadLetters) -> Any:
    broker = make_broker(Settings(KAFKA_BOOTSTRAP_SERVERS=infra.stack.bootstrap), client_id=uid("c"))
    subscribe_batch(
        broker,
        topic,
        service="test",
        group_id=uid("g"),
        handler=handler,
        retry_backoff=0.05,
        letters=letters,
    )
    await broker.start()
    return broker


async def _outboxed(database: Database) -> list[tuple[str, dict[str, Any]]]:
    """The DLQ messages waiting in the outbox (no relay runs here)."""
    out = []
    async with database.reading() as conn:
        for r in await conn.fetch("SELECT * FROM outbox ORDER BY id"):
            for topic, _, value, _, _ in outbox.stored(r):
                out.append((topic, orjson.loads(value)))
    return out


async def test_a_poison_record_is_dead_lettered_and_the_partition_goes_on(infra: Infra) -> None:
    topic = await _topic(infra)
    applied: list[bytes] = []

    async def handler(records: Sequence[Any]) -> None:
        values = [r.value for r in records]
        if b"poison" in values:
            raise ValueError("a shape this handler never foresaw")
        applied.extend(values)

    database = await _database(infra)
    values = [b"a", b"b", b"poison", b"c", b"d"]
    await _produce(infra, topic, values[:3])
    broker = await _consume(infra, topic, handler, DeadLetters(database, "test", "g", budget=3))
    try:
        await _produce(infra, topic, values[3:])

        async def past_the_poison() -> bool:
            return applied[-1:] == [b"d"]

        await eventually(past_the_poison, what="the records after the poison applied")
        assert applied == [b"a", b"b", b"c", b"d"]
        [(dlq, letter)] = await _outboxed(database)
        assert dlq == f"{topic}.dlq" and letter["message"] == "poison"
        assert letter["error"] == "ValueError: a shape this handler never foresaw" and letter["offset"] == 2
        async with database.reading() as conn:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters WHERE topic = $1", topic) == 1
    finally:
        await broker.stop()
        await database.pool.close()


async def test_records_with_null_or_undecodable_headers_reach_the_handler(infra: Infra) -> None:
    # FastStream's parser decoded every header of a batch's first record as UTF-8: a null or
    # non-UTF-8 header value (anyone producing to a topic can send one) raised before any
    # handler saw the batch, and the partition stopped (found by #20's review from outside)
    topic = await _topic(infra)
    seen: list[bytes] = []

    async def handler(records: Sequence[Any]) -> None:
        seen.extend(r.value for r in records)

    producer = AIOKafkaProducer(bootstrap_servers=infra.stack.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"null", headers=[("type", None)])
        await producer.send_and_wait(topic, b"latin", headers=[("x", b"\xff\xfe")])
        await producer.send_and_wait(topic, b"good")
    finally:
        await producer.stop()
    database = await _database(infra)
    broker = await _consume(infra, topic, handler, DeadLetters(database, "test", "g", budget=3))
    try:

        async def all_seen() -> bool:
            return seen == [b"null", b"latin", b"good"]

        await eventually(all_seen, what="every record handed to the handler")
    finally:
        await broker.stop()
        await database.pool.close()


async def test_a_failure_of_the_environment_is_retried_and_dead_letters_nothing(infra: Infra) -> None:
    topic = await _topic(infra)
    applied: list[bytes] = []
    failures = {"left": 3}

    async def handler(records: Sequence[Any]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("the database is restarting")
        applied.extend(r.value for r in records)

    database = await _database(infra)
    await _produce(infra, topic, [b"a", b"b"])
    broker = await _consume(infra, topic, handler, DeadLetters(database, "test", "g", budget=3))
    try:

        async def retried() -> bool:
            return applied == [b"a", b"b"]

        await eventually(retried, what="the batch applied once the database is back")
        await asyncio.sleep(0.2)
        assert applied == [b"a", b"b"] and failures["left"] == 0
        assert await _outboxed(database) == []
    finally:
        await broker.stop()
        await database.pool.close()


class Rec:
    def __init__(self, topic: str, offset: int, value: bytes = b"x") -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, 0, offset, None, value
        self.timestamp = 1_700_000_000_000
        self.headers: list[tuple[str, bytes]] = []


async def test_each_record_is_lettered_once_and_the_budget_is_shared_by_replicas(infra: Infra) -> None:
    database = await _database(infra)
    topic = uid("budget")
    one, other = (DeadLetters(database, "test", "g", budget=2) for _ in range(2))
    try:
        assert await one.letter(Rec(topic, 1), "ValueError: x", topic)
        assert await other.letter(Rec(topic, 1), "ValueError: x", topic)  # the same record: once
        assert len(await _outboxed(database)) == 1
        assert await other.letter(Rec(topic, 2), "ValueError: y", topic)
        # two replicas, one budget: a third record of the kind is refused, nothing written
        assert not await one.letter(Rec(topic, 3), "ValueError: z", topic)
        assert not await other.letter(Rec(topic, 3), "ValueError: z", topic)
        # ...but a record lettered before is still "in the DLQ" for a returning batch
        assert await one.letter(Rec(topic, 1), "ValueError: x", topic)
        assert await one.letter(Rec(topic, 3), "ValueError: z", f"{topic}:another-kind")
        assert len(await _outboxed(database)) == 3
    finally:
        await database.pool.close()


async def test_a_reused_offset_is_a_new_record_and_groups_letter_on_their_own(infra: Infra) -> None:
    database = await _database(infra)
    topic = uid("reused")
    try:
        assert await DeadLetters(database, "test", "g", budget=5).letter(
            Rec(topic, 7), "ValueError: a", topic
        )
        # the topic rebuilt (or the embedded broker restarted): offset 7 again, another record
        assert await DeadLetters(database, "test", "g", budget=5).letter(
            Rec(topic, 7, b"another"), "ValueError: b", topic
        )
        # another consumer group of the service letters the same record for itself
        assert await DeadLetters(database, "test", "h", budget=5).letter(
            Rec(topic, 7), "ValueError: a", topic
        )
        assert [m["error"] for _, m in await _outboxed(database)] == [
            "ValueError: a",
            "ValueError: b",
            "ValueError: a",
        ]
        async with database.reading() as conn:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters WHERE topic = $1", topic) == 3
    finally:
        await database.pool.close()


async def test_rows_past_their_week_are_swept(infra: Infra) -> None:
    database = await _database(infra)
    topic = uid("swept")
    letters = DeadLetters(database, "test", "g", budget=5)
    try:
        assert await letters.letter(Rec(topic, 1), "ValueError: old", topic)
        assert await letters.letter(Rec(topic, 2), "ValueError: new", topic)
        async with database.reading() as conn:
            await conn.execute(
                "UPDATE dead_letters SET lettered_at = now() - interval '8 days' WHERE record_offset = 1"
            )
            assert await dead_letters.sweep(conn) == 1
            assert await conn.fetchval("SELECT array_agg(record_offset) FROM dead_letters") == [2]
    finally:
        await database.pool.close()

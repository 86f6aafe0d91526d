"""A poison record over the real broker (tally.consumer.subscribe_batch): a handler that fails
on one record's content, every time, no longer blocks its partition. The batch is applied again
record by record, the poison goes to the dead letters and every other record is applied, in
order; the group's offsets move past it. A failure of the environment dead-letters nothing and
the batch is retried until it passes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tally.consumer import subscribe_batch
from tally.kafka import make_broker
from tally.settings import Settings, get_settings
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


async def _consume(infra: Infra, topic: str, handler: Any, letters: list[tuple[bytes, str]]) -> Any:
    broker = make_broker(Settings(KAFKA_BOOTSTRAP_SERVERS=infra.stack.bootstrap), client_id=uid("c"))

    async def dead_letter(record: Any, reason: str) -> None:
        letters.append((record.value, reason))

    subscribe_batch(
        broker,
        topic,
        service="test",
        group_id=uid("g"),
        handler=handler,
        retry_backoff=0.05,
        dead_letter=dead_letter,
    )
    await broker.start()
    return broker


async def test_a_poison_record_is_dead_lettered_and_the_partition_goes_on(infra: Infra) -> None:
    topic = await _topic(infra)
    applied: list[bytes] = []

    async def handler(records: Sequence[Any]) -> None:
        values = [r.value for r in records]
        if b"poison" in values:
            raise ValueError("a shape this handler never foresaw")
        applied.extend(values)

    letters: list[tuple[bytes, str]] = []
    values = [b"a", b"b", b"poison", b"c", b"d"]
    await _produce(infra, topic, values[:3])
    broker = await _consume(infra, topic, handler, letters)
    try:
        await _produce(infra, topic, values[3:])

        async def past_the_poison() -> bool:
            return applied[-1:] == [b"d"]

        await eventually(past_the_poison, what="the records after the poison applied")
        assert applied == [b"a", b"b", b"c", b"d"]
        assert letters == [(b"poison", "ValueError: a shape this handler never foresaw")]
    finally:
        await broker.stop()


async def test_a_failure_of_the_environment_is_retried_and_dead_letters_nothing(infra: Infra) -> None:
    topic = await _topic(infra)
    applied: list[bytes] = []
    failures = {"left": 3}

    async def handler(records: Sequence[Any]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("the database is restarting")
        applied.extend(r.value for r in records)

    letters: list[tuple[bytes, str]] = []
    await _produce(infra, topic, [b"a", b"b"])
    broker = await _consume(infra, topic, handler, letters)
    try:

        async def retried() -> bool:
            return applied == [b"a", b"b"]

        await eventually(retried, what="the batch applied once the database is back")
        await asyncio.sleep(0.2)
        assert applied == [b"a", b"b"] and letters == [] and failures["left"] == 0
    finally:
        await broker.stop()

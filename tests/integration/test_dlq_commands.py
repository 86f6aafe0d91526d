"""``tally dlq list`` and ``tally dlq replay`` (tally_cli.dlq) against the real broker, on
letters written as one record batch, as an outbox relay writes a batch's letters.

The embedded broker reports a partition's end as its last record batch's first offset plus
one. Reading up to that end and no further hid the rest of the batch: the last letters of a
batch were neither listed nor replayed until another letter came."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.events import DeadLetter, Topics
from tally.settings import Settings
from tally_cli import dlq
from tally_devstack.stack import Stack
from tests.support.stack import uid

TOPIC = Topics.REBILLING_EVENTS  # no service consumes it in this layer


def letter(marker: str, n: int) -> bytes:
    return (
        DeadLetter(
            error="poison",
            source_topic=TOPIC,
            partition=0,
            offset=n,
            failed_by="rebilling",
            failed_at=datetime.now(UTC),
            message=orjson.dumps({"marker": marker, "n": n}).decode(),
        )
        .model_dump_json()
        .encode()
    )


async def on_topic(stack: Stack, marker: str) -> list[int]:
    """The ``n`` of every message on ``TOPIC`` carrying ``marker``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(TOPIC, p) for p in sorted(consumer.partitions_for_topic(TOPIC) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        found: list[int] = []
        while batch := await consumer.getmany(timeout_ms=500):
            for records in batch.values():
                for r in records:
                    doc = orjson.loads(r.value or b"null")
                    if isinstance(doc, dict) and doc.get("marker") == marker:
                        found.append(doc["n"])
        return sorted(found)
    finally:
        await consumer.stop()


async def test_letters_in_one_record_batch_are_all_listed_and_replayed_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap))
    marker = uid("batch")
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        batch = producer.create_batch()
        for n in range(3):
            assert batch.append(key=marker.encode(), value=letter(marker, n), timestamp=None) is not None
        await (await producer.send_batch(batch, Topics.dlq(TOPIC), partition=0))
    finally:
        await producer.stop()

    listed = [orjson.loads(x["message"]) for x in await dlq.read(TOPIC, limit=10_000)]
    assert sorted(m["n"] for m in listed if m.get("marker") == marker) == [0, 1, 2]

    assert await dlq.replay(TOPIC, dry_run=True) >= 3
    assert await dlq.replay(TOPIC) >= 3
    assert await on_topic(stack, marker) == [0, 1, 2]
    assert await dlq.replay(TOPIC) == 0  # each letter is replayed once
    assert await on_topic(stack, marker) == [0, 1, 2]

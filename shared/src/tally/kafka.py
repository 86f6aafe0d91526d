"""Kafka plumbing: the FastStream broker factory, a raw producer for the outbox relay, topic
creation, and the naming of consumer groups. Idempotent producing is configurable and off by
default (the embedded broker rejects it; turn it on against a real cluster)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream.kafka import KafkaBroker

from tally.events import Topics
from tally.settings import Settings

log = logging.getLogger(__name__)


def make_broker(settings: Settings, *, client_id: str, middlewares: Sequence[Any] = ()) -> KafkaBroker:
    """The service's FastStream broker (subscribers and ad-hoc publishing). Its per-message
    INFO lines are dropped unless ``TALLY_LOG_LEVEL=DEBUG``: at thousands of events per second
    they would be most of the log."""
    logger = logging.getLogger(f"tally.{client_id}.kafka")
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=client_id,
        enable_idempotence=settings.kafka_enable_idempotence,
        acks="all",
        middlewares=tuple(middlewares),
        logger=logger,
        graceful_timeout=15.0,
    )


def make_producer(settings: Settings, *, client_id: str) -> AIOKafkaProducer:
    """A raw producer for bulk relaying of outbox rows: ordered per partition, batched, and
    compressed (``KAFKA_COMPRESSION``: record batches of JSON envelopes shrink several times,
    and the embedded broker's CPU per event halved; docs/0004)."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{client_id}-relay",
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        linger_ms=2,
        compression_type=None if settings.kafka_compression == "none" else settings.kafka_compression,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=30_000,
    )


def topic_specs(partitions: int = 8) -> list[NewTopic]:
    """Every topic of API.md with its DLQ; ``rebilling.settings`` is compacted."""
    specs: list[NewTopic] = []
    for topic in Topics.ALL:
        configs = {"cleanup.policy": "compact"} if topic in Topics.COMPACTED else {}
        specs.append(NewTopic(topic, partitions, 1, topic_configs=configs))
        specs.append(NewTopic(Topics.dlq(topic), 1, 1))
    return specs


async def ensure_topics(bootstrap: str, partitions: int = 8) -> list[str]:
    """Create missing topics (idempotent). Returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="tally-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_specs(partitions) if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in missing]
    finally:
        await admin.close()

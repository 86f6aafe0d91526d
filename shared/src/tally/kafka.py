"""Kafka plumbing: the FastStream broker factory, a raw producer for the outbox relay, topic
creation, and the naming of consumer groups. Idempotent producing is configurable and off by
default (the embedded broker rejects it; turn it on against a real cluster). TLS and SASL
(``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*``, ``KAFKA_SSL_CAFILE``) apply to every client."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from tally.events import Topics
from tally.settings import Settings

log = logging.getLogger(__name__)


def client_security(settings: Settings) -> dict[str, Any]:
    """aiokafka's connection settings for ``KAFKA_SECURITY_PROTOCOL`` and friends (for every
    producer, consumer and admin client Tally opens)."""
    protocol = settings.kafka_security_protocol
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    if protocol.startswith("SASL"):
        if not (settings.kafka_sasl_username and settings.kafka_sasl_password):
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        out |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password,
        }
    return out


def broker_security(settings: Settings) -> BaseSecurity | None:
    """The same, as FastStream's security object (its broker builds the clients)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl = create_ssl_context(cafile=settings.kafka_ssl_cafile) if protocol.endswith("SSL") else None
    if protocol == "SSL":
        return BaseSecurity(ssl_context=ssl, use_ssl=True)
    sasl = client_security(settings)
    kind = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}[
        settings.kafka_sasl_mechanism
    ]
    return kind(
        username=sasl["sasl_plain_username"],
        password=sasl["sasl_plain_password"],
        ssl_context=ssl,
        use_ssl=protocol == "SASL_SSL",
    )


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
        security=broker_security(settings),
    )


# The largest produce request a relay sends (a record batch; a dead letter with its record's key);
# `tally dlq replay` sends what a relay wrote, so it allows the same.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


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
        max_request_size=MAX_REQUEST_BYTES,
        request_timeout_ms=30_000,
        **client_security(settings),
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

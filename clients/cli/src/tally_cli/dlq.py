"""Dead-letter queues over the broker (``KAFKA_BOOTSTRAP_SERVERS``): read ``<topic>.dlq``, and
replay its letters to the source topic. Replays are tracked by a consumer group of their own
(``tally-cli-replay-<topic>``), so each letter is replayed once, however often the command runs;
consumers dedupe on the event id, so a replayed message that was applied meanwhile is not
applied twice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from pydantic import ValidationError

from tally.events import LETTER_TEXT_KEPT, DeadLetter, Topics
from tally.kafka import MAX_REQUEST_BYTES, client_security
from tally.settings import get_settings


class Unavailable(Exception):
    """The broker could not be reached."""


def _dlq(topic: str) -> str:
    if topic not in Topics.ALL:
        raise ValueError(f"unknown topic {topic!r} (one of {', '.join(Topics.ALL)})")
    return Topics.dlq(topic)


async def _drain(consumer: AIOKafkaConsumer, limit: int | None) -> list[Any]:
    """Records from the consumer's positions to at least the ends it had when this started.
    Every record fetched is kept, past those ends too: the embedded broker reports a
    partition's end as its last record batch's first offset plus one, so the rest of that
    batch lies past the end it reports (a relay writes a batch's letters as one record batch)."""
    parts = list(consumer.assignment())
    ends = await consumer.end_offsets(parts)
    records: list[Any] = []
    while await _behind(consumer, parts, ends):
        batch = await consumer.getmany(timeout_ms=1000)
        for recs in batch.values():
            records += recs
        if limit is not None and len(records) >= limit:
            break
    records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    return records[:limit] if limit is not None else records


async def _behind(consumer: AIOKafkaConsumer, parts: list[TopicPartition], ends: dict[Any, int]) -> bool:
    for p in parts:
        if await consumer.position(p) < ends[p]:
            return True
    return False


async def _consumer(dlq: str, group: str | None) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=get_settings().kafka_bootstrap_servers,
        **client_security(get_settings()),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="tally-cli",
    )
    try:
        await consumer.start()
        await consumer.topics()  # the cluster's metadata, this topic's partitions with it
        partitions = consumer.partitions_for_topic(dlq)
    except KafkaError as exc:
        await consumer.stop()
        raise Unavailable(f"the broker is unreachable: {exc}") from exc
    tps = [TopicPartition(dlq, p) for p in sorted(partitions or ())]
    consumer.assign(tps)
    if group is None:
        await consumer.seek_to_beginning(*tps)
    else:
        committed = {tp: await consumer.committed(tp) for tp in tps}
        for tp, offset in committed.items():
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
    return consumer


def _original(record: Any) -> bytes | None:
    """The bytes to replay for a DLQ record; None when it is no letter Tally wrote (anyone
    who may write the DLQ may write anything there) or does not hold its message's bytes."""
    try:
        return DeadLetter.model_validate_json(record.value or b"").original()
    except ValueError:  # pydantic's ValidationError too
        return None


def _described(record: Any) -> dict[str, Any]:
    """A record passed over, for the report: the letter, or what is known of a record that
    is not one."""
    try:
        return _letter(record)
    except ValidationError:
        return {
            "error": "not a dead letter",
            "source_topic": None,
            "partition": None,
            "offset": None,
            "failed_by": None,
            "failed_at": None,
            "message": (record.value or b"").decode("utf-8", errors="replace")[:LETTER_TEXT_KEPT],
            "message_bytes": len(record.value or b""),
            "dlq_partition": record.partition,
            "dlq_offset": record.offset,
        }


def _letter(record: Any) -> dict[str, Any]:
    letter = DeadLetter.model_validate_json(record.value).model_dump(mode="json")
    return {
        **letter,
        "dlq_partition": record.partition,
        "dlq_offset": record.offset,
        "key": (record.key or b"").decode("utf-8", "replace") or None,
    }


async def read(topic: str, *, limit: int = 100) -> list[dict[str, Any]]:
    consumer = await _consumer(_dlq(topic), None)
    try:
        return [_described(r) for r in await _drain(consumer, limit)]
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Replayed:
    """What a replay did: letters sent back, and letters that do not hold their message's
    exact bytes (or are too large to send), which are passed over: the message is still at
    its ``source_topic``, ``partition`` and ``offset`` while the topic retains it."""

    replayed: int
    not_replayable: list[dict[str, Any]]


# Topics whose messages only add, each once: usage, deduped by its event id by every consumer
# group. The others carry state (settings, licenses, connections, suspensions, a recharge that
# failed): a letter replayed there goes to every consumer group of the topic, not only the one
# that failed on it, and is applied again over newer state (a license taken back).
ADDITIVE = (Topics.USAGE_INGEST, Topics.USAGE_RECORDED)


class StateTopic(ValueError):
    """A replay onto a topic that carries state, not asked for."""


async def replay(topic: str, *, dry_run: bool = False, state: bool = False) -> Replayed:
    """Produce every letter not replayed before back to ``topic``, byte for byte as it failed.
    A topic that carries state (not in ``ADDITIVE``) only with ``state``: the operator has
    checked that no letter is older than what it would overwrite."""
    dlq = _dlq(topic)
    if topic not in ADDITIVE and not state and not dry_run:
        raise StateTopic(
            f"{topic} carries state: a replayed letter goes to every consumer group of it and is "
            "applied again over newer state. Check each letter (tally dlq list), then replay with "
            "--state, or publish a corrected, current message instead."
        )
    consumer = await _consumer(dlq, f"tally-cli-replay-{topic}")
    producer = AIOKafkaProducer(
        bootstrap_servers=get_settings().kafka_bootstrap_servers,
        **client_security(get_settings()),
        acks="all",
        client_id="tally-cli",
        max_request_size=MAX_REQUEST_BYTES,
    )
    try:
        records = await _drain(consumer, None)
        sendable: list[tuple[Any, bytes]] = []
        passed: list[dict[str, Any]] = []
        for r in records:
            original = _original(r)
            if original is None:
                passed.append(_described(r))
            else:
                sendable.append((r, original))
        if dry_run or not records:
            return Replayed(len(sendable), passed)
        await producer.start()
        sent = 0
        for r, original in sendable:
            try:
                await producer.send_and_wait(topic, original, key=r.key)
                sent += 1
            except MessageSizeTooLargeError:  # larger than any relay sends: listed, not retried
                passed.append(_described(r))
        # past the highest offset read in each partition (records are in time order, and
        # producers' clocks may disagree)
        read: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(dlq, r.partition)
            read[tp] = max(read.get(tp, 0), r.offset + 1)
        await consumer.commit(read)
        return Replayed(sent, passed)
    except KafkaError as exc:
        raise Unavailable(f"the broker is unreachable: {exc}") from exc
    finally:
        await producer.stop()
        await consumer.stop()

"""Batch consumption with at-least-once delivery and dead-lettering.

A handler receives the raw records of one fetch and applies them in one DB transaction;
offsets are committed only after it returns (FastStream ``AckPolicy.NACK_ON_ERROR``: an
exception rewinds every partition of the batch so nothing is skipped). A record that can never
be applied is not raised: the handler writes it to ``<topic>.dlq`` through the outbox, in the
same transaction, so the partition goes on and the DLQ copy is as durable as the state.

A record a handler did not foresee can still make it raise, on every try: an error its own
content causes (``CAUSED_BY_THE_RECORD``: a value or type error, a row the database refuses).
Then the batch is applied again in halves, down to the failing record (``Isolation``); the
record that still fails alone is dead-lettered (``letters``, through the outbox before its
offset commits) while the others are applied: a poison record no longer blocks its partition.
Every other failure (a lost connection, a restarting database, a service down, a conflict) is the
environment's, and the batch is retried as long as it takes. So is a kind of record failing
alone more than ``TALLY_POISON_BUDGET`` times a day (per consumer group, all replicas): that is a
broken release, not poison, and dead-lettering every record of the kind would empty the stream
into the DLQ. Each record is dead-lettered once, however often its batch comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

import asyncpg
from aiokafka import TopicPartition
from faststream.kafka import KafkaBroker
from faststream.middlewares import AckPolicy
from prometheus_client import Counter, Gauge, Histogram

from tally import events, outbox
from tally.settings import get_settings
from tally.telemetry import header

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "tally_consumer_batch_size",
    "Records per consumed batch",
    ["service", "topic"],
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000),
)
RECORDS = Counter("tally_consumer_records_total", "Records consumed", ["service", "topic"])
DLQ = Counter("tally_dlq_total", "Records sent to a DLQ", ["service", "topic"])
LAG = Gauge(
    "tally_consumer_lag", "Records behind the partition end, as of the last batch", ["service", "topic"]
)
RECORD_AGE = Histogram(
    "tally_consumer_record_age_seconds",
    "Age of a batch's oldest record when its handler starts (producer append to consume)",
    ["service", "topic"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HANDLE_SECONDS = Histogram(
    "tally_consumer_handle_seconds",
    "Time to apply one consumed batch (handler to commit)",
    ["service", "topic"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FAILURES = Counter(
    "tally_consumer_batch_failures_total", "Batches that failed and were retried", ["service", "topic"]
)

ISOLATED = Counter(
    "tally_consumer_isolations_total",
    "Batches applied again in parts after an error a record caused",
    ["service", "topic"],
)

BatchHandler = Callable[[Sequence[Any]], Awaitable[None]]
T = TypeVar("T")

# Errors a record's own content causes, the same on every try. Anything else is retried.
CAUSED_BY_THE_RECORD: tuple[type[Exception], ...] = (
    ValueError,  # pydantic's ValidationError, JSON and Unicode errors too
    TypeError,
    LookupError,
    AttributeError,
    AssertionError,
    ArithmeticError,
    asyncpg.DataError,  # 22xxx: a value out of range, too long, malformed
    asyncpg.IntegrityConstraintViolationError,  # 23xxx: a row a constraint refuses
    # 54xxx: a value past a limit of the database (an index row over 8 kB, from an id of
    # 20,000 characters forged onto a topic); a batch past one (too many parameters) is
    # halved by ``Isolation`` until it passes
    asyncpg.ProgramLimitExceededError,
)
# ...except a row whose reference has not arrived yet (another topic's record may bring it).
NOT_THE_RECORD: tuple[type[Exception], ...] = (asyncpg.ForeignKeyViolationError,)


def caused_by_the_record(exc: BaseException) -> bool:
    return isinstance(exc, CAUSED_BY_THE_RECORD) and not isinstance(exc, NOT_THE_RECORD)


# A consumer whose kind of record has used its poison budget (``TALLY_POISON_BUDGET`` a day,
# tally.dead_letters) parks: it retries the batch as for any failure of the environment, and
# tries the records alone again after this long.
PARK_SECONDS = 300.0


class LetterBox(Protocol):
    """Where poison goes (``tally.dead_letters.DeadLetters``: a table and the outbox)."""

    async def letter(self, record: Any, reason: str, kind: str) -> bool:
        """Dead-letter ``record`` once, durably (a record lettered before is not written
        again); False, with nothing written, when its kind has used its budget."""
        ...


def _kind(record: Any) -> str:
    """What the poison budget counts by: the topic, and the event type when the record names a
    known one on a topic Tally's relays write. ``usage.ingest`` is written by products, whose
    headers must not widen the budget: there the kind is the topic alone."""
    type_ = header(record, "type")
    if record.topic == events.Topics.USAGE_INGEST or type_ not in events.PAYLOADS:
        return str(record.topic)
    return f"{record.topic}:{type_}"


async def failing_alone(
    items: Sequence[T],
    apply: Callable[[Sequence[T]], Awaitable[object]],
    fails: Callable[[Exception], bool],
    alone: Callable[[T, Exception], Awaitable[object]],
    *,
    tried: bool = False,
) -> None:
    """Apply ``items`` in parts: all of them (unless ``tried``: they just failed together),
    and a part that fails with an error ``fails`` names halved again, down to single items;
    ``alone(item, error)`` is awaited for an item that fails by itself, before any item after
    it is applied (the batch's order holds). Any other error propagates. One such item among
    n costs at most 2·⌈log2 n⌉ + 1 applications, not n. Used by ``Isolation`` (a transaction
    per part) and by the wallet's usage batch (a savepoint per part)."""
    parts: list[tuple[Sequence[T], bool]] = [(items, tried)]
    while parts:
        part, failed = parts.pop()
        if not failed or len(part) == 1:
            try:
                await apply(part)
                continue
            except Exception as exc:
                if not fails(exc):
                    raise
                if len(part) == 1:
                    await alone(part[0], exc)
                    continue
        half = len(part) // 2
        parts += [(part[half:], False), (part[:half], False)]  # the first half goes first


class Isolation:
    """Finds the poison records of a batch that failed with ``CAUSED_BY_THE_RECORD``: the
    batch is applied in halves, and a failing half halved again down to single records; a
    record that fails alone twice is dead-lettered (once, however often its batch comes back:
    ``LetterBox``) and the rest go on. Nothing is ever skipped without being applied or
    dead-lettered. ``SystemicFailure`` when its kind has used its budget: the consumer then
    retries the batch without isolating it for ``PARK_SECONDS``."""

    def __init__(
        self, handler: BatchHandler, letters: LetterBox, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._handler = handler
        self._letters = letters
        self._clock = clock
        self._parked_until = 0.0
        self.why_parked = ""

    @property
    def parked(self) -> bool:
        return self._clock() < self._parked_until

    async def apply(self, records: Sequence[Any]) -> int:
        """Apply ``records``, whose batch just failed on a record's content, without the
        poison; returns how many were dead-lettered. The batch is halved until the failing
        part is one record (a poison record among n costs about 2·log2(n) tries of parts, not
        n transactions of one record: a large batch is not held up for minutes). An error that
        is not the record's propagates (the batch is redelivered: what was applied is applied
        again, which every handler takes as a redelivery)."""
        dead: list[Any] = []
        await failing_alone(
            records, self._handler, caused_by_the_record, partial(self._judge, dead), tried=True
        )
        return len(dead)

    async def _judge(self, dead: list[Any], record: Any, _: Exception) -> None:
        """``record`` failed alone: try it once more, and dead-letter it (into ``dead``) if it
        fails again."""
        try:
            await self._handler((record,))
        except Exception as exc:
            if not caused_by_the_record(exc):
                raise
            kind = _kind(record)
            if not await self._letters.letter(record, f"{type(exc).__name__}: {exc}", kind):
                self._parked_until = self._clock() + PARK_SECONDS
                self.why_parked = (
                    f"{kind} records failing alone used the poison budget: a broken release, "
                    f"not poison; the last: {exc!r}"
                )
                raise SystemicFailure(self.why_parked) from exc
            dead.append(record)


class SystemicFailure(Exception):
    """Records of one type keep failing alone: the handler or the release is broken, not the
    records."""


async def _itself(msg: Any, original: Any = None) -> Any:
    """The handler's one argument is the message itself: a ``KafkaMessage`` parameter is a
    context field, which FastDepends resolves per batch in a worker thread inside a task group
    (a thread hop per batch: 3-5% of a side consumer's CPU at small batches, #20)."""
    return msg


async def _records(records: tuple[Any, ...], original: Any) -> Any:
    """FastStream's batch parser decodes every record's headers into a dict; the handlers read
    only the raw records, so parse the first alone (for the commit plumbing) and hand on all.
    It is parsed without its headers: the parser decodes each as UTF-8, and a header with a
    null or non-UTF-8 value (anyone producing to a topic can send one) raised there, before
    any handler, isolation or DLQ could see the record (#20's review). The handlers read
    headers themselves (``tally.telemetry.header``), null-safe."""
    message = await original((dataclasses.replace(records[0], headers=[]),))
    message.raw_message = records
    return message


def subscribe_batch(
    broker: KafkaBroker,
    topic: str,
    *,
    service: str,
    group_id: str,
    handler: BatchHandler,
    max_records: int = 2000,
    retry_backoff: float = 1.0,
    money_path: bool = False,
    letters: LetterBox | None = None,
) -> None:
    """Register ``handler`` for batches of raw records of ``topic`` in consumer group
    ``group_id``. A failing batch is retried (after a pause) from its first record.
    ``money_path``: the topic carries every usage event, so its fetches wait the shorter
    ``KAFKA_FETCH_MAX_WAIT_MS``; others wait ``KAFKA_SIDE_FETCH_MAX_WAIT_MS``. With
    ``letters``, a batch that fails with an error a record caused is applied in halves
    down to the poison, which is dead-lettered (``Isolation``); without, every failure retries."""
    settings = get_settings()
    isolation = Isolation(handler, letters) if letters is not None else None
    max_wait = settings.kafka_fetch_max_wait_ms if money_path else settings.kafka_side_fetch_max_wait_ms

    @broker.subscriber(
        topic,
        group_id=group_id,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=50,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_itself,
        parser=_records,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        fetch_max_wait_ms=max_wait,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
    )
    async def _consume(msg: Any) -> None:
        raw = msg.raw_message
        records = raw if isinstance(raw, tuple) else (raw,)
        BATCH_SIZE.labels(service, topic).observe(len(records))
        _record_lag(msg, records, service, topic)
        started = time.time()
        oldest = min(r.timestamp for r in records)
        if oldest > 0:
            RECORD_AGE.labels(service, topic).observe(max(started - oldest / 1000, 0.0))
        try:
            await handler(records)
        except Exception as exc:
            FAILURES.labels(service, topic).inc()
            if isolation is None or isolation.parked or not caused_by_the_record(exc):
                log.exception(
                    "batch failed; it will be redelivered",
                    extra={
                        "topic": topic,
                        "records": len(records),
                        "parked": isolation.why_parked if isolation and isolation.parked else None,
                    },
                )
                await asyncio.sleep(retry_backoff)
                raise
            log.warning(
                "batch failed on a record's content; applying it in halves down to the record",
                exc_info=True,
                extra={"topic": topic, "records": len(records)},
            )
            ISOLATED.labels(service, topic).inc()
            try:
                await isolation.apply(records)
            except Exception:
                log.exception(
                    "batch failed in parts; it will be redelivered",
                    extra={"topic": topic, "records": len(records)},
                )
                await asyncio.sleep(retry_backoff)
                raise
        HANDLE_SECONDS.labels(service, topic).observe(time.time() - started)
        RECORDS.labels(service, topic).inc(len(records))


def _record_lag(msg: Any, records: Sequence[Any], service: str, topic: str) -> None:
    consumer = getattr(msg, "consumer", None)
    if consumer is None or not hasattr(consumer, "highwater"):
        return
    last: dict[int, int] = {}
    for r in records:
        last[r.partition] = max(last.get(r.partition, -1), r.offset)
    lag = 0
    for partition, offset in last.items():
        high = consumer.highwater(TopicPartition(topic, partition))
        if high is not None:
            lag += max(high - offset - 1, 0)
    LAG.labels(service, topic).set(lag)


def wanted(record: Any, types: Container[str]) -> events.Message | None:
    """The record parsed, when it is one of ``types``; None when it is another type (told by
    its ``type`` header without reading the value, else by the envelope). ``BadMessage`` when
    it claims to be a wanted type, or has no readable envelope: dead-letter it."""
    type_ = header(record, "type")
    if type_ is not None and type_ not in types:
        return None
    try:
        message = events.parse_message(record.value)
    except events.UnknownType:
        return None
    return message if message.type in types else None


def take(
    records: Sequence[Any], types: Container[str], *, service: str
) -> tuple[list[tuple[Any, events.Message]], list[outbox.Row]]:
    """Sort a batch: (record, message) for each record of ``types``, and a DLQ row for each
    record that cannot be read (see ``wanted``); other types are left out."""
    taken, dead = [], []
    for r in records:
        try:
            message = wanted(r, types)
        except events.BadMessage as exc:
            dead.append(dlq_row(r, str(exc), service=service))
            continue
        if message is not None:
            taken.append((r, message))
    return taken, dead


def dlq_row(record: Any, reason: str, *, service: str, noted: bool = True) -> outbox.Row:
    """An outbox row that dead-letters ``record`` to ``<topic>.dlq`` with the reason. Counted
    and logged now, unless ``noted`` is False: a caller whose write may still fail and be
    made again notes the letter once it is written (``note_dead_letter``)."""
    if noted:
        note_dead_letter(record, reason, service=service)
    body = events.DeadLetter.holding(
        record.value,
        error=reason[:2000],
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        failed_by=service,
        failed_at=datetime.now(UTC),
    ).model_dump(mode="json", exclude_none=True)
    # the record's key as it came, byte for byte (b"" and bytes that are not UTF-8 too): a
    # replay sends it back with it, to the partition it was on
    return outbox.row(events.Topics.dlq(record.topic), record.key, body)


def note_dead_letter(record: Any, reason: str, *, service: str) -> None:
    """Count and log a dead letter (``dlq_row`` does it as it builds the row by default)."""
    DLQ.labels(service, record.topic).inc()
    log.warning(
        "dead-lettered", extra={"topic": record.topic, "offset": record.offset, "reason": reason[:300]}
    )

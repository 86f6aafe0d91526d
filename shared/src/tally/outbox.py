"""Transactional outbox: events are written in the same transaction as the state change they
describe, then relayed to Kafka by one leader per service (advisory lock), in id order, and
deleted once Kafka has acknowledged them. A crash never loses or invents an event; at worst an
event is sent twice, and every consumer dedupes on the envelope id.

One ``enqueue`` call writes **one** row however many messages it carries (packed in
``rows_mp``, or lz4-compressed in ``rows_mp_lz4`` when large): a batch of 1,000 usage events
costs Postgres one tuple to insert, read and delete instead of 1,000. The relay sends them as
one Kafka record batch per partition, each record with ``traceparent`` and ``type`` headers
(consumers skip types they do not handle without parsing the value)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import struct
import time
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg
import lz4.frame
import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from prometheus_client import Counter, Gauge

from tally import db, events
from tally.db import Conn
from tally.telemetry import current_traceparent
from tally.worker import Worker

log = logging.getLogger(__name__)

OUTBOX_RELAYED = Counter("tally_outbox_relayed_total", "Outbox messages relayed to Kafka", ["service"])
OUTBOX_RELAYS = Counter(
    "tally_outbox_relays_total", "Relay rounds that sent messages (one produce round each)", ["service"]
)
OUTBOX_RECORD_BATCHES = Counter(
    "tally_outbox_record_batches_total", "Kafka record batches the relay produced", ["service"]
)
OUTBOX_BACKLOG = Gauge("tally_outbox_backlog", "Outbox messages last seen waiting", ["service"])

# topic, key, value, traceparent, type
Row = tuple[str, bytes | None, bytes, str | None, str | None]

# the layout before 2026-12-04 (``_unpack_length_prefixed``)
_HEAD = struct.Struct(">HiIHH")  # lengths: topic, key (-1: none), value, traceparent, type


def row(
    topic: str,
    key: str | bytes | None,
    message: dict[str, Any] | bytes,
    traceparent: str | None = None,
    *,
    inherit: bool = True,
    type_: str | None = None,
) -> Row:
    """One outbox message; ``message`` is an envelope dict (or already-encoded bytes), ``key``
    text or bytes as they are (a dead letter keeps its record's key byte for byte). With no
    ``traceparent`` it carries the current span's, unless ``inherit`` is False: per-event rows
    whose caller already knows each event's trace (None: the event has none) skip the lookup,
    which costs as much as encoding the message."""
    if isinstance(message, bytes):  # encoded already: ``type_`` is its type (for the header)
        value = message
    else:
        value, type_ = events.dumps(message), message.get("type")
    if traceparent is None and inherit:
        traceparent = current_traceparent()
    return (topic, key.encode() if isinstance(key, str) else key, value, traceparent, type_)


# Packed rows are one msgpack array of ``Row`` arrays (columns ``rows_mp``/``rows_mp_lz4``):
# msgspec encodes a row in ~0.2 µs and decodes it in ~0.3, against ~1.1 and ~2.3 µs for the
# length-prefixed layout written until 2026-12-04 (columns ``messages``/``messages_lz4``),
# which ``stored`` still reads. Columns of their own keep a relay of the previous version from
# reading the new layout as the old one during a rolling upgrade (migration 0007).
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[Row])


class Columns(Protocol):
    """An outbox row as read (an ``asyncpg.Record`` or a dict of its columns)."""

    def __getitem__(self, column: str, /) -> Any: ...


def pack(rows: Sequence[Row]) -> bytes:
    return _ENCODER.encode(rows)


def unpack(data: bytes) -> list[Row]:
    return _DECODER.decode(data)


def stored(r: Columns) -> list[Row]:
    """The messages of one outbox row (a record with its columns), whichever version wrote it."""
    if r["rows_mp_lz4"] is not None:
        return unpack(lz4.frame.decompress(r["rows_mp_lz4"]))
    if r["rows_mp"] is not None:
        return unpack(r["rows_mp"])
    if r["messages_lz4"] is not None:
        return _unpack_length_prefixed(lz4.frame.decompress(r["messages_lz4"]))
    if r["messages"] is not None:
        return _unpack_length_prefixed(r["messages"])
    # a row written before messages were packed
    return [(r["topic"], r["key"], r["value"], r["traceparent"], None)]


def _unpack_length_prefixed(data: bytes) -> list[Row]:
    """Rows as written before 2026-12-04: per row a ``_HEAD`` of lengths, then its fields."""
    out: list[Row] = []
    view, at, end, size = memoryview(data), 0, len(data), _HEAD.size
    while at < end:
        lt, lk, lv, lp, ly = _HEAD.unpack_from(view, at)
        at += size
        topic = bytes(view[at : at + lt]).decode()
        at += lt
        key = None if lk < 0 else bytes(view[at : at + lk])
        at += max(lk, 0)
        value = bytes(view[at : at + lv])
        at += lv
        traceparent = bytes(view[at : at + lp]).decode() if lp else None
        at += lp
        type_ = bytes(view[at : at + ly]).decode() if ly else None
        at += ly
        out.append((topic, key, value, traceparent, type_))
    return out


# NOTIFY channel (payload: the writer's schema) that wakes the schema's relay in another
# replica. A process whose own relay leads (``_LEADER_HERE``) wakes it in-process instead and
# does not notify: a NOTIFY serialises commits on a cluster-wide lock (measured: +15-30 ms per
# HTTP batch at 1,000 events/s).
CHANNEL = "tally_outbox"
_LEADER_HERE = asyncio.Event()
_INSERT = "INSERT INTO outbox (rows_mp, rows_mp_lz4, count) VALUES ($1, $2, $3) RETURNING id"
_INSERT_AND_NOTIFY = (
    f"WITH added AS ({_INSERT}) SELECT added.id, pg_notify('{CHANNEL}', current_schema()) FROM added"
)
# Packed batches from this size on are stored compressed: below it Postgres keeps the value
# in the row itself, where compressing saves nothing. lz4 takes ~0.7 ms for 1.2 MB of
# envelopes (a fifth of that is left) and saves Postgres ~6 ms writing it (docs/0004).
COMPRESS_FROM = 2048


def packed(rows: Sequence[Row]) -> tuple[bytes | None, bytes | None, int]:
    """The outbox row's values for ``rows``: (rows_mp, rows_mp_lz4, count)."""
    data = pack(rows)
    if len(data) >= COMPRESS_FROM:
        return None, lz4.frame.compress(data), len(rows)
    return data, None, len(rows)


async def enqueue(conn: Conn, rows: Sequence[Row]) -> int | None:
    """Write messages inside the caller's transaction: one row, one round trip, any count.
    Returns the row's id (None: no messages), which the caller hands to its relay with the
    messages once committed (``OutboxRelay.hand_over``). When another replica's relay leads,
    Postgres notifies it at commit (``CHANNEL``); the caller wakes its own process's relay
    (``OutboxRelay.wake``) after committing."""
    if not rows:
        return None
    found: int = await conn.fetchval(_INSERT if _LEADER_HERE.is_set() else _INSERT_AND_NOTIFY, *packed(rows))
    return found


def written_with(change: str, first: int) -> str:
    """One statement that makes ``change`` (data-modifying CTEs, ``name AS (...)``, joined by
    commas) and writes the outbox row of the messages it publishes, parameters ``$first`` to
    ``$first+2`` (``packed``): atomic without a transaction, one round trip in all. Its one
    value is the outbox row's id (``fetchval``), for ``OutboxRelay.hand_over``. As
    ``enqueue``, it notifies the relay of another replica when this process's does not lead;
    the caller wakes its own relay after."""
    insert = (
        f"INSERT INTO outbox (rows_mp, rows_mp_lz4, count) VALUES (${first}, ${first + 1}, ${first + 2}) "
        "RETURNING id"
    )
    if _LEADER_HERE.is_set():
        return f"WITH {change} {insert}"
    notify = f"SELECT added.id, pg_notify('{CHANNEL}', current_schema()) FROM added"
    return f"WITH {change}, added AS ({insert}) {notify}"


async def publish(conn: Conn, topic: str, key: str | None, message: dict[str, Any]) -> None:
    await enqueue(conn, [row(topic, key, message)])


# What a relay holds handed over at most, in messages and in bytes of keys and values (a
# dead letter may be ~730 kB); past either, rows are read from the table.
HANDED_MAX = 100_000
HANDED_MAX_BYTES = 64 << 20
_READ_ROWS = 500  # outbox rows a relay round reads at most
_PAYLOAD = ("topic", "key", "value", "traceparent", "messages", "messages_lz4", "rows_mp", "rows_mp_lz4")
# The oldest rows, up to about ``$1`` messages; the messages of the ids in ``$2`` (handed
# over) are not read. Whether a row was handed over is found once per row, not per column.
_READ = (
    "SELECT id, upto, handed, "
    + ", ".join(f"CASE WHEN handed THEN NULL ELSE {c} END AS {c}" for c in _PAYLOAD)
    + " FROM (  SELECT *, sum(count) OVER (ORDER BY id) AS upto, id = ANY($2::bigint[]) AS handed FROM ("
    f"    SELECT * FROM outbox ORDER BY id LIMIT {_READ_ROWS}) newest) o "
    "WHERE upto - count < $1 ORDER BY id"
)


class OutboxRelay(Worker):
    """Moves outbox rows to Kafka. Run one per service process; only the advisory-lock holder
    relays, so per-key order is kept across replicas. A ``Worker`` (start, wake, stop) whose
    loop holds one connection for as long as it holds the lock, and listens on it: a commit
    that wrote to the outbox in another replica wakes it at once (``CHANNEL``); commits in
    its own process call ``wake()``. ``poll_interval`` is only the safety net."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        *,
        service: str,
        batch_size: int = 5000,
        poll_interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.name = f"outbox-relay-{service}"
        self._pool = pool
        self._producer = producer
        self._service = service
        self._batch_size = batch_size
        self._poll = poll_interval
        # Kafka's default partitioner (murmur2 of the key, as every Kafka client computes it):
        # the relay builds each partition's record batch itself. aiokafka's murmur2 is pure
        # Python (6% of usage-meter's CPU), and keys (company ids) repeat: hashes are cached.
        self._partition = DefaultPartitioner()
        self._hashes: dict[bytes, int] = {}
        self._topic_partitions: dict[str, tuple[float, list[int]]] = {}
        # Rows committed in this process while this relay leads, by outbox id: sent from here,
        # not read back from the table (``hand_over``).
        self._leading = False
        self._handed: dict[int, tuple[list[Row], int]] = {}  # id -> (messages, their bytes)
        self._handed_messages = 0
        self._handed_bytes = 0

    def hand_over(self, outbox_id: int | None, rows: Sequence[Row]) -> None:
        """The messages of outbox row ``outbox_id`` (``enqueue``'s id), committed by this
        process: while this relay leads, it sends them as they are in memory instead of reading
        them back, unpacking and decompressing them (~5% of the wallet's CPU under load). The
        row stays in the table until Kafka has acknowledged them, as before, so a crash loses
        nothing: the next leader reads it. Call it only once the row is committed (a rolled
        back id is never read, but must not be sent). Bounded: with ``HANDED_MAX`` messages
        or ``HANDED_MAX_BYTES`` waiting (the relay behind), the rest are read from the table."""
        if outbox_id is None or not self._leading or self._handed_messages + len(rows) > HANDED_MAX:
            return
        size = sum(len(value) + len(key or b"") for _, key, value, _, _ in rows)
        if self._handed_bytes + size > HANDED_MAX_BYTES:
            return
        self._handed[outbox_id] = (list(rows), size)
        self._handed_messages += len(rows)
        self._handed_bytes += size

    def _take(self, outbox_id: int) -> list[Row] | None:
        found = self._handed.pop(outbox_id, None)
        if found is None:
            return None
        rows, size = found
        self._handed_messages -= len(rows)
        self._handed_bytes -= size
        return rows

    def _let_go(self) -> None:
        self._leading = False
        self._handed.clear()
        self._handed_messages = self._handed_bytes = 0

    async def _loop(self) -> None:
        lock_key = f"tally-outbox:{self._service}"
        while not self._stopping.is_set():
            try:
                # The lock and LISTEN end with the session (db.session). A replica that does not
                # lead keeps its session and asks again each second, not at every commit here
                # (wake) and without closing it (a session a second costs Postgres a backend).
                async with db.session(self._pool) as conn:
                    while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock_key):
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
                        if self._stopping.is_set():
                            return
                    try:
                        await self._relay_loop(conn)
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying", extra={"service": self._service})
                await self._sleep(1.0)

    async def _relay_loop(self, conn: Conn) -> None:
        schema = await conn.fetchval("SELECT current_schema()")

        def committed(_conn: Conn, _pid: int, _channel: str, payload: object) -> None:
            if payload == schema:
                self.wake()

        await conn.add_listener(CHANNEL, committed)
        _LEADER_HERE.set()
        self._leading = True
        try:
            while not self._stopping.is_set():
                _, full = await self.relay_once(conn)
                if not full:
                    await self._sleep(self._poll)
        finally:
            _LEADER_HERE.clear()
            self._let_go()
            with contextlib.suppress(Exception):
                await conn.remove_listener(CHANNEL, committed)

    async def relay_once(self, conn: Conn) -> tuple[int, bool]:
        """Relay the oldest rows, up to about ``batch_size`` messages. Returns the number of
        messages sent and whether more were probably waiting."""
        # read without their messages, this process has them: the oldest handed ids only (a
        # round reads at most _READ_ROWS rows; a handed row left out is read whole, as before)
        asked = heapq.nsmallest(_READ_ROWS, self._handed)
        rows = await conn.fetch(_READ, self._batch_size, asked)
        if asked:  # a handed row not read, older than one read, is gone (another leader sent it)
            last = rows[-1]["id"] if rows else None
            for gone in set(asked).difference(r["id"] for r in rows):
                if last is None or gone < last:
                    self._take(gone)
        if not rows:
            OUTBOX_BACKLOG.labels(self._service).set(0)
            return 0, False
        messages: list[Row] = []
        for r in rows:
            mine = self._take(r["id"])  # taken either way: once read, never kept
            if r["handed"]:  # read without its messages
                if mine is None:
                    raise RuntimeError(f"outbox row {r['id']} was read as handed over, and is not")
                messages += mine
            else:  # read with them (handed over during the read, or never)
                messages += stored(r)
        OUTBOX_BACKLOG.labels(self._service).set(len(messages))
        await self._send(messages)
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        OUTBOX_RELAYED.labels(self._service).inc(len(messages))
        OUTBOX_RELAYS.labels(self._service).inc()
        return len(messages), len(rows) == 500 or rows[-1]["upto"] >= self._batch_size

    async def _send(self, messages: Sequence[Row]) -> None:
        """One record batch per partition (several when one fills up), in order; returns when
        Kafka has acknowledged every one."""
        open_: dict[tuple[str, int], Any] = {}
        futures = []
        topics: dict[str, list[int]] = {}
        untraced: dict[str | None, list[tuple[str, bytes]]] = {}  # headers by type, shared
        for topic, key, value, traceparent, type_ in messages:
            partitions = topics.get(topic)
            if partitions is None:
                partitions = topics[topic] = await self._partitions(topic)
            if key is None:
                partition = self._partition(key, partitions, partitions)
            else:
                hashed = self._hashes.get(key)
                if hashed is None:
                    if len(self._hashes) >= 200_000:
                        self._hashes.clear()
                    hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
                partition = partitions[hashed % len(partitions)]
            if traceparent:
                headers = [("traceparent", traceparent.encode())]
                if type_:
                    headers.append(("type", type_.encode()))
            else:
                shared = untraced.get(type_)
                if shared is None:
                    shared = untraced[type_] = [("type", type_.encode())] if type_ else []
                headers = shared
            batch = open_.get((topic, partition))
            if batch is None:
                batch = open_[(topic, partition)] = self._producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await self._producer.send_batch(batch, topic, partition=partition))
                batch = open_[(topic, partition)] = self._producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"a {len(value)}-byte message does not fit a record batch")
        for (topic, partition), batch in open_.items():
            futures.append(await self._producer.send_batch(batch, topic, partition=partition))
        OUTBOX_RECORD_BATCHES.labels(self._service).inc(len(futures))
        await asyncio.gather(*futures)

    async def _partitions(self, topic: str) -> list[int]:
        """The topic's partitions (from metadata, refreshed every minute)."""
        known = self._topic_partitions.get(topic)
        if known is None or time.monotonic() - known[0] > 60:
            found = sorted(await self._producer.partitions_for(topic))
            known = self._topic_partitions[topic] = (time.monotonic(), found)
        return known[1]

"""Transactional outbox: events are written as rows in the same transaction as the state
change they describe, then relayed to Kafka by one leader per service (advisory lock), in id
order, and deleted once Kafka has acknowledged them. A crash never loses or invents an event;
at worst an event is sent twice, and every consumer dedupes on the envelope id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from tally import events
from tally.db import Conn
from tally.telemetry import current_traceparent

log = logging.getLogger(__name__)

OUTBOX_RELAYED = Counter("tally_outbox_relayed_total", "Outbox rows relayed to Kafka", ["service"])
OUTBOX_BACKLOG = Gauge("tally_outbox_backlog", "Outbox rows last seen waiting", ["service"])

_COLUMNS = ("topic", "key", "value", "traceparent")

Row = tuple[str, bytes | None, bytes, str | None]


def row(topic: str, key: str | None, message: dict[str, Any] | bytes,
        traceparent: str | None = None) -> Row:
    """One outbox row; ``message`` is an envelope dict (or already-encoded bytes)."""
    value = message if isinstance(message, bytes) else events.dumps(message)
    return (topic, key.encode() if key is not None else None, value,
            traceparent if traceparent is not None else current_traceparent())


async def enqueue(conn: Conn, rows: Iterable[Row]) -> int:
    """Write rows inside the caller's transaction (COPY: one round trip for any count)."""
    records = list(rows)
    if records:
        await conn.copy_records_to_table("outbox", records=records, columns=_COLUMNS)
    return len(records)


async def publish(conn: Conn, topic: str, key: str | None,
                  message: dict[str, Any]) -> None:
    await enqueue(conn, [row(topic, key, message)])


class OutboxRelay:
    """Moves outbox rows to Kafka. Run one per service process; only the advisory-lock holder
    relays, so per-key order is kept across replicas."""

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, *, service: str,
                 batch_size: int = 5000, poll_interval: float = 0.02) -> None:
        self._pool = pool
        self._producer = producer
        self._service = service
        self._batch_size = batch_size
        self._poll = poll_interval
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._service}")

    def wake(self) -> None:
        """Hint that rows were just committed (same process): relay without waiting a poll."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)

    async def _run(self) -> None:
        lock_key = f"tally-outbox:{self._service}"
        while not self._stopping.is_set():
            try:
                async with self._pool.acquire() as conn:
                    leader = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock_key)
                    if not leader:
                        await self._sleep(1.0)
                        continue
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
        while not self._stopping.is_set():
            sent = await self.relay_once(conn)
            if sent < self._batch_size:
                await self._sleep(self._poll)

    async def relay_once(self, conn: Conn) -> int:
        rows = await conn.fetch(
            "SELECT id, topic, key, value, traceparent FROM outbox ORDER BY id LIMIT $1",
            self._batch_size,
        )
        OUTBOX_BACKLOG.labels(self._service).set(len(rows))
        if not rows:
            return 0
        futures = []
        for r in rows:
            headers = [("traceparent", r["traceparent"].encode())] if r["traceparent"] else []
            futures.append(await self._producer.send(r["topic"], r["value"], key=r["key"],
                                                     headers=headers))
        await asyncio.gather(*futures)
        ids: Sequence[int] = [r["id"] for r in rows]
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", ids)
        OUTBOX_RELAYED.labels(self._service).inc(len(rows))
        return len(rows)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

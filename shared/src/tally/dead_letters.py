"""Poison records a consumer dead-lettered after failing on them alone (tally.consumer's
``Isolation``): each record once, in its service's ``dead_letters`` table and on its topic's DLQ
(through the outbox, in one transaction), and a budget per kind of record that every replica of
the service shares (docs/0014)."""

from __future__ import annotations

from typing import Any

from tally.consumer import POISON_WINDOW_SECONDS, dlq_row
from tally.uow import Database


class DeadLetters:
    def __init__(
        self, db: Database, service: str, *, budget: int, window_seconds: float = POISON_WINDOW_SECONDS
    ) -> None:
        self._db = db
        self._service = service
        self._budget = budget
        self._window = window_seconds

    async def already(self, record: Any) -> bool:
        async with self._db.reading() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT true FROM dead_letters WHERE topic = $1 AND part = $2 AND record_offset = $3",
                    record.topic,
                    record.partition,
                    record.offset,
                )
            )

    async def letter(self, record: Any, reason: str, kind: str) -> bool:
        async with self._db.unit() as uow:
            conn = uow.conn
            # one replica at a time per kind: the budget is counted, then spent, by one
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"dead-letters:{kind}")
            spent = await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE kind = $1 "
                "AND lettered_at > now() - make_interval(secs => $2)",
                kind,
                self._window,
            )
            if spent >= self._budget:
                return False
            new = await conn.fetchval(
                "INSERT INTO dead_letters (topic, part, record_offset, kind) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING RETURNING true",
                record.topic,
                record.partition,
                record.offset,
                kind,
            )
            if new:
                uow.publish([dlq_row(record, reason, service=self._service)])
        return True

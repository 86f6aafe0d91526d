"""Poison records a consumer dead-lettered after failing on them alone (tally.consumer's
``Isolation``): each record once, in its service's ``dead_letters`` table and on its topic's DLQ
(through the outbox, in one transaction), and a budget per consumer group and kind of record
that every replica of the service shares (docs/0014).

A record is known by its group, topic, partition, offset and a digest of its key, value and
timestamp: a topic rebuilt (or the embedded broker restarted, its offsets from 0 again) reuses
offsets, and a new record at an old offset is a new record."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from tally.consumer import dlq_row
from tally.db import Conn
from tally.uow import Database

POISON_WINDOW_SECONDS = 24 * 3600.0  # the budget counts the letters of the last day
KEPT = timedelta(days=7)  # rows kept past the window (housekeeping sweeps older ones)


def digest(record: Any) -> bytes:
    h = hashlib.sha256()
    for part in (record.key or b"", record.value or b"", str(record.timestamp).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


class DeadLetters:
    def __init__(
        self,
        db: Database,
        service: str,
        group_id: str,
        *,
        budget: int,
        window_seconds: float = POISON_WINDOW_SECONDS,
    ) -> None:
        self._db = db
        self._service = service
        self._group = group_id
        self._budget = budget
        self._window = window_seconds

    async def letter(self, record: Any, reason: str, kind: str) -> bool:
        key = (self._group, record.topic, record.partition, record.offset, digest(record))
        async with self._db.unit() as uow:
            conn = uow.conn
            # one replica at a time per group and kind: the budget is counted, then spent, by one
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"dead-letters:{self._group}:{kind}"
            )
            if await conn.fetchval(
                "SELECT true FROM dead_letters WHERE group_id = $1 AND topic = $2 AND part = $3 "
                "AND record_offset = $4 AND digest = $5",
                *key,
            ):
                return True  # its batch came back: in the DLQ already
            spent = await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE group_id = $1 AND kind = $2 "
                "AND lettered_at > now() - make_interval(secs => $3)",
                self._group,
                kind,
                self._window,
            )
            if spent >= self._budget:
                return False
            await conn.execute(
                "INSERT INTO dead_letters (group_id, topic, part, record_offset, digest, kind) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                *key,
                kind,
            )
            uow.publish([dlq_row(record, reason, service=self._service)])
        return True


async def sweep(conn: Conn) -> int:
    """Forget dead-letter rows older than ``KEPT`` (their batches are long committed)."""
    status = await conn.execute("DELETE FROM dead_letters WHERE lettered_at < now() - $1::interval", KEPT)
    return int(status.split()[-1])

"""Forgetting old event ids: ``ingested`` gets a row per accepted event, so without an end it
grows with all the usage ever sent, and its key index with it. Ids older than the dedupe
window (``TALLY_DEDUPE_WINDOW_DAYS``) are deleted in rounds, by one replica at a time. A usage
event re-sent after that is answered "accepted" again, and the wallet's ledger, whose keys
are kept for ever, posts it only once (docs/0007)."""

from __future__ import annotations

import logging
from datetime import timedelta

import asyncpg
from prometheus_client import Counter

from tally.uow import UnitOfWork
from tally.worker import Worker
from tally_usage_meter import storage

log = logging.getLogger(__name__)

FORGOTTEN = Counter(
    "tally_usage_ingested_forgotten_total", "Event ids dropped from the dedupe table after the dedupe window"
)


class DedupeExpiry(Worker):
    name = "dedupe-expiry"
    idle = 3600.0  # a round an hour; rounds follow at once while a full one came back
    ROUND = 50_000

    def __init__(self, pool: asyncpg.Pool, window_days: int) -> None:
        super().__init__()
        self._pool = pool
        self._window = timedelta(days=window_days)  # zero: keep every id

    async def step(self) -> bool:
        if not self._window:
            return False
        async with UnitOfWork(self._pool) as uow:  # the lock is the transaction's
            conn = uow.conn
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext($1))", "tally-dedupe-expiry"
            ):
                return False  # another replica is at it
            forgotten = await storage.forget_ingested(conn, self._window, self.ROUND)
        if forgotten:
            FORGOTTEN.inc(forgotten)
            log.info("forgot %d event ids older than %d days", forgotten, self._window.days)
        return forgotten == self.ROUND

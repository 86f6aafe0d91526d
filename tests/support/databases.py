"""A service's schema of its own on the real Postgres, for tests that call use cases as plain
functions (tests/integration): migrated like the service migrates it, dropped with the pool."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import asyncpg

from tally import db, outbox
from tally.uow import Database
from tests.support.stack import Infra, uid


class CountingRelay:
    """Stands for the outbox relay: counts the wakes a unit of work gives it after commit,
    and keeps what it is handed over (outbox id, messages)."""

    def __init__(self) -> None:
        self.woken = 0
        self.handed: list[tuple[int | None, list[outbox.Row]]] = []

    def wake(self) -> None:
        self.woken += 1

    def hand_over(self, outbox_id: int | None, rows: Sequence[outbox.Row]) -> None:
        self.handed.append((outbox_id, list(rows)))


@contextlib.asynccontextmanager
async def service_database(infra: Infra, package: str, prefix: str) -> AsyncIterator[Database]:
    """A fresh schema migrated with the shared tables (``tally``) and ``package``'s own."""
    schema = f"{prefix}_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=4)
    try:
        await db.migrate(pool, schema, "tally")
        await db.migrate(pool, schema, package)
        yield Database(pool, CountingRelay())
    finally:
        await pool.close()


async def advisory_lock_free(dsn: str, key: int | str) -> bool:
    """Whether another session can take the advisory lock ``key`` now (a text key as
    ``hashtext``, as the outbox relay names its lock); let go again at once."""
    lock = "pg_try_advisory_lock(hashtext($1))" if isinstance(key, str) else "pg_try_advisory_lock($1)"
    conn = await asyncpg.connect(dsn)
    try:
        taken = bool(await conn.fetchval(f"SELECT {lock}", key))
        if taken:
            await conn.execute(f"SELECT {lock.replace('try_advisory_lock', 'advisory_unlock')}", key)
        return taken
    finally:
        await conn.close()

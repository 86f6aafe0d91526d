"""A service's schema of its own on the real Postgres, for tests that call use cases as plain
functions (tests/integration): migrated like the service migrates it, dropped with the pool."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from tally import db
from tally.uow import Database
from tests.support.stack import Infra, uid


class CountingRelay:
    """Stands for the outbox relay: counts the wakes a unit of work gives it after commit."""

    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


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

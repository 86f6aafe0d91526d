"""Pooled connections go back without asyncpg's reset query (tally.db.create_pool), so nothing
may leave session state on one: work that does takes ``db.session``, whose connection is
closed after, even when that work is cancelled before it could undo its state. Real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tally import db
from tests.support.databases import advisory_lock_free
from tests.support.stack import Infra, eventually, uid

LOCK = 0x7E57_5E55


@pytest.fixture
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    schema = f"sess_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=1)  # one connection: reused
    try:
        yield pool
    finally:
        await pool.close()


async def lock_free(infra: Infra) -> bool:
    return await advisory_lock_free(infra.stack.database_url, LOCK)


async def test_a_pooled_connection_is_reused_as_it_was_left_and_without_a_reset_round_trip(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("SELECT set_config('application_name', 'marked', false)")
    async with pool.acquire() as conn:
        # the same backend, and the session setting survived: no RESET ALL was sent
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert await conn.fetchval("SELECT current_setting('application_name')") == "marked"


async def test_a_transaction_left_open_is_still_rolled_back_on_release(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS left_open (n int)")
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO left_open VALUES (1)")
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM left_open") == 0


async def test_a_session_lock_ends_with_its_session_even_when_the_work_is_cancelled(
    infra: Infra, pool: asyncpg.Pool
) -> None:
    async with db.session(pool) as conn:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK)
        assert not await lock_free(infra)
    await eventually(lambda: lock_free(infra), what="the lock to end with its closed session")

    holding = asyncio.Event()

    async def holder() -> None:
        async with db.session(pool) as conn:
            await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK)
            holding.set()
            await asyncio.sleep(3600)  # cancelled here: no chance to unlock

    task = asyncio.create_task(holder())
    await holding.wait()
    assert not await lock_free(infra)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: lock_free(infra), timeout=5, what="the cancelled session's lock to end with it")
    async with pool.acquire() as conn:  # the pool replaced the closed connection
        assert await conn.fetchval("SELECT pg_backend_pid()") != first


async def test_a_session_whose_connection_broke_under_it_ends_quietly(pool: asyncpg.Pool) -> None:
    """A connection that dies inside the work is already back in the pool, closed: the session
    does not hide the work's own error behind one of its own."""
    with pytest.raises(RuntimeError, match="the work's own error"):
        async with db.session(pool) as conn:
            conn.terminate()  # as a dropped connection is cleaned up
            raise RuntimeError("the work's own error")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1

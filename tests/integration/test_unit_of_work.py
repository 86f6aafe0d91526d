"""The unit of work against the real Postgres: state, outbox rows and the idempotency record are
written together at commit or not at all; a failed savepoint takes back its own rows; the relay
is woken only after a commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tally import db, outbox
from tally.errors import ApiError
from tally.uow import Database
from tests.support.databases import CountingRelay
from tests.support.stack import Infra, uid


@pytest.fixture
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    schema = f"uow_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    await db.migrate(pool, schema, "tally")
    await pool.execute("CREATE TABLE things (id text PRIMARY KEY)")
    yield pool
    await pool.close()


def ping(n: int) -> outbox.Row:
    message: dict[str, Any] = {"id": f"m{n}", "type": "test.ping", "time": "2026-01-01T00:00:00Z", "data": {}}
    return outbox.row("wallet.events", "k", message, inherit=False)


async def messages(pool: asyncpg.Pool) -> list[str]:
    out: list[str] = []
    for r in await pool.fetch("SELECT * FROM outbox ORDER BY id"):
        out += [value.decode() for _, _, value, _, _ in outbox.stored(r)]
    return out


async def test_a_commit_writes_state_and_messages_together_then_wakes_the_relay(pool: asyncpg.Pool) -> None:
    relay = CountingRelay()
    uow = Database(pool, relay).unit()
    async with uow:
        await uow.conn.execute("INSERT INTO things VALUES ('a')")
        uow.publish([ping(1), ping(2)])
        assert relay.woken == 0  # nothing is told before the commit
    assert relay.woken == 1 and uow.published == 2
    # handed to the relay once committed: the outbox row's id and its messages
    [(handed_id, handed)] = relay.handed
    assert handed_id == await pool.fetchval("SELECT max(id) FROM outbox")
    assert handed == [ping(1), ping(2)]
    # rows written through the connection by a storage helper wake it too
    async with Database(pool, relay).unit() as uow:
        await outbox.enqueue(uow.conn, [ping(9)])
    assert relay.woken == 2
    assert relay.handed[1] == (None, [])  # written by the helper, not the unit: read back from the table
    assert await pool.fetchval("SELECT count(*) FROM things") == 1
    found = await messages(pool)
    assert len(found) == 3 and '"m1"' in found[0] and '"m2"' in found[1] and '"m9"' in found[2]


async def test_a_failure_writes_nothing_and_wakes_no_one(pool: asyncpg.Pool) -> None:
    relay = CountingRelay()
    with pytest.raises(RuntimeError):
        async with Database(pool, relay).unit() as uow:
            await uow.conn.execute("INSERT INTO things VALUES ('b')")
            uow.publish([ping(3)])
            raise RuntimeError("the use case failed")
    assert relay.woken == 0 and relay.handed == []  # nothing committed: nothing to send
    assert await pool.fetchval("SELECT count(*) FROM things") == 0
    assert await messages(pool) == []
    assert pool.get_idle_size() == pool.get_size()  # the connection went back


async def test_a_failed_savepoint_takes_back_its_rows_and_keeps_the_rest(pool: asyncpg.Pool) -> None:
    async with Database(pool).unit() as uow:
        uow.publish([ping(4)])
        with pytest.raises(asyncpg.UniqueViolationError):
            async with uow.savepoint():
                await uow.conn.execute("INSERT INTO things VALUES ('c')")
                uow.publish([ping(5)])
                await uow.conn.execute("INSERT INTO things VALUES ('c')")  # fails this part alone
        await uow.conn.execute("INSERT INTO things VALUES ('d')")
    assert [r["id"] for r in await pool.fetch("SELECT id FROM things")] == ["d"]
    found = await messages(pool)
    assert len(found) == 1 and '"m4"' in found[0]


async def test_an_idempotency_key_records_its_response_in_the_same_commit(pool: asyncpg.Pool) -> None:
    database = Database(pool)
    async with database.unit() as uow:
        assert await uow.claim_key("user:1", "key-1", "hash-a") is None
        await uow.conn.execute("INSERT INTO things VALUES ('e')")
        uow.remember(201, {"id": "e"})
    async with database.unit() as uow:
        stored = await uow.claim_key("user:1", "key-1", "hash-a")
        assert stored is not None and (stored.status_code, stored.response) == (201, {"id": "e"})
    async with database.unit() as uow:
        with pytest.raises(ApiError) as err:
            await uow.claim_key("user:1", "key-1", "hash-b")
        assert err.value.code == "idempotency_key_reused"
    # a use case that fails leaves its key unclaimed: the retry does the work
    with pytest.raises(RuntimeError):
        async with database.unit() as uow:
            assert await uow.claim_key("user:1", "key-2", "hash-a") is None
            uow.remember(201, {"id": "f"})
            raise RuntimeError
    async with database.unit() as uow:
        assert await uow.claim_key("user:1", "key-2", "hash-a") is None


async def test_a_unit_of_work_is_used_once(pool: asyncpg.Pool) -> None:
    uow = Database(pool).unit()
    with pytest.raises(RuntimeError):
        _ = uow.conn  # not open
    async with uow:
        with pytest.raises(RuntimeError):
            await uow.__aenter__()

"""Races between usage batches and the ways an account's settings change (docs/0025), kept
from a review of a shortcut that was reverted (a one-row "rebilling clock" that let a batch
skip reading its accounts' settings again). Settings are also dropped by two paths that never
lock the company wallet (a tombstone on rebilling.settings, an account heard under another
company): a batch rated under settings dropped meanwhile goes again. Two settings batches of
different partitions do not deadlock, and a batch racing a late version goes again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tally.uow import Database
from tally_wallet import handlers, storage
from tally_wallet.domain import RatedOnOldSettings
from tally_wallet.rerating import store_settings
from tally_wallet.usage import apply_usage
from tests.integration.test_rerating import account_lines, at, database, hear, post, rebilling, used
from tests.support.stack import uid

__all__ = ["database"]


async def _batch_with_change_between_rating_and_posting(
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    batch: list[Any],
    change: Callable[[Any], Awaitable[None]],
) -> None:
    """Run ``batch`` in its own transaction; right after it read its accounts (and the clock),
    ``change`` runs and commits on another connection. Raises what apply_usage raises."""
    real = storage.load_accounts

    async def load_then_change(conn: Any, ids: Any) -> Any:
        out = await real(conn, ids)
        async with database.pool.acquire() as other, other.transaction():
            await change(other)
        return out

    monkeypatch.setattr(storage, "load_accounts", load_then_change)
    try:
        async with database.pool.acquire() as conn, conn.transaction():
            await apply_usage(conn, batch)
    finally:
        monkeypatch.setattr(storage, "load_accounts", real)


async def test_a_batch_rated_under_settings_a_tombstone_deleted_goes_again(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rebilling.settings tombstone (handlers.apply_settings -> storage.delete_rebilling)
    commits between the batch's read and its post: the batch must not charge the account by
    the deleted settings. Before HEAD the per-account re-read raised RatedOnOldSettings."""
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "rebill", effective=at(0)))
    await post(database, used(cid, aid, "opened", 1_000, at(1)))  # charged under v1: right
    assert [r["key"] for r in await account_lines(database, aid)] == ["usage:opened:account"]

    async def tombstone(conn: Any) -> None:
        await handlers.apply_settings(None, conn, (aid, None))  # type: ignore[arg-type]

    with pytest.raises(RatedOnOldSettings):
        await _batch_with_change_between_rating_and_posting(
            database, monkeypatch, [used(cid, aid, "raced", 1_000, at(20))], tombstone
        )
    # whatever happened, the account must not pay for "raced" under deleted settings
    assert [r["key"] for r in await account_lines(database, aid)] == ["usage:opened:account"]


async def test_a_batch_rated_before_its_account_moved_company_goes_again(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """account.created naming another company (storage.upsert_account, as
    apply_rebilling_event calls it) drops the account's settings and moves its wallet to the
    new company, without moving the clock. A batch of the old company rated before it must
    not debit the (now other company's) account wallet by the dropped settings."""
    old, new, aid = uid("co"), uid("co"), uid("acct")
    await hear(database, rebilling(old, aid, 1, "rebill", effective=at(0)))
    await post(database, used(old, aid, "opened", 1_000, at(1)))

    async def moved(conn: Any) -> None:
        await storage.upsert_account(conn, aid, new)

    with pytest.raises(RatedOnOldSettings):
        await _batch_with_change_between_rating_and_posting(
            database, monkeypatch, [used(old, aid, "raced", 1_000, at(20))], moved
        )
    assert [r["key"] for r in await account_lines(database, aid)] == ["usage:opened:account"]


async def test_two_settings_batches_of_different_partitions_do_not_deadlock(database: Database) -> None:
    """Settings are stored a consumer batch per transaction (handlers._transactional). T2 (one
    partition) stores c (company Y) then d (company X); T1 (another partition) stores a
    (company X) in between. Without the clock T2 just waits for T1's commit. With it T2 holds
    the clock row (bumped for c) and waits for X's wallet, while T1 holds X's wallet and
    waits for the clock row: a deadlock, one partition's whole batch rolled back."""
    x, y = uid("co"), uid("co")
    a, c, d = (uid("acct") for _ in range(3))
    for cid, aid in ((x, a), (y, c), (x, d)):  # wallets exist, settings v1 stored
        await hear(database, rebilling(cid, aid, 1, "rebill", effective=at(0)))
        await post(database, used(cid, aid, uid("e"), 1_000, at(1)))
    errors: list[BaseException] = []

    async def run(conn: Any, tx: Any, work: Awaitable[Any]) -> None:
        try:
            await work
            await tx.commit()
        except asyncpg.DeadlockDetectedError as exc:
            errors.append(exc)
            await tx.rollback()

    async with database.pool.acquire() as c1, database.pool.acquire() as c2:
        t1, t2 = c1.transaction(), c2.transaction()
        await t1.start()
        await t2.start()
        await store_settings(c2, rebilling(y, c, 2, "off", effective=at(0)), "USD")  # T2: Y, clock
        first = asyncio.create_task(
            run(c1, t1, store_settings(c1, rebilling(x, a, 2, "off", effective=at(0)), "USD"))
        )  # T1: X wallet, then waits for the clock row
        await asyncio.sleep(0.3)
        second = run(c2, t2, store_settings(c2, rebilling(x, d, 2, "off", effective=at(0)), "USD"))
        await asyncio.wait_for(asyncio.gather(first, second), timeout=20)
    assert errors == []


async def test_a_batch_racing_a_late_version_goes_again(database: Database) -> None:
    """Held: the classic race (settings lock the company wallet, store, commit while the batch
    waits for it) with a version heard late still raises RatedOnOldSettings."""
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 2, "rebill", effective=at(30)))
    await post(database, used(cid, aid, "opened", 1_000, at(40)))
    async with database.pool.acquire() as s_conn, database.pool.acquire() as u_conn:
        s_tx = s_conn.transaction()
        await s_tx.start()
        await store_settings(s_conn, rebilling(cid, aid, 1, "rebill_markup", "3", effective=at(10)), "USD")
        u_tx = u_conn.transaction()
        await u_tx.start()
        batch = asyncio.create_task(apply_usage(u_conn, [used(cid, aid, "raced", 1_000, at(20))]))
        await asyncio.sleep(0.3)
        assert not batch.done()
        await s_tx.commit()
        with pytest.raises(RatedOnOldSettings):
            await batch
        await u_tx.rollback()

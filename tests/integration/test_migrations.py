"""Safe migrations on the real Postgres: a file marked ``-- tally: no-transaction`` runs outside
a transaction (``CREATE INDEX CONCURRENTLY``), a migration waiting for a lock gives up after
the ``lock_timeout`` instead of queueing every query behind it (and the pooled connection is
left without it), and ``--migrate --status`` tells applied from pending."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tally import db
from tests.support.stack import Infra, uid


@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A package of migrations of the test's own, importable."""
    name = "migs_" + uid("p").replace("-", "_")
    root = tmp_path / name
    (root / "migrations").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        yield name, root / "migrations"
    finally:
        sys.path.remove(str(tmp_path))


async def test_a_no_transaction_file_builds_an_index_concurrently(
    infra: Infra, package: tuple[str, Path]
) -> None:
    name, migrations = package
    (migrations / "0001_table.sql").write_text("CREATE TABLE items (id bigint PRIMARY KEY, owner text);\n")
    (migrations / "0002_index.sql").write_text(
        "-- tally: no-transaction\n"
        "-- built without blocking writes\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS items_owner ON items (owner);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS items_owner_id ON items (owner, id);\n"
    )
    schema = name[:40]
    pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    try:
        assert await db.migrate(pool, schema, name) == ["0001_table.sql", "0002_index.sql"]
        assert await db.migrate(pool, schema, name) == []
        valid = await pool.fetch(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname LIKE 'items_owner%'",
            schema,
        )
        assert sorted((r["relname"], r["indisvalid"]) for r in valid) == [
            ("items_owner", True),
            ("items_owner_id", True),
        ]
        async with pool.acquire() as conn:
            status = await db.status(conn, schema, name)
        assert [n for n, at in status if at] == ["0001_table.sql", "0002_index.sql"]
    finally:
        await pool.close()


async def test_a_migration_behind_a_lock_gives_up_and_leaves_no_timeout_behind(
    infra: Infra, package: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "LOCK_TIMEOUT", "500ms")  # 5 s in service; the same path, sooner
    name, migrations = package
    (migrations / "0001_table.sql").write_text("CREATE TABLE items (id bigint PRIMARY KEY);\n")
    schema = name[:40]
    pool = await db.create_pool(infra.stack.database_url, schema, size=1)
    blocker = await asyncpg.connect(infra.stack.database_url)
    try:
        await db.migrate(pool, schema, name)
        (migrations / "0002_column.sql").write_text("ALTER TABLE items ADD COLUMN note text;\n")
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(f"LOCK TABLE {schema}.items IN ACCESS SHARE MODE")  # a long reader
        with pytest.raises(asyncpg.LockNotAvailableError):
            await asyncio.wait_for(db.migrate(pool, schema, name), timeout=30)
        await tx.rollback()
        assert await pool.fetchval("SHOW lock_timeout") == "0"  # not left on the pooled connection
        async with pool.acquire() as conn:
            assert [(n, at is None) for n, at in await db.status(conn, schema, name)] == [
                ("0001_table.sql", False),
                ("0002_column.sql", True),  # pending: the next start applies it
            ]
        assert await db.migrate(pool, schema, name) == ["0002_column.sql"]
    finally:
        await blocker.close()
        await pool.close()


def test_migrate_status_of_a_service(infra: Infra) -> None:
    env = {**os.environ, "DATABASE_URL": infra.stack.database_url, "TALLY_ENV": "development"}
    done = subprocess.run(
        [sys.executable, "-m", "tally_notifier", "--migrate", "--status"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert any("0004_webhooks.sql" in line for line in lines)
    assert {line.split()[0] for line in lines} == {"tally", "tally_notifier"}

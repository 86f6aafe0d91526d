"""Postgres: one asyncpg pool per service, confined to the service's own schema, and a
migration runner for plain versioned SQL files (``migrations/0001_name.sql``)."""

from __future__ import annotations

import importlib.resources
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection, whether taken straight or from a pool (handlers accept both).
    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Conn = asyncpg.Connection

log = logging.getLogger(__name__)

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def create_pool(dsn: str, schema: str, *, size: int = 8) -> asyncpg.Pool:
    """A pool whose connections see only ``schema`` (and ``public`` for extensions)."""
    _check_schema(schema)
    await ensure_schema(dsn, schema)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        server_settings={"search_path": schema, "application_name": f"tally-{schema}"},
        command_timeout=60,
    )
    assert pool is not None
    return pool


async def ensure_schema(dsn: str, schema: str) -> None:
    _check_schema(schema)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    finally:
        await conn.close()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(package: str) -> list[Migration]:
    """Read ``<package>/migrations/NNNN_*.sql`` in version order."""
    root = importlib.resources.files(package).joinpath("migrations")
    found: list[Migration] = []
    for entry in root.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {package}: {versions}")
    return found


async def migrate(pool: asyncpg.Pool, schema: str, package: str) -> list[str]:
    """Apply pending migrations of ``package`` (e.g. ``tally`` for the outbox and inbox, then
    the service's own package) to ``schema``, each in its own transaction,
    under an advisory lock so concurrent replicas never race. Returns what was applied."""
    _check_schema(schema)
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " package text NOT NULL, version int NOT NULL, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (package, version))"
        )
        lock_key = f"tally-migrate:{schema}"
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
        try:
            done = {
                r["version"]
                for r in await conn.fetch("SELECT version FROM schema_migrations WHERE package = $1", package)
            }
            for m in load_migrations(package):
                if m.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (package, version, name) VALUES ($1, $2, $3)",
                        package,
                        m.version,
                        m.name,
                    )
                applied.append(m.name)
                log.info("migration applied", extra={"schema": schema, "migration": m.name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
    return applied


def _check_schema(schema: str) -> None:
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"bad schema name {schema!r}")

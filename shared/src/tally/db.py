"""Postgres: one asyncpg pool per service, confined to the service's own schema, and a
migration runner for plain versioned SQL files (``migrations/0001_name.sql``)."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import re
from collections.abc import AsyncIterator
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
    """A pool whose connections see only ``schema`` (and ``public`` for extensions).

    A connection goes back to the pool without asyncpg's reset query (advisory unlock all,
    CLOSE ALL, UNLISTEN *, RESET ALL): a round trip on every release, a fifth of all the
    round trips at one usage event per request (#20). An open transaction is still rolled
    back. Work that leaves state in its session takes its connection from ``session``, which
    closes it after, so a pooled connection never carries any."""
    _check_schema(schema)
    await ensure_schema(dsn, schema)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        server_settings={"search_path": schema, "application_name": f"tally-{schema}"},
        command_timeout=60,
        reset=_nothing_to_reset,
    )
    assert pool is not None
    return pool


async def _nothing_to_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pooled connections hold no session state (``session`` takes the ones that would)."""


@contextlib.asynccontextmanager
async def session(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    """A pooled connection for work that leaves state in its session — an advisory lock held
    across transactions, LISTEN, SET — closed when done (even when the work is cancelled
    before it could undo that state): no later acquirer inherits it. The pool opens a new
    connection in its place."""
    async with pool.acquire() as conn:
        try:
            yield conn
        finally:
            # A connection that broke under the work is already back in the pool, closed.
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()


async def ensure_schema(dsn: str, schema: str) -> None:
    _check_schema(schema)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    finally:
        await conn.close()


NO_TRANSACTION = "-- tally: no-transaction"
# How long a migration waits for a lock before it fails (and the start with it, to be retried):
# a migration queued behind a long transaction would otherwise block every query behind it.
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        """False for a file that starts with ``-- tally: no-transaction``: its statements run
        one by one outside a transaction (``CREATE INDEX CONCURRENTLY``); they must be safe to
        run again (``IF NOT EXISTS``), since a failure part-way leaves the earlier ones done."""
        return not self.sql.lstrip().startswith(NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The file's statements (split after each line that ends with ``;``)."""
        out, current = [], []
        for line in self.sql.splitlines():
            current.append(line)
            if line.rstrip().endswith(";"):
                text = "\n".join(current).strip()
                if text and not all(x.strip().startswith("--") or not x.strip() for x in current):
                    out.append(text)
                current = []
        rest = "\n".join(current).strip()
        if rest and not all(x.strip().startswith("--") or not x.strip() for x in current):
            out.append(rest)
        return out


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
    the service's own package) to ``schema``, each in its own transaction (or, marked
    ``-- tally: no-transaction``, statement by statement), under an advisory lock so concurrent
    replicas never race, with a ``lock_timeout``. Returns what was applied."""
    _check_schema(schema)
    applied: list[str] = []
    async with session(pool) as conn:
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
            await conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            for m in load_migrations(package):
                if m.version in done:
                    continue
                if m.transactional:
                    async with conn.transaction():
                        await conn.execute(m.sql)
                        await _record(conn, package, m)
                else:
                    for statement in m.statements():
                        await conn.execute(statement)
                    await _record(conn, package, m)
                applied.append(m.name)
                log.info("migration applied", extra={"schema": schema, "migration": m.name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
    return applied


async def _record(conn: Conn, package: str, m: Migration) -> None:
    await conn.execute(
        "INSERT INTO schema_migrations (package, version, name) VALUES ($1, $2, $3)",
        package,
        m.version,
        m.name,
    )


async def status(conn: Conn, schema: str, package: str) -> list[tuple[str, str | None]]:
    """Each migration of ``package`` and when it was applied to ``schema`` (None: pending)."""
    _check_schema(schema)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations")
    done = (
        {
            r["version"]: r["applied_at"]
            for r in await conn.fetch(
                f"SELECT version, applied_at FROM {schema}.schema_migrations WHERE package = $1", package
            )
        }
        if exists
        else {}
    )
    return [
        (m.name, done[m.version].isoformat() if m.version in done else None) for m in load_migrations(package)
    ]


def _check_schema(schema: str) -> None:
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"bad schema name {schema!r}")

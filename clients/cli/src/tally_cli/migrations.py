"""Each service's migrations (its schema in ``DATABASE_URL``): applied, or shown with their
state. The same code the services run with ``--migrate`` (``tally.db.migrate``)."""

from __future__ import annotations

import importlib
from typing import Any

import asyncpg

from tally import db
from tally.settings import get_settings


class Unavailable(Exception):
    """Postgres could not be reached (or DATABASE_URL is not set)."""


def _spec(service: str) -> Any:
    return importlib.import_module("tally_" + service.replace("-", "_") + ".app").SPEC


def _dsn() -> str:
    try:
        return get_settings().require_database_url()
    except RuntimeError as exc:
        raise Unavailable(str(exc)) from exc


async def status(services: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        conn = await asyncpg.connect(_dsn())
    except (OSError, asyncpg.PostgresError) as exc:
        raise Unavailable(f"Postgres is unreachable: {exc}") from exc
    try:
        for service in services:
            spec = _spec(service)
            for package in ("tally", spec.package):
                for name, at in await db.status(conn, spec.schema, package):
                    state = "applied" if at else "pending"
                    rows.append(
                        {
                            "service": service,
                            "package": package,
                            "migration": name,
                            "state": state,
                            "applied_at": at,
                        }
                    )
    finally:
        await conn.close()
    return rows


async def apply(services: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for service in services:
        spec = _spec(service)
        try:
            pool = await db.create_pool(_dsn(), spec.schema, size=1)
        except (OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(f"Postgres is unreachable: {exc}") from exc
        try:
            for package in ("tally", spec.package):
                for name in await db.migrate(pool, spec.schema, package):
                    rows.append(
                        {"service": service, "package": package, "migration": name, "state": "applied now"}
                    )
        finally:
            await pool.close()
    return rows

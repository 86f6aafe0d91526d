"""The webhook tables: endpoints, deliveries (the durable queue) and the attempt log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from tally.db import Conn

ENDPOINT = "id, company_id, url, event_types, status, created_at, failing_since, disabled_at, seq"
DELIVERY = (
    "d.id, d.endpoint_id, d.company_id, d.account_id, d.event_id, d.event_type, d.status, "
    "d.attempts, d.next_attempt_at, d.retry_until, d.created_at, d.last_attempt_at, "
    "d.response_code, d.latency_ms, d.last_error, d.seq"
)

# (delivery id, endpoint id, company, account named, event id, event type, payload)
DeliveryRow = tuple[str, str, str, str | None, str, str, bytes]


async def add_endpoint(
    conn: Conn, eid: str, cid: str, url: str, types: list[str], secret: str
) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO webhook_endpoints (id, company_id, url, event_types, secret) "
        f"VALUES ($1, $2, $3, $4, $5) RETURNING {ENDPOINT}",
        eid,
        cid,
        url,
        types,
        secret,
    )
    assert row is not None
    return row


async def endpoint(conn: Conn, eid: str, *, lock: bool = False) -> asyncpg.Record | None:
    """An endpoint that is not deleted."""
    return await conn.fetchrow(
        f"SELECT {ENDPOINT}, secret FROM webhook_endpoints WHERE id = $1 AND status <> 'deleted'"
        + (" FOR UPDATE" if lock else ""),
        eid,
    )


async def endpoints(conn: Conn, cid: str, *, limit: int, before_seq: int | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {ENDPOINT} FROM webhook_endpoints WHERE company_id = $1 AND status <> 'deleted' "
        "AND seq < $2 ORDER BY seq DESC LIMIT $3",
        cid,
        before_seq if before_seq is not None else 2**62,
        limit,
    )


async def listening(conn: Conn) -> list[asyncpg.Record]:
    """Every enabled endpoint: (id, company, event types)."""
    return await conn.fetch(
        "SELECT id, company_id, event_types FROM webhook_endpoints WHERE status = 'enabled'"
    )


async def registered(conn: Conn, cid: str) -> int:
    """A company's endpoints, enabled or disabled (what the bound counts)."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM webhook_endpoints WHERE company_id = $1 AND status <> 'deleted'", cid
        )
    )


async def listening_in(conn: Conn, cid: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, company_id, event_types FROM webhook_endpoints "
        "WHERE status = 'enabled' AND company_id = $1",
        cid,
    )


async def set_status(conn: Conn, eid: str, status: str) -> asyncpg.Record | None:
    """Enable, disable or delete; a disabled or deleted endpoint's queue is dropped."""
    row = await conn.fetchrow(
        "UPDATE webhook_endpoints SET status = $2, "
        "disabled_at = CASE WHEN $2 = 'enabled' THEN NULL ELSE COALESCE(disabled_at, now()) END, "
        "failing_since = CASE WHEN $2 = 'enabled' THEN NULL ELSE failing_since END "
        f"WHERE id = $1 RETURNING {ENDPOINT}",
        eid,
        status,
    )
    if status != "enabled":
        await conn.execute(
            "UPDATE webhook_deliveries SET status = 'dropped', last_error = $2 "
            "WHERE endpoint_id = $1 AND status = 'pending'",
            eid,
            f"endpoint {status}",
        )
    return row


async def enqueue(conn: Conn, rows: Sequence[DeliveryRow]) -> int:
    """Queue deliveries; an (endpoint, event) already queued is not queued again."""
    if not rows:
        return 0
    status = await conn.execute(
        "INSERT INTO webhook_deliveries (id, endpoint_id, company_id, account_id, event_id, "
        "event_type, payload) "
        "SELECT * FROM unnest($1::text[], $2::text[], "
        "$3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[]) AS r "
        "ON CONFLICT (endpoint_id, event_id) DO NOTHING",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
        [r[5] for r in rows],
        [r[6] for r in rows],
    )
    return int(status.rsplit(" ", 1)[-1])


async def lease_endpoints(conn: Conn, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    """Enabled endpoints with a delivery due that no sender holds, now held by this one."""
    return await conn.fetch(
        "UPDATE webhook_endpoints e SET leased_until = now() + make_interval(secs => $2) "
        "WHERE e.id IN (SELECT x.id FROM webhook_endpoints x WHERE x.status = 'enabled' "
        "AND (x.leased_until IS NULL OR x.leased_until <= now()) AND EXISTS (SELECT 1 FROM "
        "webhook_deliveries d WHERE d.endpoint_id = x.id AND d.status = 'pending' "
        "AND d.next_attempt_at <= now()) ORDER BY x.leased_until NULLS FIRST "
        "LIMIT $1 FOR UPDATE SKIP LOCKED) "
        "RETURNING e.id, e.company_id, e.url, e.secret, e.failing_since",
        limit,
        lease_seconds,
    )


async def release_endpoint(conn: Conn, eid: str) -> None:
    await conn.execute("UPDATE webhook_endpoints SET leased_until = NULL WHERE id = $1", eid)


async def due(conn: Conn, eid: str, limit: int) -> list[asyncpg.Record]:
    """An endpoint's due deliveries, oldest first."""
    return await conn.fetch(
        f"SELECT {DELIVERY}, d.payload FROM webhook_deliveries d "
        "WHERE d.endpoint_id = $1 AND d.status = 'pending' AND d.next_attempt_at <= now() "
        "ORDER BY d.next_attempt_at, d.seq LIMIT $2",
        eid,
        limit,
    )


async def record_attempt(
    conn: Conn,
    did: str,
    *,
    response_code: int | None,
    latency_ms: int,
    error: str | None,
    excerpt: str | None,
    outcome: str,
    next_in_seconds: float | None,
) -> int:
    """Log one attempt and move the delivery on: ``succeeded``, ``failed`` (given up), or
    ``pending`` again in ``next_in_seconds``. Returns the attempt's number."""
    n = await conn.fetchval(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = now(), "
        "response_code = $2, latency_ms = $3, last_error = $4, "
        # a delivery dropped meanwhile (its endpoint disabled or deleted) stays dropped
        "status = CASE WHEN status = 'pending' THEN $5 ELSE status END, "
        "next_attempt_at = CASE WHEN $6::float8 IS NULL THEN next_attempt_at "
        "ELSE now() + make_interval(secs => $6) END WHERE id = $1 RETURNING attempts",
        did,
        response_code,
        latency_ms,
        error,
        outcome,
        next_in_seconds,
    )
    await conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, attempt, response_code, latency_ms, error, excerpt) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        did,
        n,
        response_code,
        latency_ms,
        error,
        excerpt,
    )
    return int(n)


async def postpone(conn: Conn, did: str, seconds: float) -> None:
    await conn.execute(
        "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => $2) WHERE id = $1",
        did,
        seconds,
    )


async def drop(conn: Conn, did: str, why: str) -> None:
    await conn.execute(
        "UPDATE webhook_deliveries SET status = 'dropped', last_error = $2 WHERE id = $1", did, why
    )


async def endpoint_succeeded(conn: Conn, eid: str) -> None:
    await conn.execute(
        "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
        eid,
    )


async def endpoint_failed(conn: Conn, eid: str, disable_after_hours: float) -> datetime | None:
    """Note a failure; returns when it started failing if that is longer ago than allowed
    (the caller disables it)."""
    row = await conn.fetchrow(
        "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, now()) "
        "WHERE id = $1 AND status = 'enabled' RETURNING failing_since, "
        "failing_since <= now() - make_interval(secs => $2) AS too_long",
        eid,
        disable_after_hours * 3600,
    )
    return row["failing_since"] if row and row["too_long"] else None


async def deliveries(
    conn: Conn, eid: str, *, status: str | None, limit: int, before_seq: int | None
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {DELIVERY} FROM webhook_deliveries d WHERE d.endpoint_id = $1 "
        "AND ($2::text IS NULL OR d.status = $2) AND d.seq < $3 ORDER BY d.seq DESC LIMIT $4",
        eid,
        status,
        before_seq if before_seq is not None else 2**62,
        limit,
    )


async def delivery(conn: Conn, did: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {DELIVERY} FROM webhook_deliveries d WHERE d.id = $1" + (" FOR UPDATE" if lock else ""),
        did,
    )


async def attempts(conn: Conn, did: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT attempt, at, response_code, latency_ms, error, excerpt FROM webhook_attempts "
        "WHERE delivery_id = $1 ORDER BY attempt",
        did,
    )


async def retry_now(conn: Conn, did: str) -> asyncpg.Record | None:
    """An attempt now. A pending delivery keeps its retries; one that had ended (delivered,
    given up, dropped) gets this one attempt."""
    return await conn.fetchrow(
        "UPDATE webhook_deliveries d SET next_attempt_at = now(), "
        "retry_until = CASE WHEN d.status = 'pending' THEN d.retry_until ELSE now() END, "
        f"status = 'pending' WHERE d.id = $1 RETURNING {DELIVERY}",
        did,
    )

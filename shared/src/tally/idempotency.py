"""``Idempotency-Key`` (API.md): the same key from the same principal with the same body within
24 hours answers the first response again and does nothing; with another body, 422
``idempotency_key_reused``. The record is written in the transaction of the effect, so either
both happen or neither does."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import Header

from tally.auth import Principal
from tally.db import Conn
from tally.errors import ApiError, JsonResponse

TTL = "24 hours"

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)]


@dataclass(frozen=True)
class Stored:
    """What a key recorded: the resource it created (once known) and the first response."""

    resource: str | None
    status_code: int | None
    response: Any

    def replay(self) -> JsonResponse:
        """The first response to the key, again."""
        return JsonResponse(self.response, status_code=self.status_code or 201)


def principal_key(p: Principal) -> str:
    return f"{p.role}:{p.sub}:{p.company_id or ''}:{p.account_id or ''}"


def principal_digest(principal: str) -> str:
    """A short stable name for a principal, to put in keys derived from theirs."""
    return hashlib.sha256(principal.encode()).hexdigest()[:16]


def request_hash(route: str, body: Any) -> str:
    """The request's fingerprint: the route (path with its ids) and the parsed body."""
    raw = orjson.dumps({"route": route, "body": body}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


async def begin(
    conn: Conn, principal: str, key: str, fingerprint: str, resource: str | None = None
) -> Stored | None:
    """In the effect's transaction: claim ``key`` for this request, or find what it recorded.
    Returns None when the key is new (go on, then ``finish``); the stored record when the same
    request came before; raises 422 ``idempotency_key_reused`` for another body. Concurrent
    requests with one key wait for each other (row lock) and see one outcome."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"idem:{principal}:{key}")
    row = await conn.fetchrow(
        "SELECT request_hash, resource, status_code, response::text AS response "
        "FROM idempotency_keys WHERE principal = $1 AND key = $2 "
        f"AND created_at > now() - interval '{TTL}'",
        principal,
        key,
    )
    if row is None:
        await conn.execute(
            "INSERT INTO idempotency_keys (principal, key, request_hash, resource) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (principal, key) DO UPDATE SET "
            "request_hash = EXCLUDED.request_hash, resource = EXCLUDED.resource, "
            "status_code = NULL, response = NULL, created_at = now()",
            principal,
            key,
            fingerprint,
            resource,
        )
        return None
    if row["request_hash"] != fingerprint:
        raise ApiError(
            422, "idempotency_key_reused", "this Idempotency-Key was used with another request; use a new key"
        )
    response = orjson.loads(row["response"]) if row["response"] is not None else None
    return Stored(row["resource"], row["status_code"], response)


@dataclass(frozen=True)
class Claim:
    """A request's claim on its key: the first response to answer again (``replayed``), or
    the resource the key names — ``fresh`` for the key's first request (``first``), or the one
    the first request is still making."""

    replayed: Stored | None
    resource: str
    first: bool


async def claim(conn: Conn, principal: str, key: str, fingerprint: str, fresh: str) -> Claim:
    """``begin`` for a request that creates a resource named up front (``fresh``)."""
    stored = await begin(conn, principal, key, fingerprint, resource=fresh)
    if stored is None:
        return Claim(None, fresh, True)
    if stored.response is not None:
        return Claim(stored, stored.resource or fresh, False)
    return Claim(None, stored.resource or fresh, False)


async def finish(conn: Conn, principal: str, key: str, status_code: int, response: Any) -> None:
    """Record the response to send again for this key."""
    await conn.execute(
        "UPDATE idempotency_keys SET status_code = $3, response = $4::json WHERE principal = $1 AND key = $2",
        principal,
        key,
        status_code,
        orjson.dumps(response).decode(),
    )


async def sweep(conn: Conn, *, batch: int = 5000) -> int:
    """Forget keys older than their 24 h (a batch at a time, oldest first); returns how many."""
    status = await conn.execute(
        "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM idempotency_keys "
        f"WHERE created_at < now() - interval '{TTL}' ORDER BY created_at LIMIT $1))",
        batch,
    )
    return int(status.split()[-1])

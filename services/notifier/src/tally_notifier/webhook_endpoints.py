"""A company's webhook endpoints (API.md, notifier): registered with a URL the SSRF guard
accepts and the event types wanted (or ``*``), answered once with the signing secret; listed,
changed (URL, types, enabled), deleted; their deliveries listed, shown with every attempt,
retried by hand; a test event sent. Another company's endpoint or delivery is a 404."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from tally import events, pagination
from tally.auth import Principal, require_company
from tally.db import Conn
from tally.errors import ApiError, not_found
from tally.idempotency import Stored, principal_key
from tally.uow import Database, UnitOfWork
from tally_notifier import storage, webhook_events, webhook_storage, webhook_urls
from tally_notifier.schemas import endpoint_created

Wake = Callable[[], None]  # the webhook sender's wake-up

MAX_ENDPOINTS = 20  # per company
MAX_TYPES = 50


@dataclass(frozen=True)
class Page:
    items: list[asyncpg.Record]
    next_cursor: str | None


@dataclass(frozen=True)
class Created:
    endpoint: asyncpg.Record
    secret: str


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def checked_types(types: Sequence[str]) -> list[str]:
    """The event types asked for: known names, or ``*``; 422 ``unknown_event_type`` else."""
    wanted = list(dict.fromkeys(types))
    if not wanted:
        raise ApiError(
            422,
            "validation_error",
            'event_types: name at least one type, or "*"',
            [{"field": "event_types", "message": "empty"}],
        )
    if len(wanted) > MAX_TYPES:
        raise ApiError(
            422,
            "validation_error",
            f"event_types: at most {MAX_TYPES}",
            [{"field": "event_types", "message": "too many"}],
        )
    unknown = [t for t in wanted if t != "*" and t not in events.WEBHOOK_TYPES]
    if unknown:
        raise ApiError(
            422,
            "unknown_event_type",
            f"unknown event type {unknown[0]!r}",
            [{"field": "event_types", "message": f"not an event type: {t}"} for t in unknown],
        )
    return ["*"] if "*" in wanted else wanted


async def checked_url(url: str, *, allow_private: bool) -> str:
    try:
        await webhook_urls.check(url, allow_private=allow_private)
    except webhook_urls.UrlRefused as exc:
        code = "url_not_allowed" if exc.private else "invalid_url"
        raise ApiError(422, code, f"url: {exc}", [{"field": "url", "message": str(exc)}]) from exc
    return url


async def register(
    uow: UnitOfWork,
    principal: Principal,
    company_id: str,
    *,
    url: str,
    event_types: Sequence[str],
    allow_private: bool,
    idempotency_key: str | None,
    fingerprint: str,
) -> Created | Stored:
    require_company(principal, company_id)
    types = checked_types(event_types)
    await checked_url(url, allow_private=allow_private)  # outside the transaction: DNS
    async with uow:
        conn = uow.conn
        if await storage.company(conn, company_id) is None:
            raise not_found("company")
        if idempotency_key is not None:
            stored = await uow.claim_key(principal_key(principal), idempotency_key, fingerprint)
            if stored is not None and stored.response is not None:
                return stored
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"webhooks:{company_id}")
        if await webhook_storage.registered(conn, company_id) >= MAX_ENDPOINTS:
            raise ApiError(409, "too_many_endpoints", f"a company has at most {MAX_ENDPOINTS} endpoints")
        secret = new_secret()
        row = await webhook_storage.add_endpoint(
            conn, f"we_{uuid.uuid4().hex[:24]}", company_id, url, types, secret
        )
        uow.remember(201, endpoint_created(row, secret).model_dump(mode="json"))
    return Created(row, secret)


async def _owned(conn: Conn, principal: Principal, eid: str, *, lock: bool = False) -> asyncpg.Record:
    row = await webhook_storage.endpoint(conn, eid, lock=lock)
    if row is None or not principal.can_see_company(row["company_id"]):
        raise not_found("webhook endpoint")
    return row


async def list_endpoints(
    db: Database, principal: Principal, company_id: str, *, limit: int, cursor: str | None
) -> Page:
    require_company(principal, company_id)
    async with db.reading() as conn:
        rows = await webhook_storage.endpoints(
            conn, company_id, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["seq"] if len(rows) > limit else None)
    return Page(items, nxt)


async def show(db: Database, principal: Principal, eid: str) -> asyncpg.Record:
    async with db.reading() as conn:
        return await _owned(conn, principal, eid)


async def change(
    db: Database,
    principal: Principal,
    eid: str,
    *,
    url: str | None,
    event_types: Sequence[str] | None,
    enabled: bool | None,
    allow_private: bool,
) -> asyncpg.Record:
    """Change the URL, the types, or enable/disable (enabling forgets past failures)."""
    types = checked_types(event_types) if event_types is not None else None
    async with db.reading() as conn:
        await _owned(conn, principal, eid)  # before the URL check: others' ids are 404
    if url is not None:
        await checked_url(url, allow_private=allow_private)  # outside the transaction: DNS
    async with db.unit() as uow:
        conn = uow.conn
        row = await _owned(conn, principal, eid, lock=True)
        if url is not None or types is not None:
            await conn.execute(
                "UPDATE webhook_endpoints SET url = COALESCE($2, url), "
                "event_types = COALESCE($3, event_types) WHERE id = $1",
                eid,
                url,
                types,
            )
        if enabled is not None and enabled != (row["status"] == "enabled"):
            await webhook_storage.set_status(conn, eid, "enabled" if enabled else "disabled")
        return await _owned(conn, principal, eid)


async def delete(uow: UnitOfWork, principal: Principal, eid: str) -> None:
    """Deleted: nothing more is sent to it; its queue is dropped (the log stays)."""
    async with uow:
        await _owned(uow.conn, principal, eid, lock=True)
        await webhook_storage.set_status(uow.conn, eid, "deleted")


async def list_deliveries(
    db: Database, principal: Principal, eid: str, *, status: str | None, limit: int, cursor: str | None
) -> Page:
    async with db.reading() as conn:
        await _owned(conn, principal, eid)
        rows = await webhook_storage.deliveries(
            conn, eid, status=status, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["seq"] if len(rows) > limit else None)
    return Page(items, nxt)


async def _owned_delivery(
    conn: Conn, principal: Principal, did: str, *, lock: bool = False
) -> asyncpg.Record:
    row = await webhook_storage.delivery(conn, did, lock=lock)
    if row is None or not principal.can_see_company(row["company_id"]):
        raise not_found("webhook delivery")
    return row


async def show_delivery(
    db: Database, principal: Principal, did: str
) -> tuple[asyncpg.Record, list[asyncpg.Record]]:
    async with db.reading() as conn:
        row = await _owned_delivery(conn, principal, did)
        return row, await webhook_storage.attempts(conn, did)


async def retry(uow: UnitOfWork, principal: Principal, did: str, wake: Wake | None = None) -> asyncpg.Record:
    """One more attempt now, whatever the delivery's state (a manual redelivery); 409
    ``endpoint_disabled`` when its endpoint is not enabled."""
    async with uow:
        conn = uow.conn
        d = await _owned_delivery(conn, principal, did, lock=True)
        endpoint = await webhook_storage.endpoint(conn, d["endpoint_id"])
        if endpoint is None or endpoint["status"] != "enabled":
            raise ApiError(409, "endpoint_disabled", "the delivery's endpoint is disabled or deleted")
        row = await webhook_storage.retry_now(conn, did)
        assert row is not None
    if wake:
        wake()
    return row


async def send_test(
    uow: UnitOfWork, principal: Principal, eid: str, *, wake: Wake | None = None
) -> asyncpg.Record:
    """Queue a ``webhook.test`` event for this endpoint only (whatever types it takes)."""
    async with uow:
        conn = uow.conn
        endpoint = await _owned(conn, principal, eid)
        if endpoint["status"] != "enabled":
            raise ApiError(409, "endpoint_disabled", "the endpoint is disabled")
        event_id = f"webhook.test:{uuid.uuid4().hex}"
        data = events.WebhookTest(company_id=endpoint["company_id"], endpoint_id=eid)
        envelope = events.envelope("webhook.test", data, source=webhook_events.SOURCE, id_=event_id)
        did = f"whd_{uuid.uuid4().hex}"
        await webhook_storage.enqueue(
            conn,
            [(did, eid, endpoint["company_id"], None, event_id, "webhook.test", events.dumps(envelope))],
        )
        row = await webhook_storage.delivery(conn, did)
        assert row is not None
    if wake:
        wake()
    return row

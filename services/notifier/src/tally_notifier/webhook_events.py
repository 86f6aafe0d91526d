"""Which events go to which endpoints: every public event of ``wallet.events``,
``recharge.events`` and ``rebilling.events`` (and the notifier's own: usage alerts, a disabled
endpoint, a test) is queued for the enabled endpoints of the company it concerns whose types
match, and for no one else's.

The company an event concerns is its payload's ``company_id``, and the record's key must name
the same company (every Tally producer keys these topics by company). An event that also names
an account is sent only once the notifier knows that account to be the company's (checked
again at each attempt, ``webhook_sender``), so an event naming another tenant's account never
leaves. Records of companies without endpoints are skipped unread: most of ``wallet.events``
is ``wallet.debited``, one per usage event."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import orjson
from prometheus_client import Counter

from tally import events
from tally.consumer import dlq_row, take
from tally.db import Conn
from tally.uow import UnitOfWork
from tally_notifier import webhook_storage

QUEUED = Counter(
    "tally_webhook_deliveries_queued_total",
    "Webhook deliveries matched to an endpoint (a redelivered event matches again but is stored once)",
    ["type"],
)
NOT_QUEUED = Counter(
    "tally_webhook_events_refused_total", "Events not sent to any endpoint, by reason", ["reason"]
)
SOURCE = "notifier"


def matches(types: Sequence[str], event_type: str) -> bool:
    return "*" in types or event_type in types


def _by_company(endpoints: Iterable[asyncpg.Record]) -> dict[str, list[asyncpg.Record]]:
    out: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for e in endpoints:
        out[e["company_id"]].append(e)
    return out


def deliveries_for(
    endpoints: Sequence[asyncpg.Record],
    *,
    event_id: str,
    event_type: str,
    company: str,
    account: str | None,
    payload: bytes,
) -> list[webhook_storage.DeliveryRow]:
    """One delivery per endpoint of ``company`` whose types match."""
    return [
        (f"whd_{uuid.uuid4().hex}", e["id"], company, account, event_id, event_type, payload)
        for e in endpoints
        if e["company_id"] == company and matches(e["event_types"], event_type)
    ]


class Refused(ValueError):
    """An event whose names do not agree on one tenant: sent to no one."""


def account_named(company: str, data: events.Payload) -> str | None:
    """The one account an event names (``account_id``, an ``account:`` wallet), checking that
    every company it names (``company:`` wallets) is ``company``; ``Refused`` otherwise."""
    accounts = {getattr(data, "account_id", None)} - {None}
    for field in ("wallet_id", "company_wallet_id", "account_wallet_id"):
        wallet = getattr(data, field, None)
        if not isinstance(wallet, str):
            continue
        kind, _, owner = wallet.partition(":")
        if kind == "account":
            accounts.add(owner)
        elif kind == "company" and owner != company:
            raise Refused(f"{field} names another company")
    if getattr(data, "owner", None) == "account" and not accounts:
        raise Refused("an account wallet's event names no account")
    if len(accounts) > 1:
        raise Refused("the event names two accounts")
    return str(next(iter(accounts))) if accounts else None


def _clean(*texts: str | None) -> bool:
    """Text Postgres can store (no NUL)."""
    return not any(t is not None and "\x00" in t for t in texts)


async def listeners(conn: Conn) -> dict[str, list[asyncpg.Record]]:
    """The enabled endpoints, by company."""
    return _by_company(await webhook_storage.listening(conn))


def heard(records: Sequence[Any], listening: dict[str, list[asyncpg.Record]]) -> list[Any]:
    """The records keyed by a company with endpoints (the rest are not even decoded)."""
    return [r for r in records if r.key is not None and r.key.decode("utf-8", "replace") in listening]


async def take_in(
    uow: UnitOfWork,
    records: Sequence[Any],
    *,
    service: str,
    listening: dict[str, list[asyncpg.Record]] | None = None,
) -> int:
    """Queue the deliveries of a consumer batch (in the caller's unit of work, with the DLQ
    rows of records that cannot be read or stored); returns how many were queued. A record
    never stops the batch: whatever fails alone is dead-lettered. ``listening``: the
    endpoints, if the caller read them already."""
    conn = uow.conn
    if listening is None:
        listening = await listeners(conn)
    mine = heard(records, listening)
    if not mine:
        return 0
    taken, dead = take(mine, events.WEBHOOK_TYPES, service=service)
    uow.publish(dead)
    groups: list[tuple[Any, list[webhook_storage.DeliveryRow]]] = []
    for record, message in taken:
        company = getattr(message.data, "company_id", None)
        if company is None or record.key.decode("utf-8", "replace") != company:
            NOT_QUEUED.labels("key_mismatch").inc()
            continue
        try:
            account = account_named(company, message.data)
        except Refused:
            NOT_QUEUED.labels("tenant").inc()
            continue
        if not _clean(message.id, message.type, company, account):
            uow.publish([dlq_row(record, "a NUL character in the event's names", service=service)])
            continue
        found = deliveries_for(
            listening.get(company, []),
            event_id=message.id,
            event_type=message.type,
            company=company,
            account=account,
            payload=orjson.dumps(message.model_dump(mode="json")),
        )
        if found:
            groups.append((record, found))
    queued = 0
    try:
        async with uow.savepoint():
            queued = await webhook_storage.enqueue(conn, [row for _, rows in groups for row in rows])
    except asyncpg.PostgresError:
        for record, rows in groups:  # one at a time: the one Postgres refuses is dead-lettered
            try:
                async with uow.savepoint():
                    queued += await webhook_storage.enqueue(conn, rows)
            except asyncpg.PostgresError as exc:
                uow.publish([dlq_row(record, f"not stored: {exc}", service=service)])
    for _, rows in groups:
        for row in rows:
            QUEUED.labels(row[5]).inc()
    return queued


async def emit(conn: Conn, type_: str, data: events.Payload, *, id_: str) -> int:
    """Queue one of the notifier's own events for its company's matching endpoints."""
    company = str(getattr(data, "company_id"))  # noqa: B009 - every webhook payload names one
    rows = deliveries_for(
        await webhook_storage.listening_in(conn, company),
        event_id=id_,
        event_type=type_,
        company=company,
        account=getattr(data, "account_id", None),
        payload=orjson.dumps(events.envelope(type_, data, source=SOURCE, id_=id_)),
    )
    for _ in rows:
        QUEUED.labels(type_).inc()
    return await webhook_storage.enqueue(conn, rows)

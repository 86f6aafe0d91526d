"""Usage from ``usage.ingest`` that waits for rebilling (docs/0029).

An event naming a company or account usage-meter has not heard of needs rebilling's answer
before it is judged (its currency, its account's company: docs/0027). Over HTTP, a request
rebilling cannot be asked about is refused 503 and the product retries. A record on
``usage.ingest`` has no one to refuse to: failing its batch held the whole partition, every
other company's usage with it, for as long as rebilling was down. So the records rebilling did
not answer about are set aside (``ingest_deferred``) in the same unit of work that records the
rest of the batch, the offsets move on, and ``IngestDeferred`` judges them again, the same way,
once rebilling answers. Nothing is lost (the set-aside records commit with the batch) and
nothing is counted twice (the dedupe claim and the ledger's keys hold as for any retry)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
import orjson
import prometheus_client

from tally import events
from tally.consumer import dlq_row, note_dead_letter
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.events import IncomingUsage
from tally.uow import Database
from tally.worker import Worker
from tally_usage_meter import storage
from tally_usage_meter.domain import Price
from tally_usage_meter.ingestion import Catalog, DirectoryUnavailable, ingest, parse_ingest_record

log = logging.getLogger(__name__)

SERVICE = "usage-meter"
DEFERRED = prometheus_client.Counter(
    "tally_usage_deferred_total", "usage.ingest events set aside until rebilling answers about them"
)
RESUMED = prometheus_client.Counter(
    "tally_usage_deferred_resumed_total", "Set-aside usage.ingest events judged once rebilling answered"
)
WAITING = prometheus_client.Gauge(
    "tally_usage_deferred_waiting", "usage.ingest events set aside, as of the last round (all replicas)"
)


class Item(NamedTuple):
    """A record of ``usage.ingest``, the event read from it, the trace it continues, and the
    prices it is judged by when not the catalog now (it came before they changed)."""

    record: Any  # what ``dlq_row`` reads: value, key, topic, partition, offset
    event: IncomingUsage
    traceparent: str | None
    prices: Catalog | None = None


Letter = tuple[Any, str]  # a record and why it is dead-lettered


class Recorded(NamedTuple):
    letters: list[Letter]  # dead-lettered with the batch (written; to be noted)
    waiting: list[Item]  # named an id rebilling did not answer about
    judged: list[Item]  # recorded: accepted, duplicate or refused


async def record(
    db: Database,
    directory: CompanyDirectory,
    take: Callable[[Conn], Awaitable[tuple[list[Item], list[Letter]]]],
    keep: Callable[[Conn, list[Item], list[Item]], Awaitable[None]],
    failed: DirectoryUnavailable | None = None,
) -> Recorded:
    """Record what ``take`` gives (the items, and records already known to be unreadable) in
    one unit of work. The items naming an id rebilling does not answer about are left out and
    given to ``keep(conn, waiting, judged)`` in that unit of work; the rest are judged as any
    usage is (``ingest``), refused ones dead-lettered with them. When rebilling fails without
    naming an id of the batch, ``DirectoryUnavailable`` is raised and nothing is written.
    ``failed``: how rebilling just failed on these items; the ones it names are left out from
    the start (a hung rebilling costs the batch one more timeout, not two)."""
    waiting: set[tuple[str, str]] = set()
    while True:
        try:
            async with db.unit() as uow:
                items, unreadable = await take(uow.conn)
                if failed is not None:
                    waiting.update(_key(i) for i in items if failed.named_in([(i.event, None)]))
                    failed = None
                judged = [i for i in items if _key(i) not in waiting]
                catalogs = [i.prices for i in judged] if any(i.prices is not None for i in judged) else None
                results = (
                    await ingest(
                        uow, [i.event for i in judged], [i.traceparent for i in judged], directory, catalogs
                    )
                    if judged
                    else []
                )
                letters = unreadable + [
                    (item.record, f"{result.code}: {result.message}")
                    for item, result in zip(judged, results, strict=True)
                    if result.status == "rejected"
                ]
                set_aside = [i for i in items if _key(i) in waiting]
                await keep(uow.conn, set_aside, judged)
                uow.publish([dlq_row(r, why, service=SERVICE, noted=False) for r, why in letters])
            return Recorded(letters, set_aside, judged)
        except DirectoryUnavailable as exc:
            named = [i for i in judged if exc.named_in([(i.event, None)])]
            if not named:
                raise
            waiting.update(_key(i) for i in named)


def _key(item: Item) -> tuple[str, str]:
    return item.event.company_id, item.event.event_id


def _prices_of(catalog: Catalog, service: str) -> str:
    """A service's prices in every currency, as kept with a set-aside record."""
    rows = sorted([c, p.unit, p.unit_price_micros] for (s, c), p in catalog.items() if s == service)
    return orjson.dumps(rows).decode()


def _catalog_of(service: str, kept: str) -> Catalog:
    return {(service, c): Price(service, unit, micros, c) for c, unit, micros in orjson.loads(kept)}


def _kept(item: Item, catalog: Catalog, came: datetime) -> storage.Deferred:
    r = item.record
    return storage.Deferred(
        item.event.company_id,
        item.event.event_id,
        bytes(r.value),
        None if r.key is None else bytes(r.key),
        r.topic,
        r.partition,
        r.offset,
        item.traceparent,
        _prices_of(catalog, item.event.service),
        came,
    )


async def record_or_defer(
    db: Database,
    directory: CompanyDirectory,
    items: Sequence[Item],
    unreadable: Sequence[Letter],
    failed: DirectoryUnavailable,
    came: datetime,
) -> list[Letter]:
    """A consumed batch, after rebilling ``failed`` on some of it: the records it did not
    answer about set aside, the rest recorded. ``came``: when the batch's first try began (the
    records that wait are dated by it, not by the rebilling timeouts after). Returns the dead
    letters written."""

    async def given(_: Conn) -> tuple[list[Item], list[Letter]]:
        return list(items), list(unreadable)

    async def set_aside(conn: Conn, waiting: list[Item], _: list[Item]) -> None:
        if waiting:  # with the prices they came under: a price set since applies after them
            catalog = await storage.load_prices(conn)
            await storage.defer(conn, [_kept(i, catalog, came) for i in waiting])

    done = await record(db, directory, given, set_aside, failed)
    if done.waiting:
        DEFERRED.inc(len(done.waiting))
        log.warning(
            "usage set aside until rebilling answers about its company or account",
            extra={
                "events": len(done.waiting),
                "companies": sorted({i.event.company_id for i in done.waiting})[:20],
            },
        )
    return done.letters


class IngestDeferred(Worker):
    """Judges the set-aside records again, oldest first, ``ROUND`` at a time; the ones rebilling
    still does not answer about stay. Replicas take different records (``SKIP LOCKED``)."""

    name = "ingest-deferred"
    idle = 5.0
    ROUND = 500

    def __init__(self, db: Database, directory: CompanyDirectory) -> None:
        super().__init__()
        self._db, self._directory = db, directory

    async def step(self) -> bool:
        async with self._db.reading() as conn:  # most rounds: nothing waits, nothing to lock
            waiting = await storage.deferred_count(conn)
        WAITING.set(waiting)
        if not waiting:
            return False
        unreadable: list[Letter] = []

        async def oldest(conn: Conn) -> tuple[list[Item], list[Letter]]:
            items: list[Item] = []
            unreadable.clear()
            for d in await storage.take_deferred(conn, self.ROUND):
                try:
                    event = parse_ingest_record(d.value)
                    if event.occurred_at is None:
                        # it happened when it came, not when it is judged (its day's usage)
                        event = msgspec.structs.replace(event, occurred_at=d.deferred_at.isoformat())
                    items.append(Item(d, event, d.traceparent, _catalog_of(event.service, d.prices)))
                except events.BadMessage as exc:  # read before; a release since reads it otherwise
                    unreadable.append((d, str(exc)))
            return items, list(unreadable)

        async def settled(conn: Conn, _: list[Item], judged: list[Item]) -> None:
            await storage.forget_deferred(conn, [i.record for i in judged] + [d for d, _ in unreadable])

        try:
            done = await record(self._db, self._directory, oldest, settled)
        except DirectoryUnavailable:
            return False  # rebilling still cannot be asked: the next round, after ``idle``
        for r, why in done.letters:
            note_dead_letter(r, why, service=SERVICE)
        if done.judged:
            RESUMED.inc(len(done.judged))
            log.info(
                "set-aside usage judged", extra={"events": len(done.judged), "waiting": len(done.waiting)}
            )
        WAITING.set(max(waiting - len(done.judged) - len(unreadable), 0))
        return len(done.judged) + len(unreadable) >= self.ROUND

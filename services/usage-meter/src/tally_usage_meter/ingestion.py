"""The one ingestion path, shared by ``POST /v1/usage`` (``HttpIngestion``: rate limit, then
group commit) and the ``usage.ingest`` topic (``handlers.on_ingest``): validate, refuse
suspended accounts, price, dedupe by ``event_id``, and publish the priced events (topic
``usage.recorded``, key ``company_id``) in the caller's unit of work."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Literal, NamedTuple

import asyncpg
import httpx
import msgspec
import prometheus_client

from tally import events, outbox
from tally.db import Conn
from tally.directory import CompanyDirectory, Unanswered
from tally.errors import ApiError
from tally.events import FAST_REFUSALS, IncomingUsage, Topics, UsageEvent, usable
from tally.groupcommit import GroupCommit
from tally.ratelimit import TokenBuckets, retry_after
from tally.telemetry import continue_trace
from tally.uow import Database, UnitOfWork
from tally_usage_meter import storage
from tally_usage_meter.domain import (
    DEFAULT_CURRENCY,
    RECORDED,
    Price,
    Priced,
    Rejected,
    price_event,
    recorded_message,
    suspension_of,
    tenancy_of,
)

USAGE = prometheus_client.Counter("tally_usage_events_total", "Usage events by outcome", ["outcome"])


class Result(NamedTuple):
    """One event's outcome (a NamedTuple: one per event, cheaper than a frozen dataclass)."""

    event_id: str
    status: Literal["accepted", "duplicate", "rejected"]
    code: str | None = None
    message: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"event_id": self.event_id, "status": self.status}
        if self.code:
            out["error"] = {"code": self.code, "message": self.message}
        return out


class DirectoryUnavailable(Exception):
    """Rebilling could not say which currency a new company has (or which company a new
    account is in): try again shortly. ``companies`` and ``accounts``: the ids it did not
    answer for, so a group commit refuses only the requests that named them."""

    def __init__(self, reason: str, companies: frozenset[str], accounts: frozenset[str]) -> None:
        super().__init__(reason)
        self.companies, self.accounts = companies, accounts

    def named_in(self, batch: Sequence[tuple[IncomingUsage, object]]) -> bool:
        return any(e.company_id in self.companies or e.account_id in self.accounts for e, _ in batch)


Catalog = dict[tuple[str, str], Price]  # prices by (service, currency)


async def _complete(
    conn: Conn,
    batch: Sequence[IncomingUsage],
    directory: CompanyDirectory,
    known: storage.Known,
    now: datetime,
    catalogs: Sequence[Catalog | None] | None = None,
) -> dict[str, str]:
    """Complete what rebilling.events told this service with rebilling's own answers, for
    companies and accounts created so recently that their events have not arrived (and
    remember them). Returns the currency of the companies no one created yet, pinned at
    rebilling (USD: ``CompanyDirectory.pinned_currencies``)."""
    new_companies = [e.company_id for e in batch if e.company_id not in known.currencies]
    new_accounts = [e.account_id for e in batch if e.account_id and e.account_id not in known.owners]
    # Both asked at once: a rebilling that hangs costs a group one timeout, not one for each
    # (the requests left after the ones refused must not wait a second one; review 2026-12-05).
    found, placed = await asyncio.gather(
        directory.currencies(new_companies), directory.account_companies(new_accounts), return_exceptions=True
    )
    failed = [a for a in (found, placed) if isinstance(a, BaseException)]
    if failed:
        for fault in failed:
            if not isinstance(fault, httpx.HTTPError):
                raise fault  # not rebilling's answer: a fault here
        cause = failed[0]
        companies, accounts = (
            _unanswered(found, "company", new_companies),
            _unanswered(placed, "account", new_accounts),
        )
        raise DirectoryUnavailable(str(cause), companies, accounts) from cause
    assert isinstance(found, dict) and isinstance(placed, dict)
    for cid, currency in sorted(found.items()):  # in key order: concurrent batches never
        await storage.upsert_company(conn, cid, currency)  # wait for each other in a ring
    for aid, cid in sorted(placed.items()):
        await storage.upsert_account(conn, aid, cid)
    known.currencies.update(found)
    known.owners.update(placed)
    # Usage of a company no one created yet is charged in the currency pinned for it, so that
    # the company is never created in another and its wallet stranded (docs/0027). Rebilling
    # answered a moment ago: asked after, not beside, the lookups above.
    # Only for usage that would be charged: a refused event (no price, a bad quantity) moves no
    # money, and must not fix the currency a company may be created in.
    uncreated = {c for c in new_companies if c not in found}
    charged = sorted(
        {
            e.company_id
            for i, e in enumerate(batch)
            if e.company_id in uncreated and _charged_in_usd(e, known, now, _catalog(known, catalogs, i))
        }
    )
    if not charged:
        return {}
    try:
        return await directory.pinned_currencies(charged)
    except httpx.HTTPError as exc:
        companies = _unanswered(exc, "company", charged)
        raise DirectoryUnavailable(str(exc), companies, frozenset()) from exc


def _catalog(known: storage.Known, catalogs: Sequence[Catalog | None] | None, i: int) -> Catalog:
    """The prices event ``i`` is judged by: the catalog now, or those it came under (docs/0029)."""
    mine = catalogs[i] if catalogs is not None else None
    return known.prices if mine is None else mine


def _charged_in_usd(event: IncomingUsage, known: storage.Known, now: datetime, prices: Catalog) -> bool:
    """Whether an event of a company no one created would be accepted, priced in USD."""
    return (
        tenancy_of(event, known.owners, known.currencies.keys()) is None
        and isinstance(price_event(event, prices, DEFAULT_CURRENCY, now), Priced)
        and suspension_of(event, known.suspended) is None
    )


def _unanswered(answer: object, kind: str, asked: Sequence[str]) -> frozenset[str]:
    """The ids rebilling did not answer for: none when ``answer`` is its answer, the ids an
    error names, or every id asked when it does not say."""
    if not isinstance(answer, BaseException):
        return frozenset()
    return answer.ids if isinstance(answer, Unanswered) and answer.kind == kind else frozenset(asked)


async def _judge(
    conn: Conn,
    batch: Sequence[IncomingUsage],
    directory: CompanyDirectory,
    now: datetime,
    catalogs: Sequence[Catalog | None] | None = None,
) -> list[Priced | Rejected | None]:
    """Each event's verdict: priced, rejected (why), or None for a repeat of an earlier event
    of the same batch. ``catalogs``: per event, the prices to judge it by instead of the
    catalog now (None: the catalog now)."""
    known = await storage.known(
        conn, [e.company_id for e in batch], [e.account_id for e in batch if e.account_id], directory.facts
    )
    pinned = await _complete(conn, batch, directory, known, now, catalogs)

    outcome: list[Priced | Rejected | None] = []
    first_seen: set[tuple[str, str]] = set()  # an event id is unique within its company
    for i, event in enumerate(batch):
        currency = known.currencies.get(event.company_id) or pinned.get(event.company_id, DEFAULT_CURRENCY)
        # What is wrong with the event itself (not the company's account, no price, a bad
        # quantity) is said before what may pass (a suspended wallet): a retry after a top-up
        # would fail all the same.
        verdict: Priced | Rejected | None = tenancy_of(event, known.owners, known.currencies.keys())
        if verdict is None:
            verdict = price_event(event, _catalog(known, catalogs, i), currency, now)
            if isinstance(verdict, Priced):
                verdict = suspension_of(event, known.suspended) or verdict
        if isinstance(verdict, Priced):
            key = (event.company_id, event.event_id)
            if key in first_seen:
                verdict = None  # same event twice in one batch: the later one is a duplicate
            else:
                first_seen.add(key)
        outcome.append(verdict)
    return outcome


async def _refused_before(
    conn: Conn, batch: Sequence[IncomingUsage], outcome: Sequence[Priced | Rejected | None]
) -> set[tuple[str, str]]:
    """The refused events that were accepted before: an event accepted before is a duplicate
    whatever else is true now (a product retrying must learn that its event was taken, even
    if the wallet has since been suspended). Only the refused ones need looking up: the claim
    tells which priced ones were known."""
    refused = [e for e, v in zip(batch, outcome, strict=True) if isinstance(v, Rejected)]
    return await storage.seen(conn, [e.event_id for e in refused], [e.company_id for e in refused])


def _settle(
    batch: Sequence[IncomingUsage],
    outcome: Sequence[Priced | Rejected | None],
    traceparents: Sequence[str | None],
    new_ids: set[tuple[str, str]] | None,
    earlier: set[tuple[str, str]],
    now: datetime,
) -> tuple[list[Result], list[outbox.Row]]:
    """One result per event, and the ``usage.recorded`` message of each accepted one.
    ``new_ids`` (claimed now; None: every priced event is new) and ``earlier`` (accepted
    before) hold ``(company_id, event_id)``s."""
    rows: list[outbox.Row] = []
    results = []
    now_text = now.isoformat()
    for event, checked, traceparent in zip(batch, outcome, traceparents, strict=True):
        if isinstance(checked, Rejected):
            if earlier and (event.company_id, event.event_id) in earlier:
                results.append(Result(event.event_id, "duplicate"))
            else:
                results.append(Result(event.event_id, "rejected", checked.code, checked.message))
        elif checked is None or (new_ids is not None and (event.company_id, event.event_id) not in new_ids):
            results.append(Result(event.event_id, "duplicate"))
        else:
            message = recorded_message(checked, now, now_text)
            rows.append(
                outbox.row(
                    Topics.USAGE_RECORDED,
                    event.company_id,
                    message,
                    traceparent,
                    inherit=False,
                    type_=RECORDED,
                )
            )
            results.append(Result(event.event_id, "accepted"))
    return results, rows


async def _judged(
    conn: Conn,
    batch: Sequence[IncomingUsage],
    directory: CompanyDirectory,
    catalogs: Sequence[Catalog | None] | None = None,
) -> tuple[datetime, list[Priced | Rejected | None], list[Priced], set[tuple[str, str]]]:
    """Both ways in, before anything is written: the time, each event's verdict, the priced
    ones, and the refused ones accepted before (``_refused_before``)."""
    now = datetime.now(UTC)
    outcome = await _judge(conn, batch, directory, now, catalogs)
    earlier = await _refused_before(conn, batch, outcome)
    return now, outcome, [p for p in outcome if isinstance(p, Priced)], earlier


def _counted(results: list[Result]) -> list[Result]:
    for status, n in Counter(r.status for r in results).items():
        USAGE.labels(status).inc(n)
    return results


async def ingest(
    uow: UnitOfWork,
    batch: Sequence[IncomingUsage],
    traceparents: Sequence[str | None],
    directory: CompanyDirectory,
    catalogs: Sequence[Catalog | None] | None = None,
) -> list[Result]:
    """In the caller's open unit of work; returns one result per input event, in order.
    ``traceparents``: the trace each event continues (its ``usage.recorded`` carries it).
    ``catalogs``: per event, the prices it came under, when not the catalog now (usage that
    waited for rebilling: docs/0029)."""
    conn = uow.conn
    now, outcome, priced, earlier = await _judged(conn, batch, directory, catalogs)
    new_ids = await storage.claim_event_ids(
        conn, [p.event.event_id for p in priced], [p.event.company_id for p in priced]
    )
    results, rows = _settle(batch, outcome, traceparents, new_ids, earlier, now)
    uow.publish(rows)  # written at commit: one outbox row for the whole batch
    return _counted(results)


async def ingest_at_once(
    conn: Conn,
    batch: Sequence[IncomingUsage],
    traceparents: Sequence[str | None],
    directory: CompanyDirectory,
    *,
    hand_over: Callable[[int | None, Sequence[outbox.Row]], None] | None = None,
    also: Callable[[list[Result]], Sequence[outbox.Row]] | None = None,
) -> list[Result]:
    """``ingest`` without a transaction, for batches whose events are all new (the common
    case): the claims and the outbox row go in one statement (``storage.record_all_new``), so
    the batch is recorded whole or not at all. ``asyncpg.UniqueViolationError`` when an event
    was accepted before (or ``DeadlockDetectedError`` when a group racing this one claims the
    same ids): nothing was recorded, and ``ingest`` in a unit of work sorts it out.
    ``hand_over`` gets the committed outbox row's id and messages (``Database.hand_over``);
    ``also(results)``: more messages written with them (a consumer's dead letters)."""
    now, outcome, priced, earlier = await _judged(conn, batch, directory)
    results, rows = _settle(batch, outcome, traceparents, None, earlier, now)
    if also is not None:
        rows += also(results)
    if rows:
        written = await storage.record_all_new(
            conn, [p.event.event_id for p in priced], [p.event.company_id for p in priced], rows
        )
        if hand_over is not None:
            hand_over(written, rows)
    return _counted(results)


class HttpIngestion:
    """``POST /v1/usage`` after its body is parsed: a token bucket per caller (product token),
    then the request's events are recorded together with concurrent requests' batches
    (tally.groupcommit): under load the per-write cost (queries, commit, outbox row, relay
    round) is shared between them. A group whose events are all new is recorded in one
    statement (``ingest_at_once``); one with a retried event, in a transaction (``ingest``).
    ``concurrency`` groups are recorded at once, and at most one starts per ``interval``
    seconds (``GroupCommit``)."""

    def __init__(
        self,
        db: Database,
        directory: CompanyDirectory,
        limiter: TokenBuckets,
        *,
        concurrency: int = 1,
        interval: float = 0.0,
    ) -> None:
        self._db = db
        self._directory = directory
        self._limiter = limiter
        self._group: GroupCommit[tuple[IncomingUsage, str | None], Result] = GroupCommit(
            "usage-http", self._apply, concurrency=concurrency, interval=interval, culprits=_asking_rebilling
        )

    async def record(self, caller: str, batch: list[IncomingUsage], traceparent: str | None) -> list[Result]:
        """One result per event, in order. 429 when ``caller`` sends more than its rate; 503
        when a new company's currency cannot be looked up (nothing recorded: try again)."""
        wait = self._limiter.take(caller, len(batch))
        if wait:
            raise ApiError(
                429,
                "rate_limited",
                "too many usage events for this token; retry later",
                headers={"Retry-After": retry_after(wait)},
            )
        with continue_trace(traceparent, "usage.ingest", {"tally.events": len(batch)}) as child:
            try:
                return await self._group.submit([(e, child) for e in batch])
            except DirectoryUnavailable as exc:
                raise ApiError(
                    503,
                    "rebilling_unavailable",
                    "the company's currency cannot be looked up right now; nothing was recorded, try again",
                    headers={"Retry-After": "2"},
                ) from exc

    async def _apply(self, items: list[tuple[IncomingUsage, str | None]]) -> list[Result]:
        batch, traceparents = [e for e, _ in items], [tp for _, tp in items]
        try:
            async with self._db.statements() as conn:
                return await ingest_at_once(
                    conn, batch, traceparents, self._directory, hand_over=self._db.hand_over
                )
        except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
            pass  # a retried event, or a group racing this one: nothing was written; sort it out
        async with self._db.unit() as uow:
            return await ingest(uow, batch, traceparents, self._directory)


def _asking_rebilling(exc: Exception, batches: list[Sequence[tuple[IncomingUsage, str | None]]]) -> set[int]:
    """The requests of a group that failed because rebilling could not be asked about a
    company or account they name: they alone are answered 503, the others go on."""
    if not isinstance(exc, DirectoryUnavailable):
        return set()
    return {i for i, batch in enumerate(batches) if exc.named_in(batch)}


_FAST_EVENT = msgspec.json.Decoder(IncomingUsage)


def parse_ingest_records(values: Sequence[bytes | None]) -> list[IncomingUsage | events.BadMessage]:
    """``usage.ingest`` messages, each the raw event JSON (as POST /v1/usage takes): each one's
    event, or why it is none (for its dead letter). msgspec takes a batch of common events,
    checked at once (``usable``); otherwise each record is read alone
    (``parse_ingest_record``)."""
    fast: list[IncomingUsage] = []
    try:
        for value in values:
            fast.append(_FAST_EVENT.decode(value or b""))
    except FAST_REFUSALS:
        pass
    else:
        if usable(fast):
            return list(fast)
    return [_parsed_or_why(value) for value in values]


def _parsed_or_why(value: bytes | None) -> IncomingUsage | events.BadMessage:
    try:
        return parse_ingest_record(value)
    except events.BadMessage as exc:
        return exc


def parse_ingest_record(value: bytes | None) -> IncomingUsage:
    """A ``usage.ingest`` message alone: msgspec takes the common event; anything it refuses,
    or a quantity neither a string nor an integer, goes the pydantic way, whose reason the
    dead letter carries (as ``schemas.parse_usage_body``)."""
    if not value:
        raise events.BadMessage("empty message")
    try:
        event = _FAST_EVENT.decode(value)
    except FAST_REFUSALS:
        pass
    else:
        if usable([event]):
            return event
    try:
        return IncomingUsage.of(UsageEvent.model_validate_json(value))
    except ValueError as exc:
        raise events.BadMessage(f"not a usage event: {str(exc)[:500]}") from exc

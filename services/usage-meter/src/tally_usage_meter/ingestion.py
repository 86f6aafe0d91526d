"""The one ingestion path, shared by ``POST /v1/usage`` and the ``usage.ingest`` topic:
validate, refuse suspended accounts, price, dedupe by ``event_id``, and write the priced events
to the outbox (topic ``usage.recorded``, key ``company_id``) in the caller's transaction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx
import prometheus_client

from tally import events, outbox
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.events import Topics, UsageEvent
from tally_usage_meter import storage
from tally_usage_meter.domain import (
    DEFAULT_CURRENCY,
    Priced,
    Rejected,
    price_event,
    recorded_payload,
    suspension_of,
    tenancy_of,
)

SOURCE = "usage-meter"

USAGE = prometheus_client.Counter("tally_usage_events_total", "Usage events by outcome", ["outcome"])


@dataclass(frozen=True)
class Result:
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
    """Rebilling could not say which currency a new company has: try again shortly."""


async def _complete(
    conn: Conn, batch: Sequence[UsageEvent], directory: CompanyDirectory | None, known: storage.Known
) -> None:
    """Complete what rebilling.events told this service with rebilling's own answers, for
    companies and accounts created so recently that their events have not arrived (and
    remember them)."""
    if directory is None:
        return
    try:
        found = await directory.currencies(
            e.company_id for e in batch if e.company_id not in known.currencies
        )
        placed = await directory.account_companies(
            e.account_id for e in batch if e.account_id and e.account_id not in known.owners
        )
    except httpx.HTTPError as exc:
        raise DirectoryUnavailable(str(exc)) from exc
    for cid, currency in sorted(found.items()):  # in key order: concurrent batches never
        await storage.upsert_company(conn, cid, currency)  # wait for each other in a ring
    for aid, cid in sorted(placed.items()):
        await storage.upsert_account(conn, aid, cid)
    known.currencies.update(found)
    known.owners.update(placed)


async def ingest(
    conn: Conn,
    batch: Sequence[UsageEvent],
    traceparents: Sequence[str | None],
    directory: CompanyDirectory | None = None,
) -> list[Result]:
    """Must run inside a transaction; returns one result per input event, in order.
    ``traceparents``: the trace each event continues (its ``usage.recorded`` carries it)."""
    now = datetime.now(UTC)
    prices = await storage.load_prices(conn)
    known = await storage.known(
        conn, [e.company_id for e in batch], [e.account_id for e in batch if e.account_id]
    )
    await _complete(conn, batch, directory, known)

    outcome: list[Priced | Rejected | None] = []
    first_seen: set[str] = set()
    for event in batch:
        currency = known.currencies.get(event.company_id, DEFAULT_CURRENCY)
        # What is wrong with the event itself (not the company's account, no price, a bad
        # quantity) is said before what may pass (a suspended wallet): a retry after a top-up
        # would fail all the same.
        verdict: Priced | Rejected | None = tenancy_of(event, known.owners, known.currencies.keys())
        if verdict is None:
            verdict = price_event(event, prices, currency, now)
            if isinstance(verdict, Priced):
                verdict = suspension_of(event, known.suspended) or verdict
        if isinstance(verdict, Priced):
            if event.event_id in first_seen:
                verdict = None  # same id twice in one batch: the later one is a duplicate
            else:
                first_seen.add(event.event_id)
        outcome.append(verdict)

    priced = [p for p in outcome if isinstance(p, Priced)]
    new_ids = await storage.claim_event_ids(
        conn, [p.event.event_id for p in priced], [p.event.company_id for p in priced]
    )
    # An event accepted before is a duplicate whatever else is true now (a product retrying
    # must learn that its event was taken, even if the wallet has since been suspended). Only
    # the refused ones need looking up: the claim above told which priced ones were known.
    refused = [e.event_id for e, v in zip(batch, outcome, strict=True) if isinstance(v, Rejected)]
    earlier = await storage.seen(conn, refused)

    rows = []
    results = []
    now_text = now.isoformat()
    for event, checked, traceparent in zip(batch, outcome, traceparents, strict=True):
        if isinstance(checked, Rejected) and event.event_id in earlier:
            results.append(Result(event.event_id, "duplicate"))
        elif isinstance(checked, Rejected):
            results.append(Result(event.event_id, "rejected", checked.code, checked.message))
        elif checked is None or event.event_id not in new_ids:
            results.append(Result(event.event_id, "duplicate"))
        else:
            data = recorded_payload(checked, now, now_text)
            message = {
                "id": f"usage:{event.event_id}",
                "type": "usage.recorded",
                "time": now_text,
                "source": SOURCE,
                "data": data,
            }
            rows.append(
                outbox.row(Topics.USAGE_RECORDED, event.company_id, message, traceparent, inherit=False)
            )
            results.append(Result(event.event_id, "accepted"))
    await outbox.enqueue(conn, rows)
    for status, n in Counter(r.status for r in results).items():
        USAGE.labels(status).inc(n)
    return results


def parse_ingest_record(value: bytes | None) -> UsageEvent:
    """A ``usage.ingest`` message: the raw event JSON (as POST /v1/usage takes)."""
    if not value:
        raise events.BadMessage("empty message")
    try:
        return UsageEvent.model_validate_json(value)
    except ValueError as exc:
        raise events.BadMessage(f"not a usage event: {str(exc)[:500]}") from exc

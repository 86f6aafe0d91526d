"""tally_usage_meter.ingestion.HttpIngestion (POST /v1/usage after parsing) with fakes: the
rate limit, the group recorded in one statement (a unit of work when an event was retried),
the 503 when rebilling cannot say a currency. tests/integration/test_usage_ingestion.py runs
the same ways on the real Postgres."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, cast

import asyncpg
import pytest

from tally import events
from tally.directory import CompanyDirectory
from tally.errors import ApiError
from tally.events import IncomingUsage
from tally.ratelimit import TokenBuckets
from tally.uow import Database
from tally_usage_meter import ingestion
from tally_usage_meter.ingestion import DirectoryUnavailable, HttpIngestion, Result


class FakeUow:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def __aenter__(self) -> FakeUow:
        self.log.append("begin")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.log.append("rollback" if kind else "commit")


class FakeDatabase:
    def __init__(self) -> None:
        self.log: list[str] = []

    def unit(self) -> FakeUow:
        return FakeUow(self.log)

    def hand_over(self, outbox_id: int | None, rows: Sequence[Any]) -> None:
        self.log.append("handed over")

    @contextlib.asynccontextmanager
    async def statements(self) -> AsyncIterator[FakeDatabase]:
        self.log.append("connection")
        yield self


def ev(event_id: str) -> IncomingUsage:
    return IncomingUsage(event_id=event_id, company_id="c1", service="email", quantity="1")


def intake(db: FakeDatabase, rate: int = 1000, burst: int = 1000) -> HttpIngestion:
    return HttpIngestion(cast(Database, db), cast(CompanyDirectory, None), TokenBuckets(rate, burst))


async def test_a_group_of_new_events_is_recorded_at_once_with_their_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[list[str], list[str | None]]] = []

    async def at_once(
        conn: Any,
        batch: Sequence[IncomingUsage],
        traceparents: Sequence[str | None],
        directory: Any,
        **_: Any,
    ) -> list[Result]:
        conn.log.append("at once")
        seen.append(([e.event_id for e in batch], list(traceparents)))
        return [Result(e.event_id, "accepted") for e in batch]

    monkeypatch.setattr(ingestion, "ingest_at_once", at_once)
    db = FakeDatabase()
    results = await intake(db).record("product:p1", [ev("e1"), ev("e2")], "00-trace-span-01")
    assert [(r.event_id, r.status) for r in results] == [("e1", "accepted"), ("e2", "accepted")]
    assert db.log == ["connection", "at once"]  # no unit of work: no BEGIN, no COMMIT
    assert seen == [(["e1", "e2"], ["00-trace-span-01", "00-trace-span-01"])]  # tracing off: as given


@pytest.mark.parametrize(
    "failure",
    [
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),  # a retry
        asyncpg.DeadlockDetectedError("deadlock detected"),  # another group claiming the same ids
    ],
    ids=["retried-event", "racing-group"],
)
async def test_a_group_whose_statement_failed_whole_goes_again_in_a_unit_of_work(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    async def at_once(conn: Any, *_: Any, **__: Any) -> list[Result]:
        conn.log.append("at once")
        raise failure

    async def ingest(uow: Any, batch: Sequence[IncomingUsage], *_: Any) -> list[Result]:
        uow.log.append("ingest")
        return [Result(e.event_id, "duplicate") for e in batch]

    monkeypatch.setattr(ingestion, "ingest_at_once", at_once)
    monkeypatch.setattr(ingestion, "ingest", ingest)
    db = FakeDatabase()
    results = await intake(db).record("product:p1", [ev("e1")], None)
    assert [(r.event_id, r.status) for r in results] == [("e1", "duplicate")]
    assert db.log == ["connection", "at once", "begin", "ingest", "commit"]


async def test_a_caller_over_its_rate_is_429_and_nothing_is_ingested(monkeypatch: pytest.MonkeyPatch) -> None:
    async def at_once(conn: Any, batch: Sequence[IncomingUsage], *_: Any, **__: Any) -> list[Result]:
        return [Result(e.event_id, "accepted") for e in batch]

    monkeypatch.setattr(ingestion, "ingest_at_once", at_once)
    db = FakeDatabase()
    limited = intake(db, rate=1, burst=2)
    assert len(await limited.record("product:p1", [ev("e1"), ev("e2")], None)) == 2
    with pytest.raises(ApiError) as info:
        await limited.record("product:p1", [ev("e3")], None)
    assert (info.value.status, info.value.code) == (429, "rate_limited")
    assert info.value.headers == {"Retry-After": "1"}
    assert db.log == ["connection"]  # the refused batch never reached the database
    assert len(await limited.record("product:p2", [ev("e4")], None)) == 1  # buckets are per caller


async def test_rebilling_unavailable_is_503_and_nothing_goes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    async def at_once(conn: Any, *_: Any, **__: Any) -> list[Result]:
        raise DirectoryUnavailable("connection refused", frozenset({"c1"}), frozenset())

    monkeypatch.setattr(ingestion, "ingest_at_once", at_once)
    db = FakeDatabase()
    with pytest.raises(ApiError) as info:
        await intake(db).record("product:p1", [ev("e1")], None)
    assert (info.value.status, info.value.code) == (503, "rebilling_unavailable")
    assert info.value.headers == {"Retry-After": "2"}
    assert db.log == ["connection"]  # not tried again in a unit of work


def test_a_usage_ingest_record_is_a_raw_usage_event() -> None:
    event = ingestion.parse_ingest_record(
        b'{"event_id": "e1", "company_id": "c1", "service": "sms", "quantity": 2}'
    )
    assert (event.event_id, event.quantity) == ("e1", 2)
    for bad in (None, b"", b"{", b'{"event_id": "e1"}'):
        with pytest.raises(events.BadMessage):
            ingestion.parse_ingest_record(bad)


def test_results_render_as_the_api_says() -> None:
    assert Result("e1", "accepted").as_json() == {"event_id": "e1", "status": "accepted"}
    assert Result("e2", "rejected", "unknown_service", "no such service").as_json() == {
        "event_id": "e2",
        "status": "rejected",
        "error": {"code": "unknown_service", "message": "no such service"},
    }

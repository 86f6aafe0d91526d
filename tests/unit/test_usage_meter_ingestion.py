"""tally_usage_meter.ingestion.HttpIngestion (POST /v1/usage after parsing) with fakes: the
rate limit, the group commit's unit of work, the 503 when rebilling cannot say a currency."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, cast

import pytest

from tally import events
from tally.directory import CompanyDirectory
from tally.errors import ApiError
from tally.events import UsageEvent
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


def ev(event_id: str) -> UsageEvent:
    return UsageEvent(event_id=event_id, company_id="c1", service="email", quantity="1")


def intake(db: FakeDatabase, rate: int = 1000, burst: int = 1000) -> HttpIngestion:
    return HttpIngestion(cast(Database, db), cast(CompanyDirectory, None), TokenBuckets(rate, burst))


async def test_events_are_ingested_in_one_unit_of_work_with_their_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[list[str], list[str | None]]] = []

    async def ingest(
        uow: Any, batch: Sequence[UsageEvent], traceparents: Sequence[str | None], directory: Any
    ) -> list[Result]:
        uow.log.append("ingest")
        seen.append(([e.event_id for e in batch], list(traceparents)))
        return [Result(e.event_id, "accepted") for e in batch]

    monkeypatch.setattr(ingestion, "ingest", ingest)
    db = FakeDatabase()
    results = await intake(db).record("product:p1", [ev("e1"), ev("e2")], "00-trace-span-01")
    assert [(r.event_id, r.status) for r in results] == [("e1", "accepted"), ("e2", "accepted")]
    assert db.log == ["begin", "ingest", "commit"]
    assert seen == [(["e1", "e2"], ["00-trace-span-01", "00-trace-span-01"])]  # tracing off: as given


async def test_a_caller_over_its_rate_is_429_and_nothing_is_ingested(monkeypatch: pytest.MonkeyPatch) -> None:
    async def ingest(uow: Any, batch: Sequence[UsageEvent], *_: Any) -> list[Result]:
        return [Result(e.event_id, "accepted") for e in batch]

    monkeypatch.setattr(ingestion, "ingest", ingest)
    db = FakeDatabase()
    limited = intake(db, rate=1, burst=2)
    assert len(await limited.record("product:p1", [ev("e1"), ev("e2")], None)) == 2
    with pytest.raises(ApiError) as info:
        await limited.record("product:p1", [ev("e3")], None)
    assert (info.value.status, info.value.code) == (429, "rate_limited")
    assert info.value.headers == {"Retry-After": "1"}
    assert db.log == ["begin", "commit"]  # the refused batch never opened a unit of work
    assert len(await limited.record("product:p2", [ev("e4")], None)) == 1  # buckets are per caller


async def test_rebilling_unavailable_is_503_and_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    async def ingest(*_: Any) -> list[Result]:
        raise DirectoryUnavailable("connection refused")

    monkeypatch.setattr(ingestion, "ingest", ingest)
    db = FakeDatabase()
    with pytest.raises(ApiError) as info:
        await intake(db).record("product:p1", [ev("e1")], None)
    assert (info.value.status, info.value.code) == (503, "rebilling_unavailable")
    assert info.value.headers == {"Retry-After": "2"}
    assert db.log == ["begin", "rollback"]


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

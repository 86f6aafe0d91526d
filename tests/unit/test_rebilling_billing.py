"""rebilling's billing rules that need no database: the dunning schedule, the keys each try of
a leg is charged under, the license price, the report's totals, how subscriptions and pools are
rendered; the period runner (one at a time across replicas, woken by a saved card) and the card
consumer's poison handling, with fakes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest

import tally_rebilling.billing as billing
import tally_rebilling.handlers as handlers
from tally.money import MoneyError
from tally.outbox import Row
from tally_rebilling.billing import (
    DEFAULT_RETRY_HOURS,
    RUNNER_LOCK,
    Biller,
    PeriodRunner,
    after_failure,
    leg_key,
    retry_delays,
)
from tally_rebilling.licenses import unit_price
from tally_rebilling.reselling import summarise
from tally_rebilling.schemas import pool_out, subscription_out
from tally_rebilling.storage import Dunning
from tally_rebilling.wiring import RebillingWiring

# --- dunning ----------------------------------------------------------------------------------


def test_the_dunning_schedule_is_hours_comma_separated() -> None:
    assert retry_delays("24,72,120") == (timedelta(hours=24), timedelta(hours=72), timedelta(hours=120))
    assert retry_delays(" 0.5, 2 ,") == (timedelta(minutes=30), timedelta(hours=2))


@pytest.mark.parametrize("raw", [None, ""])
def test_no_schedule_is_the_default_one(raw: str | None) -> None:
    assert retry_delays(raw) == tuple(timedelta(hours=h) for h in DEFAULT_RETRY_HOURS)


def test_each_failed_try_waits_its_delay_and_after_the_last_dunning_gives_up() -> None:
    delays = retry_delays("1,2,3")
    assert after_failure(1, delays) == timedelta(hours=1)
    assert after_failure(3, delays) == timedelta(hours=3)
    assert after_failure(4, delays) is None
    assert after_failure(1, ()) is None  # no retries at all


def test_each_try_of_a_leg_has_its_own_charge_key() -> None:
    # the first try keeps the key used before dunning (a period charged then is found again)
    assert leg_key("s1", "2026-03", "platform", 1) == "sub-s1-2026-03-platform"
    assert leg_key("s1", "2026-03", "account", 1) == "sub-s1-2026-03-company"
    assert leg_key("s1", "2026-03", "account", 2) == "sub-s1-2026-03-company-t2"
    # a seat added mid-period is a leg of its own
    assert leg_key("s1", "2026-03", "account:inv_1", 3) == "sub-s1-2026-03-account:inv_1-t3"
    keys = {leg_key("s1", "2026-03", leg, n) for leg in ("platform", "account") for n in (1, 2, 3)}
    assert len(keys) == 6


def test_the_license_price_is_an_exact_decimal() -> None:
    assert unit_price("10") == 10_000_000
    assert unit_price("12.345678") == 12_345_678
    with pytest.raises(MoneyError, match="TALLY_LICENSE_PRICE"):
        unit_price("12.3456789")
    with pytest.raises(MoneyError):
        unit_price("ten")


# --- the report -------------------------------------------------------------------------------


def _leg(sub: str, leg: str, amount: int, status: str, account: str = "a1") -> dict[str, Any]:
    return {
        "subscription_id": sub,
        "account_id": account,
        "product": "yext",
        "deployment": "resell",
        "leg": leg,
        "amount": amount,
        "status": status,
    }


def test_the_report_counts_revenue_cost_and_what_is_still_owed() -> None:
    lines, totals = summarise(
        [
            _leg("s1", "platform", 30, "charged"),
            _leg("s1", "account", 50, "charged"),
            _leg("s2", "platform", 30, "failed", account="a2"),
            _leg("s2", "account", 50, "due", account="a2"),
            _leg("s2", "account:inv_1", 7, "charged", account="a2"),  # a seat-like extra leg
        ]
    )
    assert totals == {"revenue": 57, "platform_cost": 30, "outstanding": 50, "platform_outstanding": 30}
    by_sub = {line["subscription_id"]: line for line in lines}
    assert [line["subscription_id"] for line in lines] == ["s1", "s2"]  # in the legs' order
    assert by_sub["s1"] == {
        "subscription_id": "s1",
        "account_id": "a1",
        "product": "yext",
        "deployment": "resell",
        "revenue": 50,
        "platform_cost": 30,
        "outstanding": 0,
    }
    # a line shows the platform cost charged only; what the company still owes is in the totals
    assert (by_sub["s2"]["revenue"], by_sub["s2"]["platform_cost"], by_sub["s2"]["outstanding"]) == (7, 0, 50)
    assert by_sub["s2"]["account_id"] == "a2"


def test_a_period_without_legs_is_all_zero() -> None:
    assert summarise([]) == (
        [],
        {"revenue": 0, "platform_cost": 0, "outstanding": 0, "platform_outstanding": 0},
    )


# --- rendering --------------------------------------------------------------------------------


def test_a_pool_shows_what_is_available_and_the_price() -> None:
    out = pool_out(10, 4, 12_500_000)
    assert out.model_dump() == {"total": 10, "assigned": 4, "available": 6, "unit_price": "12.500000"}


def test_a_subscription_renders_money_as_decimal_strings() -> None:
    sub = {
        "id": "sub_1",
        "account_id": "a1",
        "product": "yext",
        "deployment": "resell",
        "status": "past_due",
        "platform_price": 30_000_000,
        "company_price": 45_500_000,
        "quantity": 1,
        "cancel_at_period_end": False,
        "first_period": "2026-03",
    }
    retry = datetime(2026, 3, 2, tzinfo=UTC)
    out = subscription_out(sub, Dunning(45_500_000, retry, 2), period="2026-03", charge="failed")
    assert out.model_dump(mode="json") == {
        "id": "sub_1",
        "account_id": "a1",
        "product": "yext",
        "deployment": "resell",
        "status": "past_due",
        "platform_price": "30.000000",
        "company_price": "45.500000",
        "quantity": 1,
        "outstanding": "45.500000",
        "next_retry_at": "2026-03-02T00:00:00+00:00",
        "failed_attempts": 2,
        "cancel_at_period_end": False,
        "created_period": "2026-03",
        "period": "2026-03",
        "charge": "failed",
    }
    listed = subscription_out(sub, Dunning(0, None))
    assert (listed.outstanding, listed.next_retry_at, listed.period, listed.charge) == (
        "0.000000",
        None,
        None,
        None,
    )


# --- the period runner ------------------------------------------------------------------------


class _Session:
    """A pool connection as the runner uses it: the advisory lock, free or held elsewhere."""

    def __init__(self, free: bool) -> None:
        self.free = free
        self.calls: list[tuple[str, int]] = []

    async def fetchval(self, sql: str, key: int) -> bool:
        self.calls.append((sql, key))
        return self.free

    async def execute(self, sql: str, key: int) -> str:
        self.calls.append((sql, key))
        return "SELECT 1"


class _Biller:
    def __init__(self, session: _Session, *, fail: bool = False) -> None:
        self.session = session
        self.fail = fail
        self.runs: list[datetime] = []
        self.ran = asyncio.Event()
        self.db = SimpleNamespace(pool=self)  # the runner's session comes from the pool

    async def run(self, at: datetime) -> dict[str, int]:
        self.runs.append(at)
        self.ran.set()
        if self.fail:
            raise RuntimeError("recharge is down")
        return {}


@pytest.fixture(autouse=True)
def _sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tally.db.session`` on the fake pool: its one session."""

    @contextlib.asynccontextmanager
    async def session(pool: _Biller) -> AsyncIterator[_Session]:
        yield pool.session

    monkeypatch.setattr(billing, "session", session)


async def _rounds(runner: PeriodRunner, biller: _Biller, n: int) -> None:
    for _ in range(n):
        await asyncio.wait_for(biller.ran.wait(), timeout=5)
        biller.ran.clear()


async def test_the_runner_runs_under_the_advisory_lock_and_releases_it() -> None:
    session = _Session(free=True)
    biller = _Biller(session)
    runner = PeriodRunner(cast(Biller, biller), every=3600)
    runner.start()
    try:
        await _rounds(runner, biller, 1)
    finally:
        await runner.stop()
    assert len(biller.runs) == 1 and biller.runs[0].tzinfo is UTC
    assert session.calls == [
        ("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK),
        ("SELECT pg_advisory_unlock($1)", RUNNER_LOCK),
    ]


async def test_another_replica_holding_the_lock_means_no_run_here() -> None:
    session = _Session(free=False)
    biller = _Biller(session)
    runner = PeriodRunner(cast(Biller, biller), every=3600)
    runner.start()
    try:
        for _ in range(50):
            if session.calls:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.stop()
    assert biller.runs == []
    assert session.calls == [("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK)]


async def test_a_saved_card_wakes_the_runner_and_a_failed_run_still_unlocks() -> None:
    session = _Session(free=True)
    fake = _Biller(session, fail=True)
    runner = PeriodRunner(cast(Biller, fake), every=3600)  # without a wake: the next run in an hour
    biller = Biller(cast(Any, None), recharge_url="http://recharge", secret="s", delays=(), license_price=0)
    biller.runner = runner
    runner.start()
    try:
        await _rounds(runner, fake, 1)
        biller.wake()  # what the card consumer does after a card brought legs forward
        await _rounds(runner, fake, 1)
    finally:
        await runner.stop()
    assert len(fake.runs) == 2
    assert session.calls.count(("SELECT pg_advisory_unlock($1)", RUNNER_LOCK)) == 2


def test_without_a_runner_a_wake_does_nothing() -> None:
    biller = Biller(cast(Any, None), recharge_url="http://r", secret="s", delays=(), license_price=0)
    biller.wake()
    wiring = RebillingWiring(cast(Any, None), biller=biller, markup_services=set())
    assert wiring.workers() == ()
    biller.runner = PeriodRunner(biller, every=60)
    assert wiring.workers() == (biller.runner,)


# --- the card consumer ------------------------------------------------------------------------


class _Uow:
    def __init__(self) -> None:
        self.published: list[Row] = []
        self.conn = None

    async def __aenter__(self) -> _Uow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def publish(self, rows: Sequence[Row]) -> None:
        self.published.extend(rows)


class _Wiring:
    def __init__(self) -> None:
        self.units: list[_Uow] = []
        self.woken = 0
        self.biller = SimpleNamespace(wake=self._wake)

    def _wake(self) -> None:
        self.woken += 1

    def uow(self) -> _Uow:
        self.units.append(_Uow())
        return self.units[-1]


def _record(value: bytes, type_: str | None) -> SimpleNamespace:
    headers = [("type", type_.encode())] if type_ else []
    return SimpleNamespace(
        value=value, headers=headers, topic="recharge.events", partition=0, offset=3, key=b"c1"
    )


async def test_a_batch_without_card_events_opens_no_transaction() -> None:
    w = _Wiring()
    await handlers.on_recharge_events(cast(RebillingWiring, w), [_record(b"not read", "recharge.succeeded")])
    assert w.units == []


async def test_a_broken_card_event_goes_to_the_dlq() -> None:
    w = _Wiring()
    broken = orjson.dumps(
        {
            "id": "e1",
            "type": "payment_method.attached",
            "time": "2026-01-01T00:00:00Z",
            "source": "recharge",
            "data": {"company_id": "c1"},
        }
    )
    await handlers.on_recharge_events(cast(RebillingWiring, w), [_record(broken, "payment_method.attached")])
    assert len(w.units) == 1
    [row] = w.units[0].published
    assert row[0] == "recharge.events.dlq"
    assert "payment_method" in orjson.loads(row[2])["error"]
    assert w.woken == 0  # no leg brought forward

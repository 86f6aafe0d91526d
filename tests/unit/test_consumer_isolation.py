"""tally.consumer.Isolation: a batch that failed on a record's content is applied record by
record; the record that fails alone (twice) is dead-lettered once and the others are applied;
an error of the environment propagates; a kind of record that has used its poison budget parks
the consumer (a broken release, not poison). The letter box here is a fake with the budget's
rules; ``tests/integration/test_consumer_poison.py`` runs the real one (Postgres, the broker)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.consumer import PARK_SECONDS, Isolation, SystemicFailure, caused_by_the_record

BUDGET = 3


class Record:
    """A consumed record as the handlers see it."""

    def __init__(
        self, n: int, kind: str | None = "recharge.succeeded", topic: str = "recharge.events"
    ) -> None:
        self.n, self.topic, self.partition, self.offset = n, topic, 0, n
        self.headers: list[tuple[str, bytes | None]] = [("type", kind.encode() if kind is not None else None)]

    def __repr__(self) -> str:
        return f"Record({self.n})"


class Handler:
    """Applies records; ``poison`` always fail with ValueError, ``flaky`` fail once."""

    def __init__(self, poison: Iterable[int] = (), flaky: Iterable[int] = (), down: bool = False) -> None:
        self.poison, self.flaky, self.down = set(poison), set(flaky), down
        self.applied: list[int] = []
        self.calls: list[tuple[Any, ...]] = []

    async def __call__(self, records: Sequence[Any]) -> None:
        self.calls.append(tuple(records))
        if self.down:
            raise ConnectionError("the database went away")
        for r in records:
            if r.n in self.poison:
                raise ValueError(f"cannot apply {r.n}")
            if r.n in self.flaky:
                self.flaky.discard(r.n)
                raise KeyError(r.n)
        self.applied.extend(r.n for r in records)


class Letters:
    """The letter box's rules in memory: each record once, ``BUDGET`` per kind."""

    def __init__(self, down: bool = False, budget: int = BUDGET) -> None:
        self.dead: list[tuple[Any, str]] = []
        self.kinds: list[str] = []
        self.down, self.budget = down, budget

    async def letter(self, record: Any, reason: str, kind: str) -> bool:
        if self.down:
            raise ConnectionError("the database is down")
        if any(r is record for r, _ in self.dead):
            return True  # lettered before: not written again
        if self.kinds.count(kind) >= self.budget:
            return False
        self.dead.append((record, reason))
        self.kinds.append(kind)
        return True


async def test_the_poison_record_is_dead_lettered_and_the_others_are_applied_in_order() -> None:
    handler, letters = Handler(poison={3}), Letters()
    records = [Record(n) for n in (1, 2, 3, 4)]
    assert await Isolation(handler, letters).apply(records) == 1
    assert handler.applied == [1, 2, 4]
    assert letters.dead == [(records[2], "ValueError: cannot apply 3")]
    assert handler.calls.count((records[2],)) == 2  # tried alone twice before it is judged poison
    assert letters.kinds == ["recharge.events:recharge.succeeded"]


async def test_a_redelivered_batch_applies_everything_again_and_letters_nothing_twice() -> None:
    handler, letters = Handler(poison={2}), Letters()
    records = [Record(n) for n in (1, 2, 3)]
    isolation = Isolation(handler, letters)
    assert await isolation.apply(records) == 1
    assert await isolation.apply(records) == 1  # the batch came back (a later record failed)
    assert len(letters.dead) == 1  # one letter
    assert handler.applied == [1, 3, 1, 3]  # nothing skipped: a redelivery, which handlers take


async def test_a_null_or_unknown_type_header_counts_under_the_topic() -> None:
    handler, letters = Handler(poison={1, 2, 3}), Letters()
    records = [Record(1, None), Record(2, "made.up"), Record(3, "recharge.succeeded")]
    assert await Isolation(handler, letters).apply(records) == 3
    assert letters.kinds == ["recharge.events", "recharge.events", "recharge.events:recharge.succeeded"]


async def test_a_products_headers_do_not_widen_the_budget_on_usage_ingest() -> None:
    handler, letters = Handler(poison={1, 2}), Letters()
    records = [Record(1, "wallet.debited"), Record(2, "usage.recorded")]
    for r in records:
        r.topic = "usage.ingest"
    assert await Isolation(handler, letters).apply(records) == 2
    assert letters.kinds == ["usage.ingest", "usage.ingest"]


async def test_a_record_that_fails_once_alone_is_applied_on_its_second_try() -> None:
    handler, letters = Handler(flaky={2}), Letters()
    assert await Isolation(handler, letters).apply([Record(1), Record(2)]) == 0
    assert handler.applied == [1, 2] and letters.dead == []


async def test_an_error_of_the_environment_propagates_and_dead_letters_nothing() -> None:
    handler, letters = Handler(down=True), Letters()
    with pytest.raises(ConnectionError):
        await Isolation(handler, letters).apply([Record(1), Record(2)])
    assert letters.dead == []


async def test_a_kind_past_its_budget_parks_the_consumer_for_a_while() -> None:
    now = [0.0]
    broken = set(range(0, 100, 2))  # every recharge.succeeded fails; payment_method.* passes
    handler, letters = Handler(poison=broken), Letters()
    isolation = Isolation(handler, letters, clock=lambda: now[0])
    batch = [Record(n, "recharge.succeeded" if n in broken else "payment_method.attached") for n in range(20)]
    with pytest.raises(SystemicFailure, match="poison budget"):
        await isolation.apply(batch)
    assert [r.n for r, _ in letters.dead] == [0, 2, 4]  # records of another kind between: no reset
    assert isolation.parked
    now[0] += PARK_SECONDS + 1
    assert not isolation.parked  # tried alone again later


async def test_a_letter_that_could_not_be_written_propagates_and_counts_nothing() -> None:
    handler, letters = Handler(poison={7}), Letters(down=True)
    isolation = Isolation(handler, letters)
    for _ in range(BUDGET + 2):  # the poison is retried while the DLQ cannot be written
        with pytest.raises(ConnectionError):
            await isolation.apply([Record(7)])
    letters.down = False
    assert await isolation.apply([Record(7)]) == 1 and not isolation.parked


def test_what_a_record_causes_and_what_the_environment_does() -> None:
    record_caused: list[BaseException] = [
        ValueError("x"),
        TypeError("x"),
        KeyError("x"),
        ZeroDivisionError(),
        asyncpg.NumericValueOutOfRangeError("out of range"),
        asyncpg.CheckViolationError("check"),
        asyncpg.UniqueViolationError("unique"),
        asyncpg.ProgramLimitExceededError("index row requires 20048 bytes, maximum size is 8191"),
    ]
    environment: list[BaseException] = [
        ConnectionError(),
        OSError(),
        TimeoutError(),
        asyncpg.ForeignKeyViolationError("its reference has not arrived yet"),
        asyncpg.DeadlockDetectedError("deadlock"),
        asyncpg.CannotConnectNowError("starting up"),
        asyncpg.AdminShutdownError("shutting down"),
        asyncpg.UndefinedColumnError("a migration not applied yet"),
        RuntimeError("anything else"),
    ]
    assert all(caused_by_the_record(e) for e in record_caused)
    assert not any(caused_by_the_record(e) for e in environment)


@given(
    n=st.integers(1, 300),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
async def test_any_batch_comes_out_applied_once_in_order_but_for_its_poison(
    n: int, data: st.DataObject
) -> None:
    """Against the model: every record not poison is applied exactly once and in the batch's
    order, every poison record is dead-lettered exactly once, whatever fails once on the way."""
    numbers = st.sets(st.integers(0, n - 1), max_size=min(n, 8))
    poison, flaky = data.draw(numbers, "poison"), data.draw(numbers, "flaky")
    handler, letters = Handler(poison=poison, flaky=flaky - poison), Letters(budget=n)
    records = [Record(i) for i in range(n)]
    assert await Isolation(handler, letters).apply(records) == len(poison)
    assert handler.applied == [i for i in range(n) if i not in poison]
    assert [r.n for r, _ in letters.dead] == sorted(poison)


@pytest.mark.parametrize("n", [2, 100, 2_000, 8_000])
async def test_one_poison_record_costs_tries_of_halves_not_a_transaction_per_record(n: int) -> None:
    handler, letters = Handler(poison={n * 2 // 3}), Letters()
    assert await Isolation(handler, letters).apply([Record(i) for i in range(n)]) == 1
    assert len(handler.applied) == n - 1
    # halving: two parts tried per level down to the record, which is tried twice alone
    assert len(handler.calls) <= 2 * math.ceil(math.log2(n)) + 1

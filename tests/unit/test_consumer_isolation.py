"""tally.consumer.Isolation: a batch that failed on a record's content is applied record by
record; the record that fails alone (twice) is dead-lettered and the others are applied; an
error of the environment propagates; more records of one type failing than the budget allows
is a broken release, not poison: the consumer parks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import pytest

from tally.consumer import (
    POISON_BUDGET,
    POISON_WINDOW_SECONDS,
    Isolation,
    SystemicFailure,
    caused_by_the_record,
)


class Record:
    """A consumed record as the handlers see it: a value, a topic, a ``type`` header."""

    def __init__(self, n: int, kind: str = "recharge.succeeded") -> None:
        self.n, self.topic, self.headers = n, "recharge.events", [("type", kind.encode())]

    def __repr__(self) -> str:
        return f"Record({self.n})"


class Handler:
    """Applies records (ints); ``poison`` always fails with ValueError, ``flaky`` fails once."""

    def __init__(self, poison: Iterable[int] = (), flaky: Iterable[int] = (), down: bool = False) -> None:
        self.poison, self.flaky, self.down = set(poison), set(flaky), down
        self.applied: list[int] = []
        self.calls: list[tuple[Any, ...]] = []

    async def __call__(self, records: Sequence[Any]) -> None:
        self.calls.append(tuple(records))
        if self.down:
            raise ConnectionError("the database went away")
        for r in records:
            n = r.n if isinstance(r, Record) else r
            if n in self.poison:
                raise ValueError(f"cannot apply {n}")
            if n in self.flaky:
                self.flaky.discard(n)
                raise KeyError(n)
        self.applied.extend(r.n if isinstance(r, Record) else r for r in records)


class Letters:
    def __init__(self) -> None:
        self.dead: list[tuple[Any, str]] = []

    async def __call__(self, record: Any, reason: str) -> None:
        self.dead.append((record, reason))


async def test_the_poison_record_is_dead_lettered_and_the_others_are_applied_in_order() -> None:
    handler, letters = Handler(poison={3}), Letters()
    isolation = Isolation(handler, letters)
    records = [Record(n) for n in (1, 2, 3, 4)]
    assert await isolation.apply(records) == 1
    assert handler.applied == [1, 2, 4]
    assert letters.dead == [(records[2], "ValueError: cannot apply 3")]
    assert handler.calls.count((records[2],)) == 2  # tried alone twice before it is judged poison
    assert isolation.parked is None


async def test_a_record_that_fails_once_alone_is_applied_on_its_second_try() -> None:
    handler, letters = Handler(flaky={2}), Letters()
    assert await Isolation(handler, letters).apply([Record(1), Record(2)]) == 0
    assert handler.applied == [1, 2] and letters.dead == []


async def test_an_error_of_the_environment_propagates_and_dead_letters_nothing() -> None:
    handler, letters = Handler(down=True), Letters()
    with pytest.raises(ConnectionError):
        await Isolation(handler, letters).apply([Record(1), Record(2)])
    assert letters.dead == []


async def test_a_release_breaking_one_type_parks_after_the_budget_whatever_succeeds_between() -> None:
    # every recharge.succeeded fails; other types go through and must not clear the count
    broken = set(range(0, 100, 2))
    handler, letters = Handler(poison=broken), Letters()
    isolation = Isolation(handler, letters)
    batch = [Record(n, "recharge.succeeded" if n in broken else "payment_method.attached") for n in range(20)]
    with pytest.raises(SystemicFailure, match=r"recharge\.succeeded"):
        await isolation.apply(batch)
    assert [r.n for r, _ in letters.dead] == [0, 2, 4][:POISON_BUDGET]
    assert isolation.parked
    # redelivered: parked, so nothing is dead-lettered again and nothing is applied
    applied_before = list(handler.applied)
    with pytest.raises(SystemicFailure):
        await isolation.apply(batch)
    assert len(letters.dead) == POISON_BUDGET and handler.applied == applied_before


async def test_the_budget_is_per_type_and_renews_after_the_window() -> None:
    now = [0.0]
    handler, letters = Handler(poison=range(100)), Letters()
    isolation = Isolation(handler, letters, clock=lambda: now[0])
    assert await isolation.apply([Record(n) for n in range(POISON_BUDGET)]) == POISON_BUDGET
    assert await isolation.apply([Record(50, "license.changed")]) == 1  # another type: its own budget
    now[0] += POISON_WINDOW_SECONDS + 1
    assert await isolation.apply([Record(60)]) == 1  # the earlier letters are out of the window
    assert isolation.parked is None


async def test_a_letter_that_could_not_be_written_does_not_count() -> None:
    handler = Handler(poison={7})

    class Down(Letters):
        async def __call__(self, record: Any, reason: str) -> None:
            raise ConnectionError("the database is down")

    isolation = Isolation(handler, Down())
    for _ in range(POISON_BUDGET + 3):  # the poison is retried while the DLQ cannot be written
        with pytest.raises(ConnectionError):
            await isolation.apply([Record(7)])
    letters = Letters()
    isolation._dead_letter = letters  # the database is back
    assert await isolation.apply([Record(7)]) == 1 and isolation.parked is None


def test_what_a_record_causes_and_what_the_environment_does() -> None:
    record_caused: list[BaseException] = [
        ValueError("x"),
        TypeError("x"),
        KeyError("x"),
        ZeroDivisionError(),
        asyncpg.NumericValueOutOfRangeError("out of range"),
        asyncpg.CheckViolationError("check"),
        asyncpg.UniqueViolationError("unique"),
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

"""tally.consumer.Isolation: a batch that failed on a record's content is applied record by
record; the record that fails alone (twice) is dead-lettered and the others are applied; an
error of the environment propagates; a run of records that all fail alone is a systemic
failure, not poison."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import pytest

from tally.consumer import SYSTEMIC_AFTER, Isolation, SystemicFailure, caused_by_the_record


class Handler:
    """Applies records (ints); ``poison`` always fails with ValueError, ``flaky`` fails once."""

    def __init__(self, poison: Iterable[int] = (), flaky: Iterable[int] = (), down: bool = False) -> None:
        self.poison, self.flaky, self.down = set(poison), set(flaky), down
        self.applied: list[int] = []
        self.calls: list[tuple[int, ...]] = []

    async def __call__(self, records: Sequence[Any]) -> None:
        self.calls.append(tuple(records))
        if self.down:
            raise ConnectionError("the database went away")
        for r in records:
            if r in self.poison:
                raise ValueError(f"cannot apply {r}")
            if r in self.flaky:
                self.flaky.discard(r)
                raise KeyError(r)
        self.applied.extend(records)


class Letters:
    def __init__(self) -> None:
        self.dead: list[tuple[Any, str]] = []

    async def __call__(self, record: Any, reason: str) -> None:
        self.dead.append((record, reason))


async def test_the_poison_record_is_dead_lettered_and_the_others_are_applied_in_order() -> None:
    handler, letters = Handler(poison={3}), Letters()
    isolation = Isolation(handler, letters)
    assert await isolation.apply([1, 2, 3, 4]) == 1
    assert handler.applied == [1, 2, 4]
    assert letters.dead == [(3, "ValueError: cannot apply 3")]
    assert handler.calls.count((3,)) == 2  # tried alone twice before it is judged poison
    assert isolation.failing_in_a_row == 0  # 4 was applied after it


async def test_a_record_that_fails_once_alone_is_applied_on_its_second_try() -> None:
    handler, letters = Handler(flaky={2}), Letters()
    assert await Isolation(handler, letters).apply([1, 2]) == 0
    assert handler.applied == [1, 2] and letters.dead == []


async def test_an_error_of_the_environment_propagates_and_dead_letters_nothing() -> None:
    handler, letters = Handler(down=True), Letters()
    with pytest.raises(ConnectionError):
        await Isolation(handler, letters).apply([1, 2])
    assert letters.dead == []


async def test_records_that_all_fail_alone_are_a_systemic_failure_after_a_few() -> None:
    handler, letters = Handler(poison=set(range(100))), Letters()
    isolation = Isolation(handler, letters)
    assert await isolation.apply(list(range(3))) == 3
    with pytest.raises(SystemicFailure):  # the count runs across batches
        await isolation.apply(list(range(3, 100)))
    assert [r for r, _ in letters.dead] == list(range(SYSTEMIC_AFTER))
    assert handler.applied == []


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

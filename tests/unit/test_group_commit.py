"""tally.groupcommit: concurrent batches share one call; each gets its own results."""

from __future__ import annotations

import asyncio

import pytest

from tally.groupcommit import GroupCommit


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on

    async def apply(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        if len(self.calls) == 1:
            await self.release.wait()  # hold the first call: the others queue up meanwhile
        if self.fail_on in items:
            raise RuntimeError("the transaction failed")
        return [i * 10 for i in items]


async def test_batches_arriving_during_a_call_share_the_next_one() -> None:
    rec = Recorder()
    group = GroupCommit("test", rec.apply)
    first = asyncio.create_task(group.submit([1]))
    await asyncio.sleep(0)
    later = [asyncio.create_task(group.submit(b)) for b in ([2, 3], [4], [5, 6, 7])]
    await asyncio.sleep(0)
    rec.release.set()
    assert await first == [10]
    assert [await t for t in later] == [[20, 30], [40], [50, 60, 70]]
    assert rec.calls == [[1], [2, 3, 4, 5, 6, 7]]


async def test_a_group_never_exceeds_max_items() -> None:
    rec = Recorder()
    group = GroupCommit("test", rec.apply, max_items=3)
    first = asyncio.create_task(group.submit([0]))
    await asyncio.sleep(0)
    later = [asyncio.create_task(group.submit(b)) for b in ([1, 2], [3], [4, 5, 6], [7])]
    await asyncio.sleep(0)
    rec.release.set()
    await asyncio.gather(first, *later)
    assert rec.calls == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_a_failed_call_fails_every_batch_in_it_and_the_next_call_runs() -> None:
    rec = Recorder(fail_on=3)
    group = GroupCommit("test", rec.apply)
    first = asyncio.create_task(group.submit([1]))
    await asyncio.sleep(0)
    doomed = [asyncio.create_task(group.submit(b)) for b in ([2], [3])]
    await asyncio.sleep(0)
    rec.release.set()
    assert await first == [10]
    for task in doomed:
        with pytest.raises(RuntimeError, match="transaction failed"):
            await task
    assert await group.submit([4]) == [40]
    assert rec.calls == [[1], [2, 3], [4]]

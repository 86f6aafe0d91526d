"""tally.groupcommit: concurrent batches share one call; each gets its own results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

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


async def test_up_to_concurrency_calls_run_at_once_and_the_rest_wait_for_either() -> None:
    started: list[list[int]] = []
    gates = [asyncio.Event() for _ in range(4)]

    async def apply(items: list[int]) -> list[int]:
        n = len(started)
        started.append(items)
        await gates[n].wait()
        return [-i for i in items]

    group = GroupCommit("test", apply, concurrency=2)
    first = asyncio.create_task(group.submit([1]))
    await asyncio.sleep(0)
    second = asyncio.create_task(group.submit([2]))  # a second call starts: it does not wait
    await asyncio.sleep(0)
    queued = [asyncio.create_task(group.submit(b)) for b in ([3], [4, 5])]
    await asyncio.sleep(0)
    assert started == [[1], [2]]  # both slots taken: 3, 4 and 5 wait
    gates[1].set()  # the second call ends first: its slot takes all that waits
    assert await second == [-2]
    await asyncio.sleep(0)
    assert started == [[1], [2], [3, 4, 5]]
    assert not first.done()
    gates[2].set()
    assert [await t for t in queued] == [[-3], [-4, -5]]
    gates[0].set()
    assert await first == [-1]
    # idle again: the next batch is called at once, alone
    gates[3].set()
    assert await group.submit([6]) == [-6]
    assert started[-1] == [6]


def test_concurrency_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit("test", lambda items: asyncio.sleep(0, items), concurrency=0)


async def test_after_a_quiet_interval_a_batch_runs_at_once_and_within_it_batches_wait_to_share() -> None:
    """``interval``: a batch arriving when no call started for ``interval`` runs at once (an
    hour here: the first call would never end if it waited); one arriving within it waits for
    the interval to end, and whatever else arrives meanwhile joins the same call."""
    calls: list[list[int]] = []

    async def apply(items: list[int]) -> list[int]:
        calls.append(items)
        return items

    group = GroupCommit("test", apply, interval=3600)
    assert await group.submit([1]) == [1]  # at once
    second = asyncio.create_task(group.submit([2]))
    third = asyncio.create_task(group.submit([3]))
    await asyncio.sleep(0.05)
    assert calls == [[1]] and not second.done() and not third.done()  # waiting for the interval
    for task in (second, third, *group._tasks):
        task.cancel()

    calls.clear()
    group = GroupCommit("test", apply, interval=0.5)
    assert await group.submit([1]) == [1]
    later = [asyncio.create_task(group.submit([n])) for n in (2, 3, 4)]
    assert [await t for t in later] == [[2], [3], [4]]
    assert calls == [[1], [2, 3, 4]]  # one call for what arrived within the interval


class Blamed(Exception):
    def __init__(self, bad: set[int]) -> None:
        self.bad = bad


def blaming(exc: Exception, batches: list[Sequence[int]]) -> set[int]:
    """The batches holding an item ``exc`` names."""
    assert isinstance(exc, Blamed)
    return {n for n, b in enumerate(batches) if exc.bad & set(b)}


async def behind_a_held_call(
    then: Callable[[list[int]], list[int]],
    culprits: Callable[[Exception, list[Sequence[int]]], set[int]],
    batches: Sequence[list[int]],
) -> tuple[list[list[int]], list[object]]:
    """Submit ``batches`` while a first call (of ``[0]``) is held, so they share the next one;
    every later call is ``then(items)``. Returns the calls' items and each batch's outcome
    (its results, or the error it got)."""
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def apply(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            await release.wait()
            return [0]
        return then(items)

    group = GroupCommit("test", apply, culprits=culprits)
    first = asyncio.create_task(group.submit([0]))
    await asyncio.sleep(0)
    later = [asyncio.create_task(group.submit(b)) for b in batches]
    await asyncio.sleep(0)
    release.set()
    assert await first == [0]
    outcomes = await asyncio.wait_for(asyncio.gather(*later, return_exceptions=True), 5)
    return calls, list(outcomes)


def failing(items: list[int]) -> list[int]:
    raise RuntimeError("the transaction failed")


async def test_a_failure_pinned_on_some_batches_fails_them_alone_and_the_rest_is_applied_again() -> None:
    """One tenant's request must not fail the others' that arrived with it: ``culprits``
    names the batches an error is theirs, they get it, and the call goes again without them
    (again and again while it keeps pinning new ones)."""

    def then(items: list[int]) -> list[int]:
        bad = {i for i in items if i % 10 == 7}
        if bad:
            raise Blamed(bad)
        return [i * 10 for i in items]

    calls, outcomes = await behind_a_held_call(then, blaming, ([1, 2], [7], [3], [17, 4], [5]))
    assert outcomes[0] == [10, 20] and outcomes[2] == [30] and outcomes[4] == [50]
    assert isinstance(outcomes[1], Blamed) and isinstance(outcomes[3], Blamed)
    assert calls == [[0], [1, 2, 7, 3, 17, 4, 5], [1, 2, 3, 5]]


@pytest.mark.parametrize("blame", ["all", "none", "unknown index"])
async def test_a_failure_pinned_on_every_batch_or_none_fails_the_whole_group(blame: str) -> None:
    def culprits(exc: Exception, batches: list[Sequence[int]]) -> set[int]:
        return {"all": set(range(len(batches))), "none": set(), "unknown index": {99}}[blame]

    calls, outcomes = await behind_a_held_call(failing, culprits, ([1], [2]))
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert calls == [[0], [1, 2]]  # not tried again


async def test_a_fault_in_culprits_fails_the_whole_group_and_leaves_no_submitter_waiting() -> None:
    def culprits(exc: Exception, batches: list[Sequence[int]]) -> set[int]:
        raise KeyError("a bug in the hook")

    calls, outcomes = await behind_a_held_call(failing, culprits, ([1], [2]))
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert calls == [[0], [1, 2]]

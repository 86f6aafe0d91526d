"""Group commit: batches submitted concurrently (HTTP requests, say) are applied together in
one call, so one transaction, one commit and one outbox row serve all of them.

A batch arriving while no call ran for ``interval`` runs at once; whatever arrives while a
call runs, or within ``interval`` of the last call's start, goes together in the next call, up
to ``max_items``. So under light load every batch has its own call, without waiting; under
load at most one call starts per ``interval``, and the per-call cost (statements, commit,
outbox row, relay round, produce request) is shared by more batches. That is what keeps
latency flat as the load rises: at half of the saturated rate, calls that followed each other
as fast as they could cost so much more per item that the machine ran near its limit, and
queued (docs/0024). Each submitter gets its own slice of the results, or the exception when
the shared call failed (nothing of the group was applied: one transaction). A failure that
``culprits`` pins on some of the group's batches goes to those submitters alone, and the call
is made again without them: one tenant's request must not fail the others' that happened to
arrive with it.

Up to ``concurrency`` calls run at once: while one group waits on the database, the next one
is already being judged and sent. That pays when round trips bound the rate (a database a
network hop away); on a machine whose CPU is the bound, smaller groups cost more per item and
one call at a time is faster (docs/0015)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

GROUP_SIZE = Histogram(
    "tally_group_commit_batches",
    "Submitted batches applied per call",
    ["name"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        name: str,
        apply: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_items: int = 5000,
        concurrency: int = 1,
        interval: float = 0.0,
        culprits: Callable[[Exception, list[Sequence[T]]], set[int]] | None = None,
    ) -> None:
        """``culprits(error, batches)``: the indexes of the group's batches that caused a failed
        call (empty: the failure is the group's, and every submitter gets it)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._interval = interval
        self._started = -float("inf")  # when the last call started (loop time)
        self._name = name
        self._apply = apply
        self._max = max_items
        self._concurrency = concurrency
        self._culprits = culprits
        self._waiting: deque[tuple[Sequence[T], asyncio.Future[list[R]]]] = deque()
        self._running = 0  # calls in flight
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Apply ``items`` (with whatever else is waiting); their results, in order."""
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._running < self._concurrency:
            self._running += 1
            task = asyncio.create_task(self._drain(), name=f"group-commit-{self._name}")
            self._tasks.add(task)  # a reference until done: the loop keeps only weak ones
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                if self._interval:  # at most one call per interval: what arrives meanwhile joins it
                    loop = asyncio.get_running_loop()
                    wait = self._started + self._interval - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._started = loop.time()
                group = [self._waiting.popleft()]
                size = len(group[0][0])
                while self._waiting and size + len(self._waiting[0][0]) <= self._max:
                    items, future = self._waiting.popleft()
                    group.append((items, future))
                    size += len(items)
                await self._run(group)
        finally:
            self._running -= 1

    async def _run(self, group: list[tuple[Sequence[T], asyncio.Future[list[R]]]]) -> None:
        while group:
            GROUP_SIZE.labels(self._name).observe(len(group))  # per call, a call made again included
            try:
                results = await self._apply([item for items, _ in group for item in items])
            except BaseException as exc:
                culprits = self._blamed(exc, group)
                for i, (_, future) in enumerate(group):
                    if (not culprits or i in culprits) and not future.done():
                        future.set_exception(exc)
                if culprits:  # the others again, without the batches that failed them
                    group = [g for i, g in enumerate(group) if i not in culprits]
                    continue
                if not isinstance(exc, Exception):
                    raise
                return
            at = 0
            for items, future in group:
                if not future.done():  # a submitter cancelled (client gone) still had it applied
                    future.set_result(list(results[at : at + len(items)]))
                at += len(items)
            return

    def _blamed(
        self, exc: BaseException, group: list[tuple[Sequence[T], asyncio.Future[list[R]]]]
    ) -> set[int]:
        """The batches ``culprits`` pins ``exc`` on, when that leaves others to apply."""
        if self._culprits is None or len(group) < 2 or not isinstance(exc, Exception):
            return set()
        try:
            found = self._culprits(exc, [items for items, _ in group]) & set(range(len(group)))
        except Exception:  # a fault in the hook: the failure is the whole group's, as without it
            log.exception("group commit %s: culprits failed; the whole group gets the error", self._name)
            return set()
        return found if len(found) < len(group) else set()

"""tally.worker.Worker: a wake that arrives while a round runs starts the next round at once."""

from __future__ import annotations

import asyncio

from tally.worker import Worker


class _WakesItself(Worker):
    """Its first round commits new work (calls ``wake()``) and reports nothing more waiting."""

    idle = 3600.0  # without the wake, the second round would come an hour later

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0
        self.second = asyncio.Event()

    async def step(self) -> bool:
        self.rounds += 1
        if self.rounds == 1:
            self.wake()
        else:
            self.second.set()
        return False


async def test_a_wake_during_a_round_is_not_lost() -> None:
    worker = _WakesItself()
    worker.start()
    try:
        await asyncio.wait_for(worker.second.wait(), timeout=5)
    finally:
        await worker.stop()
    assert worker.rounds >= 2

"""A background loop owned by a service process: ``step()`` until stopped, waking early when
``wake()`` is called (new work committed in this process), else every ``idle`` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


class Worker:
    name = "worker"
    idle = 0.5

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> bool:
        """Do one round of work; return True when more may be waiting (no pause)."""
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, timeout=15)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if await self.step():
                    continue
            except Exception:
                log.exception("%s error", self.name)
            await self._sleep(self.idle)

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until ``wake()``. The flag is cleared after the wait, so a wake
        that came while the last round ran is not lost (the next round starts at once)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

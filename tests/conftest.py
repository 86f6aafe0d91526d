"""Test fixtures. Integration tests share one real stack per session: the Tansu broker,
Postgres (``DATABASE_URL`` or embedded, in a fresh database), localstripe, an SMTP sink and all
five services as processes, on free ports so a running ``make run`` is never disturbed."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.auth import issue_token
from tally_devstack.stack import Ports, Stack, stop_on_sigterm

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs the real embedded stack")
    stop_on_sigterm()  # a terminated test run still stops the stack it started


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


def matches(predicate: Callable[[dict[str, Any]], bool], raw: bytes | None) -> bool:
    """Apply a predicate to a message, treating anything that is not a well-formed envelope
    (the fuzz tests put garbage on every topic) as not matching."""
    try:
        doc = orjson.loads(raw or b"")
        return isinstance(doc, dict) and bool(predicate(doc))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False


class Tally:
    """A handle on the running stack for tests: HTTP clients, tokens, Kafka and SQL access."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = httpx.AsyncClient(timeout=30)
        self._producer: AIOKafkaProducer | None = None

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
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.stack.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
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
        await self.http.aclose()
        if self._producer:
            await self._producer.stop()


@pytest.fixture(scope="session")
async def tally(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tally]:
    root = tmp_path_factory.mktemp("stack")
    stack = Stack(
        root,
        ports=Ports.free(),
        database_url=os.environ.get("DATABASE_URL"),
        isolated_database=True,
        partitions=4,
        extra_env={
            # retries and leases on a test's time scale
            "TALLY_RECHARGE_RETRY_SECONDS": "1,1",
            "TALLY_RECHARGE_LEASE_SECONDS": "3",
            "TALLY_RECHARGE_UNAVAILABLE_RETRY_SECONDS": "2",
            # spans as JSON lines, one file per service (tests/integration/test_observability)
            "TALLY_TRACES_DIR": str(root / "traces"),
            # ingestion rate limit per product token (test_security proves the 429)
            "TALLY_INGEST_RATE": "2000",
            "TALLY_INGEST_BURST": "5000",
        },
    )
    try:
        await stack.start()
        await stack.start_services()
        handle = Tally(stack)
        yield handle
        await handle.close()
    finally:
        await stack.stop()

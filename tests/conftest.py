"""Test fixtures, by layer. ``tests/unit`` needs nothing. ``tests/integration`` tests one
service's machinery against the real broker and Postgres (``infra``: Tansu, Postgres from
``DATABASE_URL`` or embedded in a fresh database, localstripe, an SMTP sink). ``tests/e2e`` adds
the five services as processes (``tally``), started once, only when an e2e test runs. Ports are
free ones, so a running ``make run`` is never disturbed."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from tally_devstack.stack import Ports, Stack, stop_on_sigterm

# The tests' own processes verify development tokens (the services get it from the stack).
os.environ.setdefault("TALLY_ENV", "development")
from tests.support.stack import Infra, Tally


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs the real broker and Postgres")
    config.addinivalue_line("markers", "e2e: needs the whole stack")
    stop_on_sigterm()  # a terminated test run still stops the stack it started


# The longest e2e files (tens of seconds, mostly waiting on the stack), run first: with one
# stack per pytest-xdist worker (``make test``) a long file started last holds the whole run.
LONGEST_FIRST = (
    "test_hand_over_public_attacks.py",
    "test_rerating_public_attacks.py",
    "test_chaos.py",
    "test_lifecycle_model.py",
    "test_card_retries.py",
    "test_webhook_attacks.py",
    "test_recharge.py",
    "test_announcement_attacks.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each layer's marker from its folder, so ``-m`` selects layers; the longest files first."""
    for item in items:
        layer = item.path.parent.name
        if layer in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, layer))

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
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
            "TALLY_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "TALLY_WEBHOOK_RETRY_CAP_SECONDS": "2",
            # spans as JSON lines, one file per service (tests/e2e/test_observability)
            "TALLY_TRACES_DIR": str(root / "traces"),
            # ingestion rate limit per product token (test_security proves the 429)
            "TALLY_INGEST_RATE": "2000",
            "TALLY_INGEST_BURST": "5000",
            # Tests send poison on purpose, in whatever order their files run (one stack per
            # pytest-xdist worker): the production budget (3 a day per kind, docs/0014) could
            # park a consumer for a later file. tests/integration/test_consumer_poison proves it.
            "TALLY_POISON_BUDGET": "10000",
        },
    )
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


@pytest.fixture(scope="session")
async def infra(stack: Stack) -> AsyncIterator[Infra]:
    handle = Infra(stack)
    yield handle
    await handle.close()


@pytest.fixture(scope="session")
async def tally(stack: Stack) -> AsyncIterator[Tally]:
    await stack.start_services()
    handle = Tally(stack)
    yield handle
    await handle.close()


@pytest.fixture
async def producer(tally: Tally) -> AsyncIterator[AIOKafkaProducer]:
    """A Kafka producer on the stack's broker, for tests that produce records themselves."""
    p = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()

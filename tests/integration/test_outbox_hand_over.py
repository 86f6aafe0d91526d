"""The relay sends what its own process committed from memory (``OutboxRelay.hand_over``),
over the real Postgres and broker. The handed messages here differ from the stored ones on
purpose, so each test can tell which way a message went: what is sent from memory, what is
read back from the table, and that a row is never lost or sent twice when the two disagree
about what is still waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from tally import db, outbox
from tests.support.stack import Infra, eventually, uid


@dataclass
class Relaying:
    pool: asyncpg.Pool
    relay: outbox.OutboxRelay
    schema: str
    batch: str

    def ping(self, label: str) -> outbox.Row:
        message: dict[str, Any] = {
            "id": f"{self.batch}-{label}",
            "type": "test.ping",
            "time": "2026-01-01T00:00:00+00:00",
            "source": "test",
            "data": {"batch": self.batch, "label": label},
        }
        return outbox.row("wallet.events", self.batch, message, inherit=False)

    async def commit(self, *labels: str) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            written = await outbox.enqueue(conn, [self.ping(label) for label in labels])
        assert written is not None
        return written

    async def sent(self, infra: Infra, last: str) -> list[str]:
        """The labels relayed, in order, once ``last`` has been (one key: one partition)."""
        found = await infra.topic_messages(
            "wallet.events",
            lambda m: m.get("data", {}).get("batch") == self.batch,
            until=lambda m: m["id"] == f"{self.batch}-{last}",
        )
        return [m["data"]["label"] for m in found]

    async def emptied(self) -> None:
        """The table is empty, and the relay holds nothing (after its next round)."""

        async def empty() -> bool:
            return bool(await self.pool.fetchval("SELECT count(*) = 0 FROM outbox")) and (
                self.relay._handed == {} and self.relay._handed_messages == 0
            )

        await eventually(empty, what="the relayed rows to be deleted, and the relay to hold none")


class CountingRelay(outbox.OutboxRelay):
    """Counts its finished rounds, so a test starts only once the first one (reading the
    empty table) is over: a row committed before that round reads would be read from the
    table, never handed over, and a test of the handed path would see the stored copy."""

    rounds = 0

    async def relay_once(self, conn: Any) -> tuple[int, bool]:
        done = await super().relay_once(conn)
        self.rounds += 1
        return done


@pytest.fixture
async def relaying(infra: Infra) -> AsyncIterator[Relaying]:
    """A leading relay, its first round over, that sends only when woken (an hour between
    polls)."""
    schema = f"handed_{uid('t').replace('-', '_')}"
    pool = await db.create_pool(infra.stack.database_url, schema, size=2)
    await db.migrate(pool, schema, "tally")
    producer = AIOKafkaProducer(bootstrap_servers=infra.stack.bootstrap)
    await producer.start()
    relay = CountingRelay(pool, producer, service=schema, poll_interval=3600)
    relay.hand_over(1, [("wallet.events", None, b"{}", None, None)])  # not leading yet: kept nowhere
    assert relay._handed == {}
    relay.start()
    try:

        async def idle() -> bool:
            return relay._leading and relay.rounds >= 1

        await eventually(idle, what="the relay to take the lead and finish its first round")
        yield Relaying(pool, relay, schema, uid("batch"))
    finally:
        await relay.stop()
        await producer.stop()
        await pool.close()


async def test_a_committed_row_handed_over_is_sent_from_memory_then_deleted(
    infra: Infra, relaying: Relaying
) -> None:
    written = await relaying.commit("as stored")
    relaying.relay.hand_over(written, [relaying.ping("as handed")])
    relaying.relay.wake()
    assert await relaying.sent(infra, "as handed") == ["as handed"]
    await relaying.emptied()


async def test_a_row_not_handed_over_is_read_from_the_table_beside_one_that_is(
    infra: Infra, relaying: Relaying
) -> None:
    """Another replica's row, or one written past the bound, is read as before, in id order."""
    first = await relaying.commit("first, read back")
    second = await relaying.commit("second, stored")
    relaying.relay.hand_over(second, [relaying.ping("second, handed")])
    assert first < second
    relaying.relay.wake()
    assert await relaying.sent(infra, "second, handed") == ["first, read back", "second, handed"]
    await relaying.emptied()


async def test_a_handed_id_that_never_committed_or_is_gone_is_let_go_and_never_sent(
    infra: Infra, relaying: Relaying
) -> None:
    """An id older than every row read is no longer in the table (another leader sent it, or
    it was never committed): its messages are dropped, never sent."""
    async with relaying.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        rolled_back = await outbox.enqueue(conn, [relaying.ping("rolled back")])
        await tx.rollback()
    relaying.relay.hand_over(rolled_back, [relaying.ping("ghost")])
    written = await relaying.commit("real")
    relaying.relay.hand_over(written, [relaying.ping("real")])
    relaying.relay.wake()
    assert await relaying.sent(infra, "real") == ["real"]
    await relaying.emptied()
    # and with nothing left to read, every handed id is let go
    relaying.relay.hand_over(written + 1_000, [relaying.ping("never written")])
    relaying.relay.wake()
    await relaying.emptied()
    assert await relaying.sent(infra, "real") == ["real"]


async def test_a_send_that_fails_leaves_the_row_to_be_read_from_the_table(
    infra: Infra, relaying: Relaying, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handed messages are taken before the send; the row stays until Kafka has them, so
    the next round (the next leader, after a crash) sends what the table holds, once."""
    send = relaying.relay._send
    failures: list[int] = []

    async def failing_once(messages: Any) -> None:
        if not failures:
            failures.append(len(messages))
            raise ConnectionError("the broker went away mid-send")
        await send(messages)

    monkeypatch.setattr(relaying.relay, "_send", failing_once)
    written = await relaying.commit("as stored")
    relaying.relay.hand_over(written, [relaying.ping("as handed")])
    relaying.relay.wake()
    assert await relaying.sent(infra, "as stored") == ["as stored"]
    assert failures == [1]
    await relaying.emptied()


async def test_past_the_bound_rows_are_read_from_the_table(
    infra: Infra, relaying: Relaying, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "HANDED_MAX", 2)
    first = await relaying.commit("first, stored")
    relaying.relay.hand_over(first, [relaying.ping("first, handed"), relaying.ping("first, handed too")])
    second = await relaying.commit("second, stored")
    relaying.relay.hand_over(second, [relaying.ping("second, handed")])  # over the bound: not kept
    assert relaying.relay._handed_messages == 2 and list(relaying.relay._handed) == [first]
    relaying.relay.wake()
    sent = await relaying.sent(infra, "second, stored")
    assert sent == ["first, handed", "first, handed too", "second, stored"]
    await relaying.emptied()

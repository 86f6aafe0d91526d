"""wallet's Kafka consumers: ``usage.recorded`` in batches, one transaction per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally import events
from tally.consumer import dlq_row, subscribe_batch
from tally.events import Topics, UsageRecorded
from tally.outbox import enqueue
from tally.service import Runtime

from tally_wallet.domain import LedgerError
from tally_wallet.usage import apply_usage

SERVICE = "wallet"


def parse_recorded(value: bytes | None) -> UsageRecorded:
    env = events.parse_envelope(value)
    if env.type != "usage.recorded":
        raise events.BadMessage(f"unexpected event type {env.type!r} on usage.recorded")
    payload = events.typed(env)
    assert isinstance(payload, UsageRecorded)
    return payload


def subscribe(rt: Runtime) -> None:
    async def on_usage(records: Sequence[Any]) -> None:
        good: list[tuple[Any, UsageRecorded]] = []
        dead = []
        for r in records:
            try:
                good.append((r, parse_recorded(r.value)))
            except events.BadMessage as exc:
                dead.append(dlq_row(r, str(exc), service=SERVICE))
        async with rt.pool.acquire() as conn, conn.transaction():
            try:
                async with conn.transaction():  # savepoint: the whole batch at once
                    await apply_usage(conn, [u for _, u in good])
            except LedgerError:
                # Some event cannot be posted: apply one by one, dead-letter the culprits.
                for record, usage in good:
                    try:
                        async with conn.transaction():
                            await apply_usage(conn, [usage])
                    except LedgerError as exc:
                        dead.append(dlq_row(record, str(exc), service=SERVICE))
            await enqueue(conn, dead)
        rt.relay.wake()

    subscribe_batch(rt.broker, Topics.USAGE_RECORDED, service=SERVICE, group_id="wallet",
                    handler=on_usage, max_records=rt.settings.kafka_max_batch)

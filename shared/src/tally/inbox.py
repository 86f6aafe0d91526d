"""Idempotent consumer: a message id is claimed in the same transaction as its effects; a
second delivery finds the claim and is skipped (eventsourcing's tracking record)."""

from __future__ import annotations

from collections.abc import Sequence

from tally.db import Conn


async def claim(conn: Conn, consumer: str, message_ids: Sequence[str]) -> set[str]:
    """Claim ``message_ids`` for ``consumer``; returns the ids never seen before (to apply).
    Must run inside the transaction that applies their effects."""
    if not message_ids:
        return set()
    rows = await conn.fetch(
        "INSERT INTO inbox (consumer, message_id) SELECT $1, unnest($2::text[]) "
        "ON CONFLICT DO NOTHING RETURNING message_id",
        consumer,
        list(dict.fromkeys(message_ids)),
    )
    return {r["message_id"] for r in rows}

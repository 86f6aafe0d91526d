"""Opaque list cursors (API.md lists: ``{"items", "next_cursor"}`` with ``?limit=&cursor=``).
A cursor wraps the last row's sequence number; a bad one is a 422."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TypeVar

from tally.errors import ApiError

T = TypeVar("T")


def encode(position: int) -> str:
    return base64.urlsafe_b64encode(str(position).encode()).decode()


def decode(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        position = int(base64.urlsafe_b64decode(cursor.encode()).decode())
        if not 0 <= position < 2**62:  # a sequence number, as Postgres holds it (bigint)
            raise ValueError(position)
        return position
    except ValueError as exc:
        raise ApiError(
            422,
            "validation_error",
            "cursor is not valid",
            [{"field": "cursor", "message": "not a cursor from this list"}],
        ) from exc


def page(rows: Sequence[T], limit: int, position: int | None) -> tuple[list[T], str | None]:
    """``rows`` fetched with ``limit + 1``: the page and the cursor of the next one (if any).
    ``position`` is the last row's sequence number."""
    items = list(rows[:limit])
    more = len(rows) > limit
    return items, (encode(position) if more and items and position is not None else None)

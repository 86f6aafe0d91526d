"""List cursors (API.md lists: ``{"items", "next_cursor"}`` with ``?limit=&cursor=``).

A cursor is the last row's sequence number in decimal (``Cursor``), or, for lists in id order,
the last row's id (``IdCursor``). Each is exactly its pattern in the OpenAPI document: what
matches is served (a cursor past the end is an empty page), anything else is a 422."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from tally.errors import ApiError
from tally.ids import KEY_PATTERN

T = TypeVar("T")


# up to 18 digits: any sequence number Postgres holds (bigint) that a list can reach
CURSOR_PATTERN = r"^[0-9]{0,18}$"
Cursor = Annotated[
    str | None, Query(pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page")
]
IdCursor = Annotated[str | None, Query(pattern=KEY_PATTERN, description="`next_cursor` of the previous page")]


def encode(position: int) -> str:
    return str(position)


def decode(cursor: str | None) -> int | None:
    if not cursor:
        return None
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):  # routes check it too
        raise ApiError(
            422,
            "validation_error",
            "cursor is not valid",
            [{"field": "cursor", "message": "not a cursor from this list"}],
        )
    return int(cursor)


def page(rows: Sequence[T], limit: int, position: int | None) -> tuple[list[T], str | None]:
    """``rows`` fetched with ``limit + 1``: the page and the cursor of the next one (if any).
    ``position`` is the last row's sequence number."""
    items = list(rows[:limit])
    more = len(rows) > limit
    return items, (encode(position) if more and items and position is not None else None)

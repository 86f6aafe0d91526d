"""Outbox rows as earlier versions wrote them, for the tests that show they still relay."""

from __future__ import annotations

from tally import outbox


def length_prefixed(rows: list[outbox.Row]) -> bytes:
    """The layout of ``messages``/``messages_lz4`` until 2026-12-04, written as that code did."""
    parts: list[bytes] = []
    for topic, key, value, traceparent, type_ in rows:
        t, p, y = topic.encode(), (traceparent or "").encode(), (type_ or "").encode()
        parts.append(outbox._HEAD.pack(len(t), -1 if key is None else len(key), len(value), len(p), len(y)))
        parts += (t, key or b"", value, p, y)
    return b"".join(parts)

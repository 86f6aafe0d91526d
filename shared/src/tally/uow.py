"""The unit of work: one connection and one transaction, the messages the work will publish
(outbox and DLQ rows) and the idempotency record it leaves, written at commit; the relay is
woken once the commit is durable (after every commit: some storage helpers write their events
through the connection directly). Every route and consumer reaches Postgres through one.

    async with uow:                      # BEGIN
        ...uow.conn...                   # the service's storage functions
        uow.publish(rows)                # queued, written with the state at commit
        uow.remember(201, body)          # the Idempotency-Key's first response
    # COMMIT (or ROLLBACK on an exception); then the relay wakes

``uow.savepoint()`` runs a part that may fail on its own: on failure its writes and the rows
it queued are both undone. ``Database.reading()`` is a plain connection for read-only work,
``Database.statements()`` one for writes that are each a single atomic statement.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol

import asyncpg

from tally import idempotency, outbox
from tally.db import Conn


class Wakeable(Protocol):
    def wake(self) -> None: ...


class Relay(Wakeable, Protocol):
    """A service's outbox relay (``outbox.OutboxRelay``), as units of work see it."""

    def hand_over(self, outbox_id: int | None, rows: Sequence[outbox.Row]) -> None: ...


class UnitOfWork:
    """Not reentrant: one ``async with`` per instance (``Database.unit()`` makes a new one)."""

    def __init__(self, pool: asyncpg.Pool, relay: Relay | None = None) -> None:
        self._pool = pool
        self._relay = relay
        self._conn: Any = None  # a pool connection (Conn)
        self._tx: Any = None
        self._rows: list[outbox.Row] = []
        self._key: tuple[str, str] | None = None
        self._response: tuple[int, Any] | None = None
        self.published = 0  # messages written by the last commit
        self._sealed = False  # committing: nothing more may be published

    @property
    def conn(self) -> Conn:
        if self._conn is None:
            raise RuntimeError("the unit of work is not open (use `async with uow:`)")
        conn: Conn = self._conn
        return conn

    async def __aenter__(self) -> UnitOfWork:
        if self._conn is not None:
            raise RuntimeError("a unit of work is used once")
        self._conn = await self._pool.acquire()
        try:
            self._tx = self._conn.transaction()
            await self._tx.start()
        except BaseException:
            await self._pool.release(self._conn)
            self._conn = None
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn, tx = self._conn, self._tx
        try:
            if kind is not None:
                await tx.rollback()
                return
            try:
                if self._key is not None and self._response is not None:
                    await idempotency.finish(conn, *self._key, *self._response)
                rows, self._sealed = self._rows, True  # what is published from here on is refused
                written = await outbox.enqueue(conn, rows)
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
            self.published = len(rows)
            if self._relay is not None:  # committed: the relay may send them from memory
                self._relay.hand_over(written, rows)
        finally:
            await self._pool.release(conn)
            self._conn = None
            self._rows = []
        # Woken after every commit, not only when ``publish`` queued rows: storage helpers deeper
        # down (a credit, a settings change) write their events through ``uow.conn`` directly,
        # and a relay left to its poll adds up to a second to every hop of the money path.
        if self._relay is not None:
            self._relay.wake()

    # --- what the work publishes -------------------------------------------------------------

    def publish(self, rows: Iterable[outbox.Row]) -> None:
        """Queue messages (outbox rows, DLQ rows) to be written with the state at commit."""
        self._open()
        self._rows.extend(rows)

    def emit(self, topic: str, key: str | None, message: dict[str, Any]) -> None:
        self._open()
        self._rows.append(outbox.row(topic, key, message))

    def _open(self) -> None:
        if self._conn is None or self._sealed:  # a message queued outside its unit would be lost
            raise RuntimeError("the unit of work is not open: nothing published outside `async with`")

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A part of the work that fails alone: its writes and its queued rows are undone."""
        mark = len(self._rows)
        try:
            async with self.conn.transaction():
                yield
        except BaseException:
            del self._rows[mark:]
            raise

    # --- Idempotency-Key (tally.idempotency) ---------------------------------------------------

    async def claim_key(
        self, principal: str, key: str, fingerprint: str, resource: str | None = None
    ) -> idempotency.Stored | None:
        """Claim ``key`` in this transaction (``idempotency.begin``); the response given to
        ``remember`` is recorded for it at commit."""
        stored = await idempotency.begin(self.conn, principal, key, fingerprint, resource)
        self._key = (principal, key)
        return stored

    async def claim_resource(
        self, principal: str, key: str, fingerprint: str, fresh: str
    ) -> idempotency.Claim:
        """``idempotency.claim`` (a resource named up front) in this transaction."""
        found = await idempotency.claim(self.conn, principal, key, fingerprint, fresh)
        self._key = (principal, key)
        return found

    def remember(self, status_code: int, response: Any, *, key: tuple[str, str] | None = None) -> None:
        """The response to answer again for the key claimed in this unit (no-op without one),
        or for ``key`` (principal, key) claimed in an earlier unit: a request whose outcome is
        known only after a call outside any transaction (a card charge) records it in the next."""
        if key is not None:
            self._key = key
        self._response = (status_code, response)


class Database:
    """Where a service's units of work come from (its pool and its outbox relay)."""

    def __init__(self, pool: asyncpg.Pool, relay: Relay | None = None) -> None:
        self.pool = pool
        self.relay = relay

    def unit(self) -> UnitOfWork:
        return UnitOfWork(self.pool, self.relay)

    def hand_over(self, outbox_id: int | None, rows: Sequence[outbox.Row]) -> None:
        """Messages a statement of ``statements()`` has committed (``outbox.written_with``'s
        id): see ``OutboxRelay.hand_over``."""
        if self.relay is not None:
            self.relay.hand_over(outbox_id, rows)

    @contextlib.asynccontextmanager
    async def statements(self) -> AsyncIterator[Conn]:
        """A connection without a transaction, for work whose every write is one statement
        that commits (or fails) whole, its outbox row included (``outbox.written_with``): a
        unit's BEGIN and COMMIT are two round trips more. The relay is woken after."""
        async with self.pool.acquire() as conn:
            yield conn
        if self.relay is not None:
            self.relay.wake()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Conn]:
        """A connection for read-only work (no transaction, nothing published)."""
        async with self.pool.acquire() as conn:
            yield conn

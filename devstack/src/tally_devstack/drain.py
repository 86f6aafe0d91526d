"""A drained stop of ``make run``: the broker keeps everything in memory, so what it holds
unconsumed when it stops is gone (usage accepted and never debited). Services stop upstream
first; before each stops, the stack waits (bounded) until it and every running service that
feeds it have consumed their topics, emptied their outboxes and settled what they have in
flight. Then, with every service stopped and the broker still up, it counts what was left.

Who consumes what is the services' own consumer tables; what each produces is listed below
(tests/unit/test_devstack_drain.py fails when it differs from the services' code)."""

from __future__ import annotations

import asyncio
import functools
import importlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from tally.events import Topics

# upstream first: usage enters at usage-meter; the notifier only listens
STOP_ORDER = ("usage-meter", "wallet", "recharge", "rebilling", "notifier")


@functools.cache
def consumes(service: str) -> tuple[tuple[str, str], ...]:
    """(group, topic) of each of the service's consumers: its own consumer table
    (``ServiceSpec.consumers``), read when a stop needs it."""
    spec = importlib.import_module("tally_" + service.replace("-", "_") + ".app").SPEC
    return tuple((c.group_id, c.topic) for c in spec.consumers)


PRODUCES: dict[str, tuple[str, ...]] = {  # through the service's outbox (and the DLQs)
    "usage-meter": (Topics.USAGE_RECORDED,),
    "wallet": (Topics.WALLET_EVENTS, Topics.WALLET_DIGEST),
    "recharge": (Topics.RECHARGE_EVENTS,),
    "rebilling": (Topics.REBILLING_SETTINGS, Topics.REBILLING_EVENTS),
    "notifier": (),
}

# Work a service has in flight that will put something on a topic without anything left to
# consume: recharge's due checks and attempts, and recharges charged that the wallet has not
# credited yet (stopping the wallet before that credit lands loses it with the broker).
IN_FLIGHT: dict[str, tuple[str, str]] = {
    "recharge": (
        "recharge{s} running or charged and not yet credited",
        "SELECT (SELECT count(*) FROM recharge.recharge_checks WHERE not_before <= now())"
        " + (SELECT count(*) FROM recharge.recharge_attempts WHERE purpose = 'wallet' AND"
        "    ((status = 'pending' AND not_before <= now())"
        "     OR (status = 'succeeded' AND credited_at IS NULL)))",
    ),
}


def schema(service: str) -> str:
    return service.replace("-", "_")


def feeders(service: str, running: Collection[str]) -> list[str]:
    """``service`` and every running service that feeds it, directly or through another
    running one (the services form cycles: wallet -> recharge -> wallet), in stop order."""
    found = {service}
    todo = [service]
    while todo:
        current = todo.pop()
        for _, topic in consumes(current):
            for producer, topics in PRODUCES.items():
                if topic in topics and producer in running and producer not in found:
                    found.add(producer)
                    todo.append(producer)
    return [s for s in STOP_ORDER if s in found]


@dataclass(frozen=True)
class Left:
    """Something not yet done: records a group has not consumed, outbox messages not yet
    relayed, or work in flight. ``what`` reads after the count; ``{s}`` in it is the plural's."""

    service: str
    count: int
    what: str
    group: str | None = None
    topic: str | None = None

    def __str__(self) -> str:
        if not self.count:
            return f"{self.service}: {self.what}"
        return f"{self.service}: {self.count:,} " + self.what.replace("{s}", "" if self.count == 1 else "s")


class Gauges(Protocol):
    async def lag(self, group: str, topic: str) -> int: ...

    async def outbox(self, service: str) -> int: ...

    async def in_flight(self, service: str) -> int: ...


async def waiting_for(service: str, running: Collection[str], gauges: Gauges) -> list[Left]:
    """What must settle before ``service`` stops: for it and each running service feeding it,
    records not consumed, outbox messages not relayed, work in flight."""
    out: list[Left] = []
    for name in feeders(service, running):
        for group, topic in consumes(name):
            n = await gauges.lag(group, topic)
            if n:
                out.append(Left(name, n, f"record{{s}} on {topic} not consumed", group, topic))
        n = await gauges.outbox(name)
        if n:
            out.append(Left(name, n, "outbox message{s} not yet relayed"))
        if name in IN_FLIGHT:
            n = await gauges.in_flight(name)
            if n:
                out.append(Left(name, n, IN_FLIGHT[name][0]))
    return out


@dataclass
class Drained:
    stopped: list[str] = field(default_factory=list)
    gave_up: dict[str, list[Left]] = field(default_factory=dict)  # service -> what was left
    skipped: bool = False  # told to stop without waiting


async def drain(
    *,
    running: Callable[[str], bool],
    stop: Callable[[str], Awaitable[None]],
    gauges: Gauges,
    hop_seconds: float = 15.0,
    poll: float = 0.25,
    status: Callable[[str], None] = lambda _: None,
    note: Callable[[str], None] = lambda _: None,
    skip: asyncio.Event | None = None,
    order: Sequence[str] = STOP_ORDER,
) -> Drained:
    """Stop the running services of ``order`` one by one, each once ``waiting_for`` it is
    empty or after ``hop_seconds``. ``status`` gets what is being waited for (a console
    status), ``note`` one line per hop; ``skip`` set: stop the rest without waiting. A gauge
    that fails (the broker or Postgres gone) gives its hop up, and the later hops do not wait."""
    result = Drained()
    skip = skip or asyncio.Event()
    blind = False  # a gauge failed: the next hops do not wait on it again
    for name in order:
        if not running(name):
            continue
        started = time.monotonic()
        left: list[Left] | None = None  # None: not measured, told not to wait
        failed = False
        while not skip.is_set() and not blind:
            alive = [s for s in order if running(s)]
            try:
                async with asyncio.timeout(max(hop_seconds, 1.0)):
                    left = await waiting_for(name, alive, gauges)
            except Exception as exc:
                left, failed = [Left(name, 0, f"not measured ({type(exc).__name__}: {exc})")], True
                blind = True
                break
            waited = time.monotonic() - started
            if not left or waited >= hop_seconds:
                break
            shown = "; ".join(str(x) for x in left[:3]) + (" …" if len(left) > 3 else "")
            status(f"draining before {name} stops ({waited:.0f} s of {hop_seconds:.0f}): {shown}")
            try:
                await asyncio.wait_for(skip.wait(), timeout=poll)
            except TimeoutError:
                pass
        told = skip.is_set()
        result.skipped = result.skipped or told
        status(f"stopping {name}…")
        await stop(name)
        result.stopped.append(name)
        if left is None:
            note(f"{name}: stopped without waiting ({'told not to' if told else 'nothing to measure with'})")
        elif left:
            result.gave_up[name] = left
            why = (
                "without waiting"
                if failed
                else "told not to wait"
                if told
                else f"gave up after {hop_seconds:g} s"
            )
            note(f"{name}: stopped, {why}: " + "; ".join(str(x) for x in left))
        else:
            note(f"{name}: drained and stopped ({time.monotonic() - started:.1f} s)")
    return result


@dataclass
class Account:
    """What the broker held unconsumed once every service had stopped (gone with it), the
    dead letters on it (gone too) and the outbox messages left in Postgres (relayed by the
    next start)."""

    lost: list[Left] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)

    def summary(self) -> tuple[bool, str]:
        """(nothing lost, one line)."""
        parts: list[str] = []
        if self.lost:
            parts.append("gone with the broker: " + "; ".join(str(x) for x in self.lost))
        if self.dead_letters:
            parts.append(
                "dead letters gone with it: "
                + ", ".join(f"{n:,} on {t}" for t, n in sorted(self.dead_letters.items()))
            )
        if self.kept:
            parts.append(
                "kept in Postgres for the next start: "
                + ", ".join(
                    f"{s} {n:,} outbox message" + ("" if n == 1 else "s") for s, n in self.kept.items()
                )
            )
        if not self.lost:
            head = "drained: every record relayed was consumed"
            return True, head + ("; " + "; ".join(parts) if parts else "; nothing is lost with the broker")
        return False, "; ".join(parts)


async def account(gauges: Gauges, dead_letters: Callable[[], Awaitable[dict[str, int]]]) -> Account:
    """Count, for every service, what its groups left unconsumed and its outbox holds."""
    out = Account()
    for name in STOP_ORDER:
        for group, topic in consumes(name):
            n = await gauges.lag(group, topic)
            if n:
                out.lost.append(Left(name, n, f"record{{s}} on {topic} not consumed", group, topic))
        n = await gauges.outbox(name)
        if n:
            out.kept[name] = n
    out.dead_letters = {t: n for t, n in (await dead_letters()).items() if n}
    return out


class StackGauges:
    """``Gauges`` over a running stack: lag from the broker, outboxes and work in flight from
    each service's schema in Postgres."""

    def __init__(self, probe: Gauge, database_url: str) -> None:
        self.probe = probe
        self.database_url = database_url
        self._conn: asyncpg.Connection | None = None

    async def _fetchval(self, sql: str) -> int:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            value = await self._conn.fetchval(sql, timeout=5)
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedColumnError):
            return 0  # a service that never started here: nothing of it to wait for
        return int(value or 0)

    async def lag(self, group: str, topic: str) -> int:
        return await self.probe.lag(group, topic)

    async def outbox(self, service: str) -> int:
        return await self._fetchval(f'SELECT sum(count) FROM "{schema(service)}".outbox')

    async def in_flight(self, service: str) -> int:
        return await self._fetchval(IN_FLIGHT[service][1]) if service in IN_FLIGHT else 0

    async def dead_letters(self) -> dict[str, int]:
        return await self.probe.held(Topics.dlq(t) for t in Topics.ALL)

    async def close(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close(timeout=5)
            except Exception:
                pass


class Gauge(Protocol):
    async def lag(self, group: str, topic: str) -> int: ...

    async def held(self, topics: Iterable[str]) -> dict[str, int]: ...


async def relayed(
    database_url: str, schemas: Sequence[str] = tuple(map(schema, STOP_ORDER))
) -> tuple[int, int]:
    """(outbox rows this database has relayed to some broker, messages its outboxes hold now),
    over the services' schemas: rows written (each outbox's id sequence) minus rows left (a
    rolled-back insert takes an id too: an upper bound, used as "did it relay anything")."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        present = await conn.fetch(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = 'outbox_id_seq' AND n.nspname = ANY($1::text[])",
            list(schemas),
        )
        sent = pending = 0
        for row in present:
            name = row["nspname"]
            written = await conn.fetchval(
                f'SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM "{name}".outbox_id_seq'
            )
            left = await conn.fetchrow(
                f'SELECT count(*) AS rows, sum(count) AS messages FROM "{name}".outbox'
            )
            rows, messages = (left["rows"], left["messages"] or 0) if left else (0, 0)
            sent += max(int(written) - int(rows), 0)
            pending += int(messages)
        return sent, pending
    finally:
        await conn.close()

"""usage-meter's ingestion use case over the real Postgres — no HTTP, no broker — both ways in:
``ingestion.ingest`` on a unit of work (the ``usage.ingest`` consumer) and
``HttpIngestion.record`` (``POST /v1/usage``: a group of all-new events in one statement, else
a unit of work). An event is accepted once whatever the batches, its ``usage.recorded`` is
written to the outbox once, with its claim; another company's account, a service not in the
catalog and a bad quantity are refused with their codes; a refused event that was accepted
before is a duplicate; a company rebilling cannot be asked about right now records nothing; a
group with a retried event records nothing in one statement, then each new event once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from tally import outbox
from tally.consumer import DLQ
from tally.directory import CompanyDirectory, Facts, Unanswered
from tally.errors import ApiError
from tally.events import AccountCreated, CompanyUpdated, IncomingUsage, UsageEvent
from tally.outbox import CHANNEL
from tally.ratelimit import TokenBuckets
from tally.uow import Database
from tally_usage_meter import companies, deferral, handlers, storage
from tally_usage_meter.domain import Price
from tally_usage_meter.ingestion import DirectoryUnavailable, HttpIngestion, Result, ingest, ingest_at_once
from tests.support.databases import CountingRelay, service_database
from tests.support.stack import Infra, uid


class Directory:
    """rebilling's answers, as usage-meter's CompanyDirectory gives them."""

    def __init__(self, currencies: dict[str, str], owners: dict[str, str], *, down: bool = False) -> None:
        self.known, self.owners, self.down = currencies, owners, down
        self.facts = Facts()
        self.pinned: set[str] = set()  # the companies no one created whose currency was pinned

    async def currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        asked = list(company_ids)
        if self.down and asked:  # as CompanyDirectory: nothing to ask, no request
            raise httpx.ConnectError("rebilling is down")
        return {c: self.known[c] for c in asked if c in self.known}

    async def account_companies(self, account_ids: Iterable[str]) -> dict[str, str]:
        asked = list(account_ids)
        if self.down and asked:
            raise httpx.ConnectError("rebilling is down")
        return {a: self.owners[a] for a in asked if a in self.owners}

    async def pinned_currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        asked = list(company_ids)
        if self.down and asked:
            raise httpx.ConnectError("rebilling is down")
        self.pinned.update(c for c in asked if c not in self.known)
        return {c: self.known.get(c, "USD") for c in asked}


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    async with service_database(infra, "tally_usage_meter", "usage_uc") as database:
        yield database


@pytest.fixture(params=["unit", "http"])
def way(request: pytest.FixtureRequest) -> str:
    """Which way in ``run`` takes: the consumer's unit of work, or the HTTP group commit."""
    return str(request.param)


def event(
    eid: str, company: str, account: str | None = None, service: str = "email", qty: object = "10"
) -> IncomingUsage:
    return IncomingUsage.of(
        UsageEvent(event_id=eid, company_id=company, account_id=account, service=service, quantity=qty)
    )


async def run(
    database: Database, directory: Directory, batch: list[IncomingUsage], way: str = "unit"
) -> list[tuple[str, str | None]]:
    results: list[Result]
    if way == "http":
        http = HttpIngestion(database, directory, TokenBuckets(rate=0, burst=0))  # type: ignore[arg-type]
        results = await http.record("product:test", batch, None)
    else:
        async with database.unit() as uow:
            results = await ingest(uow, batch, [None] * len(batch), directory)  # type: ignore[arg-type]
    return [(r.status, r.code) for r in results]


async def claimed(database: Database, event_ids: list[str]) -> set[str]:
    async with database.reading() as conn:
        rows = await conn.fetch("SELECT event_id FROM ingested WHERE event_id = ANY($1::text[])", event_ids)
    return {r["event_id"] for r in rows}


async def recorded(database: Database) -> list[dict[str, Any]]:
    """Every usage.recorded message waiting in the outbox."""
    out = []
    async with database.reading() as conn:
        for r in await conn.fetch("SELECT * FROM outbox ORDER BY id"):
            for topic, _, value, _, _ in outbox.stored(r):
                assert topic == "usage.recorded"
                out.append(orjson.loads(value))
    return out


async def test_an_event_is_accepted_and_recorded_once_whatever_the_batches(
    database: Database, way: str
) -> None:
    co, acct = uid("co"), uid("ws")
    directory = Directory({co: "USD"}, {acct: co})
    first, again = uid("ev"), uid("ev")
    assert await run(
        database, directory, [event(first, co, acct), event(first, co, acct), event(again, co)], way
    ) == [
        ("accepted", None),
        ("duplicate", None),  # the same id twice in one batch
        ("accepted", None),
    ]
    assert await run(database, directory, [event(first, co, acct), event(again, co)], way) == [
        ("duplicate", None),
        ("duplicate", None),
    ]
    messages = await recorded(database)
    assert sorted(m["data"]["event_id"] for m in messages) == sorted([first, again])
    priced = next(m["data"] for m in messages if m["data"]["event_id"] == first)
    assert (priced["platform_amount_micros"], priced["currency"], priced["account_id"]) == (6750, "USD", acct)


async def test_usage_of_a_company_no_one_created_is_priced_in_the_currency_pinned_for_it(
    database: Database, way: str
) -> None:
    """docs/0027: a company rebilling does not know has its currency pinned there before its
    usage is priced (USD, or the company's own when it was created between the two asks); a
    company rebilling knows is not pinned. A pinned company is not one rebilling announced:
    its accounts are not refused as not its own. A company whose every event is refused is not
    pinned: nothing is charged (found by the attack on this change, 2026-12-05)."""
    created, ghost, raced, refused, acct = uid("co"), uid("co"), uid("co"), uid("co"), uid("ws")

    class Racing(Directory):
        async def pinned_currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
            out = await super().pinned_currencies(company_ids)
            return {c: "EUR" if c == raced else v for c, v in out.items()}

    directory = Racing({created: "EUR"}, {})
    async with database.unit() as uow:
        await uow.conn.execute(
            "INSERT INTO prices (service, unit, unit_price_micros, currency) "
            "VALUES ('email', 'email', 600, 'EUR') ON CONFLICT DO NOTHING"
        )
    ids = {created: uid("ev"), ghost: uid("ev"), raced: uid("ev")}
    batch = [event(ids[created], created), event(ids[ghost], ghost, acct), event(ids[raced], raced)]
    batch += [event(uid("ev"), refused, service="nosuch"), event(uid("ev"), refused, qty="0")]
    assert await run(database, directory, batch, way) == [("accepted", None)] * 3 + [
        ("rejected", "unknown_service"),
        ("rejected", "invalid_quantity"),
    ]
    assert directory.pinned == {ghost, raced}
    currencies = {m["data"]["company_id"]: m["data"]["currency"] for m in await recorded(database)}
    assert currencies == {created: "EUR", ghost: "USD", raced: "EUR"}
    async with database.reading() as conn:
        stored = await conn.fetch(
            "SELECT company_id FROM companies WHERE company_id = ANY($1::text[])", list(ids)
        )
    assert {r["company_id"] for r in stored} == {created}  # only what rebilling said it created


async def test_refusals_carry_their_codes_and_a_refused_resend_of_an_accepted_event_is_a_duplicate(
    database: Database, way: str
) -> None:
    co, other, acct, foreign = uid("co"), uid("co"), uid("ws"), uid("ws")
    directory = Directory({co: "USD", other: "USD"}, {acct: co, foreign: other})
    taken = uid("ev")
    assert await run(database, directory, [event(taken, co, acct)], way) == [("accepted", None)]
    got = await run(
        database,
        directory,
        [
            event(uid("ev"), co, foreign),  # another company's account
            event(uid("ev"), co, uid("nobody")),  # an account the (announced) company never had
            event(uid("ev"), co, service="carrier-pigeon"),  # not in the catalog
            event(uid("ev"), co, qty="-3"),  # a bad quantity
            event(taken, co, foreign),  # accepted before: what is wrong now does not matter
        ],
        way,
    )
    assert got == [
        ("rejected", "unknown_account"),
        ("rejected", "unknown_account"),
        ("rejected", "unknown_service"),
        ("rejected", "invalid_quantity"),
        ("duplicate", None),
    ]
    assert len(await recorded(database)) == 1


async def test_nothing_is_recorded_when_a_new_companys_currency_cannot_be_asked(
    database: Database, way: str
) -> None:
    co = uid("co")
    refused: type[Exception] = DirectoryUnavailable if way == "unit" else ApiError
    with pytest.raises(refused) as caught:
        await run(database, Directory({}, {}, down=True), [event(uid("ev"), co)], way)
    if isinstance(caught.value, ApiError):  # POST /v1/usage answers 503
        assert (caught.value.status, caught.value.code) == (503, "rebilling_unavailable")
    assert await recorded(database) == []
    async with database.reading() as conn:
        assert await conn.fetchval("SELECT count(*) FROM ingested") == 0


async def test_rebilling_down_refuses_only_the_requests_of_a_group_that_name_a_new_company(
    database: Database,
) -> None:
    """Requests sent together share one group commit; with rebilling unreachable, the ones
    that name a company or account usage-meter must ask it about are answered 503 and record
    nothing, and the others in the same group are recorded (before, the whole group was 503)."""
    co, new_co, new_acct = uid("co"), uid("co"), uid("ws")
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, co, "USD")
    http = HttpIngestion(database, Directory({}, {}, down=True), TokenBuckets(rate=0, burst=0))  # type: ignore[arg-type]
    first, second, third = [event(uid("ev"), co)], [event(uid("ev"), new_co)], [event(uid("ev"), co)]
    fourth = [event(uid("ev"), co), event(uid("ev"), co, new_acct)]  # its account is new
    outcomes = await asyncio.gather(
        *(http.record("product:test", b, None) for b in (first, second, third, fourth)),
        return_exceptions=True,
    )
    for taken in (outcomes[0], outcomes[2]):
        assert isinstance(taken, list) and [r.status for r in taken] == ["accepted"], taken
    for refused in (outcomes[1], outcomes[3]):
        assert isinstance(refused, ApiError)
        assert (refused.status, refused.code) == (503, "rebilling_unavailable")
    everything = [e.event_id for b in (first, second, third, fourth) for e in b]
    assert await claimed(database, everything) == {first[0].event_id, third[0].event_id}
    assert sorted(m["data"]["event_id"] for m in await recorded(database)) == sorted(
        [first[0].event_id, third[0].event_id]
    )


def directory_answering(answer: Callable[[httpx.Request], httpx.Response]) -> CompanyDirectory:
    """The real CompanyDirectory, with rebilling's answers from ``answer``."""
    directory = CompanyDirectory("http://rebilling.test", "s" * 32)
    directory._client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return directory


async def test_a_request_is_refused_only_for_what_rebilling_did_not_answer_about_it(
    database: Database,
) -> None:
    """Found by the review of 2026-12-05: the error named every id usage-meter did not know,
    so a request naming a company rebilling had already said it does not know (remembered,
    not asked again), or a new company rebilling answered for, was refused because another
    request of its group named an id rebilling failed on. Now the error names only those."""
    co, ghost, new_co, bad, good = uid("co"), uid("co"), uid("co"), uid("co"), uid("co")
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, co, "USD")
    down = False

    def rebilling(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("rebilling is down", request=request)
        if request.url.path.endswith(bad):
            return httpx.Response(500, json={})
        if request.url.path.endswith(good):
            return httpx.Response(200, json={"currency": "USD"})
        return httpx.Response(404, json={"error": {"code": "not_found"}})

    http = HttpIngestion(database, directory_answering(rebilling), TokenBuckets(rate=0, burst=0))

    async def together(*batches: list[IncomingUsage]) -> list[list[str] | str]:
        answers = await asyncio.gather(
            *(http.record("product:test", b, None) for b in batches), return_exceptions=True
        )
        return [a.code if isinstance(a, ApiError) else [r.status for r in a] for a in answers]  # type: ignore[union-attr]

    # rebilling fails on one new company only: the other new company and the known one go on
    assert await together([event(uid("ev"), bad)], [event(uid("ev"), good)], [event(uid("ev"), co)]) == [
        "rebilling_unavailable",
        ["accepted"],
        ["accepted"],
    ]
    # a company rebilling said it does not know is not asked again (priced in USD) ...
    assert await together([event(uid("ev"), ghost)]) == [["accepted"]]
    down = True
    # ... so rebilling being down refuses only the request naming a company it must be asked about
    assert await together([event(uid("ev"), new_co)], [event(uid("ev"), ghost)], [event(uid("ev"), co)]) == [
        "rebilling_unavailable",
        ["accepted"],
        ["accepted"],
    ]


async def test_a_group_with_a_retried_event_records_nothing_at_once_then_each_new_event_once(
    database: Database,
) -> None:
    """The one-statement way fails whole on an event accepted before (no claim, no message
    for the new ones beside it); the HTTP way then takes the unit of work, which accepts the
    new ones once and calls the retried one a duplicate."""
    co = uid("co")
    directory = Directory({co: "USD"}, {})
    taken, fresh = uid("ev"), uid("ev")
    assert await run(database, directory, [event(taken, co)], "http") == [("accepted", None)]
    batch = [event(fresh, co), event(taken, co)]
    async with database.statements() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await ingest_at_once(conn, batch, [None, None], directory)  # type: ignore[arg-type]
    assert await claimed(database, [fresh]) == set()
    assert [m["data"]["event_id"] for m in await recorded(database)] == [taken]

    assert await run(database, directory, batch, "http") == [("accepted", None), ("duplicate", None)]
    assert await claimed(database, [fresh, taken]) == {fresh, taken}
    assert [m["data"]["event_id"] for m in await recorded(database)] == [taken, fresh]


@pytest.mark.parametrize("leading_here", [True, False], ids=["relay-here", "relay-elsewhere"])
async def test_a_group_recorded_at_once_wakes_the_relay_that_leads(
    infra: Infra, database: Database, leading_here: bool
) -> None:
    """The one statement takes both forms of ``outbox.written_with``: with this process's
    relay leading, it wakes it after (no NOTIFY); with another replica's, Postgres notifies
    that one at commit, once, naming this schema."""
    co = uid("co")
    async with database.reading() as conn:
        schema = await conn.fetchval("SELECT current_schema()")
    heard: list[object] = []
    listener = await asyncpg.connect(infra.stack.database_url)
    await listener.add_listener(CHANNEL, lambda *args: heard.append(args[-1]))
    relay = database.relay
    assert isinstance(relay, CountingRelay)
    woken = relay.woken
    if leading_here:
        outbox._LEADER_HERE.set()
    try:
        assert await run(database, Directory({co: "USD"}, {}), [event(uid("ev"), co)], "http") == [
            ("accepted", None)
        ]
        await asyncio.sleep(0.3)  # a notification arrives within moments
    finally:
        outbox._LEADER_HERE.clear()
        await listener.close()
    assert relay.woken == woken + 1
    assert heard == ([] if leading_here else [schema])


async def test_two_groups_racing_with_one_event_accept_it_once(database: Database) -> None:
    """Two groups (two processes' group commits) with the same new event at the same moment:
    one statement claims it, the other waits on the claim, fails whole and goes again as a
    unit of work, which calls the event a duplicate and still records its own new one."""
    co = uid("co")
    directory = Directory({co: "USD"}, {})
    shared, own_a, own_b = uid("ev"), uid("ev"), uid("ev")
    a, b = await asyncio.gather(
        run(database, directory, [event(shared, co), event(own_a, co)], "http"),
        run(database, directory, [event(own_b, co), event(shared, co)], "http"),
    )
    assert sorted([a[0][0], b[1][0]]) == ["accepted", "duplicate"]  # the shared event: once
    assert (a[1], b[0]) == (("accepted", None), ("accepted", None))
    assert await claimed(database, [shared, own_a, own_b]) == {shared, own_a, own_b}
    assert sorted(m["data"]["event_id"] for m in await recorded(database)) == sorted([shared, own_a, own_b])


async def test_known_companies_and_accounts_are_read_once_and_suspensions_every_time(
    database: Database,
) -> None:
    """A group's lookup asks the tables only for the companies and accounts the process has not
    met (their currency and company never change), while suspensions are read for every group;
    what the rebilling.events consumer writes is read again."""
    co, acct = uid("co"), uid("ws")
    facts = Facts()
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, co, "EUR")
        await storage.upsert_account(uow.conn, acct, co)
    async with database.reading() as conn:
        first = await storage.known(conn, [co, co], [acct], facts)
    assert (first.currencies, first.owners, first.suspended) == ({co: "EUR"}, {acct: co}, set())
    assert facts.recall("company", [co]) == ({co: "EUR"}, [])
    # the rows gone (only a test can do that), the process still knows; a suspension is seen
    async with database.unit() as uow:
        await uow.conn.execute("DELETE FROM accounts WHERE account_id = $1", acct)
        await uow.conn.execute("DELETE FROM companies WHERE company_id = $1", co)
        await storage.set_suspended(uow.conn, "account", acct, True)
    async with database.reading() as conn:
        again = await storage.known(conn, [co], [acct], facts)
        bare = await storage.known(conn, [co], [acct])
    assert (again.currencies, again.owners) == ({co: "EUR"}, {acct: co})
    assert again.suspended == bare.suspended == {("account", acct)}
    assert (bare.currencies, bare.owners) == ({}, {})
    assert again.prices == bare.prices and again.prices  # the catalog comes with every group
    # what the consumer of rebilling.events wrote is read from the tables again
    companies.forget(facts, [AccountCreated(account_id=acct, company_id=co, name="n", owner_email=None)])
    async with database.reading() as conn:
        forgotten = await storage.known(conn, [co], [acct], facts)
    assert (forgotten.currencies, forgotten.owners) == ({co: "EUR"}, {})


def test_facts_learned_from_tables_stop_at_their_bound_and_expire() -> None:
    facts = Facts(max_learned=2)
    facts.learn("account", {"a": "co-1"})
    facts.learn("account", {"b": "co-1", "c": "co-2"})
    found, missing = facts.recall("account", ["a", "b", "c"])
    assert (found, missing) == ({"a": "co-1", "b": "co-1"}, ["c"])
    facts.learn("company", {"co-1": "USD"})  # each kind has its own bound
    assert facts.recall("company", ["co-1"]) == ({"co-1": "USD"}, [])
    # a fact read from a table is believed ttl seconds: another replica's correction of that
    # row reaches this one too; expired facts make room again
    stale = Facts(max_learned=2, ttl=0)
    stale.learn("account", {"a": "co-1", "b": "co-1"})
    assert stale.recall("account", ["a"]) == ({}, ["a"])
    stale.learn("account", {"c": "co-2"})
    assert stale._learned["account"].keys() == {"c"}


async def test_a_row_corrected_through_one_replica_reaches_the_others_within_the_ttl(
    database: Database,
) -> None:
    """Two replicas' facts over one table: the replica whose consumer corrects a row forgets it
    at once; the other believes what it read for at most ``ttl`` seconds, then reads the row."""
    co = uid("co")
    writer, other = Facts(ttl=0.5), Facts(ttl=0.5)
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, co, "EUR")  # as a forged announcement left it
    async with database.reading() as conn:
        for facts in (writer, other):
            assert (await storage.known(conn, [co], [], facts)).currencies == {co: "EUR"}
    async with database.unit() as uow:  # rebilling's next announcement, taken in by `writer`
        await storage.upsert_company(uow.conn, co, "USD")
    companies.forget(writer, [CompanyUpdated(company_id=co, name="n", plan="starter", currency="USD")])
    async with database.reading() as conn:
        assert (await storage.known(conn, [co], [], writer)).currencies == {co: "USD"}
        assert (await storage.known(conn, [co], [], other)).currencies == {co: "EUR"}  # not yet
        await asyncio.sleep(0.6)
        assert (await storage.known(conn, [co], [], other)).currencies == {co: "USD"}


@dataclass
class IngestRecord:
    """A ``usage.ingest`` record as the consumer hands it over."""

    value: bytes
    offset: int
    key: bytes | None = None
    topic: str = "usage.ingest"
    partition: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


async def test_a_usage_ingest_batch_is_recorded_in_one_statement_and_again_as_duplicates(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer batch of new events: claims, usage.recorded and dead letters (an unreadable
    record, a refused event) in one outbox row, with no transaction. The same batch again (a
    redelivery): every event claimed before, so the unit of work takes it, records nothing new
    and dead-letters the same two records again."""
    co = uid("co")
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, co, "USD")
    wiring = SimpleNamespace(db=database, uow=database.unit, directory=Directory({}, {}))
    first, second = uid("ev"), uid("ev")
    records = [
        IngestRecord(
            orjson.dumps({"event_id": first, "company_id": co, "service": "email", "quantity": "2"}), 0
        ),
        IngestRecord(b"{not json", 1),
        IngestRecord(
            orjson.dumps({"event_id": uid("ev"), "company_id": co, "service": "pigeon", "quantity": "1"}), 2
        ),
        IngestRecord(
            orjson.dumps({"event_id": second, "company_id": co, "service": "sms", "quantity": "1"}), 3
        ),
    ]

    async def written() -> list[list[tuple[str, int | None]]]:
        """Each outbox row's messages: (topic, the offset of the record a dead letter holds)."""
        async with database.reading() as conn:
            rows = await conn.fetch("SELECT * FROM outbox ORDER BY id")
        return [
            [
                (topic, orjson.loads(value)["offset"] if topic.endswith(".dlq") else None)
                for topic, _, value, _, _ in outbox.stored(r)
            ]
            for r in rows
        ]

    in_a_unit: list[int] = []  # batches that took the unit of work's way

    async def counted_ingest(*args: Any, **kwargs: Any) -> list[Result]:
        in_a_unit.append(1)
        return await ingest(*args, **kwargs)

    def letters_counted() -> float:
        return float(DLQ.labels(handlers.SERVICE, "usage.ingest")._value.get())

    monkeypatch.setattr(handlers, "ingest", counted_ingest)
    counted = letters_counted()
    await handlers.on_ingest(wiring, records)  # type: ignore[arg-type]
    assert in_a_unit == []  # one statement
    assert letters_counted() - counted == 2
    assert await written() == [
        [("usage.recorded", None), ("usage.recorded", None), ("usage.ingest.dlq", 1), ("usage.ingest.dlq", 2)]
    ]
    assert await claimed(database, [first, second]) == {first, second}
    relay = database.relay
    assert isinstance(relay, CountingRelay)
    assert [len(rows) for _, rows in relay.handed if rows] == [4]  # handed over whole

    await handlers.on_ingest(wiring, records)  # type: ignore[arg-type]
    assert in_a_unit == [1]  # the claims were there: the unit of work sorted it out
    assert letters_counted() - counted == 4  # the two written again, not the try that failed
    again = (await written())[1:]
    assert again == [[("usage.ingest.dlq", 1), ("usage.ingest.dlq", 2)]]  # no usage.recorded twice
    assert sorted(m["data"]["event_id"] for m in await recorded_usage(database)) == sorted([first, second])


async def recorded_usage(database: Database) -> list[dict[str, Any]]:
    """Every usage.recorded message waiting in the outbox (dead letters left out)."""
    out = []
    async with database.reading() as conn:
        for r in await conn.fetch("SELECT * FROM outbox ORDER BY id"):
            out += [orjson.loads(v) for topic, _, v, _, _ in outbox.stored(r) if topic == "usage.recorded"]
    return out


async def test_a_hung_rebilling_costs_a_group_one_wait_not_one_per_kind_of_id(database: Database) -> None:
    """Found by the public-API review of 2026-12-05: with rebilling hung, a group naming a new
    company and a new account waited one timeout for the company, and the requests left after
    the refused one waited another for the account. Both are asked at once now."""
    co, new_co, new_acct = uid("co"), uid("co"), uid("ws")
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, co, "USD")
    seen: list[str] = []

    class Hung(Directory):
        async def currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
            return await self._wait("company", list(company_ids))

        async def account_companies(self, account_ids: Iterable[str]) -> dict[str, str]:
            return await self._wait("account", list(account_ids))

        async def _wait(self, kind: str, asked: list[str]) -> dict[str, str]:
            if not asked:
                return {}
            seen.append(f"{kind} asked")
            await asyncio.sleep(0.2)  # stands for the client's timeout
            seen.append(f"{kind} timed out")
            raise httpx.ReadTimeout("rebilling does not answer")

    http = HttpIngestion(database, Hung({}, {}), TokenBuckets(rate=0, burst=0))  # type: ignore[arg-type]
    batches = ([event(uid("ev"), new_co)], [event(uid("ev"), co, new_acct)], [event(uid("ev"), co)])
    outcomes = await asyncio.gather(
        *(http.record("product:test", b, None) for b in batches), return_exceptions=True
    )
    assert isinstance(outcomes[0], ApiError) and isinstance(outcomes[1], ApiError)
    assert isinstance(outcomes[2], list) and [r.status for r in outcomes[2]] == ["accepted"]
    assert seen[:2] == ["company asked", "account asked"] and len(seen) == 4  # one wait, both kinds


class AnswersFor(Directory):
    """Rebilling down for the ids in ``unreachable`` only (``Unanswered`` names them), and
    answering as ``Directory`` for the rest."""

    def __init__(self, currencies: dict[str, str], owners: dict[str, str], unreachable: set[str]) -> None:
        super().__init__(currencies, owners)
        self.unreachable = unreachable
        self.asked: list[list[str]] = []  # the ids of each question asked

    async def currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        return await self._ask("company", list(company_ids), super().currencies)

    async def account_companies(self, account_ids: Iterable[str]) -> dict[str, str]:
        return await self._ask("account", list(account_ids), super().account_companies)

    async def pinned_currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        return await self._ask("company", list(company_ids), super().pinned_currencies)

    async def _ask(self, kind: str, asked: list[str], answer: Any) -> dict[str, str]:
        if asked:
            self.asked.append(asked)
        failed = frozenset(i for i in asked if i in self.unreachable)
        if failed:
            raise Unanswered(kind, failed, "rebilling is down")  # type: ignore[arg-type]
        result: dict[str, str] = await answer(asked)
        return result


def usage_record(eid: str, company: str, offset: int, **fields: Any) -> IngestRecord:
    body = {"event_id": eid, "company_id": company, "service": "email", "quantity": "2", **fields}
    return IngestRecord(orjson.dumps(body), offset, key=company.encode())


async def waiting(database: Database) -> list[tuple[str, str, int]]:
    async with database.reading() as conn:
        rows = await conn.fetch("SELECT company_id, event_id, source_offset FROM ingest_deferred ORDER BY 3")
    return [(r[0], r[1], r[2]) for r in rows]


async def test_records_rebilling_cannot_answer_about_wait_and_the_partition_goes_on(
    database: Database,
) -> None:
    """docs/0029: a usage.ingest batch naming a company (or account) rebilling cannot be asked
    about no longer fails whole, holding its partition: the rest is recorded, and those records
    are set aside in the same transaction. Once rebilling answers, the worker judges them the
    same way (a new company's usage is charged in the currency pinned for it), once; a record
    the judgement refuses is dead-lettered then; a redelivery of the batch changes nothing."""
    known, ghost, eur = uid("co"), uid("co"), uid("co")
    new_acct = uid("ws")
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, known, "USD")
        await uow.conn.execute(
            "INSERT INTO prices (service, unit, unit_price_micros, currency) "
            "VALUES ('email', 'email', 600, 'EUR') ON CONFLICT DO NOTHING"
        )
    directory = AnswersFor({eur: "EUR"}, {new_acct: known}, unreachable={ghost, eur, new_acct})
    wiring = SimpleNamespace(db=database, uow=database.unit, directory=directory)
    ok, g1, e1, e2, bad = (uid("ev") for _ in range(5))
    records = [
        usage_record(ok, known, 0),
        usage_record(g1, ghost, 1),
        IngestRecord(b"{not json", 2),
        usage_record(e1, eur, 3),
        usage_record(e2, known, 4, account_id=new_acct),  # names the new account: waits too
        usage_record(bad, ghost, 5, service="pigeon"),  # refused once judged, not before
    ]
    deferred = float(deferral.DEFERRED._value.get())
    await handlers.on_ingest(wiring, records)  # type: ignore[arg-type]
    assert await claimed(database, [ok, g1, e1, e2, bad]) == {ok}
    assert [m["data"]["event_id"] for m in await recorded_usage(database)] == [ok]
    assert await waiting(database) == [(ghost, g1, 1), (eur, e1, 3), (known, e2, 4), (ghost, bad, 5)]
    assert float(deferral.DEFERRED._value.get()) - deferred == 4
    # rebilling was asked about each once: a hung one costs the batch one wait, not two
    assert len(directory.asked) == 2 and set(chain(*directory.asked)) == {ghost, eur, new_acct}

    # redelivered (the offsets did not commit): nothing recorded twice, nothing set aside twice
    await handlers.on_ingest(wiring, records)  # type: ignore[arg-type]
    assert [m["data"]["event_id"] for m in await recorded_usage(database)] == [ok]
    assert len(await waiting(database)) == 4

    worker = deferral.IngestDeferred(database, directory)  # type: ignore[arg-type]
    assert await worker.step() is False  # rebilling still down: everything stays
    assert len(await waiting(database)) == 4

    directory.unreachable = {eur}  # the ghost company and the new account can be asked now
    await worker.step()
    assert await waiting(database) == [(eur, e1, 3)]  # the one rebilling still fails on
    assert await claimed(database, [g1, e2, bad]) == {g1, e2}
    directory.unreachable = set()
    await worker.step()
    assert await waiting(database) == []
    assert await claimed(database, [e1]) == {e1}
    usage = {m["data"]["event_id"]: m["data"] for m in await recorded_usage(database)}
    assert sorted(usage) == sorted([ok, g1, e1, e2])
    assert usage[g1]["currency"] == "USD" and ghost in directory.pinned  # pinned, not assumed
    assert usage[e1]["currency"] == "EUR" and usage[e2]["currency"] == "USD"
    async with database.reading() as conn:
        letters = [
            orjson.loads(v)
            for r in await conn.fetch("SELECT * FROM outbox ORDER BY id")
            for topic, _, v, _, _ in outbox.stored(r)
            if topic == "usage.ingest.dlq"
        ]
    # the unreadable record at once (twice: the batch came twice), the refused one when judged
    assert sorted(m["offset"] for m in letters) == [2, 2, 5]
    assert await worker.step() is False  # nothing left


async def test_set_aside_usage_is_judged_once_across_replicas(database: Database) -> None:
    """Two replicas' workers at once over the same set-aside records: each record is judged by
    one of them (``SKIP LOCKED``), and each event is claimed and published once."""
    ghost = uid("co")
    directory = AnswersFor({}, {}, unreachable={ghost})
    wiring = SimpleNamespace(db=database, uow=database.unit, directory=directory)
    ids = [uid("ev") for _ in range(40)]
    await handlers.on_ingest(wiring, [usage_record(e, ghost, i) for i, e in enumerate(ids)])  # type: ignore[arg-type]
    assert len(await waiting(database)) == 40
    directory.unreachable = set()
    first, second = (deferral.IngestDeferred(database, directory) for _ in range(2))  # type: ignore[arg-type]
    first.ROUND = second.ROUND = 7
    while await waiting(database):
        await asyncio.gather(first.step(), second.step())
    assert sorted(m["data"]["event_id"] for m in await recorded_usage(database)) == sorted(ids)


async def test_set_aside_usage_against_a_model_of_what_each_event_becomes(database: Database) -> None:
    """A seeded random walk over the lifecycle of a usage.ingest event while rebilling comes
    and goes id by id: batches (new events, resends of old ones, unreadable and refused
    records), their redelivery, rebilling's answers changing, and two replicas' workers. After
    every step, against a model: no event is lost (each is claimed, or waiting, or was refused
    and dead-lettered), none is published twice, each is priced in its company's currency. At
    the end, with rebilling back, nothing waits and every good event is published once."""
    rng = random.Random(20261205)
    async with database.unit() as uow:
        await uow.conn.execute(
            "INSERT INTO prices (service, unit, unit_price_micros, currency) "
            "VALUES ('email', 'email', 600, 'EUR') ON CONFLICT DO NOTHING"
        )
    known = [uid("co") for _ in range(2)]
    for co in known:
        async with database.unit() as uow:
            await storage.upsert_company(uow.conn, co, "USD")
    created_eur, never_created = [uid("co") for _ in range(2)], [uid("co") for _ in range(2)]
    currency = {**dict.fromkeys(known, "USD"), **dict.fromkeys(created_eur, "EUR")}
    currency.update(dict.fromkeys(never_created, "USD"))  # pinned USD when first charged
    directory = AnswersFor(
        dict.fromkeys(created_eur, "EUR"), {}, unreachable=set(created_eur + never_created)
    )
    wiring = SimpleNamespace(db=database, uow=database.unit, directory=directory)
    workers = [deferral.IngestDeferred(database, directory) for _ in range(2)]  # type: ignore[arg-type]
    for w in workers:
        w.ROUND = 3
    companies_all = known + created_eur + never_created
    sent: dict[tuple[str, str], bool] = {}  # (company, event) -> whether it is chargeable
    offset = 0

    async def check(final: bool = False) -> None:
        async with database.reading() as conn:
            claimed_now = {
                (r[0], r[1]) for r in await conn.fetch("SELECT company_id, event_id FROM ingested")
            }
            waiting_now = {
                (r[0], r[1]) for r in await conn.fetch("SELECT company_id, event_id FROM ingest_deferred")
            }
        published = [m["data"] for m in await recorded_usage(database)]
        keys = [(m["company_id"], m["event_id"]) for m in published]
        assert len(keys) == len(set(keys)), "an event published twice"
        assert set(keys) == claimed_now & set(sent)
        for m in published:
            assert m["currency"] == currency[m["company_id"]], m
        for key, chargeable in sent.items():
            if chargeable:
                assert key in claimed_now or key in waiting_now, f"lost: {key}"
            else:
                assert key not in claimed_now, f"refused yet charged: {key}"
        if final:
            assert waiting_now == set() and {k for k, c in sent.items() if c} == set(keys)

    for _ in range(120):
        roll = rng.random()
        if roll < 0.5:
            records = []
            for _ in range(rng.randint(1, 6)):
                if sent and rng.random() < 0.25:  # the product sends an event again
                    co, eid = rng.choice(sorted(sent))
                    service = "email" if sent[(co, eid)] else "pigeon"
                else:
                    co, eid = rng.choice(companies_all), uid("ev")
                    service = "pigeon" if rng.random() < 0.15 else "email"
                    sent[(co, eid)] = service == "email"
                records.append(usage_record(eid, co, offset, service=service))
                offset += 1
            if rng.random() < 0.1:
                records.append(IngestRecord(b"{not json", offset))
                offset += 1
            await handlers.on_ingest(wiring, records)  # type: ignore[arg-type]
            if rng.random() < 0.2:  # redelivered: its offsets did not commit
                await handlers.on_ingest(wiring, records)  # type: ignore[arg-type]
        elif roll < 0.7:
            co = rng.choice(created_eur + never_created)
            directory.unreachable ^= {co}
        else:
            await asyncio.gather(*(w.step() for w in workers[: rng.randint(1, 2)]))
        await check()
    directory.unreachable = set()
    while any([await w.step() for w in workers]) or await waiting(database):
        pass
    await check(final=True)


async def test_set_aside_usage_is_priced_and_dated_as_when_it_came_and_a_bad_trace_header_is_dropped(
    database: Database,
) -> None:
    """Found by the review of docs/0029: a set-aside event was priced when judged, so a price
    raised while it waited charged it the new price (API.md: a price "applies to events
    received after"). It is now kept with its service's prices when it came. And a record whose
    ``traceparent`` header held a NUL byte could not be set aside (a text column refuses NUL):
    its batch failed again and again for the whole outage, and the record went to the DLQ;
    such a header is no trace context, and is dropped."""
    service = f"svc{uid('x')[-6:]}"
    async with database.unit() as uow:
        await storage.upsert_price(uow.conn, Price(service, "unit", 1_000_000, "USD"))
    ghost = uid("co")

    class Hanging(AnswersFor):  # rebilling hangs for a while before the ask fails
        async def _ask(self, kind: str, asked: list[str], answer: Any) -> dict[str, str]:
            if self.unreachable & set(asked):
                await asyncio.sleep(0.5)
            return await super()._ask(kind, asked, answer)

    directory = Hanging({}, {}, unreachable={ghost})
    wiring = SimpleNamespace(db=database, uow=database.unit, directory=directory)
    eid = uid("ev")
    record = usage_record(eid, ghost, 0, service=service, quantity="2")
    record.headers = (("traceparent", b"00-\x00abc"),)
    came = datetime.now(UTC)
    await handlers.on_ingest(wiring, [record])  # type: ignore[arg-type]
    assert await waiting(database) == [(ghost, eid, 0)]
    async with database.reading() as conn:
        kept = await conn.fetchval("SELECT deferred_at FROM ingest_deferred WHERE event_id = $1", eid)
    # dated by when it came, not by when rebilling's wait ended (an attack saw 5-10 s between)
    assert datetime.now(UTC) - came >= timedelta(seconds=0.5) and kept - came < timedelta(seconds=0.25)
    async with database.unit() as uow:  # raised while it waits
        await storage.upsert_price(uow.conn, Price(service, "unit", 5_000_000, "USD"))
        # it came a while ago: without an occurred_at of its own, it happened then
        await uow.conn.execute(
            "UPDATE ingest_deferred SET deferred_at = '2026-12-04T23:59:00Z' WHERE event_id = $1", eid
        )
    directory.unreachable = set()
    await deferral.IngestDeferred(database, directory).step()  # type: ignore[arg-type]
    assert await waiting(database) == []
    (usage,) = [m["data"] for m in await recorded_usage(database) if m["data"]["event_id"] == eid]
    assert (usage["unit_price_micros"], usage["platform_amount_micros"]) == (1_000_000, 2_000_000)
    assert usage["occurred_at"] == "2026-12-04T23:59:00+00:00"  # not the day it was judged
    later = uid("ev")  # what comes now is priced now
    await handlers.on_ingest(wiring, [usage_record(later, ghost, 1, service=service, quantity="2")])  # type: ignore[arg-type]
    (now,) = [m["data"] for m in await recorded_usage(database) if m["data"]["event_id"] == later]
    assert now["platform_amount_micros"] == 10_000_000

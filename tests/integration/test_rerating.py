"""Usage is rated by the rebilling settings in effect when usage-meter recorded it, whichever
the wallet hears first (docs/0025). On the real Postgres with the wallet's own storage, posting
and re-rating code: settings heard after usage re-rate it, usage heard after settings takes
the version then in effect, a usage batch racing a settings change is never rated by the old
settings, and a property test delivers usage and settings in any order against a reference."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally import db, events
from tally.db import Conn
from tally.events import RebillingSettings, RecordedUsage
from tally.money import apply_markup
from tally.uow import Database
from tally_wallet import rerating, storage
from tally_wallet.domain import RatedOnOldSettings, Transfer, Wallet
from tally_wallet.rerating import store_settings
from tally_wallet.usage import Outcome, apply_usage
from tests.support.builders import recorded_usage, run_in_fresh_loop
from tests.support.databases import service_database
from tests.support.stack import Infra, uid

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def used(
    cid: str, aid: str, eid: str, amount: int, recorded: datetime, service: str = "sms"
) -> RecordedUsage:
    return recorded_usage(cid, eid, amount, aid, recorded=recorded, service=service)


def rebilling(
    cid: str,
    aid: str,
    version: int,
    mode: str,
    markup: str = "2",
    effective: datetime | None = None,
    active: bool = True,
) -> RebillingSettings:
    return RebillingSettings(
        account_id=aid,
        company_id=cid,
        mode=mode,
        markups={"default": markup} if mode == "rebill_markup" else {},
        active=active,
        company_stripe_connected=True,
        version=version,
        effective_at=effective,
    )


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    async with service_database(infra, "tally_wallet", "wallet_rr") as database:
        yield database


async def post(database: Database, *batch: RecordedUsage) -> Outcome:
    async with database.unit() as uow:
        return await apply_usage(uow.conn, batch)


async def hear(database: Database, s: RebillingSettings) -> list[Any]:
    async with database.unit() as uow:
        rows = await store_settings(uow.conn, s, "USD")
    return rows


async def account_lines(database: Database, aid: str) -> list[asyncpg.Record]:
    async with database.reading() as conn:
        return await conn.fetch(
            "SELECT key, kind, amount, debit_wallet = $1 AS charged FROM transfers "
            "WHERE $1 IN (debit_wallet, credit_wallet) ORDER BY id",
            f"account:{aid}",
        )


async def balance(database: Database, wallet_id: str) -> int:
    async with database.reading() as conn:
        return int(
            await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM wallets WHERE id = $1", wallet_id)
        )


async def test_settings_heard_after_the_usage_charge_the_account_once(database: Database) -> None:
    cid, aid = uid("co"), uid("acct")
    await post(database, used(cid, aid, "before", 1_000, at(5)), used(cid, aid, "after", 2_000, at(15)))
    assert await account_lines(database, aid) == []  # no settings yet: the company alone

    rows = await hear(database, rebilling(cid, aid, 1, "rebill_markup", "2", effective=at(10)))

    lines = await account_lines(database, aid)
    assert [(r["key"], r["kind"], r["amount"], r["charged"]) for r in lines] == [
        ("usage:after:account", "usage", 4_000, True)
    ]
    assert await balance(database, f"account:{aid}") == -4_000
    assert await balance(database, f"company:{cid}") == -3_000  # the company leg never changes
    [rerated] = [events.parse_message(r[2]) for r in rows if r[0] == events.Topics.WALLET_EVENTS][:1]
    assert rerated.type == "wallet.usage_rerated"
    assert isinstance(rerated.data, events.WalletUsageRerated)
    assert (rerated.data.events, rerated.data.amount_micros, rerated.data.balance_micros) == (
        1,
        4_000,
        -4_000,
    )
    assert any(events.parse_message(r[2]).type == "wallet.suspended" for r in rows)
    # the account's usage counted the platform's 2,000 when posted; it pays 4,000 now
    [digest] = [
        events.parse_wallet_usage(r[2])
        for r in rows
        if r[0] == events.Topics.WALLET_DIGEST and b'"wallet.usage"' in r[2]
    ]
    assert digest.totals == []
    assert [(c.account_id, c.service, c.amount_micros) for c in digest.corrections] == [(aid, "sms", 2_000)]

    # the same version again (a redelivery) and an older one change nothing
    assert await hear(database, rebilling(cid, aid, 1, "rebill_markup", "2", effective=at(10))) == []
    assert await hear(database, rebilling(cid, aid, 0, "off", effective=at(1))) == []
    assert len(await account_lines(database, aid)) == 1
    # and the usage redelivered is not charged again
    await post(database, used(cid, aid, "after", 2_000, at(15)))
    assert await balance(database, f"account:{aid}") == -4_000


async def test_a_changed_markup_and_rebilling_turned_off_are_settled_by_the_difference(
    database: Database,
) -> None:
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "rebill_markup", "2", effective=at(0)))
    await post(database, used(cid, aid, "e1", 1_000, at(20)), used(cid, aid, "e2", 1_000, at(40)))
    assert await balance(database, f"account:{aid}") == -4_000

    await hear(database, rebilling(cid, aid, 2, "rebill_markup", "3", effective=at(10)))  # both at 3
    assert await balance(database, f"account:{aid}") == -6_000
    await hear(database, rebilling(cid, aid, 3, "off", effective=at(30)))  # e2 given back
    assert await balance(database, f"account:{aid}") == -3_000
    lines = [(r["key"], r["kind"], r["amount"], r["charged"]) for r in await account_lines(database, aid)]
    assert lines[2:] == [
        ("usage:e1:account:v2", "adjustment", 1_000, True),
        ("usage:e2:account:v2", "adjustment", 1_000, True),
        ("usage:e2:account:v3", "adjustment", 3_000, False),
    ]
    await hear(database, rebilling(cid, aid, 4, "rebill", effective=at(35)))  # e2 at cost again
    assert await balance(database, f"account:{aid}") == -4_000
    async with database.reading() as conn:
        rows = await conn.fetch(storage.LEDGER_BALANCES)
    assert all(r["balance"] == r["derived"] for r in rows)


async def test_usage_heard_after_a_change_is_rated_by_the_version_then_in_effect(database: Database) -> None:
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "off", effective=at(0)))
    await hear(database, rebilling(cid, aid, 2, "rebill_markup", "2", effective=at(10)))
    await hear(database, rebilling(cid, aid, 3, "rebill", effective=at(20)))
    await post(
        database,
        used(cid, aid, "off", 1_000, at(5)),
        used(cid, aid, "doubled", 1_000, at(10)),
        used(cid, aid, "at-cost", 1_000, at(25)),
    )
    lines = [(r["key"], r["amount"]) for r in await account_lines(database, aid)]
    assert sorted(lines) == [("usage:at-cost:account", 1_000), ("usage:doubled:account", 2_000)]


async def test_usage_from_before_any_dated_version_takes_no_account_leg(database: Database) -> None:
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "rebill", effective=at(10)))
    await post(database, used(cid, aid, "early", 1_000, at(1)))
    assert await account_lines(database, aid) == []


async def test_a_batch_rated_while_settings_were_stored_goes_again(database: Database) -> None:
    """The settings lock the company wallet first: a batch that read the old settings and then
    waits for that lock finds them changed once it has it, and is rated again."""
    cid, aid = uid("co"), uid("acct")
    await post(database, used(cid, aid, "opened", 1_000, at(1)))  # the company wallet exists
    async with database.pool.acquire() as s_conn, database.pool.acquire() as u_conn:
        s_tx = s_conn.transaction()
        await s_tx.start()
        assert await store_settings(s_conn, rebilling(cid, aid, 1, "rebill", effective=at(10)), "USD") == []
        u_tx = u_conn.transaction()
        await u_tx.start()
        batch = asyncio.create_task(apply_usage(u_conn, [used(cid, aid, "raced", 1_000, at(20))]))
        await asyncio.sleep(0.3)
        assert not batch.done()  # waiting for the company wallet
        await s_tx.commit()
        with pytest.raises(RatedOnOldSettings):
            await batch
        await u_tx.rollback()
    await post(database, used(cid, aid, "raced", 1_000, at(20)))
    assert [(r["key"], r["amount"]) for r in await account_lines(database, aid)] == [
        ("usage:raced:account", 1_000)
    ]


@pytest.mark.parametrize("first", [False, True], ids=["opened", "the-companys-first-batch"])
async def test_settings_stored_while_a_batch_commits_re_rate_it(database: Database, first: bool) -> None:
    """The settings wait for the batch holding the company wallet, then re-rate it. A
    company's very first batch creates that wallet: the settings open the same row, so they
    wait for that batch too instead of missing it."""
    cid, aid = uid("co"), uid("acct")
    if not first:
        await post(database, used(cid, aid, "opened", 1_000, at(1)))
    async with database.pool.acquire() as s_conn, database.pool.acquire() as u_conn:
        u_tx = u_conn.transaction()
        await u_tx.start()
        await apply_usage(u_conn, [used(cid, aid, "in-flight", 1_000, at(20))])
        s_tx = s_conn.transaction()
        await s_tx.start()
        storing = asyncio.create_task(
            store_settings(s_conn, rebilling(cid, aid, 1, "rebill", effective=at(10)), "USD")
        )
        await asyncio.sleep(0.3)
        assert not storing.done()  # waiting for the batch's lock on the company wallet
        await u_tx.commit()
        rows = await storing
        await s_tx.commit()
    assert rows  # the re-rating's messages
    assert [(r["key"], r["amount"]) for r in await account_lines(database, aid)] == [
        ("usage:in-flight:account", 1_000)
    ]


# --- the property: any order of arrival, against a reference model ---------------------------

MARKUPS = ["1", "1.5", "2", "3.333333"]


@dataclass(frozen=True)
class Change:
    """Settings version ``version`` of account ``account``, in effect from second ``at``."""

    account: str
    version: int
    at: int
    mode: str
    markup: str


@dataclass(frozen=True)
class Use:
    event: int
    account: str
    at: int  # second it was recorded
    amount: int


def charge(c: Change | None, amount: int) -> int:
    if c is None or c.mode == "off":
        return 0
    return amount if c.mode == "rebill" else apply_markup(amount, Decimal(c.markup))


def reference(changes: list[Change], uses: list[Use]) -> dict[str, int]:
    """What each wallet ends at: every event charged once, the company at its price and the
    account by the newest version in effect when it was recorded."""
    out: dict[str, int] = {"company": 0, "a1": 0, "a2": 0}
    for u in {u.event: u for u in uses}.values():
        out["company"] -= u.amount
        effective = [c for c in changes if c.account == u.account and c.at <= u.at]
        newest = max(effective, key=lambda c: c.version, default=None)
        out[u.account] -= charge(newest, u.amount)
    return out


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Change], list[Use], list[Any]]:
    """Settings versions (in effect at rising times, per account), usage, and an order of
    arrival: each account's versions in order (one partition), usage anywhere, some twice."""
    changes = []
    for account in ("a1", "a2"):
        times = sorted(draw(st.lists(st.integers(0, 60), max_size=4)))
        for version, t in enumerate(times, start=1):
            mode = draw(st.sampled_from(["off", "rebill", "rebill_markup"]))
            changes.append(Change(account, version, t, mode, draw(st.sampled_from(MARKUPS))))
    uses = draw(
        st.lists(
            st.builds(
                Use,
                st.integers(0, 15),
                st.sampled_from(["a1", "a2"]),
                st.integers(0, 70),
                st.integers(1, 3_000_000),
            ),
            max_size=25,
            unique_by=lambda u: u.event,
        )
    )
    arrivals: list[Any] = list(uses) + draw(st.lists(st.sampled_from(uses), max_size=5)) if uses else []
    arrivals = draw(st.permutations(arrivals))
    for c in changes:  # each version after the account's earlier ones, anywhere among the usage
        earliest = max(
            (i + 1 for i, a in enumerate(arrivals) if isinstance(a, Change) and a.account == c.account),
            default=0,
        )
        arrivals.insert(draw(st.integers(earliest, len(arrivals))), c)
    return changes, uses, arrivals


async def deliver(dsn: str, schema: str, run: str, arrivals: list[Any], batch: int) -> dict[str, int]:
    pool = await db.create_pool(dsn, schema, size=2)
    try:
        await db.migrate(pool, schema, "tally")
        await db.migrate(pool, schema, "tally_wallet")
        cid = f"{run}-co"
        pending: list[RecordedUsage] = []

        async def flush(conn: Conn) -> None:
            if pending:
                async with conn.transaction():
                    await apply_usage(conn, list({u.event_id: u for u in pending}.values()))
                pending.clear()

        async with pool.acquire() as conn:
            for item in arrivals:
                if isinstance(item, Use):
                    pending.append(
                        used(cid, f"{run}-{item.account}", f"e{item.event}", item.amount, at(item.at))
                    )
                    if len(pending) >= batch:
                        await flush(conn)
                else:
                    await flush(conn)
                    s = rebilling(
                        cid, f"{run}-{item.account}", item.version, item.mode, item.markup, at(item.at)
                    )
                    async with conn.transaction():
                        await store_settings(conn, s, "USD")
            await flush(conn)
            rows = await conn.fetch(storage.LEDGER_BALANCES)
            assert all(r["balance"] == r["derived"] for r in rows), "materialised != derived"
            assert sum(r["balance"] for r in rows) == 0, "double entry broken"
            wallets = {"company": f"company:{cid}", "a1": f"account:{run}-a1", "a2": f"account:{run}-a2"}
            found = {r["id"]: r["balance"] for r in rows}
            return {name: found.get(w, 0) for name, w in wallets.items()}
    finally:
        await pool.close()


def test_any_order_of_usage_and_settings_ends_on_the_reference(infra: Infra) -> None:
    dsn, schema, counter = infra.stack.database_url, "wallet_rerating_props", itertools.count()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(histories(), st.sampled_from([1, 3, 50]))
    def check(history: tuple[list[Change], list[Use], list[Any]], batch: int) -> None:
        changes, uses, arrivals = history
        run = f"{uid('r')}-{next(counter)}"
        assert run_in_fresh_loop(deliver(dsn, schema, run, arrivals, batch)) == reference(changes, uses)

    check()


async def test_a_rerating_that_cannot_post_leaves_the_settings_stored(database: Database) -> None:
    """Give-backs that would take the account's wallet past what a balance holds: the settings
    are stored all the same (dead-lettering them would keep the old settings for good), and
    the usage before them stays as first posted."""
    cid, aid = uid("co"), uid("acct")
    top = 2**63 - 1
    await hear(database, rebilling(cid, aid, 1, "rebill", effective=at(0)))
    account = Wallet(f"account:{aid}", "account", "USD", company_id=cid, account_id=aid)

    async def credit(amount: int) -> None:  # each from its own source: none goes past the bound
        source = Wallet(f"system:{uid('src')}", "system", "USD")
        transfer = Transfer(uid("c"), source.id, account.id, amount, "manual_credit")
        async with database.unit() as uow:
            await storage.post(uow.conn, [account, source], [transfer])

    await credit(top - 5_000)
    await post(database, used(cid, aid, "e1", 1_000, at(5)))
    await credit(5_990)  # the account's wallet at top - 10
    failed = rerating.FAILED._value.get()
    assert await hear(database, rebilling(cid, aid, 2, "off", effective=at(1))) == []
    assert rerating.FAILED._value.get() == failed + 1
    assert await balance(database, f"account:{aid}") == top - 10
    async with database.reading() as conn:
        stored = await conn.fetchval("SELECT version FROM rebilling_settings WHERE account_id = $1", aid)
    assert stored == 2
    await post(database, used(cid, aid, "e2", 1_000, at(6)))  # rated by the stored settings: off
    assert [r["key"] for r in await account_lines(database, aid) if r["kind"] == "usage"] == [
        "usage:e1:account"
    ]

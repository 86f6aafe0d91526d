"""Attacks on rating usage by the rebilling settings in effect when it was recorded (docs/0025).

Each test states the rule it holds the wallet to: every event's account charge is what the
settings in effect at its ``recorded_at`` say, the company leg once, balance == sum of lines."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import msgspec
import pytest

from tally import events
from tally.events import RecordedUsage, Topics, usage_key
from tally.money import apply_markup
from tally.uow import Database
from tally_wallet import rerating, storage
from tally_wallet.domain import RatedOnOldSettings
from tally_wallet.rerating import store_settings
from tally_wallet.usage import apply_usage
from tests.integration.test_rerating import at, database, hear, post, rebilling, used
from tests.support.stack import uid

__all__ = ["database"]  # the fixture, shared with test_rerating


async def charged_for(database: Database, aid: str) -> dict[str, int]:
    """What the account paid per event (its legs and adjustments, signed)."""
    async with database.reading() as conn:
        rows = await conn.fetch(
            "SELECT usage_event_id, sum(CASE WHEN debit_wallet = $1 THEN amount ELSE -amount END) AS paid "
            "FROM transfers WHERE $1 IN (debit_wallet, credit_wallet) AND usage_event_id IS NOT NULL "
            "GROUP BY 1",
            f"account:{aid}",
        )
    return {r["usage_event_id"]: int(r["paid"]) for r in rows}


async def assert_ledger(database: Database) -> None:
    async with database.reading() as conn:
        rows = await conn.fetch(storage.LEDGER_BALANCES)
        dup = await conn.fetchval(
            "SELECT count(*) FROM (SELECT key FROM transfers GROUP BY key HAVING count(*) > 1) d"
        )
    assert all(r["balance"] == r["derived"] for r in rows), "balance != sum of lines"
    assert sum(r["balance"] for r in rows) == 0, "double entry broken"
    assert dup == 0


# --- 1. the upgrade: settings stored before 0006 (or by an older publisher) have no date -------


async def test_usage_recorded_under_undated_settings_heard_after_a_dated_change_keeps_its_leg(
    database: Database,
) -> None:
    """Every account rebilled before migration 0006 has settings without effective_at; the
    migration keeps them as in effect since ever. The first change after the upgrade is dated;
    usage recorded just before it (rebill, at cost) but heard just after is charged at cost."""
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "rebill"))
    async with database.unit() as uow:  # as migration 0006 leaves a version stored before it
        await uow.conn.execute(
            "UPDATE rebilling_history SET effective_at = '-infinity' WHERE account_id = $1", aid
        )
        await uow.conn.execute("UPDATE rebilling_settings SET effective_at = NULL WHERE account_id = $1", aid)
    await post(database, used(cid, aid, "warmup", 1_000, at(1)))
    assert await charged_for(database, aid) == {"warmup": 1_000}  # v1 applied

    await hear(database, rebilling(cid, aid, 2, "rebill_markup", "2", effective=at(10)))
    await post(database, used(cid, aid, "in-flight", 1_000, at(9)))  # recorded under v1

    assert (await charged_for(database, aid)).get("in-flight") == 1_000, "account leg lost"
    await assert_ledger(database)


async def test_an_undated_version_between_dated_ones_is_not_forgotten(database: Database) -> None:
    """v1 dated (off), v2 undated (rebill: in effect from when the wallet heard it), v3 dated.
    Usage recorded while v2 was in force but heard after v3 is rated by v2."""
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "off", effective=at(0)))
    await hear(database, rebilling(cid, aid, 2, "rebill"))  # no effective_at: from now
    now = datetime.now(UTC)
    await post(database, used(cid, aid, "under-v2", 1_000, now + timedelta(seconds=1)))
    assert await charged_for(database, aid) == {"under-v2": 1_000}
    await hear(database, rebilling(cid, aid, 3, "rebill_markup", "3", effective=now + timedelta(seconds=30)))
    await post(database, used(cid, aid, "also-under-v2", 1_000, now + timedelta(seconds=25)))
    await post(database, used(cid, aid, "before-v2", 1_000, at(20)))  # recorded under v1

    paid = await charged_for(database, aid)
    assert paid.get("also-under-v2") == 1_000
    assert "before-v2" not in paid
    await assert_ledger(database)


# --- 2. versions heard out of order --------------------------------------------------------


async def test_a_version_heard_late_rerates_the_usage_it_governs(database: Database) -> None:
    """v2 (markup 2, from 10) is heard after v3 (off, from 20), e.g. replayed from the DLQ.
    Usage recorded at 15 is rated by v1 when posted; v2, once heard, is kept in history
    (so later-heard usage of 15 takes it) but re-rates nothing (``previous >= version``):
    two events recorded at the same instant end up charged differently."""
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "rebill", effective=at(0)))
    await hear(database, rebilling(cid, aid, 3, "off", effective=at(20)))
    await post(database, used(cid, aid, "early-heard", 1_000, at(15)))
    await hear(database, rebilling(cid, aid, 2, "rebill_markup", "2", effective=at(10)))
    await post(database, used(cid, aid, "late-heard", 1_000, at(15)))

    paid = await charged_for(database, aid)
    assert paid.get("late-heard") == 2_000  # by history: v2
    assert paid.get("early-heard") == paid.get("late-heard"), paid
    await assert_ledger(database)


# --- 3. the walk back from effective_at - 30s over a company's lines --------------------------


async def test_a_line_from_a_long_transaction_hides_newer_lines_from_the_walk(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``usage_recorded_since`` starts after the NEWEST line (by id) whose created_at
    (transaction start, now()) is before effective_at - 30s. A company line posted by a
    transaction that began > 30 s earlier but committed after newer ones has the higher id:
    the walk starts after it and skips an event recorded after effective_at, which keeps the
    old rating forever (here: no account leg at all)."""
    monkeypatch.setattr(rerating, "CLOCK_SLACK", timedelta(seconds=2))  # the walk's 30 s, shortened
    cid, aid, other = uid("co"), uid("acct"), uid("acct")
    now = datetime.now(UTC)
    async with database.pool.acquire() as slow:
        tx = slow.transaction()
        await tx.start()  # its now() is fixed here
        await slow.execute("SELECT 1")
        await asyncio.sleep(3)
        eff = datetime.now(UTC)
        # an event recorded after the change, posted (without the change) by a fresh batch
        await post(database, used(cid, aid, "after-change", 1_000, eff + timedelta(seconds=1)))
        # the slow batch (another account of the company, say) posts after it and commits
        await apply_usage(slow, [used(cid, other, "slow", 500, now)])
        await tx.commit()
    rows = await hear(database, rebilling(cid, aid, 1, "rebill", effective=eff))

    assert (await charged_for(database, aid)).get("after-change") == 1_000, (
        f"event recorded after effective_at never re-rated (rows={len(rows)})"
    )
    await assert_ledger(database)


# --- 4. what the account's usage view is fed: wallet.usage totals ---------------------------


async def test_a_rerate_corrects_the_accounts_usage_totals(database: Database) -> None:
    """Usage posted before the settings feeds ``wallet.usage`` (notifier: GET
    /v1/accounts/{aid}/usage, spend alerts) with the company amount (1000). The re-rate
    charges the account 2000 but publishes no ``wallet.usage`` correction."""
    cid, aid = uid("co"), uid("acct")
    async with database.unit() as uow:
        outcome = await apply_usage(uow.conn, [used(cid, aid, "e", 1_000, at(20))])
    digest = [events.parse_message(r[2]) for r in outcome.messages]
    shown = sum(t.amount_micros for m in digest if m.type == "wallet.usage" for t in m.data.totals)  # type: ignore[attr-defined]
    assert shown == 1_000
    rows = await hear(database, rebilling(cid, aid, 1, "rebill_markup", "2", effective=at(10)))
    assert (await charged_for(database, aid)) == {"e": 2_000}
    corrections = [r for r in rows if events.parse_message(r[2]).type == "wallet.usage"]
    assert corrections, "the account's usage view keeps 1000 for usage charged 2000"


# --- 5. the alternate key (docs/0021): two companies' events with the same id ----------------


async def test_rerate_under_the_alternate_key_charges_the_right_account_once(database: Database) -> None:
    c1, a1, c2, a2 = uid("co"), uid("acct"), uid("co"), uid("acct")
    await hear(database, rebilling(c1, a1, 1, "rebill", effective=at(0)))
    await post(database, used(c1, a1, "same", 1_000, at(20)))
    await post(database, used(c2, a2, "same", 3_000, at(20)))  # posted under c2/same
    await hear(database, rebilling(c2, a2, 1, "rebill_markup", "2", effective=at(10)))
    await hear(database, rebilling(c2, a2, 2, "rebill", effective=at(15)))
    await hear(database, rebilling(c1, a1, 2, "off", effective=at(15)))
    assert await charged_for(database, a1) == {"same": 0}
    assert await charged_for(database, a2) == {"same": 3_000}
    async with database.reading() as conn:
        keys = {r[0] for r in await conn.fetch("SELECT key FROM transfers")}
    assert f"usage:{usage_key(c2, 'same')}:account" in keys
    await assert_ledger(database)


# --- 6. many batches racing many settings changes -------------------------------------------


async def test_concurrent_batches_and_settings_end_on_the_rule(database: Database) -> None:
    """Eight workers post usage of two accounts while another hears ten settings versions;
    RatedOnOldSettings batches go again. Every event ends charged by the version in effect at
    its recorded_at, the company once."""
    cid = uid("co")
    accounts = [uid("acct"), uid("acct")]
    rnd = random.Random(7)
    versions: dict[str, list[tuple[int, datetime, str, str]]] = {a: [] for a in accounts}
    for a in accounts:
        t = 0
        for v in range(1, 11):
            t += rnd.randint(1, 8)
            versions[a].append(
                (v, at(t), rnd.choice(["off", "rebill", "rebill_markup"]), rnd.choice(["1.5", "2", "3"]))
            )
    uses = [
        used(cid, rnd.choice(accounts), f"e{i}", rnd.randint(1, 50_000), at(rnd.randint(0, 90)))
        for i in range(240)
    ]
    retries = 0
    deadlocks = 0
    usage_deadlocks: list[int] = []

    async def usage_worker(chunk: list[RecordedUsage]) -> None:
        nonlocal retries, deadlocks
        for i in range(0, len(chunk), 5):
            batch = chunk[i : i + 5]
            while True:
                try:
                    async with database.unit() as uow:
                        await apply_usage(uow.conn, batch)
                    break
                except RatedOnOldSettings:
                    retries += 1
                except asyncpg.DeadlockDetectedError:
                    deadlocks += 1
                    usage_deadlocks.append(1)
            await asyncio.sleep(0)

    async def settings_worker() -> None:
        nonlocal deadlocks
        order = [(a, *v) for a in accounts for v in versions[a]]
        order.sort(key=lambda x: x[1])  # interleave, each account's in order
        for a, v, eff, mode, markup in order:
            while True:
                try:
                    await hear(database, rebilling(cid, a, v, mode, markup, effective=eff))
                    break
                except asyncpg.DeadlockDetectedError:
                    deadlocks += 1
            await asyncio.sleep(0.01)

    chunks = [uses[i::8] for i in range(8)]
    await asyncio.wait_for(asyncio.gather(settings_worker(), *(usage_worker(c) for c in chunks)), timeout=240)

    def due(u: RecordedUsage) -> int:
        live = [v for v in versions[u.account_id or ""] if v[1] <= u.recorded_at]
        if not live:
            return 0
        _, _, mode, markup = max(live, key=lambda v: v[0])
        if mode == "off":
            return 0
        return (
            u.platform_amount_micros
            if mode == "rebill"
            else apply_markup(u.platform_amount_micros, Decimal(markup))
        )

    wrong = []
    for a in accounts:
        paid = await charged_for(database, a)
        for u in uses:
            if u.account_id == a and paid.get(u.event_id, 0) != due(u):
                wrong.append((u.event_id, paid.get(u.event_id, 0), due(u)))
    async with database.reading() as conn:
        company = await conn.fetchval("SELECT balance FROM wallets WHERE id = $1", f"company:{cid}")
    print("STATS retries", retries, "deadlocks", deadlocks, "of usage", len(usage_deadlocks))
    assert company == -sum(u.platform_amount_micros for u in uses)
    assert not wrong, f"{len(wrong)} events mis-rated (retries={retries}, deadlocks={deadlocks}): {wrong[:5]}"
    await assert_ledger(database)


# --- 7. two versions in one consumer batch; redelivery of both in any order --------------------


async def test_two_versions_in_one_transaction_and_their_redelivery(database: Database) -> None:
    cid, aid = uid("co"), uid("acct")
    await post(database, used(cid, aid, "a", 1_000, at(5)), used(cid, aid, "b", 1_000, at(15)))
    async with database.unit() as uow:  # one consumer batch, one unit of work
        for s in (
            rebilling(cid, aid, 1, "rebill_markup", "2", effective=at(0)),
            rebilling(cid, aid, 2, "rebill", effective=at(10)),
        ):
            async with uow.savepoint():
                await store_settings(uow.conn, s, "USD")
    assert await charged_for(database, aid) == {"a": 2_000, "b": 1_000}
    for v in (2, 1, 2):
        await hear(
            database,
            rebilling(
                cid, aid, v, "rebill" if v == 2 else "rebill_markup", "2", effective=at(10 if v == 2 else 0)
            ),
        )
    await post(database, used(cid, aid, "a", 1_000, at(5)), used(cid, aid, "b", 1_000, at(15)))
    assert await charged_for(database, aid) == {"a": 2_000, "b": 1_000}
    await assert_ledger(database)


# --- 8. turned off, then on again: refunds and re-charges, suspension edges ---------------------


async def test_off_then_on_again_refunds_then_recharges_once(database: Database) -> None:
    cid, aid = uid("co"), uid("acct")
    await hear(database, rebilling(cid, aid, 1, "rebill_markup", "3", effective=at(0)))
    await post(database, *(used(cid, aid, f"e{i}", 1_000, at(20 + i)) for i in range(5)))
    assert sum((await charged_for(database, aid)).values()) == 15_000
    rows = await hear(database, rebilling(cid, aid, 2, "off", effective=at(10)))
    types = [events.parse_message(r[2]).type for r in rows if r[0] == Topics.WALLET_EVENTS]
    assert "wallet.reactivated" in types, types
    assert set((await charged_for(database, aid)).values()) == {0}
    await hear(database, rebilling(cid, aid, 3, "rebill", effective=at(10)))
    assert set((await charged_for(database, aid)).values()) == {1_000}
    async with database.reading() as conn:
        bal = await conn.fetchval("SELECT balance FROM wallets WHERE id = $1", f"account:{aid}")
    assert bal == -5_000
    await assert_ledger(database)


async def test_a_rerate_corrects_the_minute_the_usage_was_counted_in(database: Database) -> None:
    """``wallet.usage`` totals count an event in the minute it OCCURRED (UsageTotals keys by
    ``occurred_at``); the re-rate's correction is keyed by the minute it was RECORDED. Usage
    reported late (occurred two days before it was recorded) keeps 1000 on the day it
    occurred and gets +1000 on the day it was recorded: both days' usage are wrong."""
    cid, aid = uid("co"), uid("acct")
    late = msgspec.structs.replace(
        used(cid, aid, "late", 1_000, at(20)), occurred_at=at(20) - timedelta(days=2)
    )
    async with database.unit() as uow:
        outcome = await apply_usage(uow.conn, [late])
    counted: dict[str, int] = {}
    for m in (events.parse_message(r[2]) for r in outcome.messages):
        if m.type == "wallet.usage":
            for t in m.data.totals:  # type: ignore[attr-defined]
                counted[str(t.minute)] = counted.get(str(t.minute), 0) + t.amount_micros
    rows = await hear(database, rebilling(cid, aid, 1, "rebill_markup", "2", effective=at(10)))
    for m in (events.parse_message(r[2]) for r in rows):
        if m.type == "wallet.usage":
            for c in m.data.corrections:  # type: ignore[attr-defined]
                counted[str(c.minute)] = counted.get(str(c.minute), 0) + c.amount_micros
    assert await charged_for(database, aid) == {"late": 2_000}
    assert sorted(counted.values()) == [2_000], f"usage by minute after the re-rate: {counted}"

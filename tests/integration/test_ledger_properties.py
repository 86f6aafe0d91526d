"""Property: for any sequence of usage, credits, rebilling changes and duplicate deliveries,
the wallet's ledger (real Postgres, the service's own storage and posting code) ends with
balances equal to the sum of their transfers, to a simple reference model, and summing to 0."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally import db
from tally.events import RebillingSettings, RecordedUsage
from tally.money import apply_markup
from tally_wallet import storage
from tally_wallet.credits import credit
from tally_wallet.domain import LedgerError, Transfer, Wallet, platform_revenue_wallet_id
from tally_wallet.usage import apply_usage
from tests.support.builders import recorded_usage, run_in_fresh_loop
from tests.support.stack import Infra, uid

ACCOUNT_COMPANY = {"a1": "A", "a2": "B"}
MARKUPS = ["1", "1.5", "2", "3.333333"]


@dataclass(frozen=True)
class Usage:
    event: int
    company: str
    account: str | None
    amount: int


@dataclass(frozen=True)
class Credit:
    target: str  # "company:A" or "account:a1"
    key: int
    amount: int


@dataclass(frozen=True)
class Settings:
    account: str
    mode: str
    markup: str
    active: bool


usage = st.builds(
    lambda e, acct, amount: Usage(
        e, ACCOUNT_COMPANY[acct] if acct else ("A" if e % 2 else "B"), acct, amount
    ),
    st.integers(0, 12),
    st.sampled_from([None, "a1", "a2"]),
    st.integers(1, 2_000_000),
)
credit_op = st.builds(
    Credit,
    st.sampled_from(["company:A", "company:B", "account:a1", "account:a2"]),
    st.integers(0, 4),
    st.integers(1, 5_000_000),
)
settings_op = st.builds(
    Settings,
    st.sampled_from(["a1", "a2"]),
    st.sampled_from(["off", "rebill", "rebill_markup"]),
    st.sampled_from(MARKUPS),
    st.booleans(),
)
operations = st.lists(st.one_of(usage, usage, credit_op, settings_op), min_size=1, max_size=40)


def model(ops: list[Any]) -> dict[str, int]:
    balances: dict[str, int] = {}
    seen_events: set[tuple[str, int]] = set()  # an event id is unique within its company
    seen_credits: set[tuple[str, int]] = set()
    rebill: dict[str, Settings] = {}
    for op in ops:
        if isinstance(op, Usage):
            if (op.company, op.event) in seen_events:
                continue
            seen_events.add((op.company, op.event))
            balances[f"company:{op.company}"] = balances.get(f"company:{op.company}", 0) - op.amount
            s = rebill.get(op.account) if op.account else None
            if s and s.active and s.mode != "off":
                charge = op.amount if s.mode == "rebill" else apply_markup(op.amount, Decimal(s.markup))
                key = f"account:{op.account}"
                balances[key] = balances.get(key, 0) - charge
        elif isinstance(op, Credit):
            if (op.target, op.key) in seen_credits:
                continue
            seen_credits.add((op.target, op.key))
            balances[op.target] = balances.get(op.target, 0) + op.amount
        else:
            rebill[op.account] = op
    return balances


async def apply_ops(dsn: str, schema: str, run: str, ops: list[Any]) -> dict[str, int]:
    pool = await db.create_pool(dsn, schema, size=2)
    try:
        await db.migrate(pool, schema, "tally")
        await db.migrate(pool, schema, "tally_wallet")
        now = datetime.now(UTC)
        version = itertools.count(1)

        def ids(name: str) -> str:
            return f"{run}-{name}"

        async with pool.acquire() as conn:
            for op in ops:
                async with conn.transaction():
                    if isinstance(op, Usage):
                        # recorded as it is posted: settings without a date take effect when
                        # heard (docs/0025), so this usage comes after the settings before it
                        now = datetime.now(UTC)
                        await apply_usage(
                            conn,
                            [
                                RecordedUsage(
                                    event_id=ids(f"e{op.event}"),
                                    company_id=ids(op.company),
                                    account_id=ids(op.account) if op.account else None,
                                    service="ai",
                                    quantity="1",
                                    occurred_at=now,
                                    recorded_at=now,
                                    unit_price_micros=op.amount,
                                    platform_amount_micros=op.amount,
                                    currency="USD",
                                )
                            ],
                        )
                    elif isinstance(op, Credit):
                        kind, owner = op.target.split(":")
                        company = ACCOUNT_COMPANY[owner] if kind == "account" else owner
                        wallet = Wallet(
                            f"{kind}:{ids(owner)}",
                            kind,  # type: ignore[arg-type]
                            "USD",
                            company_id=ids(company),
                            account_id=ids(owner) if kind == "account" else None,
                        )
                        await credit(
                            conn,
                            wallet,
                            amount=op.amount,
                            kind="manual_credit",
                            key=f"{run}-{op.target}-{op.key}",
                            system="manual_credits",
                        )
                    else:
                        await storage.upsert_rebilling(
                            conn,
                            RebillingSettings(
                                account_id=ids(op.account),
                                company_id=ids(ACCOUNT_COMPANY[op.account]),
                                mode=op.mode,
                                markups={"default": op.markup},
                                active=op.active,
                                version=next(version),
                            ),
                            "USD",
                        )
            rows = await conn.fetch(storage.LEDGER_BALANCES)
            assert all(r["balance"] == r["derived"] for r in rows), "materialised != derived"
            assert sum(r["balance"] for r in rows) == 0, "double entry broken"
            prefix = {"company": f"company:{run}-", "account": f"account:{run}-"}
            out = {}
            for r in rows:
                for kind, p in prefix.items():
                    if r["id"].startswith(p) and r["balance"] != 0:
                        out[f"{kind}:{r['id'][len(p) :]}"] = r["balance"]
            return out
    finally:
        await pool.close()


def test_ledger_matches_the_reference_model(infra: Infra) -> None:
    dsn = infra.stack.database_url
    schema = "wallet_props"
    counter = itertools.count()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(operations)
    def check(ops: list[Any]) -> None:
        # Every example runs its operations, then delivers them all a second time (duplicates).
        run = f"{uid('p')}-{next(counter)}"
        replayed = ops + [op for op in ops if not isinstance(op, Settings)]
        got = run_in_fresh_loop(apply_ops(dsn, schema, run, replayed))
        want = {k: v for k, v in model(replayed).items() if v != 0}
        assert got == want

    check()


async def test_a_wallet_created_by_a_rolled_back_batch_is_created_again(infra: Infra) -> None:
    """A wallet whose creating batch rolled back (a redelivery's unique-key failure does that)
    does not exist: the next posting's update finds no row, and it is created and moved then."""
    pool = await db.create_pool(infra.stack.database_url, "wallet_props", size=1)
    try:
        await db.migrate(pool, "wallet_props", "tally")
        await db.migrate(pool, "wallet_props", "tally_wallet")
        wallet = Wallet(f"company:{uid('co')}", "company", "USD", company_id="c")
        revenue = Wallet(platform_revenue_wallet_id("USD", 0), "system", "USD")
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await storage.post(
                conn, [wallet, revenue], [Transfer(uid("t"), wallet.id, revenue.id, 3, "usage")]
            )
            await tx.rollback()
            assert await storage.get_wallet(conn, wallet.id) is None
            async with conn.transaction():
                posting = await storage.post(
                    conn, [wallet, revenue], [Transfer(uid("t"), wallet.id, revenue.id, 7, "usage")]
                )
            assert posting.posted[0].debit_after == -7
            moved = await storage.get_wallet(conn, wallet.id)
            assert moved is not None and moved.balance == -7 and moved.status == "suspended"
    finally:
        await pool.close()


async def test_a_company_paying_in_two_currencies_is_a_ledger_error_not_a_crash(infra: Infra) -> None:
    """A batch where one company's usage comes in two currencies (a price set in EUR while its
    wallet is in USD): the mismatched event must be a LedgerError (dead-lettered alone by the
    handler), never an exception that fails the whole batch forever."""
    pool = await db.create_pool(infra.stack.database_url, "wallet_props", size=1)
    try:
        await db.migrate(pool, "wallet_props", "tally")
        await db.migrate(pool, "wallet_props", "tally_wallet")
        cid, now = uid("co"), datetime.now(UTC)

        def used(currency: str) -> RecordedUsage:
            return RecordedUsage(
                event_id=uid("ev"),
                company_id=cid,
                service="ai",
                quantity="1",
                occurred_at=now,
                recorded_at=now,
                unit_price_micros=5,
                platform_amount_micros=5,
                currency=currency,
            )

        usd, eur = used("USD"), used("EUR")
        async with pool.acquire() as conn:
            with pytest.raises(LedgerError, match="cannot pay"):
                async with conn.transaction():
                    await apply_usage(conn, [usd, eur])
            async with conn.transaction():  # the handler's fallback: one by one
                assert (await apply_usage(conn, [usd])).posted == 1
            with pytest.raises(LedgerError, match="cannot pay"):
                async with conn.transaction():
                    await apply_usage(conn, [eur])
            wallet = await storage.get_wallet(conn, f"company:{cid}")
            assert wallet is not None and wallet.balance == -5
    finally:
        await pool.close()


async def test_one_id_from_three_companies_is_three_events(infra: Infra) -> None:
    """Three companies' events with one id (docs/0021): in one batch, in two batches,
    optimistic or not, each company is charged once; the first posted keeps the bare key."""
    pool = await db.create_pool(infra.stack.database_url, "wallet_props", size=1)
    try:
        await db.migrate(pool, "wallet_props", "tally")
        await db.migrate(pool, "wallet_props", "tally_wallet")
        shared = uid("ev")
        a, b, c = uid("co"), uid("co"), uid("co")

        def used(cid: str, amount: int) -> RecordedUsage:
            return recorded_usage(cid, shared, amount)

        async with pool.acquire() as conn:
            async with conn.transaction():  # one batch, A's first
                assert (await apply_usage(conn, [used(a, 1), used(b, 2)], optimistic=True)).posted == 2
            for optimistic in (True, False):  # a later batch: C's is new, A's and B's are not
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    async with conn.transaction():
                        batch = [used(b, 2), used(c, 3), used(a, 1)]
                        assert (await apply_usage(conn, batch, optimistic=optimistic)).posted == 1
            for cid, amount in ((a, 1), (b, 2), (c, 3)):
                wallet = await storage.get_wallet(conn, f"company:{cid}")
                assert wallet is not None and wallet.balance == -amount, cid
            keys = {
                r["key"]
                for r in await conn.fetch("SELECT key FROM transfers WHERE usage_event_id = $1", shared)
            }
            assert keys == {
                f"usage:{shared}:company",
                f"usage:{b}/{shared}:company",
                f"usage:{c}/{shared}:company",
            }
    finally:
        await pool.close()

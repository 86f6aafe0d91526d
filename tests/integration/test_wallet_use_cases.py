"""The wallet's use cases called as plain functions — no HTTP, no broker — on a unit of work over
the real Postgres: manual credits (once per key, per-company system wallets, the range of a
balance), the credit-request workflow, settings changes, and the tenant check before the body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import asyncpg
import httpx
import pytest

from tally import events
from tally.auth import Principal
from tally.errors import ApiError
from tally.idempotency import Stored
from tally.uow import Database
from tally_wallet import credit_requests, credits, storage, wallets
from tally_wallet.schemas import CreditOut, CreditRequestOut
from tally_wallet.wallet_settings import SettingsPatch
from tally_wallet.wallets import Target
from tests.support.databases import service_database
from tests.support.stack import Infra, uid


class Directory:
    """rebilling's answers, as the wallet's CompanyDirectory gives them."""

    def __init__(self, currencies: dict[str, str] | None = None) -> None:
        self.known = currencies or {}

    async def currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        return {c: self.known[c] for c in company_ids if c in self.known}

    async def pinned_currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        return {c: self.known.get(c, "USD") for c in company_ids}

    async def rebilling_says(self, kind: str, id_: str) -> str | None:
        return self.known.get(id_) if kind == "company" else None

    async def currency_of(self, company_id: str, *, pin: bool = False) -> str:
        return self.known.get(company_id, "USD")


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    async with service_database(infra, "tally_wallet", "wallet_uc") as database:
        yield database


async def tenant(database: Database, currency: str = "USD", connected: bool = False) -> tuple[str, str]:
    cid, aid = uid("co"), uid("acct")
    async with database.unit() as uow:
        await storage.upsert_company(
            uow.conn,
            events.CompanyUpdated(
                company_id=cid, name=cid, plan="saas_pro", currency=currency, stripe_connected=connected
            ),
        )
        await storage.upsert_account(uow.conn, aid, cid)
    return cid, aid


def admin(cid: str) -> Principal:
    return Principal(sub=f"admin-{cid}", role="company_admin", company_id=cid, email=f"admin@{cid}.test")


def user(cid: str, aid: str) -> Principal:
    return Principal(sub=f"user-{aid}", role="account_user", company_id=cid, account_id=aid)


async def grant(database: Database, who: Principal, aid: str, amount: str, key: str | None = None) -> Any:
    return await credits.grant(
        database,
        Directory(),  # type: ignore[arg-type]
        who,
        Target("account", aid),
        amount=amount,
        reference=None,
        idempotency_key=key,
        fingerprint=f"credit {aid} {amount}",
    )


async def lines(database: Database, wallet_id: str) -> list[asyncpg.Record]:
    return await database.pool.fetch("SELECT * FROM transfers WHERE credit_wallet = $1", wallet_id)


async def test_a_manual_credit_is_posted_once_per_key_from_the_companys_own_system_wallet(
    database: Database,
) -> None:
    cid, aid = await tenant(database, "EUR")
    first = await grant(database, admin(cid), aid, "12.5", key="k1")
    again = await grant(database, admin(cid), aid, "12.5", key="k1")
    assert isinstance(first, CreditOut) and first.wallet.balance == "12.500000"
    assert first.wallet.currency == "EUR"
    assert isinstance(again, Stored) and again.response == first.model_dump(mode="json")
    [line] = await lines(database, f"account:{aid}")
    assert line["debit_wallet"] == f"system:manual_credits:{cid}:EUR"
    assert line["amount"] == 12_500_000
    balances = await database.pool.fetch("SELECT sum(balance)::bigint AS total FROM wallets")
    assert balances[0]["total"] == 0  # double entry: the system wallet is at -12.5


async def test_another_tenants_wallet_is_not_found_before_the_amount_is_read(database: Database) -> None:
    cid, aid = await tenant(database)
    other, _ = await tenant(database)
    for amount in ("abc", "-1", "5"):
        with pytest.raises(ApiError) as err:
            await grant(database, admin(other), aid, amount)
        assert err.value.status == 404, amount
    with pytest.raises(ApiError) as err:
        await grant(database, admin(cid), aid, "abc")
    assert (err.value.status, err.value.code) == (422, "validation_error")
    assert await lines(database, f"account:{aid}") == []


async def test_a_credit_past_what_a_wallet_holds_is_a_422_and_moves_nothing(database: Database) -> None:
    cid, aid = await tenant(database)
    for _ in range(9):
        assert isinstance(await grant(database, admin(cid), aid, "999999999999.999999"), CreditOut)
    with pytest.raises(ApiError) as err:
        await grant(database, admin(cid), aid, "999999999999.999999")
    assert (err.value.status, err.value.code) == (422, "validation_error")
    assert len(await lines(database, f"account:{aid}")) == 9


async def test_a_credit_request_is_approved_once_and_credits_once(database: Database) -> None:
    cid, aid = await tenant(database)
    asked = await credit_requests.request_credits(
        database,
        Directory(),  # type: ignore[arg-type]
        user(cid, aid),
        aid,
        amount="7",
        reference="please",
        idempotency_key=None,
        fingerprint="cr",
    )
    assert isinstance(asked, CreditRequestOut) and asked.status == "pending"
    with pytest.raises(ApiError) as err:  # one pending request per account
        await credit_requests.request_credits(
            database,
            Directory(),  # type: ignore[arg-type]
            user(cid, aid),
            aid,
            amount="1",
            reference=None,
            idempotency_key=None,
            fingerprint="cr2",
        )
    assert err.value.code == "pending_request_exists"
    approved = await credit_requests.resolve(database.unit(), admin(cid), asked.id, "approved")
    assert approved["status"] == "approved"
    with pytest.raises(ApiError) as err:
        await credit_requests.resolve(database.unit(), admin(cid), asked.id, "rejected")
    assert err.value.code == "request_not_pending"
    [line] = await lines(database, f"account:{aid}")
    assert (line["amount"], line["kind"]) == (7_000_000, "credit_request")


async def test_a_connected_company_tops_up_instead_of_requesting(database: Database) -> None:
    cid, aid = await tenant(database, connected=True)
    with pytest.raises(ApiError) as err:
        await credit_requests.request_credits(
            database,
            Directory(),  # type: ignore[arg-type]
            user(cid, aid),
            aid,
            amount="7",
            reference=None,
            idempotency_key=None,
            fingerprint="cr",
        )
    assert (err.value.status, err.value.code) == (409, "top_up_available")


async def test_a_settings_change_is_kept_and_published_with_the_balance(database: Database) -> None:
    cid, aid = await tenant(database)
    view = await wallets.update_settings(
        database,
        Directory(),  # type: ignore[arg-type]
        user(cid, aid),  # the spec lets account owners change their own
        Target("account", aid),
        SettingsPatch(threshold="3", reload_amount="20", auto_recharge=True),
    )
    assert (view.wallet.threshold, view.wallet.reload_amount, view.wallet.auto_recharge) == (
        3_000_000,
        20_000_000,
        True,
    )
    [row] = await database.pool.fetch("SELECT count(*) AS n FROM outbox")
    assert row["n"] >= 1  # wallet.settings_changed, in the same commit
    with pytest.raises(ApiError) as err:
        await wallets.update_settings(
            database,
            Directory(),  # type: ignore[arg-type]
            user(cid, aid),
            Target("account", aid),
            SettingsPatch(threshold="-1"),
        )
    assert err.value.status == 422


class Unreachable:
    async def currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        raise httpx.ConnectError("rebilling is down")

    async def pinned_currencies(self, company_ids: Iterable[str]) -> dict[str, str]:
        raise httpx.ConnectError("rebilling is down")

    async def rebilling_says(self, kind: str, id_: str) -> str | None:
        raise httpx.ConnectError("rebilling is down")

    async def currency_of(self, company_id: str, *, pin: bool = False) -> str:
        raise httpx.ConnectError("rebilling is down")


async def test_settings_of_a_company_no_one_created_are_refused(database: Database) -> None:
    ghost, fresh = uid("co"), uid("co")
    outbox_before = await database.pool.fetchval("SELECT count(*) FROM outbox")
    for directory, status in ((Directory(), 404), (Unreachable(), 503)):
        with pytest.raises(ApiError) as err:
            await wallets.update_settings(
                database,
                directory,  # type: ignore[arg-type]
                admin(ghost),
                Target("company", ghost),
                SettingsPatch(threshold="5"),
            )
        assert err.value.status == status
    assert await database.pool.fetchval("SELECT count(*) FROM wallets WHERE company_id = $1", ghost) == 0
    assert await database.pool.fetchval("SELECT count(*) FROM outbox") == outbox_before
    # created in rebilling a moment ago: known from its answer, in its currency
    view = await wallets.update_settings(
        database,
        Directory({fresh: "EUR"}),  # type: ignore[arg-type]
        admin(fresh),
        Target("company", fresh),
        SettingsPatch(threshold="5"),
    )
    assert (view.wallet.currency, view.wallet.threshold) == ("EUR", 5_000_000)


async def test_a_hung_rebilling_holds_no_connection_while_asked_about_unknown_accounts(
    database: Database,
) -> None:
    """Found by the attack on docs/0027's second version: credits (and credit requests) naming
    accounts the wallet had not heard of asked rebilling inside their transaction. With
    rebilling hung, a flood of them held every connection of the pool, and every other wallet,
    and the usage consumer, waited. Now rebilling is asked with no connection held: a known
    wallet is shown while the asks still wait (the pool has 4 connections; 12 asks wait)."""
    cid, aid = await tenant(database)
    released = asyncio.Event()
    asked = 0

    class Hung(Directory):
        async def rebilling_says(self, kind: str, id_: str) -> str | None:
            nonlocal asked
            asked += 1
            await released.wait()
            return None

    hung = Hung()

    async def credit_unknown() -> int:
        with pytest.raises(ApiError) as err:
            await credits.grant(
                database,
                hung,  # type: ignore[arg-type]
                admin(cid),
                Target("account", uid("acct")),
                amount="1",
                reference=None,
                idempotency_key=None,
                fingerprint="flood",
            )
        return err.value.status

    flood = [asyncio.create_task(credit_unknown()) for _ in range(12)]
    while asked < 12:
        await asyncio.sleep(0.01)
    shown = await asyncio.wait_for(wallets.show(database, hung, admin(cid), Target("account", aid)), 10)  # type: ignore[arg-type]
    assert shown.wallet.account_id == aid and not released.is_set()
    released.set()
    assert await asyncio.gather(*flood) == [404] * 12


async def test_a_credit_racing_the_companys_creation_is_posted_in_the_currency_it_opened_in(
    database: Database,
) -> None:
    """Found by the attack on the review's version (2026-12-05): a platform admin's credit read
    a company no one had created (a default USD wallet); the company was then created in EUR
    and another credit opened its wallet in EUR before this one was pinned. The credit posted
    from a USD source to the EUR wallet, and answered 500. Stands in for the race: the pin is
    where the company is created and the other credit lands."""
    cid = uid("co")
    platform = Principal(sub="platform", role="platform_admin")

    async def credit(directory: Directory, amount: str, fingerprint: str) -> object:
        return await credits.grant(
            database,
            directory,  # type: ignore[arg-type]
            platform,
            Target("company", cid),
            amount=amount,
            reference=None,
            idempotency_key=None,
            fingerprint=fingerprint,
        )

    class CreatedMeanwhile(Directory):
        async def currency_of(self, company_id: str, *, pin: bool = False) -> str:
            if not pin:
                return "USD"  # find: not created yet
            await credit(Directory({cid: "EUR"}), "2", "the other credit")
            return "EUR"

    out = await credit(CreatedMeanwhile(), "1.5", "this credit")
    assert isinstance(out, CreditOut)
    assert (out.wallet.currency, out.wallet.balance) == ("EUR", "3.500000")
    assert len(await lines(database, f"company:{cid}")) == 2

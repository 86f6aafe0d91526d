"""rebilling's use cases called as plain functions on a unit of work over the real Postgres (no
HTTP, no services): rebilling gated by plan, Stripe and the account's card; a downgrade or a
disconnection takes rebilling down with it; the tenant check before the body; every change
published in its own commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tally import events
from tally.auth import Principal
from tally.errors import ApiError
from tally.uow import Database
from tally_rebilling import accounts, companies, rebilling_settings, storage
from tally_rebilling.cards import CardEvent, follow_cards
from tally_rebilling.domain import current_period
from tally_rebilling.schemas import AccountIn, CompanyIn
from tests.support.databases import service_database
from tests.support.stack import Infra, uid

KNOWN = {"email", "sms", "phone", "ai", "whatsapp"}
PLATFORM = Principal(sub="ops", role="platform_admin")


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    async with service_database(infra, "tally_rebilling", "rebilling_uc") as database:
        yield database


def admin(cid: str) -> Principal:
    return Principal(sub=f"admin-{cid}", role="company_admin", company_id=cid, email=f"a@{cid}.test")


async def company(database: Database, plan: str = "saas_pro") -> tuple[str, str]:
    cid, aid = uid("co"), uid("ws")
    await companies.create(
        database.unit(),
        CompanyIn(id=cid, name="Agency", plan=plan, owner_email=f"owner-{cid}@example.com"),
    )
    client = AccountIn(id=aid, name="Client", owner_email=f"client-{aid}@example.com")
    await accounts.create(database.unit(), admin(cid), cid, client)
    return cid, aid


async def set_mode(database: Database, who: Principal, aid: str, mode: str, markups: dict[str, str]) -> str:
    out = await rebilling_settings.change(database.unit(), who, aid, mode, markups, KNOWN)  # type: ignore[arg-type]
    return out.mode


async def test_rebilling_is_gated_by_plan_stripe_and_card_in_that_order(database: Database) -> None:
    cid, aid = await company(database, plan="starter")
    with pytest.raises(ApiError) as err:
        await set_mode(database, admin(cid), aid, "rebill", {})
    assert (err.value.status, err.value.code) == (403, "plan_upgrade_required")
    await companies.change_plan(database.unit(), admin(cid), cid, "saas_pro")
    with pytest.raises(ApiError) as err:
        await set_mode(database, admin(cid), aid, "rebill_markup", {"sms": "2"})
    assert (err.value.status, err.value.code) == (409, "company_stripe_not_connected")
    await companies.connect_stripe(database.unit(), admin(cid), cid, "acct_test_1")
    with pytest.raises(ApiError) as err:
        await set_mode(database, admin(cid), aid, "rebill_markup", {"sms": "2"})
    assert (err.value.status, err.value.code) == (409, "account_card_required")
    async with database.unit() as uow:
        assert await storage.set_card(uow.conn, aid, True)
    assert await set_mode(database, admin(cid), aid, "rebill_markup", {"sms": "2.50"}) == "rebill_markup"
    shown = await rebilling_settings.show(database, admin(cid), aid)
    assert shown.markups == {"sms": "2.5"}


async def test_a_downgrade_and_a_disconnection_take_rebilling_down(database: Database) -> None:
    cid, aid = await company(database)
    await companies.connect_stripe(database.unit(), admin(cid), cid, "acct_test_2")
    async with database.unit() as uow:
        await storage.set_card(uow.conn, aid, True)
    await set_mode(database, admin(cid), aid, "rebill_markup", {"default": "1.5"})
    await companies.change_plan(database.unit(), admin(cid), cid, "unlimited")  # markup needs saas_pro
    assert (await rebilling_settings.show(database, admin(cid), aid)).mode == "rebill"
    await companies.disconnect_stripe(database.unit(), admin(cid), cid)
    assert (await rebilling_settings.show(database, admin(cid), aid)).mode == "off"
    # each change is in the outbox with its state (the relay sends it after the commit)
    [row] = await database.pool.fetch("SELECT sum(count)::int AS n FROM outbox")
    assert row["n"] >= 5


async def test_another_tenants_account_is_not_found_whatever_the_markups(database: Database) -> None:
    _, aid = await company(database)
    other, _ = await company(database)
    for markups in ({"sms": "99"}, {"nope": "2"}, {}):
        with pytest.raises(ApiError) as err:
            await set_mode(database, admin(other), aid, "rebill_markup", markups)
        assert err.value.status == 404, markups
    cid = (await accounts.show(database, PLATFORM, aid))["company_id"]
    with pytest.raises(ApiError) as err:  # its own admin is told what is wrong with the body
        await set_mode(database, admin(cid), aid, "rebill_markup", {"sms": "99"})
    assert (err.value.status, err.value.code) == (422, "invalid_markup")


async def test_a_company_is_created_once(database: Database) -> None:
    cid, _ = await company(database)
    with pytest.raises(ApiError) as err:
        await companies.create(
            database.unit(),
            CompanyIn(id=cid, name="Again", plan="starter", owner_email="x@example.com"),
        )
    assert (err.value.status, err.value.code) == (409, "already_exists")


async def test_a_card_saved_brings_failed_legs_forward_and_never_pushes_a_due_one_back(
    database: Database,
) -> None:
    """Regression (CI, 2026-12-03): an account saved a card just before it was subscribed; the
    card event, handled while the subscribe was charging its first period, moved the due leg's
    time from the subscribe's instant to the consumer's ``now``, so the subscribe no longer saw
    it as due and answered ``charge: pending`` for a card that declines."""
    cid, aid = await company(database)
    opened = datetime.now(UTC)
    async with database.unit() as uow:
        sub = await storage.insert_subscription(
            uow.conn,
            {
                "id": uid("sub"),
                "account_id": aid,
                "company_id": cid,
                "product": "whatsapp",
                "deployment": "resell",
                "platform_price": 10_000_000,
                "company_price": 15_000_000,
                "first_period": current_period(opened),
            },
        )
        await storage.open_legs(uow.conn, sub, current_period(opened), opened)
    period = current_period(opened)

    def saved(at: datetime, *, account: bool, card: str | None = None) -> CardEvent:
        change = events.PaymentMethodChanged(
            company_id=cid,
            account_id=aid if account else None,
            payment_method=card or uid("pm"),
            has_valid_card=True,
        )
        return CardEvent(uid("ev"), at, True, change)

    async def due(at: datetime) -> set[str]:
        async with database.reading() as conn:
            return {r["leg"] for r in await storage.due_legs(conn, at, subscription_id=sub["id"])}

    async def fail_account_leg(tried: datetime, cards: tuple[str, ...]) -> None:
        async with database.unit() as uow:
            leg = await storage.lock_leg(uow.conn, sub["id"], period, "account")
            assert leg is not None
            await storage.settle_leg(
                uow.conn,
                leg,
                status="failed",
                failures=leg["failures"] + 1,
                next_try_at=tried + timedelta(hours=24),
                error="card_declined",
                tried_at=tried,
                cards=cards,
            )

    # the account's card, saved after the legs opened: both legs stay due at the opening instant
    async with database.unit() as uow:
        woken = await follow_cards(uow, [saved(opened + timedelta(milliseconds=5), account=True)])
    assert woken == 1
    assert await due(opened) == {"platform", "account"}

    # the account leg fails on the card it tried; its next try is a day later ...
    tried = datetime.now(UTC)
    await fail_account_leg(tried, ("pm_first",))
    assert await due(tried + timedelta(seconds=1)) == {"platform"}
    # ... that card, saved or made default again — before the try or after it — changes
    # nothing: the try charged it and saw it decline (the schedule is not spent on it) ...
    for when in (tried - timedelta(seconds=1), tried + timedelta(seconds=1)):
        async with database.unit() as uow:
            assert await follow_cards(uow, [saved(when, account=True, card="pm_first")]) == 0
        assert await due(tried + timedelta(seconds=2)) == {"platform"}
    # ... a card the try did not charge brings it forward
    async with database.unit() as uow:
        after = tried + timedelta(milliseconds=1)
        assert await follow_cards(uow, [saved(after, account=True, card="pm_new")]) == 1
    assert await due(datetime.now(UTC)) == {"platform", "account"}

    # a card saved before a try began that the try did not reach (it was saved while the try
    # read the payer's cards, across two services' clocks): brought forward all the same
    tried = datetime.now(UTC)
    await fail_account_leg(tried, ("pm_first",))
    async with database.unit() as uow:
        before = tried - timedelta(seconds=1)
        assert await follow_cards(uow, [saved(before, account=True, card="pm_second")]) == 1
    assert await due(datetime.now(UTC)) == {"platform", "account"}

    # the company's card concerns the platform leg only (still due: it keeps its time)
    async with database.unit() as uow:
        assert await follow_cards(uow, [saved(datetime.now(UTC), account=False)]) == 1
    assert await due(opened) == {"platform"}

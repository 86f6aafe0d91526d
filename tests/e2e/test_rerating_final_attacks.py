"""A final review's attack on docs/0025 through the public API: SaaS-plan accounts whose
rebilling turns on when a card is saved (``bump_rebilling``), with usage posted before, while
and after the card becomes known."""

from __future__ import annotations

import asyncio

from tests.e2e.test_rerating_public_attacks import (
    OFF,
    SMS_PRICE,
    Book,
    Setting,
    check_invariants,
    post_events,
)
from tests.support.builders import GOOD, Reseller, new_card
from tests.support.stack import Tally, eventually, uid

MARKUP: Setting = ("rebill_markup", "1.5")


async def test_saas_plan_account_first_usage_after_card_gets_the_account_leg(tally: Tally) -> None:
    """Accounts on a SaaS plan with rebilling on; usage flows before and right after the card
    is saved. Before: no leg (inactive, pending a card). After rebilling knows the card: 1.5x."""
    agency = await Reseller(tally).create()
    await agency.patch_wallet({"threshold": "0", "auto_recharge": False})
    await agency.fund("1000")
    plan = uid("plan")
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/saas-plans"),
        json={"id": plan, "name": "P", "rebilling": {"mode": "rebill_markup", "markups": {"default": "1.5"}}},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    accounts = [await agency.account(saas_plan_id=plan) for _ in range(4)]
    book = Book()
    for aid in accounts:
        await agency.patch_wallet({"threshold": "0", "auto_recharge": False}, aid)
        await agency.fund("1000", aid)
        for e in await post_events(tally, agency.cid, aid, 3):
            book.add(agency.cid, e, aid, SMS_PRICE, [OFF])

    async def one(aid: str) -> None:
        async def attached() -> bool:
            r = await tally.http.post(
                tally.url("recharge", f"/v1/accounts/{aid}/payment-methods"),
                json={"payment_method": await new_card(tally, GOOD)},
                headers=agency.user(aid),
            )
            return r.status_code == 201

        await eventually(attached, what="recharge to know the account")
        # usage while rebilling learns of the card: either side
        for e in await post_events(tally, agency.cid, aid, 5):
            book.add(agency.cid, e, aid, SMS_PRICE, [OFF, MARKUP])

        async def card_known() -> bool:
            r = await tally.http.get(tally.url("rebilling", f"/v1/accounts/{aid}"), headers=agency.admin)
            return bool(r.json()["has_valid_card"])

        await eventually(card_known, what="rebilling to learn of the card")
        for e in await post_events(tally, agency.cid, aid, 5):  # after: 1.5x, whatever the wallet heard
            book.add(agency.cid, e, aid, SMS_PRICE, [MARKUP])

    await asyncio.gather(*(one(a) for a in accounts))
    await check_invariants(tally, [agency], book)

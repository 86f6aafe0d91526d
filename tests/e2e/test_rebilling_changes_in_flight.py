"""Usage posted the moment a rebilling change is answered is charged by the new settings
(docs/0025), through the public API. Before, the wallet applied the settings it had heard:
turning rebilling on and posting at once left four of six first events without an account
leg, the reseller's revenue lost for good. Nothing here waits for the wallet to hear a change."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from tests.e2e.test_notifier import wait_total
from tests.support.builders import Reseller
from tests.support.stack import Tally, eventually

SMS_10 = Decimal("0.079")  # 10 sms at the platform price


async def lines_of(tally: Tally, agency: Reseller, aid: str | None) -> list[dict[str, Any]]:
    owner = f"accounts/{aid}" if aid else f"companies/{agency.cid}"
    r = await tally.http.get(tally.url("wallet", f"/v1/{owner}/wallet/transactions"), headers=agency.admin)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def test_usage_right_after_each_rebilling_change_is_charged_by_it(tally: Tally) -> None:
    agency = await Reseller(tally).create()
    accounts = [await agency.account() for _ in range(4)]
    await agency.patch_wallet({"threshold": "0", "auto_recharge": False})
    await agency.fund("10")  # the account wallets: pre-loaded by the card
    for aid in accounts:
        await agency.add_card(aid)
        await agency.patch_wallet({"threshold": "0", "auto_recharge": False}, aid)
        # Enough that no change's usage empties the wallet: an empty wallet is suspended and
        # its next usage refused, as soon as usage-meter hears of it (a race on a slow machine,
        # CI 2026-12-05), and suspension is not what this test is about.
        await agency.fund("1", aid)

    # (mode, markup, what the account pays for 10 sms under it)
    changes = [
        ("rebill_markup", "2", SMS_10 * 2),
        ("rebill_markup", "3", SMS_10 * 3),
        ("off", None, Decimal(0)),
        ("rebill", None, SMS_10),
    ]

    async def one_account(aid: str) -> None:
        for mode, markup, _ in changes:
            r = await agency.set_rebilling(aid, mode, {"default": markup} if markup else None)
            assert r.status_code == 200, r.text
            await agency.use(aid, "sms", "10")  # at once: the wallet may not have heard it yet

    await asyncio.gather(*(one_account(aid) for aid in accounts))

    owed = -sum(paid for _, _, paid in changes)  # adding a card may pre-load the wallet too
    for aid in accounts:

        async def settled(aid: str = aid) -> bool:
            return usage_of(await lines_of(tally, agency, aid)) == owed

        await eventually(settled, what=f"account {aid} charged by each change")
        wallet = await agency.wallet(aid)
        lines = await lines_of(tally, agency, aid)
        assert Decimal(wallet["balance"]) == sum(Decimal(line["amount"]) for line in lines)
        # the account's usage (notifier) follows the re-ratings: what it pays, or the
        # platform's price while not rebilled
        await wait_total(tally, agency, aid, "daily", "0.553000")
    company = await lines_of(tally, agency, None)
    assert usage_of(company) == -SMS_10 * len(changes) * len(accounts)  # the platform price, once each


def usage_of(lines: list[dict[str, Any]]) -> Decimal:
    """What usage cost a wallet: its usage legs and their adjustments."""
    return sum(
        (Decimal(line["amount"]) for line in lines if line["kind"] in ("usage", "adjustment")), Decimal(0)
    )

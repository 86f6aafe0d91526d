"""The auto-recharge rule while a retry waits (API.md, wallet): a retry whose reason went away
(auto-recharge turned off, the balance restored by a credit) charges nothing, and a card that
needs authentication fails without blocking the wallet. recharge runs here with retries 4 s
apart, restarted once for the module, so each test can act while a retry waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.builders import (
    DECLINES,
    GOOD,
    Agency,
    attach,
    attempts_where,
    configure,
    patch_company_wallet,
    recharges,
    succeeded_charges,
    wait_balance,
)
from tests.support.stack import Tally

THREE_DS = "4000002500003155"  # every charge requires 3-D Secure authentication


@pytest.fixture(scope="module", autouse=True)
async def slow_retries(tally: Tally) -> AsyncIterator[None]:
    """recharge with retries 4 s apart, so a test can act while one waits; then as before.
    Stopped gracefully: a killed one's consumer groups would wait out its session first."""
    await tally.stack.stop_service("recharge")
    tally.stack.spawn_service("recharge", env={"TALLY_RECHARGE_RETRY_SECONDS": "4,4"})
    await tally.stack.wait_ready("recharge")
    yield
    await tally.stack.stop_service("recharge")
    tally.stack.spawn_service("recharge")
    await tally.stack.wait_ready("recharge")


async def test_a_retry_after_the_owner_opted_out_charges_nothing(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    await attach(tally, agency, DECLINES)
    await agency.use("sms", "10")
    await attempts_where(
        tally,
        agency,
        "a failed round and a retry waiting",
        lambda a: [x["status"] for x in a] == ["pending", "failed"],
    )
    await patch_company_wallet(tally, agency, auto_recharge=False)
    await attach(tally, agency, GOOD)  # a good card now: the retry must still not charge
    attempts = await attempts_where(
        tally, agency, "the retry dropped", lambda a: [x["status"] for x in a] == ["cancelled", "failed"]
    )
    assert attempts[0]["tries"] == [] and attempts[0]["error"] == "auto_recharge_off"
    await asyncio.sleep(5)  # past the retry's time
    assert [a["status"] for a in await recharges(tally, agency)] == ["cancelled", "failed"]
    assert (await agency.wallet())["balance"] == "4.931000"
    assert await succeeded_charges(tally, await recharges(tally, agency)) == 0


async def test_a_credit_that_restores_the_balance_drops_the_pending_retry(tally: Tally) -> None:
    agency = Agency(tally)
    await configure(tally, agency, threshold="5", reload="10")
    await agency.fund("5.01")
    await attach(tally, agency, DECLINES)
    await agency.use("sms", "10")
    await attempts_where(
        tally, agency, "a retry waiting", lambda a: [x["status"] for x in a] == ["pending", "failed"]
    )
    await agency.fund("20")  # back above the threshold
    attempts = await attempts_where(
        tally, agency, "the retry dropped", lambda a: [x["status"] for x in a] == ["cancelled", "failed"]
    )
    assert attempts[0]["error"] == "balance_at_threshold"
    assert (await agency.wallet())["balance"] == "24.931000"
    assert (await agency.wallet())["auto_recharge"] is True


async def test_a_card_that_requires_authentication_fails_and_never_blocks_the_wallet(tally: Tally) -> None:
    """An off-session charge that ends in requires_action cannot complete without the customer:
    that try fails (authentication_required) and the next card is tried; it never leaves the
    recharge pending forever."""
    agency = Agency(tally)
    await configure(tally, agency, threshold="10", reload="25")
    await attach(tally, agency, THREE_DS)  # the pre-load tries it
    failed = await attempts_where(
        tally,
        agency,
        "the 3-D Secure try to fail",
        lambda a: any(t["decline_code"] == "authentication_required" for x in a for t in x["tries"]),
    )
    assert all(x["status"] != "succeeded" for x in failed)
    await attach(tally, agency, GOOD)  # a waiting retry is brought forward, or a new round
    wallet = await wait_balance(agency, "25.000000")
    assert wallet["status"] == "active"
    assert await succeeded_charges(tally, await recharges(tally, agency)) == 1

"""SIGKILL the wallet in the middle of a stream, restart it: every balance exactly right."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from decimal import Decimal

from tally.money import apply_markup
from tally_wallet.storage import LEDGER_BALANCES
from tests.support.stack import Tally, eventually, uid


async def test_wallet_killed_mid_stream_loses_nothing_and_doubles_nothing(tally: Tally) -> None:
    rng = random.Random(7)
    companies = [uid("crash-co") for _ in range(4)]
    rebilled = {c: uid("crash-acct") for c in companies[:2]}  # x1.5 markup on every service
    for cid, aid in rebilled.items():
        await tally.envelope(
            "rebilling.events",
            "account.created",
            {"account_id": aid, "company_id": cid, "name": aid},
            key=cid,
        )
        await tally.envelope(
            "rebilling.settings",
            "rebilling.settings",
            {
                "account_id": aid,
                "company_id": cid,
                "mode": "rebill_markup",
                "markups": {"default": "1.5"},
                "version": 1,
            },
            key=aid,
        )

    async def settings_known() -> bool:  # as each account wallet shows its rebilling
        for cid, aid in rebilled.items():
            r = await tally.http.get(
                tally.url("wallet", f"/v1/accounts/{aid}/wallet"),
                headers=tally.auth("company_admin", company_id=cid),
            )
            if r.status_code != 200 or r.json()["rebilling"] != "rebill_markup":
                return False
        return True

    await eventually(settings_known, what="rebilling settings")

    total = 6000
    expected_company = dict.fromkeys(companies, 0)
    expected_account = dict.fromkeys(rebilled.values(), 0)
    now = datetime.now(UTC).isoformat()
    messages = []
    for i in range(total):
        cid = rng.choice(companies)
        amount = rng.randint(1, 100_000)
        account = rebilled.get(cid)
        expected_company[cid] -= amount
        if account:
            expected_account[account] -= apply_markup(amount, Decimal("1.5"))
        eid = f"{cid}-{i}"
        messages.append(
            (
                cid,
                {
                    "id": f"usage:{eid}",
                    "type": "usage.recorded",
                    "time": now,
                    "source": "test",
                    "data": {
                        "event_id": eid,
                        "company_id": cid,
                        "account_id": account,
                        "service": "ai",
                        "quantity": "1",
                        "occurred_at": now,
                        "recorded_at": now,
                        "unit_price_micros": amount,
                        "platform_amount_micros": amount,
                        "currency": "USD",
                    },
                },
            )
        )

    async def ledger_lines() -> int:
        rows = await tally.sql(
            "wallet",
            "SELECT count(*) AS n FROM transfers WHERE debit_wallet = ANY($1::text[])",
            [f"company:{c}" for c in companies],
        )
        return int(rows[0]["n"])

    async def produce_stream() -> None:
        for start in range(0, total, 200):
            for cid, msg in messages[start : start + 200]:
                await tally.produce("usage.recorded", msg, key=cid)
            await asyncio.sleep(0.02)

    producer = asyncio.create_task(produce_stream())
    await eventually(lambda: _at_least(ledger_lines, 500), what="the stream to be flowing")
    tally.stack.kill("wallet")  # SIGKILL: no graceful anything
    killed_at = await ledger_lines()
    # Redeliver too: the first 300 messages once more, while the wallet is down.
    for cid, msg in messages[:300]:
        await tally.produce("usage.recorded", msg, key=cid)
    tally.stack.spawn_service("wallet")
    await tally.stack.wait_ready("wallet")
    await producer

    async def all_applied() -> bool:
        return await ledger_lines() == total

    await eventually(all_applied, timeout=120, what="every event in the ledger")
    assert killed_at < total, "the kill happened mid-stream"

    rows = await tally.sql(
        "wallet",
        "SELECT id, balance FROM wallets WHERE id = ANY($1::text[])",
        [f"company:{c}" for c in companies] + [f"account:{a}" for a in rebilled.values()],
    )
    balances = {r["id"]: r["balance"] for r in rows}
    for cid, want in expected_company.items():
        assert balances[f"company:{cid}"] == want, cid
    for aid, want in expected_account.items():
        assert balances[f"account:{aid}"] == want, aid
    legs = await tally.sql(
        "wallet",
        "SELECT count(*) AS n FROM transfers WHERE debit_wallet = ANY($1::text[])",
        [f"account:{a}" for a in rebilled.values()],
    )
    assert legs[0]["n"] == sum(1 for cid, _ in messages if cid in rebilled)
    check = await tally.sql("wallet", LEDGER_BALANCES)
    assert check and all(r["balance"] == r["derived"] for r in check)


async def _at_least(count: object, n: int) -> bool:
    return bool(await count() >= n)  # type: ignore[operator]

"""Attacks on usage-meter's price memory (``domain.priced_quantity``, #20) from the public API.
The unit side is tests/unit/test_usage_meter_final_attacks.py. Real stack.

A review found this in the memory's first version, now mended (only texts of 32 characters
or fewer are kept): the memory kept up to 4,096 quantities *as sent*, whatever their length.
A quantity of ~1.9 MB of valid text ("000…0.000001": leading zeros are accepted, and it
costs 0 micros) is accepted over POST /v1/usage and then kept by the usage-meter process: a
product token grows the process ~2 MB an event, up to ~8 GB, where the chart gives it 512 MiB
(768 MiB in production). Before the memory the process kept nothing of it.

The others held and are kept as guards: a price changed through PUT /v1/prices between
events with the same quantity text charges the new price (and the old one when put back);
events with a field nobody reads ("metadata") are taken exactly as before, alone or in a batch
beside plain ones, and charged once."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tests.support.builders import funded
from tests.support.stack import Tally, micros, uid


async def post(tally: Tally, body: Any) -> list[dict[str, Any]]:
    r = await tally.post_usage(body)
    assert r.status_code == 202, r.text
    return r.json()["results"]  # type: ignore[no-any-return]


async def put_price(tally: Tally, service: str, unit_price: str, currency: str = "USD") -> None:
    r = await tally.http.put(
        tally.url("usage-meter", f"/v1/prices/{service}"),
        headers=tally.auth("platform_admin"),
        json={"unit": "u", "unit_price": unit_price, "currency": currency},
    )
    assert r.status_code == 200, r.text


async def amounts(tally: Tally, cid: str, eids: list[str]) -> dict[str, list[int]]:
    await tally.wait_applied(cid, eids[-1])
    await asyncio.sleep(0.5)
    lines = await tally.company_transactions(cid)
    return {e: [micros(t["amount"]) for t in lines if t["usage_event_id"] == e] for e in eids}


async def test_held_a_price_changed_between_events_with_the_same_quantity_text(tally: Tally) -> None:
    """The same texts ("1.5", "01.500000", " 1.5 ") at 0.001234, then 0.002, then 0.001234
    again: each event charged quantity x the price of its moment, half-up, once."""
    service = f"fa{uid('s')[-8:]}"
    cid = await funded(tally, "100.00")
    expected: dict[str, list[int]] = {}
    for unit_price, unit in (("0.001234", 1234), ("0.002", 2000), ("0.001234", 1234)):
        await put_price(tally, service, unit_price)
        for q, times_ten in (("1.5", 15), ("01.500000", 15), (" 1.5 ", 15), ("1.000000", 10)):
            eid = uid("ev")
            [res] = await post(tally, {"event_id": eid, "company_id": cid, "service": service, "quantity": q})
            assert res["status"] == "accepted", res
            expected[eid] = [-((times_ten * unit + 5) // 10)]  # half-up
    assert await amounts(tally, cid, list(expected)) == expected


async def test_held_unknown_fields_are_taken_as_before_and_charged_once(tally: Tally) -> None:
    """{"metadata": {...}} on an event alone, and one such event between plain ones in a
    batch: all accepted, each charged once; sent again, all duplicates."""
    service = f"fm{uid('s')[-8:]}"
    await put_price(tally, service, "0.01")
    cid = await funded(tally, "100.00")
    alone = {
        "event_id": uid("ev"),
        "company_id": cid,
        "service": service,
        "quantity": "2",
        "metadata": {"campaign": "x", "n": [1, 2.5, None]},
    }
    assert [r["status"] for r in await post(tally, alone)] == ["accepted"]
    batch = [
        {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": "1"},
        {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": "3", "metadata": "m"},
        {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": "4"},
    ]
    assert [r["status"] for r in await post(tally, {"events": batch})] == ["accepted"] * 3
    again = await post(tally, {"events": [alone, *batch]})
    assert [r["status"] for r in again] == ["duplicate"] * 4
    eids = [str(alone["event_id"]), *(str(e["event_id"]) for e in batch)]
    assert await amounts(tally, cid, eids) == dict(
        zip(eids, [[-20000], [-10000], [-30000], [-40000]], strict=True)
    )


def _rss_mb(tally: Tally) -> float:
    pid = tally.stack.pid("usage-meter")
    assert pid is not None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_long_quantity_texts_do_not_grow_usage_meter(tally: Tally) -> None:
    """Found by a review, mended: 40 events, each one quantity of ~1.9 MB of valid text
    costing 0 micros, are all accepted (as before), and usage-meter stays about the size it
    was (before the price memory it kept nothing of them). The first version grew by ~1.9 MB
    an event (~76 MB here; 4,096 such events keep ~8 GB)."""
    service = f"fl{uid('s')[-8:]}"
    await put_price(tally, service, "0.01")
    cid = await funded(tally, "100.00")
    warm = "0" * 1_900_000 + "0.000001"
    for _ in range(3):  # the process's buffers for such bodies, before measuring
        [res] = await post(
            tally, {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": warm}
        )
        assert res["status"] == "accepted", res
    before = _rss_mb(tally)
    for i in range(40):
        quantity = "0" * (1_900_000 + i) + "0.000001"
        raw = orjson.dumps(
            {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": quantity}
        )
        r = await tally.http.post(
            tally.url("usage-meter", "/v1/usage"),
            content=raw,
            headers={**tally.auth("product"), "content-type": "application/json"},
        )
        assert r.status_code == 202 and r.json()["results"][0]["status"] == "accepted", r.text
    grown = _rss_mb(tally) - before
    assert grown < 30, f"usage-meter grew {grown:.0f} MB after 40 accepted events of ~1.9 MB"

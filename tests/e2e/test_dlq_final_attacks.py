"""A replay reaches every consumer group of its topic, not only the one that dead-lettered the
record (the last review of the change that made replays exact, docs/0023). The wallet applies
``rebilling.events`` without an inbox or versions: a genuine ``license.changed`` lettered by
another group (here the notifier's) and replayed after a newer one took the wallet's licenses
back, and a workspace holding a license was refused service (``no_license``). A topic that
carries state is now replayed only with ``--state``. What needs no broker of that review is
tests/unit/test_dead_letters.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.consumer import dlq_row
from tally.events import Topics
from tally.settings import Settings
from tally_cli import dlq
from tests.support.attacks import after_the_forgery
from tests.support.builders import GOOD, Reseller, attach
from tests.support.stack import Tally, eventually

# --- broke: a replay reaches every group of the topic -----------------------------------------


@pytest.fixture
def replayer(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> Tally:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=tally.stack.bootstrap))
    return tally


async def raw_license_changes(tally: Tally, aid: str, want: int) -> list[Any]:
    """The records of rebilling.events naming ``aid`` in a ``license.changed``, as the broker
    holds them (bytes, key, partition, offset), once at least ``want`` are there."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=tally.stack.bootstrap, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = [
            TopicPartition(Topics.REBILLING_EVENTS, p)
            for p in sorted(consumer.partitions_for_topic(Topics.REBILLING_EVENTS) or ())
        ]

        async def found() -> list[Any] | None:
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            out: list[Any] = []
            while batch := await consumer.getmany(timeout_ms=500):
                for records in batch.values():
                    out += [
                        r
                        for r in records
                        if r.value and b'"license.changed"' in r.value and aid.encode() in r.value
                    ]
            return out if len(out) >= want else None

        return await eventually(found, what=f"{want} license.changed of {aid}")
    finally:
        await consumer.stop()


async def test_a_letter_of_another_group_is_not_replayed_over_newer_licenses(replayer: Tally) -> None:
    tally = replayer
    agency = await Reseller(tally).create()
    await agency.patch_wallet({"auto_recharge": False})
    await attach(tally, agency, GOOD)
    aid = await agency.account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/service-status")

    async def status(reason: str) -> dict[str, Any] | None:
        r = await tally.http.get(url, headers=tally.auth("product"))
        return r.json() if r.status_code == 200 and r.json()["reason"] == reason else None

    await eventually(lambda: status("no_license"), what="no license")
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses"),
        json={"quantity": 2},
        headers=agency.admin,
    )
    assert r.status_code in (200, 201), r.text
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/licenses"), json={"quantity": 1}, headers=agency.admin
    )
    assert r.status_code == 201, r.text
    await eventually(lambda: status("ok"), what="the license in the wallet")

    changes = await raw_license_changes(tally, aid, 2)
    old = next(r for r in changes if orjson.loads(r.value)["data"]["account_assigned"] in (0, None))
    # the notifier's webhook consumer (another group) dead-lettered rebilling's own record
    _, key, letter, _, _ = dlq_row(old, "DataError: a webhook row refused", service="notifier")
    producer = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(Topics.dlq(Topics.REBILLING_EVENTS), letter, key=key)
    finally:
        await producer.stop()

    with pytest.raises(dlq.StateTopic):
        await dlq.replay(Topics.REBILLING_EVENTS)  # rebilling.events carries state
    assert (await dlq.replay(Topics.REBILLING_EVENTS, dry_run=True)).replayed >= 1
    await after_the_forgery(tally, agency.cid)
    rows = await tally.sql("wallet", "SELECT licenses FROM accounts WHERE account_id = $1", aid)
    got = (await tally.http.get(url, headers=tally.auth("product"))).json()
    assert got == {"allowed": True, "reason": "ok"}, (got, [r["licenses"] for r in rows])

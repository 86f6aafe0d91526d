"""Producing records onto the topics as an attacker inside the network could, and reading what
each service stored of companies and accounts (white box): shared by the e2e attacks on the
announcements (docs/0019) and on the outbox and facts (docs/0018)."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from tests.support.stack import Tally, eventually, uid


async def one_batch(
    p: AIOKafkaProducer, topic: str, key: str, records: list[tuple[bytes, list[tuple[str, bytes]]]]
) -> None:
    """Produce ``records`` (value, headers) as ONE Kafka record batch on the key's partition: a
    consumer fetches a record batch whole, so they reach the handler in one batch (as a relay's
    re-send can)."""
    parts = sorted(await p.partitions_for(topic))
    partition = parts[(murmur2(key.encode()) & 0x7FFFFFFF) % len(parts)]
    batch = p.create_batch()
    for value, headers in records:
        assert batch.append(key=key.encode(), value=value, timestamp=None, headers=headers) is not None
    await (await p.send_batch(batch, topic, partition=partition))


async def usage(tally: Tally, cid: str, service: str = "email", account: str | None = None) -> dict[str, Any]:
    """POST one event; its result (``event`` holds what was sent)."""
    e: dict[str, Any] = {"event_id": uid("ev"), "company_id": cid, "service": service, "quantity": "1"}
    if account:
        e["account_id"] = account
    r = await tally.post_usage(e)
    assert r.status_code == 202, r.text
    return {**r.json()["results"][0], "event": e}


STORES = ("usage_meter", "wallet", "recharge")  # the services that keep companies and accounts
_STORED = {
    "company": "SELECT currency FROM companies WHERE company_id = $1",
    "account": "SELECT company_id FROM accounts WHERE account_id = $1",
}


async def stored(tally: Tally, kind: str, id_: str) -> dict[str, str | None]:
    """What each service that keeps it stores of a company's currency or an account's company."""
    out: dict[str, str | None] = {}
    for schema in STORES:
        rows = await tally.sql(schema, _STORED[kind], id_)
        out[schema] = rows[0][0] if rows else None
    return out


async def all_store(tally: Tally, kind: str, id_: str, value: str) -> None:
    async def agreed() -> bool:
        return set((await stored(tally, kind, id_)).values()) == {value}

    await eventually(agreed, what=f"usage-meter, the wallet and recharge to store {kind} {id_} as {value}")


async def announce_account(tally: Tally, aid: str, cid: str, id_: str | None = None) -> None:
    """An ``account.created`` produced onto rebilling.events (keyed by the company), as anyone
    able to write to the topic could (``id_``: the message id, else a random one)."""
    data = {"account_id": aid, "company_id": cid, "name": aid}
    await tally.envelope("rebilling.events", "account.created", data, key=cid, id_=id_)


async def after_the_forgery(tally: Tally, cid: str) -> None:
    """Announce a new account of ``cid`` on its partition and wait until every service stores
    it: the records produced before it on that partition have been applied."""
    marker = uid("acct")
    await announce_account(tally, marker, cid)
    await all_store(tally, "account", marker, cid)

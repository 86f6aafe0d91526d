"""The notifier's outbound webhooks as plain functions over the real Postgres, sent over real
HTTP to a real receiver that checks every signature with its own implementation
(``tests/support/receiver``): consumer records become deliveries for the company's matching
endpoints only; failures are retried with growing waits and the same ``webhook-id``; an endpoint
that keeps failing is disabled and the company told; the per-endpoint bound holds; the SSRF guard
refuses private addresses without the flag and redirects are not followed; answers are kept to
a small excerpt; an event naming another company's account never leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tally import events
from tally.auth import Principal
from tally.errors import ApiError
from tally.settings import Settings
from tally.uow import Database
from tally_notifier import storage, webhook_endpoints, webhook_events
from tally_notifier.webhook_sender import WebhookSender, backoff
from tests.support.databases import service_database
from tests.support.receiver import Receiver, Served
from tests.support.stack import Infra, uid


@dataclass
class Record:
    """A consumed Kafka record, as the consumers get it."""

    key: bytes | None
    value: bytes
    topic: str = events.Topics.WALLET_EVENTS
    partition: int = 0
    offset: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "webhook_allow_private": True,
        "webhook_timeout_seconds": 2,
        "webhook_retry_base_seconds": 0.05,
        "webhook_retry_cap_seconds": 0.2,
        "webhook_retry_hours": 1,
        "webhook_endpoint_concurrency": 4,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    async with service_database(infra, "tally_notifier", "hooks") as database:
        yield database


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def Admin(company_id: str) -> Principal:
    return Principal(sub="admin", role="company_admin", company_id=company_id)


async def company(database: Database, name: str = "co", email: str | None = None) -> str:
    cid = uid(name)
    async with database.unit() as uow:
        await storage.upsert_company(uow.conn, cid, name, email, "UTC")
    return cid


async def endpoint(
    database: Database, receiver: Receiver, cid: str, path: str, types: list[str] | None = None
) -> str:
    created = await webhook_endpoints.register(
        database.unit(),
        Admin(cid),
        cid,
        url=receiver.url(path),
        event_types=types or ["*"],
        allow_private=True,
        idempotency_key=None,
        fingerprint="-",
    )
    assert isinstance(created, webhook_endpoints.Created)
    assert created.secret.startswith("whsec_")
    receiver.secrets[path] = created.secret
    return str(created.endpoint["id"])


def credited(
    cid: str, *, amount: int = 5_000_000, account: str | None = None, key: str | None = None
) -> Record:
    data = events.WalletCredited(
        wallet_id=f"w-{cid}",
        owner="account" if account else "company",
        company_id=cid,
        account_id=account,
        currency="USD",
        transfer_id=uid("t"),
        kind="manual_credit",
        amount_micros=amount,
        balance_micros=amount,
    )
    envelope = events.envelope("wallet.credited", data, source="wallet", id_=uid("ev"))
    return Record(key=(key or cid).encode(), value=orjson.dumps(envelope))


async def take(database: Database, *records: Record) -> int:
    async with database.unit() as uow:
        return await webhook_events.take_in(uow, list(records), service="notifier")


async def drain(sender: WebhookSender, until: Any, timeout: float = 10) -> None:
    """Step the sender until ``until()``, then let the attempts under way write their outcome
    (a receiver has its request a moment before the sender records the answer)."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "not delivered in time"
        if not await sender.step():
            await asyncio.sleep(0.05)
    await sender.settle()


async def delivery_rows(database: Database, eid: str) -> list[Any]:
    async with database.reading() as conn:
        return list(
            await conn.fetch(
                "SELECT id, status, attempts, last_error, response_code FROM webhook_deliveries "
                "WHERE endpoint_id = $1 ORDER BY seq",
                eid,
            )
        )


async def test_events_reach_the_companys_matching_endpoints_signed(
    database: Database, receiver: Receiver
) -> None:
    a, b = await company(database, "a"), await company(database, "b")
    everything = await endpoint(database, receiver, a, "/a-all")
    await endpoint(database, receiver, a, "/a-alerts", ["usage_alert.triggered"])
    await endpoint(database, receiver, b, "/b-all")
    sender = WebhookSender(database.pool, settings())
    try:
        first, second = credited(a), credited(a)
        assert await take(database, first, second, credited(b)) == 3  # a-all twice, b-all once
        assert await take(database, first) == 0  # redelivered: not queued again
        await drain(sender, lambda: len(receiver.received) == 3)
        assert sorted(receiver.ids("/a-all")) == sorted(orjson.loads(r.value)["id"] for r in (first, second))
        assert receiver.ids("/a-alerts") == []
        assert len(receiver.ids("/b-all")) == 1
        assert receiver.refused == []
        got = receiver.received[0]
        assert got.headers["webhook-signature"].startswith("v1,")
        assert got.body["type"] == "wallet.credited" and got.body["data"]["company_id"] in (a, b)
        rows = await delivery_rows(database, everything)
        assert [(r["status"], r["attempts"], r["response_code"]) for r in rows] == [("succeeded", 1, 200)] * 2
    finally:
        await sender.stop()


async def test_a_record_keyed_by_one_company_naming_another_is_not_queued(
    database: Database, receiver: Receiver
) -> None:
    a, b = await company(database, "a"), await company(database, "b")
    await endpoint(database, receiver, a, "/a")
    await endpoint(database, receiver, b, "/b")
    # keyed by a, about b: neither gets it (producers key these topics by company)
    assert await take(database, credited(b, key=a)) == 0
    # not JSON, keyed by a company with endpoints: dead-lettered, nothing queued
    async with database.unit() as uow:
        assert await webhook_events.take_in(uow, [Record(a.encode(), b"{")], service="notifier") == 0
        assert len(uow._rows) == 1  # the DLQ row


class Rebilling:
    """rebilling's public API as the directory asks it (``GET /v1/accounts/{aid}``): a real
    HTTP server that knows which company each account belongs to."""

    def __init__(self) -> None:
        self.accounts: dict[str, str] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        aid = scope["path"].rsplit("/", 1)[-1]
        company = self.accounts.get(aid)
        status, body = (200, {"account_id": aid, "company_id": company}) if company else (404, {})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(body)})


@pytest.fixture
async def rebilling() -> AsyncIterator[tuple[Rebilling, str]]:
    app = Rebilling()
    served = await Served(app).start()
    yield app, f"http://127.0.0.1:{served.port}"
    await served.stop()


async def test_an_event_naming_another_companys_account_never_leaves(
    database: Database, receiver: Receiver, rebilling: tuple[Rebilling, str]
) -> None:
    a, b = await company(database, "a"), await company(database, "b")
    hook = await endpoint(database, receiver, a, "/a")
    directory, url = rebilling
    directory.accounts = {"acct-of-b-" + b: b, "acct-of-a-" + a: a}
    # whatever the notifier's own table was told (a forged account.created), rebilling decides
    async with database.unit() as uow:
        await storage.upsert_account(uow.conn, "acct-of-b-" + b, a, "stolen", None)
    sender = WebhookSender(database.pool, settings(TALLY_REBILLING_URL=url))
    try:
        await take(database, credited(a, account="acct-of-b-" + b), credited(a, account="acct-of-a-" + a))
        await take(database, credited(a, account="never-heard-of"))
        await drain(sender, lambda: len(receiver.received) == 1)
        await asyncio.sleep(0.3)
        await sender.step()
        await asyncio.sleep(0.2)
        assert [r.body["data"]["account_id"] for r in receiver.received] == ["acct-of-a-" + a]
        statuses = sorted((r["status"], r["last_error"]) for r in await delivery_rows(database, hook))
        assert statuses == [
            ("dropped", "account of another company"),
            ("pending", None),  # unknown to rebilling: waits for it (up to an hour)
            ("succeeded", None),
        ]
    finally:
        await sender.stop()


async def test_failures_are_retried_with_the_same_id_until_the_receiver_answers(
    database: Database, receiver: Receiver
) -> None:
    a = await company(database, "a")
    hook = await endpoint(database, receiver, a, "/a")
    receiver.status = 503
    sender = WebhookSender(database.pool, settings())
    try:
        record = credited(a)
        await take(database, record)
        await drain(sender, lambda: receiver.requests >= 3)
        receiver.status = 200
        await drain(sender, lambda: len(receiver.received) == 1)
        assert receiver.ids() == [orjson.loads(record.value)["id"]]
        [row] = await delivery_rows(database, hook)
        assert row["status"] == "succeeded" and row["attempts"] >= 4
        _, attempts = await webhook_endpoints.show_delivery(database, Admin(a), row["id"])
        codes = [x["response_code"] for x in attempts]
        assert codes[-1] == 200 and set(codes[:-1]) == {503}
        assert attempts[0]["excerpt"] == "ok"
    finally:
        await sender.stop()


def test_the_wait_grows_fourfold_with_jitter_up_to_the_cap() -> None:
    waits = [backoff(n, 5, 21_600) for n in range(1, 12)]
    for n, w in enumerate(waits, start=1):
        nominal = min(5 * 4 ** (n - 1), 21_600)
        assert 0.75 * nominal <= w <= 1.25 * nominal
    # the default schedule keeps trying for more than a day before its 30 h window closes
    assert sum(min(5 * 4**n, 21_600) for n in range(12)) > 24 * 3600


async def test_a_delivery_is_given_up_after_its_window_and_a_manual_retry_is_one_attempt(
    database: Database, receiver: Receiver
) -> None:
    a = await company(database, "a")
    hook = await endpoint(database, receiver, a, "/a")
    receiver.status = 500
    sender = WebhookSender(database.pool, settings(webhook_retry_hours=0.5 / 3600))  # half a second
    try:
        await take(database, credited(a))
        await drain(sender, lambda: receiver.requests >= 1)
        await asyncio.sleep(0.6)
        await drain(sender, lambda: receiver.requests >= 2)
        await asyncio.sleep(0.3)
        [row] = await delivery_rows(database, hook)
        assert row["status"] == "failed"
        before = receiver.requests
        await webhook_endpoints.retry(database.unit(), Admin(a), row["id"])
        await drain(sender, lambda: receiver.requests == before + 1)
        await asyncio.sleep(0.3)
        await sender.step()
        assert receiver.requests == before + 1
        [row] = await delivery_rows(database, hook)
        assert row["status"] == "failed"
    finally:
        await sender.stop()


async def test_an_endpoint_failing_too_long_is_disabled_and_the_company_told(
    database: Database, receiver: Receiver
) -> None:
    a = await company(database, "a", email="owner@a.example")
    broken = await endpoint(database, receiver, a, "/broken")
    await endpoint(database, receiver, a, "/healthy", ["webhook_endpoint.disabled"])
    receiver.secrets["/broken"] = "whsec_" + "A" * 32  # its answers are 401s from now on
    sender = WebhookSender(database.pool, settings(webhook_disable_after_hours=0.3 / 3600))
    try:
        await take(database, credited(a), credited(a))
        await drain(sender, lambda: len(receiver.refused) >= 2)
        await asyncio.sleep(0.4)
        await drain(sender, lambda: len(receiver.ids("/healthy")) == 1)
        shown = await webhook_endpoints.show(database, Admin(a), broken)
        assert shown["status"] == "disabled"
        assert {r["status"] for r in await delivery_rows(database, broken)} == {"dropped"}
        [told] = receiver.received
        assert told.type == "webhook_endpoint.disabled" and told.body["data"]["endpoint_id"] == broken
        async with database.reading() as conn:
            kinds = [
                r["kind"] for r in await conn.fetch("SELECT kind FROM notifications WHERE company_id = $1", a)
            ]
            mails = await conn.fetchval("SELECT count(*) FROM emails WHERE recipients ? 'owner@a.example'")
        assert kinds == ["webhook_disabled"] and mails == 1
        # nothing more is queued for it; enabled again, it takes events again
        assert await take(database, credited(a)) == 0
        await webhook_endpoints.change(
            database, Admin(a), broken, url=None, event_types=None, enabled=True, allow_private=True
        )
        assert await take(database, credited(a)) == 1
    finally:
        await sender.stop()


async def test_deliveries_in_flight_per_endpoint_are_bounded(database: Database, receiver: Receiver) -> None:
    a = await company(database, "a")
    await endpoint(database, receiver, a, "/a")
    receiver.delay = 0.1
    sender = WebhookSender(database.pool, settings(webhook_endpoint_concurrency=3))
    try:
        await take(database, *(credited(a) for _ in range(12)))
        await drain(sender, lambda: len(receiver.received) == 12)
        assert receiver.max_in_flight == 3
    finally:
        await sender.stop()


async def test_private_addresses_are_refused_without_the_flag_and_redirects_not_followed(
    database: Database, receiver: Receiver
) -> None:
    a = await company(database, "a")
    with pytest.raises(ApiError) as refused:
        await webhook_endpoints.register(
            database.unit(),
            Admin(a),
            a,
            url=receiver.url("/a"),
            event_types=["*"],
            allow_private=False,
            idempotency_key=None,
            fingerprint="-",
        )
    assert (refused.value.status, refused.value.code) == (422, "url_not_allowed")
    hook = await endpoint(database, receiver, a, "/a")
    # registered while allowed; the flag is off at send time: refused before any connection
    strict = WebhookSender(database.pool, settings(webhook_allow_private=False))
    try:
        await take(database, credited(a))
        deadline = time.monotonic() + 10
        while not (rows := await delivery_rows(database, hook))[0]["attempts"]:
            assert time.monotonic() < deadline, "never attempted"
            await strict.step()
            await asyncio.sleep(0.05)
        [row] = rows
        assert row["attempts"] >= 1 and row["last_error"].startswith("refused:")
        assert receiver.requests == 0
    finally:
        await strict.stop()
    receiver.status, receiver.answer = 302, b"moved"
    sender = WebhookSender(database.pool, settings())
    try:
        await drain(sender, lambda: receiver.requests >= 1)
        [row] = await delivery_rows(database, hook)
        assert row["status"] == "pending" and row["response_code"] == 302
        assert receiver.requests == 1  # the Location was not followed
    finally:
        await sender.stop()


async def test_only_a_small_excerpt_of_the_answer_is_kept(database: Database, receiver: Receiver) -> None:
    a = await company(database, "a")
    hook = await endpoint(database, receiver, a, "/a")
    receiver.answer = b"x" * 1_000_000
    sender = WebhookSender(database.pool, settings())
    try:
        await take(database, credited(a))
        await drain(sender, lambda: len(receiver.received) == 1)
        [row] = await delivery_rows(database, hook)
        _, attempts = await webhook_endpoints.show_delivery(database, Admin(a), row["id"])
        assert len(attempts[0]["excerpt"]) == 512
    finally:
        await sender.stop()

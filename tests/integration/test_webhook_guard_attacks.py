"""Attacks on the outbound webhooks below the HTTP API: the SSRF guard with
``TALLY_WEBHOOK_ALLOW_PRIVATE`` off (``webhook_urls.check`` and the use case's
``checked_url``), and the sender and the consumer's queueing over the real Postgres against a
real receiver (``tests/support/receiver``).

The tests whose docstring starts "Fixed" each showed a defect the review of 2026-12-03 found;
they pass since the fix."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
import pytest

from tally.errors import ApiError
from tally_notifier import webhook_endpoints, webhook_events, webhook_urls
from tally_notifier.webhook_sender import WebhookSender
from tests.integration.test_webhook_delivery import (  # helpers and fixtures, no tests
    Record,
    company,
    credited,
    database,
    delivery_rows,
    endpoint,
    receiver,
    settings,
    take,
)
from tests.support.receiver import Receiver

__all__ = ["database", "receiver"]  # fixtures


async def refusal(url: str) -> tuple[int, str]:
    """(status, code) of the use case's refusal of ``url`` with the flag off."""
    with pytest.raises(ApiError) as refused:
        await webhook_endpoints.checked_url(url, allow_private=False)
    return refused.value.status, refused.value.code


# --- the SSRF guard, flag off -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://2130706433/",
        "http://127.1/",
        "http://0/",
        "http://0.0.0.0:8005/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[::1]/",
        "http://[::]/",
        "http://localhost./",
        "http://LOCALHOST:8005/",
        "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",  # fullwidth "localhost"
        "http://[fe80::1%25lo]/",
        "http://[fe80::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://[fd00::2]/",
        "http://[ff02::1]/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "https://127.0.0.1:443/",
    ],
)
async def test_loopback_private_and_link_local_spellings_are_refused(url: str) -> None:
    status, code = await refusal(url)
    assert status == 422 and code in ("url_not_allowed", "invalid_url"), (url, code)


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::a00:1]/",  # NAT64 well-known prefix (RFC 6052): 10.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64: 169.254.169.254 (cloud metadata)
        "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
        "http://[::7f00:1]/",  # IPv4-compatible 127.0.0.1 (deprecated)
    ],
)
async def test_ipv6_addresses_embedding_a_private_ipv4_are_refused(url: str) -> None:
    """Was a defect (guard gap): ``webhook_urls.public`` unwraps only IPv4-*mapped* addresses
    (``::ffff:a.b.c.d``); Python 3.11's ``is_global`` holds the NAT64 prefix ``64:ff9b::/96``,
    6to4 ``2002::/16`` and IPv4-compatible ``::a.b.c.d`` for global, so an endpoint on
    ``[64:ff9b::a9fe:a9fe]`` (the metadata service through a NAT64 gateway, standard on
    IPv6-only clusters) passes the guard. The embedded IPv4 should be checked too."""
    status, code = await refusal(url)
    assert (status, code) == (422, "url_not_allowed")


async def test_a_name_resolving_to_a_private_address_is_refused_and_rebinding_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: dict[str, list[str]] = {
        "hooks.internal.example": ["10.1.2.3"],
        "mixed.example": ["93.184.216.34", "10.1.2.3"],
        "rebinding.example": ["93.184.216.34"],
    }

    async def fake_getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    assert await refusal("http://hooks.internal.example/x") == (422, "url_not_allowed")
    assert await refusal("http://mixed.example/x") == (422, "url_not_allowed")
    assert await refusal("http://nowhere.example/x") == (422, "invalid_url")
    # at registration the name is public; the attempt connects to the checked address only
    target = await webhook_urls.check("https://rebinding.example:8443/h?q=1", allow_private=False)
    assert target.url == "https://93.184.216.34:8443/h?q=1"
    assert target.host == "rebinding.example:8443" and target.sni == "rebinding.example"
    answers["rebinding.example"] = ["10.9.9.9"]  # rebinds before the next attempt
    with pytest.raises(webhook_urls.UrlRefused) as later:
        await webhook_urls.check("https://rebinding.example:8443/h?q=1", allow_private=False)
    assert later.value.private


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "http://user@127.0.0.1/",
        "http://:pw@127.0.0.1/",
        "http:///nohost",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:-1/",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/\x00",
        "http://127.0.0.1/\u2028",
        " http://127.0.0.1/",
        "http://[::1/",
        "",
    ],
)
async def test_malformed_urls_are_invalid_even_with_the_flag_on(url: str) -> None:
    with pytest.raises(ApiError) as refused:
        await webhook_endpoints.checked_url(url, allow_private=True)
    assert (refused.value.status, refused.value.code) == (422, "invalid_url"), url


# --- the sender and the queueing, over Postgres -----------------------------------------


def with_id(record: Record, event_id: str) -> Record:
    envelope = orjson.loads(record.value)
    envelope["id"] = event_id
    return Record(key=record.key, value=orjson.dumps(envelope))


async def run_sender(sender: WebhookSender, seconds: float) -> list[str]:
    """Run the sender as the service runs it (its Worker loop) for a while; the errors its
    loop logged (an exception escaping a round)."""
    errors: list[str] = []
    original = sender.step

    async def step() -> bool:
        try:
            return bool(await original())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            raise

    sender.step = step  # type: ignore[method-assign]
    sender.start()
    await asyncio.sleep(seconds)
    return errors


async def test_an_idn_host_is_attempted_and_recorded(database: Any, receiver: Receiver) -> None:
    """Fixed (review 2026-12-03):
    the attempt sends the URL's host name as the ``Host`` header unencoded; httpx
    refuses a non-ASCII header value with ``UnicodeEncodeError``, which ``attempt`` does not
    catch. The delivery is never recorded (attempts 0, pending forever, never given up, the
    endpoint never disabled) and every round of the sender raises. Any IDN endpoint
    (``https://bücher.example/hooks``) is affected; here the fullwidth spelling of localhost,
    which resolves on this machine."""
    a = await company(database, "a")
    idn = f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{receiver.port}/idn"
    hook = await endpoint(database, receiver, a, "/idn")
    async with database.unit() as uow:
        await uow.conn.execute("UPDATE webhook_endpoints SET url = $2 WHERE id = $1", hook, idn)
    await take(database, credited(a))
    sender = WebhookSender(database.pool, settings())
    try:
        errors = await run_sender(sender, 1.5)
    finally:
        await sender.stop()
    [row] = await delivery_rows(database, hook)
    assert errors == [] and row["attempts"] >= 1, (errors[:1], dict(row))


async def test_a_non_ascii_event_id_neither_sticks_nor_duplicates_its_neighbours(
    database: Any, receiver: Receiver
) -> None:
    """Fixed (review 2026-12-03):
    an event id that is not ASCII (a wallet credit's id carries the client's
    Idempotency-Key, which Starlette reads as latin-1) becomes the ``webhook-id`` header:
    ``UnicodeEncodeError`` escapes ``attempt``; the ``gather`` in ``send_endpoint`` raises at
    once and its ``finally`` releases the endpoint's lease while the endpoint's other
    deliveries are still in flight, so the next round (0.5 s later) sends them again,
    concurrently: the same webhook-id posted several times, beyond the per-endpoint bound.
    The bad delivery itself stays pending with 0 attempts forever."""
    a = await company(database, "a")
    hook = await endpoint(database, receiver, a, "/a")
    receiver.delay = 1.6
    good = credited(a)
    await take(database, good, with_id(credited(a), "manual:account:x:0123456789abcdef:\u00e9t\u00e9"))
    sender = WebhookSender(database.pool, settings(webhook_timeout_seconds=5))
    try:
        errors = await run_sender(sender, 2.5)
    finally:
        await sender.stop()
    rows = {r["id"]: r for r in await delivery_rows(database, hook)}
    # both delivered once; the non-ASCII id travels percent-encoded as webhook-id (signed so)
    assert sorted(receiver.ids()) == sorted(
        [orjson.loads(good.value)["id"], "manual:account:x:0123456789abcdef:%C3%A9t%C3%A9"]
    )
    assert (errors[:1], receiver.requests, receiver.duplicates) == ([], 2, 0), [
        dict(r) for r in rows.values()
    ]


async def test_a_record_with_a_nul_in_its_id_is_dead_lettered_not_a_poison_pill(
    database: Any, receiver: Receiver
) -> None:
    """Fixed (review 2026-12-03):
    a readable record keyed by a company with endpoints whose event id (or
    ``account_id``) holds a NUL is queued as is; Postgres refuses the text, ``take_in`` raises,
    and the consumer retries the batch forever: one such record on ``wallet.events`` stops
    every company's wallet webhooks (see the e2e test). It should be dead-lettered."""
    a = await company(database, "a")
    await endpoint(database, receiver, a, "/a")
    poison = with_id(credited(a), "ev-\u0000-nul")
    other = credited(a, account="acct\u0000nul")
    for record in (poison, other):
        async with database.unit() as uow:
            try:
                await webhook_events.take_in(uow, [record], service="notifier")
            except Exception as exc:
                pytest.fail(f"take_in raised {type(exc).__name__}: {exc} (the batch is retried forever)")
            assert len(uow._rows) == 1  # dead-lettered


async def test_the_attempt_timeout_covers_name_resolution(
    database: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was a defect (minor): ``asyncio.timeout`` wraps the POST only; the URL check before it
    resolves the name again, unbounded, so a slow authoritative DNS server holds the attempt
    (and with it the sender's whole round, see the e2e head-of-line test) past the timeout."""
    a = await company(database, "a")
    hook = await endpoint(database, receiver, a, "/a")
    slow_resolve = webhook_urls.resolve

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(2.0)
        return list(await slow_resolve(host, port))

    await take(database, credited(a))
    monkeypatch.setattr(webhook_urls, "resolve", slow)
    sender = WebhookSender(database.pool, settings(webhook_timeout_seconds=0.5))
    try:
        started = time.monotonic()
        await sender.step()
        took = time.monotonic() - started
    finally:
        await sender.stop()
    [row] = await delivery_rows(database, hook)
    assert row["attempts"] == 1
    assert took < 1.0, f"one attempt took {took:.1f} s with a 0.5 s timeout"


async def test_the_same_event_on_two_records_is_one_delivery_and_a_forged_twin_is_ignored(
    database: Any, receiver: Receiver
) -> None:
    a = await company(database, "a")
    hook = await endpoint(database, receiver, a, "/a")
    first = credited(a, amount=1_000_000)
    twin = orjson.loads(first.value)
    twin["data"]["amount_micros"] = 9_000_000  # same id, another body
    assert await take(database, first, first, Record(first.key, orjson.dumps(twin))) == 1
    assert await take(database, first) == 0
    sender = WebhookSender(database.pool, settings())
    try:
        deadline = time.monotonic() + 5
        while not receiver.received and time.monotonic() < deadline:
            await sender.step()
            await asyncio.sleep(0.05)
    finally:
        await sender.stop()
    [got] = receiver.received
    assert got.body["data"]["amount_micros"] == 1_000_000
    assert [r["status"] for r in await delivery_rows(database, hook)] == ["succeeded"]

"""Attacks on the relay's hand-over (OutboxRelay.hand_over: usage-meter's one-statement groups,
the wallet's apply_usage through its unit of work) and on the 10 ms group interval
(TALLY_INGEST_GROUP_INTERVAL_MS), from the public API only: POST /v1/usage, usage.ingest, the
wallet's credits and ledger. Every test ends on the same money invariants: each event the
meter answered for is in its company's ledger exactly once, no event is answered "accepted"
twice, nothing else is charged, and the balance is the sum of the ledger's lines."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

import httpx
import orjson

from tests.support.builders import usage_event
from tests.support.stack import Tally, eventually, uid

SMS = Decimal("0.0079")


async def credit(tally: Tally, cid: str, amount: str) -> dict[str, Any]:
    r = await tally.http.post(
        tally.url("wallet", f"/v1/companies/{cid}/wallet/credits"),
        json={"amount": amount},
        headers={**tally.auth("platform_admin"), "Idempotency-Key": uid("k")},
    )
    assert r.status_code == 201, r.text
    return r.json()["wallet"]  # type: ignore[no-any-return]


async def all_lines(tally: Tally, cid: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = "?limit=500" + (f"&cursor={cursor}" if cursor else "")
        r = await tally.http.get(
            tally.url("wallet", f"/v1/companies/{cid}/wallet/transactions{q}"),
            headers=tally.auth("company_admin", company_id=cid),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["items"]
        cursor = body["next_cursor"]
        if not cursor:
            return out


class Ledger:
    """What the meter answered per (company, event id), for the checks at the end."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.sent: set[tuple[str, str]] = set()
        self.failures = 0  # requests not answered 202 (transport errors, 5xx, 429)
        self.lost: set[tuple[str, str]] = set()  # events of a request whose answer was lost

    def record(self, events: list[dict[str, str]], response: httpx.Response) -> None:
        for e, res in zip(events, response.json()["results"], strict=True):
            assert res["event_id"] == e["event_id"]
            self.answers[(e["company_id"], e["event_id"])].append(
                res["status"] if res["status"] != "rejected" else "rejected:" + res["error"]["code"]
            )

    def taken(self, cid: str) -> set[str]:
        """Event ids of ``cid`` the meter said it has (accepted now or before)."""
        return {
            eid for (c, eid), a in self.answers.items() if c == cid and ({"accepted", "duplicate"} & set(a))
        }

    def accepted_twice(self) -> dict[tuple[str, str], list[str]]:
        return {k: a for k, a in self.answers.items() if a.count("accepted") > 1}


async def post_until_answered(
    tally: Tally, ledger: Ledger, events: list[dict[str, str]], client: httpx.AsyncClient | None = None
) -> httpx.Response:
    """POST until a 202 (transport errors, 429, 5xx: the same body again, as a product retries)."""
    ledger.sent.update((e["company_id"], e["event_id"]) for e in events)
    http = client or tally.http
    deadline = time.monotonic() + 120
    while True:
        try:
            r = await http.post(
                tally.url("usage-meter", "/v1/usage"), json={"events": events}, headers=tally.auth("product")
            )
            if r.status_code == 202:
                ledger.record(events, r)
                return r
            assert r.status_code in (429, 500, 502, 503, 504), (r.status_code, r.text)
            if r.status_code != 429:
                ledger.failures += 1
                ledger.lost.update((e["company_id"], e["event_id"]) for e in events)
        except httpx.TransportError:
            ledger.failures += 1
            ledger.lost.update((e["company_id"], e["event_id"]) for e in events)
        assert time.monotonic() < deadline, "usage-meter never answered"
        await asyncio.sleep(0.05)


async def settled(tally: Tally, cid: str, expected: set[str], timeout: float = 90) -> list[dict[str, Any]]:
    """Wait until ``cid``'s ledger has a usage line for each of ``expected``; then check exactly
    once each, nothing else, and the balance equals the sum of the lines."""

    async def check() -> list[dict[str, Any]] | None:
        lines = await all_lines(tally, cid)
        have = {t["usage_event_id"] for t in lines if t["kind"] == "usage"}
        return lines if expected <= have else None

    try:
        lines = await eventually(check, timeout=timeout, what=f"{len(expected)} events in {cid}'s ledger")
    except AssertionError:
        lines = await all_lines(tally, cid)
        have = {t["usage_event_id"] for t in lines if t["kind"] == "usage"}
        missing = sorted(expected - have)
        raise AssertionError(
            f"{len(missing)} of {len(expected)} events answered accepted/duplicate never reached "
            f"{cid}'s ledger (e.g. {missing[:5]})"
        ) from None
    await asyncio.sleep(1.5)  # anything charged late (twice) shows up too
    lines = await all_lines(tally, cid)
    usage = Counter(t["usage_event_id"] for t in lines if t["kind"] == "usage")
    twice = {e: n for e, n in usage.items() if n > 1}
    assert not twice, f"charged more than once: {list(twice.items())[:5]}"
    assert set(usage) == expected, f"charged but never accepted: {sorted(set(usage) - expected)[:5]}"
    r = await tally.http.get(
        tally.url("wallet", f"/v1/companies/{cid}/wallet"),
        headers=tally.auth("company_admin", company_id=cid),
    )
    balance = Decimal(r.json()["balance"])
    total = sum((Decimal(t["amount"]) for t in lines), Decimal(0))
    assert balance == total, f"balance {balance} != sum of {len(lines)} ledger lines {total}"
    for t in lines:
        if t["kind"] == "usage":
            assert Decimal(t["amount"]) == -SMS, t
    return lines


# --- 1. overlapping ids in concurrent requests, within and across 10 ms groups ---------------


async def test_overlapping_concurrent_posts_across_groups_and_companies_charge_each_event_once(
    tally: Tally,
) -> None:
    """60 requests of 20 events drawn from 300 ids, sent within ~60 ms (several 10 ms groups,
    each group mixing requests that repeat each other's ids), for two companies that use the
    same ids. Each (company, id): answered accepted exactly once, in its own ledger once."""
    rng = random.Random(11)
    a, b = uid("ho-a"), uid("ho-b")
    for cid in (a, b):
        await credit(tally, cid, "100")
    ids = [f"ov-{uuid.uuid4().hex[:8]}-{i}" for i in range(300)]
    ledger = Ledger()

    async def one(cid: str, picked: list[str], delay: float) -> None:
        await asyncio.sleep(delay)
        await post_until_answered(tally, ledger, [usage_event(cid, e) for e in picked])

    jobs = [one(rng.choice((a, b)), rng.sample(ids, 20), rng.random() * 0.06) for _ in range(60)]
    # every id of both companies at least once, in requests of their own, in the same burst
    jobs += [one(cid, ids[i : i + 50], rng.random() * 0.06) for cid in (a, b) for i in range(0, 300, 50)]
    await asyncio.gather(*jobs)

    assert not ledger.accepted_twice(), list(ledger.accepted_twice().items())[:5]
    for key, answers in ledger.answers.items():
        assert answers.count("accepted") == 1, (key, answers)
        assert set(answers) <= {"accepted", "duplicate"}, (key, answers)
    for cid in (a, b):
        await settled(tally, cid, set(ids))
    # retried as a whole afterwards: all duplicate, nothing charged again
    again = Ledger()
    r = await post_until_answered(tally, again, [usage_event(a, e) for e in ids[:100]])
    assert {x["status"] for x in r.json()["results"]} == {"duplicate"}
    await settled(tally, a, set(ids))


# --- 2. clients that go away mid-request -----------------------------------------------------


async def test_clients_cancelling_mid_request_then_retrying_charge_each_event_once(tally: Tally) -> None:
    """80 requests abandoned after 1-15 ms (while they wait for their 10 ms group or inside
    it), then every batch retried until answered: each event once in the ledger, never
    answered accepted twice."""
    rng = random.Random(5)
    cid = uid("ho-cancel")
    await credit(tally, cid, "100")
    batches = [[usage_event(cid, f"cx-{n}-{i}-{uuid.uuid4().hex[:6]}") for i in range(10)] for n in range(80)]
    ledger = Ledger()

    url = httpx.URL(tally.url("usage-meter", "/v1/usage"))

    async def abandoned(events: list[dict[str, str]]) -> None:
        """The whole request written, then the connection closed 0-15 ms later (no answer read)."""
        ledger.sent.update((cid, e["event_id"]) for e in events)
        body = orjson.dumps({"events": events})
        head = (
            f"POST /v1/usage HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Authorization: {tally.auth('product')['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(head + body)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0, 0.015))
        writer.transport.abort()

    await asyncio.gather(*(abandoned(b) for b in batches))
    unanswered = {e for (_, e), a in ledger.answers.items() if a} ^ {e for _, e in ledger.sent}
    await asyncio.gather(*(post_until_answered(tally, ledger, b) for b in batches))
    applied_unanswered = [e for e in unanswered if ledger.answers[(cid, e)] == ["duplicate"]]
    assert unanswered and applied_unanswered, "no abandoned request was applied: the attack missed"
    assert not ledger.accepted_twice(), list(ledger.accepted_twice().items())[:5]
    for key, answers in ledger.answers.items():
        assert set(answers) <= {"accepted", "duplicate"}, (key, answers)
    await settled(tally, cid, {e for _, e in ledger.sent})


# --- 3-5. SIGKILL of usage-meter, of the wallet, a Postgres restart, mid-load -----------------


async def load_through(
    tally: Tally, fault: Any, *, posters: int = 6, rounds: int = 60, twins: bool = False
) -> tuple[str, Ledger]:
    """``posters`` products posting 20 new events a request for ``rounds`` requests each, the
    same batch again until answered; ``fault`` runs once the load flows."""
    cid = uid("ho-load")
    await credit(tally, cid, "1000")
    ledger = Ledger()
    flowing = asyncio.Event()

    async def poster(p: int) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            for n in range(rounds):
                events = [usage_event(cid, f"ld-{p}-{n}-{i}-{uuid.uuid4().hex[:4]}") for i in range(20)]
                if twins:  # the same batch from two instances of the product at once, 0-15 ms apart
                    await asyncio.gather(
                        post_until_answered(tally, ledger, events, client),
                        _later(random.uniform(0, 0.015), post_until_answered(tally, ledger, events)),
                    )
                else:
                    await post_until_answered(tally, ledger, events, client)
                if n == 8:
                    flowing.set()

    tasks = [asyncio.create_task(poster(p)) for p in range(posters)]
    await flowing.wait()
    await fault()
    await asyncio.gather(*tasks)
    assert not ledger.accepted_twice(), list(ledger.accepted_twice().items())[:5]
    for key, answers in ledger.answers.items():
        assert set(answers) <= {"accepted", "duplicate"}, (key, answers)
    assert len(ledger.answers) == posters * rounds * 20
    if twins:  # an answer lost to the fault may have been the accepted one
        for key, answers in ledger.answers.items():
            if key not in ledger.lost:
                assert answers.count("accepted") == 1, (key, answers)
        assert len(ledger.lost) < len(ledger.answers) / 2
    return cid, ledger


async def test_usage_meter_sigkilled_mid_load_loses_and_doubles_nothing(tally: Tally) -> None:
    async def fault() -> None:
        await asyncio.sleep(0.3)
        tally.stack.kill("usage-meter")
        await asyncio.sleep(0.5)
        tally.stack.spawn_service("usage-meter")
        await tally.stack.wait_ready("usage-meter")

    cid, ledger = await load_through(tally, fault)
    assert ledger.failures > 0, "the kill hit no request"
    await settled(tally, cid, ledger.taken(cid), timeout=120)
    await eventually(lambda: _outbox_empty(tally, "usage-meter"), what="usage-meter's outbox drained")


async def _later(delay: float, work: Any) -> Any:
    await asyncio.sleep(delay)
    return await work


async def test_usage_meter_sigkilled_three_times_under_twin_retries_accepts_and_charges_once(
    tally: Tally,
) -> None:
    """Every batch posted twice at once (a product's retry racing its first try, same or next
    10 ms group) while usage-meter is SIGKILLed three times: each event answered accepted
    exactly once across both, charged exactly once."""

    async def fault() -> None:
        for _ in range(3):
            await asyncio.sleep(0.4)
            tally.stack.kill("usage-meter")
            tally.stack.spawn_service("usage-meter")
            await tally.stack.wait_ready("usage-meter")

    cid, ledger = await load_through(tally, fault, posters=4, rounds=40, twins=True)
    assert ledger.failures > 0, "the kills hit no request"
    await settled(tally, cid, ledger.taken(cid), timeout=120)
    await eventually(lambda: _outbox_empty(tally, "usage-meter"), what="usage-meter's outbox drained")


async def test_wallet_sigkilled_twice_mid_load_loses_and_doubles_nothing(tally: Tally) -> None:
    at_kill: list[int] = []

    async def fault() -> None:
        for _ in range(2):
            await asyncio.sleep(0.4)
            rows = await tally.sql("wallet", "SELECT count(*) AS n FROM transfers WHERE kind = 'usage'")
            at_kill.append(int(rows[0]["n"]))
            tally.stack.kill("wallet")
            await asyncio.sleep(0.3)
            tally.stack.spawn_service("wallet")
            await tally.stack.wait_ready("wallet")

    cid, ledger = await load_through(tally, fault)
    lines = await settled(tally, cid, ledger.taken(cid), timeout=120)
    print("usage transfers at each kill", at_kill, "this company's lines", len(lines))
    await eventually(lambda: _outbox_empty(tally, "wallet"), what="the wallet's outbox drained")


async def test_postgres_restart_mid_load_loses_and_doubles_nothing(tally: Tally) -> None:
    if not tally.stack.can_restart_postgres:
        return

    async def fault() -> None:
        await asyncio.sleep(0.3)
        await tally.stack.restart_postgres()

    cid, ledger = await load_through(tally, fault, rounds=50)
    assert ledger.failures > 0, "the restart hit no request"
    await settled(tally, cid, ledger.taken(cid), timeout=120)
    for service in ("usage-meter", "wallet"):
        await eventually(lambda s=service: _outbox_empty(tally, s), what=f"{service}'s outbox drained")  # type: ignore[misc]


async def _outbox_empty(tally: Tally, schema: str) -> bool:
    rows = await tally.sql(schema.replace("-", "_"), "SELECT count(*) AS n FROM outbox")
    return bool(rows[0]["n"] == 0)


# --- 6. the same ids over HTTP and usage.ingest at once --------------------------------------


async def test_same_ids_over_http_and_usage_ingest_at_once_charge_once(tally: Tally) -> None:
    """A product writes 200 events to usage.ingest while (another instance of it) posts the same
    ids over HTTP in concurrent requests: each charged once; HTTP answers accepted at most once."""
    cid = uid("ho-both")
    await credit(tally, cid, "100")
    ids = [f"both-{uuid.uuid4().hex[:8]}-{i}" for i in range(200)]
    ledger = Ledger()

    async def kafka() -> None:
        for e in ids:
            await tally.produce("usage.ingest", usage_event(cid, e), key=cid)

    async def http() -> None:
        await asyncio.gather(
            *(
                post_until_answered(tally, ledger, [usage_event(cid, e) for e in ids[i : i + 10]])
                for i in range(0, 200, 10)
            )
        )

    await asyncio.gather(kafka(), http())
    assert not ledger.accepted_twice()
    await settled(tally, cid, set(ids))


# --- 7. suspension and reactivation crossed under load ---------------------------------------


async def test_suspension_and_reactivation_crossed_under_load_never_stick(tally: Tally) -> None:
    """A company with a few cents: four products post one sms a request as fast as they can,
    while credits keep lifting the wallet back over zero (five times, racing the debits). Once
    the load stops and a credit leaves the wallet positive, usage-meter must accept usage again
    (the last of wallet.suspended / wallet.reactivated it hears must be the wallet's state), and
    every accepted event is charged exactly once."""
    cid = uid("ho-susp")
    await credit(tally, cid, "0.05")
    ledger = Ledger()
    stop = asyncio.Event()
    refusals = 0

    async def poster(p: int) -> None:
        nonlocal refusals
        n = 0
        async with httpx.AsyncClient(timeout=10) as client:
            while not stop.is_set():
                n += 1
                r = await post_until_answered(tally, ledger, [usage_event(cid, f"s-{p}-{n}")], client)
                res = r.json()["results"][0]
                if res["status"] == "rejected":
                    assert res["error"]["code"] == "agency_wallet_empty", res
                    refusals += 1
                    await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(poster(p)) for p in range(4)]
    for _ in range(5):

        async def refused_since(seen: int = refusals) -> bool:
            return refusals > seen

        await eventually(refused_since, timeout=60, what="a refusal")
        await asyncio.sleep(0.2)
        await credit(tally, cid, "0.05")
        await asyncio.sleep(0.4)
    stop.set()
    await asyncio.gather(*tasks)
    assert refusals > 0
    taken = ledger.taken(cid)
    lines = await settled(tally, cid, taken)
    balance = sum((Decimal(t["amount"]) for t in lines), Decimal(0))
    wallet = await credit(tally, cid, str(max(-balance, Decimal(0)) + Decimal("1")))
    assert wallet["status"] == "active", wallet

    async def accepted_again() -> bool:
        probe = Ledger()
        r = await post_until_answered(tally, probe, [usage_event(cid, uid("after"))])
        res = r.json()["results"][0]
        if res["status"] == "accepted":
            ledger.answers.update(probe.answers)
        return bool(res["status"] == "accepted")

    await eventually(accepted_again, timeout=30, what="usage-meter to hear the wallet is active again")
    await settled(tally, cid, ledger.taken(cid))

"""Demo data and a usage simulator for ``make run``: a few agencies with client accounts,
funded wallets, and a steady mix of usage through both public paths (HTTP and usage.ingest)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

import httpx
import orjson
import stripe
from aiokafka import AIOKafkaProducer

from tally.auth import issue_token
from tally_devstack.stack import Stack

COMPANIES = {
    "acme-agency": ["acme-bakery", "acme-dental", "acme-gym"],
    "bright-marketing": ["bright-cafe", "bright-law"],
    "corner-digital": ["corner-florist", "corner-garage", "corner-salon", "corner-vet"],
}
SERVICES = [("email", "20"), ("sms", "2"), ("phone", "3.5"), ("ai", "4"), ("whatsapp", "1")]
OPENING_CREDIT = "20.00"  # small on purpose: the demo shows auto-recharges within a minute
THRESHOLD, RELOAD = "10.00", "25.00"


@dataclass
class SimStats:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    last_error: str = ""


async def _card(stripe_client: stripe.StripeClient) -> str:
    pm = await stripe_client.v1.payment_methods.create_async(
        params={
            "type": "card",
            "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    return str(pm.id)


def _ok(r: httpx.Response) -> None:
    if r.status_code not in (200, 201, 204, 409):  # 409: already there from an earlier run
        r.raise_for_status()


async def seed(stack: Stack) -> None:
    """Agencies on the $497 plan with Stripe connected, funded wallets and a card each; client
    accounts with a license pool; the first account of each agency rebilled at x1.5 with its own
    card; a daily usage alert. Idempotent across runs."""
    admin = {"Authorization": "Bearer " + issue_token("platform_admin", sub="demo")}
    stripe_client = stripe.StripeClient(
        "sk_test_tally", http_client=stripe.HTTPXClient(), base_addresses={"api": stack.stripe_api_base}
    )
    rebilling, wallet, recharge = (stack.url(s) for s in ("rebilling", "wallet", "recharge"))
    async with httpx.AsyncClient(headers=admin, timeout=30) as client:
        for cid, accounts in COMPANIES.items():
            _ok(
                await client.post(
                    f"{rebilling}/v1/companies",
                    json={
                        "id": cid,
                        "name": cid.replace("-", " ").title(),
                        "plan": "saas_pro",
                        "owner_email": f"owner@{cid}.example.com",
                        "currency": "USD",
                    },
                )
            )
            _ok(
                await client.put(
                    f"{rebilling}/v1/companies/{cid}/stripe-connect",
                    json={"stripe_account_id": f"acct_demo_{cid.replace('-', '_')}"},
                )
            )
            cards = await client.get(f"{recharge}/v1/companies/{cid}/payment-methods")
            if not cards.json()["items"]:
                _ok(
                    await client.post(
                        f"{recharge}/v1/companies/{cid}/payment-methods",
                        json={"payment_method": await _card(stripe_client)},
                    )
                )
            pool = (await client.get(f"{rebilling}/v1/companies/{cid}/licenses")).json()
            if pool["total"] < len(accounts):  # bought: charged to the card just saved
                _ok(
                    await client.post(
                        f"{rebilling}/v1/companies/{cid}/licenses",
                        json={"quantity": len(accounts) - pool["total"]},
                        headers={"Idempotency-Key": f"demo-licenses-{cid}"},
                    )
                )
            _ok(
                await client.post(
                    f"{wallet}/v1/companies/{cid}/wallet/credits",
                    json={"amount": OPENING_CREDIT, "reference": "demo opening credit"},
                    headers={"Idempotency-Key": f"demo-opening-credit-{cid}"},
                )
            )
            _ok(
                await client.patch(
                    f"{wallet}/v1/companies/{cid}/wallet",
                    json={"threshold": THRESHOLD, "reload_amount": RELOAD, "auto_recharge": True},
                )
            )
            for aid in accounts:
                _ok(
                    await client.post(
                        f"{rebilling}/v1/companies/{cid}/accounts",
                        json={
                            "id": aid,
                            "name": aid.replace("-", " ").title(),
                            "owner_email": f"owner@{aid}.example.com",
                        },
                    )
                )
        for cid, accounts in COMPANIES.items():
            await _rebill(client, stripe_client, stack, cid, accounts[0])


async def _rebill(
    client: httpx.AsyncClient, stripe_client: stripe.StripeClient, stack: Stack, cid: str, aid: str
) -> None:
    """The account's own card (on the company's Stripe), then rebilling with markup."""
    rebilling, recharge, notifier = (stack.url(s) for s in ("rebilling", "recharge", "notifier"))
    for _ in range(100):  # the recharge service learns of new accounts from events
        cards = await client.get(f"{recharge}/v1/accounts/{aid}/payment-methods")
        if cards.status_code == 200:
            break
        await asyncio.sleep(0.1)
    if not cards.json()["items"]:
        _ok(
            await client.post(
                f"{recharge}/v1/accounts/{aid}/payment-methods",
                json={"payment_method": await _card(stripe_client)},
            )
        )
    for _ in range(100):
        r = await client.put(
            f"{rebilling}/v1/accounts/{aid}/rebilling",
            json={"mode": "rebill_markup", "markups": {"default": "1.5"}},
        )
        if r.status_code == 200:
            break
        await asyncio.sleep(0.1)  # 409 account_card_required until the card event lands
    _ok(
        await client.patch(
            f"{stack.url('wallet')}/v1/accounts/{aid}/wallet",
            json={"threshold": "5", "reload_amount": "10", "auto_recharge": True},
        )
    )
    for _ in range(100):
        r = await client.put(
            f"{notifier}/v1/accounts/{aid}/usage-alerts",
            json={
                "enabled": True,
                "conditions": [{"threshold": "2.00", "period": "daily"}],
                "recipients": [f"finance@{cid}.example.com"],
            },
        )
        if r.status_code == 200:
            break
        await asyncio.sleep(0.1)


REBILLED = [accounts[0] for accounts in COMPANIES.values()]


async def simulate(stack: Stack, stats: SimStats, rate: float = 60.0) -> None:
    """Send usage at about ``rate`` events/s: HTTP batches, and every fourth batch on Kafka."""
    token = issue_token("product", sub="demo-simulator", ttl_seconds=7 * 24 * 3600)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    rng = random.Random()
    run = f"{int(time.time())}"
    counter = itertools.count()
    pairs = [(c, a) for c, accounts in COMPANIES.items() for a in accounts]
    try:
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
            for tick in itertools.count():
                batch = []
                for _ in range(max(1, int(rate / 4))):
                    cid, aid = rng.choice(pairs)
                    service, q = rng.choice(SERVICES)
                    batch.append(
                        {
                            "event_id": f"demo-{run}-{next(counter)}",
                            "company_id": cid,
                            "account_id": aid,
                            "service": service,
                            "quantity": q,
                        }
                    )
                stats.sent += len(batch)
                try:
                    if tick % 4 == 3:
                        for e in batch:
                            await producer.send("usage.ingest", orjson.dumps(e), key=e["company_id"].encode())
                        await producer.flush()
                        stats.accepted += len(batch)
                    else:
                        r = await client.post(stack.url("usage-meter") + "/v1/usage", json={"events": batch})
                        r.raise_for_status()
                        for res in r.json()["results"]:
                            if res["status"] == "accepted":
                                stats.accepted += 1
                            else:
                                stats.rejected += 1
                                stats.last_error = res.get("error", {}).get("code", res["status"])
                except (httpx.HTTPError, OSError) as exc:
                    stats.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.25)
    finally:
        await producer.stop()

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


async def seed(stack: Stack) -> None:
    """Each demo agency: a card in the fake Stripe attached through the recharge API, wallet
    settings (threshold, reload amount), and an opening credit. Idempotent across runs."""
    headers = {"Authorization": "Bearer " + issue_token("platform_admin", sub="demo")}
    stripe_client = stripe.StripeClient("sk_test_tally", http_client=stripe.HTTPXClient(),
                                        base_addresses={"api": stack.stripe_api_base})
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        for cid in COMPANIES:
            cards = await client.get(stack.url("recharge") + f"/v1/companies/{cid}/payment-methods")
            cards.raise_for_status()
            if not cards.json()["items"]:
                pm = await stripe_client.v1.payment_methods.create_async(params={
                    "type": "card", "card": {"number": "4242424242424242", "exp_month": 12,
                                             "exp_year": 2034, "cvc": "123"}})
                r = await client.post(stack.url("recharge") + f"/v1/companies/{cid}/payment-methods",
                                      json={"payment_method": pm.id})
                r.raise_for_status()
            r = await client.post(stack.url("wallet") + f"/v1/companies/{cid}/wallet/credits",
                                  json={"amount": OPENING_CREDIT, "reference": "demo opening credit"},
                                  headers={"Idempotency-Key": "demo-opening-credit"})
            r.raise_for_status()
            r = await client.patch(stack.url("wallet") + f"/v1/companies/{cid}/wallet",
                                   json={"threshold": THRESHOLD, "reload_amount": RELOAD,
                                         "auto_recharge": True})
            r.raise_for_status()


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
        async with httpx.AsyncClient(timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            for tick in itertools.count():
                batch = []
                for _ in range(max(1, int(rate / 4))):
                    cid, aid = rng.choice(pairs)
                    service, q = rng.choice(SERVICES)
                    batch.append({"event_id": f"demo-{run}-{next(counter)}", "company_id": cid,
                                  "account_id": aid, "service": service, "quantity": q})
                stats.sent += len(batch)
                try:
                    if tick % 4 == 3:
                        for e in batch:
                            await producer.send(
                                "usage.ingest", orjson.dumps(e), key=e["company_id"].encode())
                        await producer.flush()
                        stats.accepted += len(batch)
                    else:
                        r = await client.post(stack.url("usage-meter") + "/v1/usage",
                                              json={"events": batch})
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

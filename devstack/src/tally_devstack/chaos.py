"""The fault suite (``make chaos``; a short run is part of ``make test``).

A stream of usage (agencies with a rebilled account each, thresholds, real recharges through
the fake Stripe) runs while faults are injected: SIGKILL and restart of usage-meter, wallet,
recharge and notifier; restarts of Postgres; old ``usage.recorded`` messages delivered again,
out of order. Then it checks, from sources other than the wallet's own arithmetic:

- every wallet balance = credits granted + what Stripe actually charged for it - the accepted
  usage at catalog prices (x markup for the rebilled accounts);
- successful Stripe charges = recharges credited in the ledger;
- the ledger's double entry: materialised balances = sums of transfers, all summing to zero;
- no usage alert was sent twice to an account on one day.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

import asyncpg
import httpx
import stripe
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.auth import issue_token
from tally.money import apply_markup, minor_units_to_micros, price_usage, to_micros
from tally_devstack import demo
from tally_devstack.stack import Stack
from tally_wallet.storage import LEDGER_BALANCES

MARKUP = Decimal("1.5")  # what demo.seed gives the rebilled accounts
SERVICES = [("email", "20"), ("sms", "2"), ("phone", "3.5"), ("ai", "4"), ("whatsapp", "1")]
KILLABLE = ("usage-meter", "wallet", "recharge", "notifier")


@dataclass
class Report:
    seconds: float = 0.0
    batches_sent: int = 0
    events_accepted: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    wallets_checked: int = 0
    recharges_charged: int = 0
    recharges_credited: int = 0
    discrepancies: list[str] = field(default_factory=list)

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        return [
            f"run: {self.seconds:.0f}s, {self.batches_sent} batches, "
            f"{self.events_accepted} usage events accepted",
            f"faults injected: {self.fault_count} ({kinds})",
            f"wallets checked: {self.wallets_checked}; Stripe charges {self.recharges_charged}, "
            f"recharges credited {self.recharges_credited}",
            f"discrepancies: {len(self.discrepancies)}",
            *[f"  - {d}" for d in self.discrepancies],
        ]


class Chaos:
    def __init__(
        self, stack: Stack, *, seconds: float, faults: int, rate: float = 40.0, seed: int = 7
    ) -> None:
        self.stack = stack
        self.seconds = seconds
        self.faults_wanted = faults
        self.rate = rate
        self.rng = random.Random(seed)
        self.report = Report()
        self.accepted: dict[str, dict[str, Any]] = {}  # event id -> the event
        self.prices: dict[str, int] = {}
        self.token = issue_token("product", sub="chaos", ttl_seconds=86_400)
        self.admin = issue_token("platform_admin", sub="chaos", ttl_seconds=86_400)

    # --- traffic -------------------------------------------------------------------------

    async def _send(self, client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> None:
        """Post until the outcome is known: 'accepted' or 'duplicate' both mean taken."""
        while True:
            try:
                r = await client.post(self.stack.url("usage-meter") + "/v1/usage", json={"events": batch})
            except httpx.HTTPError:
                await asyncio.sleep(0.2)  # usage-meter is down or restarting: same ids again
                continue
            if r.status_code != 202:
                await asyncio.sleep(0.2)
                continue
            for event, result in zip(batch, r.json()["results"], strict=True):
                if result["status"] in ("accepted", "duplicate"):
                    self.accepted[event["event_id"]] = event
            self.report.batches_sent += 1
            return

    async def traffic(self, stop: asyncio.Event) -> None:
        pairs = [(c, a) for c, accounts in demo.COMPANIES.items() for a in accounts]
        n = 0
        async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {self.token}"}) as client:
            while not stop.is_set():
                batch = []
                for _ in range(max(1, int(self.rate / 5))):
                    cid, aid = self.rng.choice(pairs)
                    service, quantity = self.rng.choice(SERVICES)
                    n += 1
                    batch.append(
                        {
                            "event_id": f"chaos-{self.run_id}-{n}",
                            "company_id": cid,
                            "account_id": aid,
                            "service": service,
                            "quantity": quantity,
                        }
                    )
                await self._send(client, batch)
                await asyncio.sleep(0.2)

    # --- faults --------------------------------------------------------------------------

    async def _redeliver(self, producer: AIOKafkaProducer) -> None:
        """Re-produce a handful of old usage.recorded messages, byte for byte, out of order."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.stack.bootstrap, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            await consumer.topics()
            parts = [
                TopicPartition("usage.recorded", p)
                for p in consumer.partitions_for_topic("usage.recorded") or []
            ]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            records = []
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=500)).values():
                records.extend(batch)
            for r in self.rng.sample(records, min(20, len(records)))[::-1]:
                await producer.send("usage.recorded", r.value, key=r.key, headers=list(r.headers or []))
            await producer.flush()
        finally:
            await consumer.stop()

    def plan(self) -> list[str]:
        """The faults to inject, in a random order: every service killed at least once, two
        Postgres restarts (embedded Postgres), the rest kills and redeliveries."""
        plan = [f"kill:{name}" for name in KILLABLE]
        if self.stack.can_restart_postgres:
            plan += ["postgres", "postgres"]
        while len(plan) < self.faults_wanted:
            plan.append(self.rng.choice([*(f"kill:{n}" for n in KILLABLE), "redeliver", "redeliver"]))
        self.rng.shuffle(plan)
        return plan

    async def faults(self, until: float) -> None:
        """Inject the planned faults spread over the run (the run lasts until all are in)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.bootstrap)
        await producer.start()
        try:
            plan = self.plan()
            gap = max((until - time.monotonic()) / (len(plan) + 1), 0.3)
            for fault in plan:
                await asyncio.sleep(gap * self.rng.uniform(0.5, 1.0))
                if fault.startswith("kill:"):
                    name = fault.split(":", 1)[1]
                    self.stack.kill(name)
                    self.report.faults[f"sigkill {name}"] += 1
                    await asyncio.sleep(self.rng.uniform(0, 1.0))
                    self.stack.spawn_service(name)
                    await self.stack.wait_ready(name, timeout=120)
                elif fault == "postgres":
                    await self.stack.restart_postgres()
                    self.report.faults["postgres restart"] += 1
                else:
                    await self._redeliver(producer)
                    self.report.faults["duplicate/out-of-order delivery"] += 1
        finally:
            await producer.stop()

    # --- verification --------------------------------------------------------------------

    async def _settled(self, conn: dict[str, asyncpg.Connection]) -> bool:
        accepted = list(self.accepted)
        applied = await conn["wallet"].fetchval(
            "SELECT count(*) FROM transfers WHERE key = ANY($1::text[])",
            [f"usage:{e}:company" for e in accepted],
        )
        pending = await conn["recharge"].fetchval(
            "SELECT count(*) FROM recharge_attempts WHERE status = 'pending' "
            "AND not_before <= now() + interval '5 seconds'"
        )
        backlog = 0
        for schema, c in conn.items():
            backlog += await c.fetchval("SELECT count(*) FROM outbox")
            del schema
        return bool(applied == len(accepted) and pending == 0 and backlog == 0)

    async def verify(self) -> None:
        conns = {
            s: await asyncpg.connect(self.stack.database_url, server_settings={"search_path": s})
            for s in ("wallet", "recharge", "usage_meter", "notifier")
        }
        try:
            deadline = time.monotonic() + 180
            stable = 0
            while stable < 3:
                stable = stable + 1 if await self._settled(conns) else 0
                if time.monotonic() > deadline:
                    self.report.discrepancies.append("the system did not settle in 180 s")
                    break
                await asyncio.sleep(1.0)
            await self._check_balances(conns)
            await self._check_charges(conns)
            await self._check_ledger(conns["wallet"])
            self._check_emails()
        finally:
            for c in conns.values():
                await c.close()

    async def _check_balances(self, conn: dict[str, asyncpg.Connection]) -> None:
        expected: dict[str, int] = defaultdict(int)
        for e in self.accepted.values():
            amount = price_usage(Decimal(e["quantity"]), self.prices[e["service"]])
            expected[f"company:{e['company_id']}"] -= amount
            if e["account_id"] in demo.REBILLED:
                expected[f"account:{e['account_id']}"] -= apply_markup(amount, MARKUP)
        for wallet_id in list(expected):
            if wallet_id.startswith("company:"):
                expected[wallet_id] += to_micros(demo.OPENING_CREDIT)
        for wallet_id, charged in (await self._stripe_charged(conn["recharge"])).items():
            if wallet_id in self.wallets:
                expected[wallet_id] += charged
        rows = await conn["wallet"].fetch(
            "SELECT id, balance FROM wallets WHERE id = ANY($1)", list(expected)
        )
        actual = {r["id"]: r["balance"] for r in rows}
        for wallet_id, want in sorted(expected.items()):
            self.report.wallets_checked += 1
            if actual.get(wallet_id) != want:
                self.report.discrepancies.append(
                    f"{wallet_id}: ledger {actual.get(wallet_id)} != expected {want}"
                )

    async def _stripe_charged(self, recharge: asyncpg.Connection) -> dict[str, int]:
        """What Stripe says it charged, per wallet (mapping intents to wallets through the
        attempt ids in their metadata)."""
        client = stripe.StripeClient(
            "sk_test_tally",
            http_client=stripe.HTTPXClient(),
            base_addresses={"api": self.stack.stripe_api_base},
        )
        intents: list[dict[str, Any]] = []
        params: Any = {"limit": 100}
        while True:
            page = await client.v1.payment_intents.list_async(params=params)
            intents.extend(i.to_dict() for i in page.data)
            if not page.has_more or not page.data:
                break
            params = {"limit": 100, "starting_after": page.data[-1].id}
        attempts = {
            r["id"]: r["wallet_id"]
            for r in await recharge.fetch(
                "SELECT id, wallet_id FROM recharge_attempts WHERE purpose = 'wallet'"
            )
        }
        charged: dict[str, int] = defaultdict(int)
        for intent in intents:
            attempt = (intent.get("metadata") or {}).get("tally_attempt")
            if (
                intent.get("status") == "succeeded"
                and attempt in attempts
                and attempts[attempt] in self.wallets
            ):  # not other tests' wallets
                charged[attempts[attempt]] += minor_units_to_micros(intent["amount"], "USD")
                self.report.recharges_charged += 1
        return charged

    async def _check_charges(self, conn: dict[str, asyncpg.Connection]) -> None:
        self.report.recharges_credited = int(
            await conn["wallet"].fetchval(
                "SELECT count(*) FROM transfers WHERE key LIKE 'recharge:%' "
                "AND credit_wallet = ANY($1::text[])",
                sorted(self.wallets),
            )
        )
        if self.report.recharges_charged != self.report.recharges_credited:
            self.report.discrepancies.append(
                f"Stripe charged {self.report.recharges_charged} recharges, the ledger credited "
                f"{self.report.recharges_credited}"
            )

    async def _check_ledger(self, wallet: asyncpg.Connection) -> None:
        bad = sum(r["balance"] != r["derived"] for r in await wallet.fetch(LEDGER_BALANCES))
        total = await wallet.fetchval("SELECT COALESCE(sum(balance), 0) FROM wallets")
        if bad:
            self.report.discrepancies.append(f"{bad} wallets differ from their transfers")
        if total != 0:
            self.report.discrepancies.append(f"balances sum to {total}, not 0")

    def _check_emails(self) -> None:
        per_day: Counter[tuple[str, str]] = Counter()
        for path in self.stack.mail.mails():
            msg = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
            subject = str(msg["Subject"])
            if subject.startswith("Usage alert: "):
                day = parsedate_to_datetime(str(msg["Date"])).date().isoformat()
                per_day[(subject.split()[2], day)] += 1
        for (account, day), n in per_day.items():
            if n > 1:
                self.report.discrepancies.append(f"{n} usage alerts to {account} on {day}")

    @property
    def wallets(self) -> set[str]:
        """The wallets this run funds and uses: the demo's companies and accounts."""
        return {f"company:{cid}" for cid in demo.COMPANIES} | {
            f"account:{aid}" for accounts in demo.COMPANIES.values() for aid in accounts
        }

    # --- the run ---------------------------------------------------------------------------

    async def run(self) -> Report:
        self.run_id = f"{int(time.time())}-{self.rng.randrange(10**6)}"
        start = time.monotonic()
        await demo.seed(self.stack)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {self.admin}"}) as c:
            prices = (await c.get(self.stack.url("usage-meter") + "/v1/prices")).json()["items"]
            self.prices = {p["service"]: to_micros(p["unit_price"]) for p in prices}
        until = time.monotonic() + self.seconds
        stop_traffic = asyncio.Event()
        traffic = asyncio.create_task(self.traffic(stop_traffic))
        try:
            await self.faults(until)
            while time.monotonic() < until:
                await asyncio.sleep(0.2)
        finally:
            stop_traffic.set()
            await traffic
        for name in KILLABLE:  # everything back up before judging
            if not self.stack.alive(name):
                self.stack.spawn_service(name)
                await self.stack.wait_ready(name, timeout=120)
        self.report.events_accepted = len(self.accepted)
        await self.verify()
        self.report.seconds = time.monotonic() - start
        return self.report


async def main(seconds: float, faults: int) -> int:
    import os
    import tempfile
    from pathlib import Path

    from rich.console import Console

    from tally_devstack.stack import Ports, stop_on_sigterm

    stop_on_sigterm()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="tally-chaos-") as tmp:
        stack = Stack(
            Path(tmp),
            ports=Ports.free(),
            database_url=os.environ.get("DATABASE_URL"),
            isolated_database=True,
            partitions=4,
            extra_env={"TALLY_RECHARGE_LEASE_SECONDS": "3", "TALLY_RECHARGE_RETRY_SECONDS": "2,2"},
        )
        try:
            with console.status("starting the stack…"):
                await stack.start()
                await stack.start_services()
            with console.status(f"chaos for {seconds:.0f}s with {faults} faults, then checking…"):
                report = await Chaos(stack, seconds=seconds, faults=faults).run()
        finally:
            with contextlib.suppress(Exception):
                await stack.stop()
    for line in report.lines():
        console.print(line)
    ok = not report.discrepancies and report.fault_count >= faults
    console.print("[green]chaos: passed[/]" if ok else "[red]chaos: FAILED[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tally_devstack.chaos")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--faults", type=int, default=24)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.faults)))

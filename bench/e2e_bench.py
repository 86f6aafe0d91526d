"""End-to-end benchmark (``make bench``): usage through the public paths (HTTP batches to
usage-meter, 1 in 4 batches produced to ``usage.ingest``) for many companies, half of them
rebilling their accounts, until every debit is committed. Prints, and writes under
``bench/results/``: events/s end to end, send-to-commit latency percentiles, CPU seconds and
peak memory per service, and this run's references: the raw database doing the same ledger
writes in large batches (the limit) and one transaction per event (naive).

    make bench                 # EVENTS=50000 COMPANIES=500
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from wallet_bench import measure_naive  # the same naive reference as `make bench-wallet`

from tally.auth import issue_token
from tally_devstack.stack import SERVICES, Ports, Stack, stop_on_sigterm

sys_path = Path(__file__).parent
console = Console()
EVENTS = int(os.environ.get("EVENTS", "50000"))
COMPANIES = int(os.environ.get("COMPANIES", "500"))
BATCH = 1000
MIX = [("email", "20"), ("sms", "2"), ("phone", "3.5"), ("ai", "4"), ("whatsapp", "1")]


async def setup(stack: Stack, client: httpx.AsyncClient, run: str) -> None:
    """Fund every company (no suspension during the run) and rebill the even companies'
    accounts at x1.5 (published on the compacted topic, as rebilling does)."""
    sem = asyncio.Semaphore(16)

    async def fund(c: int) -> None:
        async with sem:
            cid = f"{run}-co{c}"
            await client.patch(stack.url("wallet") + f"/v1/companies/{cid}/wallet",
                               json={"threshold": "0"})
            await client.post(stack.url("wallet") + f"/v1/companies/{cid}/wallet/credits",
                              json={"amount": "1000000"})
    await asyncio.gather(*(fund(c) for c in range(COMPANIES)))
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    await producer.start()
    now = datetime.now(UTC).isoformat()
    for c in range(0, COMPANIES, 2):
        for k in range(2):
            aid, cid = f"{run}-acct{c}-{k}", f"{run}-co{c}"
            for type_, data, topic, key in (
                    ("account.created", {"account_id": aid, "company_id": cid, "name": aid},
                     "rebilling.events", cid),
                    ("rebilling.settings", {"account_id": aid, "company_id": cid,
                                            "mode": "rebill_markup", "markups": {"default": "1.5"},
                                            "version": 1}, "rebilling.settings", aid)):
                await producer.send(topic, orjson.dumps({
                    "id": f"{type_}:{aid}", "type": type_, "time": now, "source": "bench",
                    "data": data}), key=key.encode())
    await producer.flush()
    await producer.stop()
    conn = await asyncpg.connect(stack.database_url, server_settings={"search_path": "wallet"})
    try:
        while await conn.fetchval("SELECT count(*) FROM rebilling_settings") < COMPANIES:
            await asyncio.sleep(0.2)
        # Pre-create the account wallets with threshold 0 (no recharges in this benchmark).
        for c in range(0, COMPANIES, 2):
            for k in range(2):
                await client.patch(stack.url("wallet") + f"/v1/accounts/{run}-acct{c}-{k}/wallet",
                                   json={"threshold": "0"})
                await client.post(
                    stack.url("wallet") + f"/v1/accounts/{run}-acct{c}-{k}/wallet/credits",
                    json={"amount": "1000000"})
    finally:
        await conn.close()


def make_batches(run: str) -> list[list[dict[str, Any]]]:
    rng = random.Random(5)
    events = []
    for i in range(EVENTS):
        c = rng.randrange(COMPANIES)
        service, quantity = rng.choice(MIX)
        events.append({"event_id": f"{run}-{i}", "company_id": f"{run}-co{c}",
                       "account_id": f"{run}-acct{c}-{rng.randrange(2)}", "service": service,
                       "quantity": quantity})
    return [events[i:i + BATCH] for i in range(0, len(events), BATCH)]


async def drive(stack: Stack, batches: list[list[dict[str, Any]]],
                product: str) -> dict[str, float]:
    """Send everything; returns event id -> send time (epoch seconds) for a sample."""
    sent: dict[str, float] = {}
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    await producer.start()
    queue: asyncio.Queue[tuple[int, list[dict[str, Any]]]] = asyncio.Queue()
    for item in enumerate(batches):
        queue.put_nowait(item)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            n, batch = queue.get_nowait()
            t = time.time()
            if n % 4 == 3:
                for e in batch:
                    await producer.send("usage.ingest", orjson.dumps(e),
                                        key=e["company_id"].encode())
                await producer.flush()
            else:
                r = await client.post(stack.url("usage-meter") + "/v1/usage",
                                      json={"events": batch})
                r.raise_for_status()
            for e in batch[::50]:
                sent[e["event_id"]] = t
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {product}"}) as c:
        await asyncio.gather(*(worker(c) for _ in range(4)))
    await producer.stop()
    return sent


async def measure_limit(stack: Stack, run: str, events: int = 100_000) -> dict[str, float]:
    """The raw database doing the same ledger writes as the wallet, in large batches: COPY of
    the ledger lines (two legs for half the events) and one UPDATE per wallet per batch."""
    from tally import db

    pool = await db.create_pool(stack.database_url, "wallet_limit", size=1)
    await db.migrate(pool, "wallet_limit", "tally")
    await db.migrate(pool, "wallet_limit", "tally_wallet")
    rng = random.Random(3)
    cols = ("key", "debit_wallet", "credit_wallet", "amount", "kind", "service",
            "usage_event_id", "reference", "debit_balance_after", "credit_balance_after")
    start = time.perf_counter()
    async with pool.acquire() as conn:
        for first in range(0, events, 5000):
            rows, balances = [], {}
            for i in range(first, min(first + 5000, events)):
                c = rng.randrange(COMPANIES)
                company = f"company:{run}-{c}"
                balances[company] = balances.get(company, 0) - 675
                rows.append((f"{run}:{i}:c", company, "system:rev", 675, "usage", "email",
                             f"{run}:{i}", None, balances[company], 0))
                if c % 2 == 0:
                    account = f"account:{run}-{c}"
                    balances[account] = balances.get(account, 0) - 1013
                    rows.append((f"{run}:{i}:a", account, "system:crev", 1013, "usage", "email",
                                 f"{run}:{i}", None, balances[account], 0))
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO wallets (id, kind, currency) SELECT unnest($1::text[]), "
                    "'company', 'USD' ON CONFLICT DO NOTHING", list(balances))
                await conn.fetch("SELECT id FROM wallets WHERE id = ANY($1::text[]) "
                                 "ORDER BY id FOR UPDATE", list(balances))
                await conn.copy_records_to_table("transfers", records=rows, columns=cols)
                await conn.execute(
                    "UPDATE wallets SET balance = wallets.balance + v.delta FROM "
                    "unnest($1::text[], $2::bigint[]) AS v(id, delta) WHERE wallets.id = v.id",
                    list(balances), list(balances.values()))
    seconds = time.perf_counter() - start
    await pool.close()
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds}




async def main() -> None:
    run = f"e{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="tally-bench-") as tmp:
        stack = Stack(Path(tmp), ports=Ports.free(), database_url=os.environ.get("DATABASE_URL"),
                      isolated_database=True, partitions=8,
                      extra_env={"TALLY_INGEST_RATE": "0", "TALLY_LOG_LEVEL": "WARNING"})
        try:
            with console.status("starting the stack and all services…"):
                await stack.start()
                await stack.start_services()
            admin = issue_token("platform_admin", sub="bench")
            async with httpx.AsyncClient(timeout=60,
                                         headers={"Authorization": f"Bearer {admin}"}) as client:
                with console.status(f"funding {COMPANIES} companies, rebilling half…"):
                    await setup(stack, client, run)
            batches = make_batches(run)
            procs = {n: psutil.Process(stack._procs[n].pid) for n in SERVICES}
            cpu0 = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
            peak = dict.fromkeys(procs, 0)
            conn = await asyncpg.connect(stack.database_url,
                                         server_settings={"search_path": "wallet"})
            start = time.time()
            driver = asyncio.create_task(drive(stack, batches, issue_token("product", sub="bench")))
            with Progress(TextColumn("usage committed"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("", total=EVENTS)
                while True:
                    done = await conn.fetchval(
                        "SELECT count(*) FROM transfers WHERE kind = 'usage' "
                        "AND debit_wallet LIKE 'company:' || $1 || '-%'", run)
                    for n, p in procs.items():
                        peak[n] = max(peak[n], p.memory_info().rss)
                    bar.update(task, completed=done)
                    if done >= EVENTS:
                        break
                    await asyncio.sleep(0.25)
            elapsed = time.time() - start
            sent = await driver
            rows = await conn.fetch(
                "SELECT usage_event_id, extract(epoch FROM created_at) AS t FROM transfers "
                "WHERE key = ANY($1::text[])", [f"usage:{e}:company" for e in sent])
            await conn.close()
            latencies = sorted(max(float(r["t"]) - sent[r["usage_event_id"]], 0.0) for r in rows)
            cpu = {n: sum(p.cpu_times()[:2]) - cpu0[n] for n, p in procs.items()}
            for n in SERVICES:  # the references run on the same database, services stopped
                stack.kill(n)
            with console.status("the limit: raw batched ledger writes…"):
                limit = await measure_limit(stack, run)
            with console.status("naive: one transaction per event…"):
                naive = await measure_naive(stack, run)
        finally:
            await stack.stop()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    result = {
        "benchmark": "e2e", "time": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "events": EVENTS, "companies": COMPANIES, "seconds": elapsed,
        "events_per_s": EVENTS / elapsed,
        "latency_s": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
        "cpu_seconds": cpu, "peak_rss_mb": {n: v / 2**20 for n, v in peak.items()},
        "limit_raw_database": limit, "naive_one_tx_per_event": naive,
        "share_of_limit": (EVENTS / elapsed) / limit["events_per_s"],
        "times_naive": (EVENTS / elapsed) / naive["events_per_s"],
    }
    console.print(f"[bold]end to end[/]: {result['events_per_s']:,.0f} usage events/s "
                  f"({EVENTS:,} events, {COMPANIES} companies, half rebilled, {elapsed:.1f}s)")
    console.print("send → ledger commit: p50 {p50:.3f}s  p95 {p95:.3f}s  p99 {p99:.3f}s".format(
        **result["latency_s"]))
    for n in SERVICES:
        console.print(f"  {n:<12} cpu {cpu[n]:6.1f}s   peak rss {peak[n] / 2**20:6.0f} MB")
    console.print(f"limit (raw batched ledger writes): {limit['events_per_s']:,.0f} events/s -> "
                  f"end to end is {result['share_of_limit']:.0%} of it")
    console.print(f"naive (one transaction per event): {naive['events_per_s']:,.0f} events/s -> "
                  f"end to end is {result['times_naive']:.1f}x it")
    out = sys_path / "results" / f"e2e-{run}.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


if __name__ == "__main__":
    stop_on_sigterm()
    asyncio.run(main())

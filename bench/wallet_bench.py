"""Wallet benchmark (not a test): usage events applied per second by the wallet service alone,
company and account legs, from a pre-filled ``usage.recorded`` topic; and, on the same machine,
the naive way — the same posting code with one transaction per event.

    make bench-wallet            # defaults: 100,000 events, 2,000 companies, half rebilled
    EVENTS=300000 make bench-wallet
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tally import db
from tally.events import parse_usage_recorded
from tally_devstack.stack import Ports, Stack, stop_on_sigterm
from tally_wallet.usage import apply_usage

console = Console()
EVENTS = int(os.environ.get("EVENTS", "100000"))
COMPANIES = int(os.environ.get("COMPANIES", "2000"))
NAIVE_EVENTS = int(os.environ.get("NAIVE_EVENTS", "3000"))


def make_events(n: int, run: str) -> tuple[list[tuple[str, dict[str, object]]], int]:
    rng = random.Random(1)
    now = datetime.now(UTC).isoformat()
    out: list[tuple[str, dict[str, object]]] = []
    legs = 0
    for i in range(n):
        c = rng.randrange(COMPANIES)
        cid = f"{run}-co{c}"
        aid = f"{run}-acct{c}-{rng.randrange(3)}"
        legs += 2 if c % 2 == 0 else 1  # even companies rebill their accounts
        amount = rng.randint(100, 100_000)
        out.append(
            (
                cid,
                {
                    "id": f"usage:{cid}/{run}-{i}",
                    "type": "usage.recorded",
                    "time": now,
                    "source": "bench",
                    "data": {
                        "event_id": f"{run}-{i}",
                        "company_id": cid,
                        "account_id": aid,
                        "service": rng.choice(["email", "sms", "ai", "phone"]),
                        "quantity": "1",
                        "occurred_at": now,
                        "recorded_at": now,
                        "unit_price_micros": amount,
                        "platform_amount_micros": amount,
                        "currency": "USD",
                    },
                },
            )
        )
    return out, legs


async def prefill_settings(stack: Stack, run: str) -> int:
    """Rebilling settings (x1.5) for the accounts of the even companies; returns how many."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    await producer.start()
    n = 0
    try:
        now = datetime.now(UTC).isoformat()
        for c in range(0, COMPANIES, 2):
            for k in range(3):
                aid = f"{run}-acct{c}-{k}"
                msg = {
                    "id": f"rs-{aid}",
                    "type": "rebilling.settings",
                    "time": now,
                    "source": "bench",
                    "data": {
                        "account_id": aid,
                        "company_id": f"{run}-co{c}",
                        "mode": "rebill_markup",
                        "markups": {"default": "1.5"},
                        "version": 1,
                    },
                }
                await producer.send("rebilling.settings", orjson.dumps(msg), key=aid.encode())
                n += 1
        await producer.flush()
        return n
    finally:
        await producer.stop()


async def wait_settings(stack: Stack, run: str) -> None:
    """Start the wallet, tell it the companies (their currency: rebilling, which would answer
    for them, does not run here), let it take in every setting, stop it (gracefully)."""
    stack.spawn_service("wallet")
    await stack.wait_ready("wallet")
    conn = await asyncpg.connect(stack.database_url, server_settings={"search_path": "wallet"})
    try:
        await conn.copy_records_to_table(
            "companies",
            records=[(f"{run}-co{c}", "USD") for c in range(COMPANIES)],
            columns=("company_id", "currency"),
        )
        n = await prefill_settings(stack, run)
        while await conn.fetchval("SELECT count(*) FROM rebilling_settings") < n:
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    stack.kill("wallet", signal.SIGTERM)


async def prefill(stack: Stack, run: str) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5, max_batch_size=1024 * 1024)
    await producer.start()
    try:
        events, legs = make_events(EVENTS, run)
        with Progress(
            TextColumn("pre-filling usage.recorded"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("", total=len(events))
            pending = []
            for i, (cid, msg) in enumerate(events):
                pending.append(await producer.send("usage.recorded", orjson.dumps(msg), key=cid.encode()))
                if i % 5000 == 4999:
                    await asyncio.gather(*pending)
                    pending.clear()
                    bar.update(task, completed=i + 1)
            await asyncio.gather(*pending)
            await producer.flush()
            bar.update(task, completed=len(events))
        return legs
    finally:
        await producer.stop()


async def measure_service(stack: Stack, legs: int) -> dict[str, float]:
    conn = await asyncpg.connect(stack.database_url, server_settings={"search_path": "wallet"})

    async def count() -> int:
        try:
            return int(await conn.fetchval("SELECT count(*) FROM transfers WHERE kind = 'usage'"))
        except asyncpg.UndefinedTableError:
            return 0

    stack.spawn_service("wallet")
    wallet = psutil.Process(stack._procs["wallet"].pid)
    pgdata = str(stack.root / "pgdata")  # the embedded Postgres (not measured when external)
    postgres = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) > 2 and cmd[0].endswith("/postgres") and pgdata in cmd:
            postgres.append(p)

    def cpu() -> tuple[float, float]:
        """CPU seconds (user + sys) of the wallet and of Postgres (its processes now)."""
        family = [c for p in postgres for c in (p, *p.children(recursive=True))]
        return sum(wallet.cpu_times()[:2]), sum(sum(q.cpu_times()[:2]) for q in family if q.is_running())

    first_t = first_n = None
    first_cpu = (0.0, 0.0)
    with Progress(
        TextColumn("wallet applying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("", total=legs)
        while True:
            n = await count()
            now = time.perf_counter()
            if n and first_t is None:
                first_t, first_n, first_cpu = now, n, cpu()
            bar.update(task, completed=n)
            if n >= legs:
                break
            await asyncio.sleep(0.05)
    last_cpu = cpu()
    await conn.close()
    assert first_t is not None and first_n is not None
    seconds = max(now - first_t, 1e-9)
    applied_legs = legs - first_n
    events = max(applied_legs * EVENTS / legs, 1e-9)
    return {
        "seconds": seconds,
        "legs_per_s": applied_legs / seconds,
        "events_per_s": applied_legs / seconds * EVENTS / legs,
        # CPU per event moves less than events/s with the machine's drift (docs/performance.md)
        "wallet_cpu_us_per_event": (last_cpu[0] - first_cpu[0]) / events * 1e6,
        "postgres_cpu_us_per_event": (last_cpu[1] - first_cpu[1]) / events * 1e6,
    }


async def measure_naive(stack: Stack, run: str) -> dict[str, float]:
    """The same posting code, one transaction per event, on a schema of its own."""
    pool = await db.create_pool(stack.database_url, "wallet_naive", size=2)
    await db.migrate(pool, "wallet_naive", "tally")
    await db.migrate(pool, "wallet_naive", "tally_wallet")
    events, _ = make_events(NAIVE_EVENTS, run + "-naive")
    parsed = [parse_usage_recorded(orjson.dumps(m)) for _, m in events]  # as the wallet reads them
    start = time.perf_counter()
    async with pool.acquire() as conn:
        for u in parsed:
            async with conn.transaction():
                await apply_usage(conn, [u])
    seconds = time.perf_counter() - start
    await pool.close()
    return {"seconds": seconds, "events_per_s": len(parsed) / seconds}


async def main() -> None:
    run = f"b{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="tally-bench-") as tmp:
        stack = Stack(
            Path(tmp),
            ports=Ports.free(),
            database_url=os.environ.get("DATABASE_URL"),
            isolated_database=True,
            partitions=8,
        )
        try:
            with console.status("starting broker and Postgres…"):
                await stack.start()
            with console.status("rebilling settings into the wallet…"):
                await wait_settings(stack, run)
            legs = await prefill(stack, run)
            service = await measure_service(stack, legs)
            with console.status(f"naive: {NAIVE_EVENTS} events, one transaction each…"):
                naive = await measure_naive(stack, run)
        finally:
            await stack.stop()
    result = {
        "benchmark": "wallet",
        "time": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "events": EVENTS,
        "companies": COMPANIES,
        "legs": legs,
        "wallet_service": service,
        "naive_one_tx_per_event": naive,
        "speedup": service["events_per_s"] / naive["events_per_s"],
    }
    console.print(
        f"[bold]wallet service[/]: {service['events_per_s']:,.0f} usage events/s "
        f"({service['legs_per_s']:,.0f} ledger legs/s, {EVENTS:,} events, "
        f"{legs:,} legs, {service['seconds']:.1f}s); CPU µs per event: wallet "
        f"{service['wallet_cpu_us_per_event']:.1f}, Postgres {service['postgres_cpu_us_per_event']:.1f}"
    )
    console.print(f"[bold]naive[/] (one transaction per event): {naive['events_per_s']:,.0f} events/s")
    console.print(f"speed-up: {result['speedup']:.1f}x")
    out = Path(__file__).parent / "results" / f"wallet-{run}.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


if __name__ == "__main__":
    stop_on_sigterm()
    asyncio.run(main())

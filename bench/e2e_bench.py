"""End-to-end benchmark (``make bench``, ``make bench-scaling``).

Usage goes in through the public paths — HTTP batches to usage-meter (3 batches in 4) and
records produced to ``usage.ingest`` (1 in 4) — for many companies, half of them rebilling
their two accounts at x1.5, five services, until every company debit is committed. One run:

1. **throughput**: everything offered at once; events/s end to end;
2. **latency**: fixed offered loads (``RATES``, up to 5,000 events/s) paced in 10 ms ticks,
   each after every consumer has caught up; send -> ledger-commit percentiles (a commit is
   seen by polling the ledger every 10 ms, so the figures are upper bounds by up to one poll);
3. the **request shapes** (``SHAPES``, bench/shapes.py): 1, 10 and 100 events per request
   from many keep-alive connections. They come after 1 and 2, so that the big-batch figure is
   taken on a stack that has seen nothing else, as before the shapes came in: the embedded
   broker slows as its topics fill, and the raw limit below has no broker;
4. the same run's references on the same database: the **limit** (the raw database doing the
   same ledger writes in 5,000-event batches: COPY of the ledger lines, one UPDATE per wallet
   per batch) and the **naive** way (the wallet's posting code, one transaction per event).

CPU seconds (user+sys) and peak RSS per service, Postgres and the broker are taken around each
phase. Results print and go to ``bench/results/``.

Wallets are seeded straight into the wallet's tables (funded, threshold 0 so no recharge runs,
with the matching credit transfers so the ledger adds up): 1M wallets through HTTP would
benchmark the seeding. ``make bench-scaling`` repeats the throughput phase at 1k, 100k and 1M
wallets (100k events) and at 100k and 1M events, each on a fresh stack, and reports cost per
event.

    make bench              # EVENTS=100000 WALLETS=10000 RATES=1000,2500,5000 LATENCY_SECONDS=10
                            # SHAPES=1,10,100 SHAPE_SECONDS=10 SHAPE_CONNECTIONS=128 (bench/shapes.py)
    EVENTS=0 make bench                     # the request shapes only
    PROFILE=1 make bench                    # + py-spy profiles of the hot services
    REFERENCES=0 RATES= make bench          # throughput only (no limit, naive or latency runs)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from shapes import run_shape, statements, statements_reset
from wallet_bench import measure_naive  # the same naive reference as `make bench-wallet`

from tally.auth import issue_token
from tally_devstack.stack import (
    EMBEDDED_PARTITIONS,
    POSTGRES_SETTINGS,
    SERVICES,
    Ports,
    Stack,
    stop_on_sigterm,
)

HERE = Path(__file__).parent
RESULTS = HERE / "results"
console = Console()
MIX = [
    ("email", "20", 675),
    ("sms", "2", 15_000),
    ("phone", "3.5", 13_000),
    ("ai", "4", 2_000),
    ("whatsapp", "1", 5_000),
]  # service, quantity, ~platform micros
HTTP_BATCH = 1000
SEED = 50_000_000_000  # every seeded wallet starts with 50,000.00


@dataclass
class Workload:
    """``wallets`` user wallets: C companies and, for the even (rebilling) companies, their two
    accounts' wallets — 2C in all. Every event names a company and one of its two accounts."""

    run: str
    wallets: int
    events: int

    @property
    def companies(self) -> int:
        return max(self.wallets // 2, 2)

    def event(self, rng: random.Random, i: int) -> dict[str, Any]:
        c = rng.randrange(self.companies)
        service, quantity, _ = rng.choice(MIX)
        return {
            "event_id": f"{self.run}-{i}",
            "company_id": f"{self.run}-co{c}",
            "account_id": f"{self.run}-acct{c}-{rng.randrange(2)}",
            "service": service,
            "quantity": quantity,
        }


# --- seeding ------------------------------------------------------------------------------


async def seed(conn: asyncpg.Connection, w: Workload) -> None:
    """Funded wallets (with their credit transfers), rebilling settings and accounts, by COPY."""
    run, total = w.run, 0
    wallets, transfers, settings, accounts = [], [], [], []
    markups = orjson.dumps({"default": "1.5"}).decode()
    for c in range(w.companies):
        cid = f"{run}-co{c}"
        owners = [(f"company:{cid}", "company", cid, None)]
        for k in range(2):
            aid = f"{run}-acct{c}-{k}"
            accounts.append((aid, cid))
            if c % 2 == 0:
                owners.append((f"account:{aid}", "account", cid, aid))
                settings.append((aid, cid, "rebill_markup", markups, True, 1))
        for wid, kind, company, account in owners:
            total += SEED
            wallets.append((wid, kind, company, account, "USD", SEED, 0, False))
            transfers.append(
                (f"seed:{wid}", f"system:manual_credits:{run}", wid, SEED, "manual_credit", -total, SEED)
            )
    wallets.append((f"system:manual_credits:{run}", "system", None, None, "USD", -total, 0, False))
    async with conn.transaction():
        await conn.copy_records_to_table(
            "wallets",
            records=wallets,
            columns=(
                "id",
                "kind",
                "company_id",
                "account_id",
                "currency",
                "balance",
                "threshold",
                "threshold_armed",
            ),
        )
        await conn.copy_records_to_table(
            "transfers",
            records=transfers,
            columns=(
                "key",
                "debit_wallet",
                "credit_wallet",
                "amount",
                "kind",
                "debit_balance_after",
                "credit_balance_after",
            ),
        )
        await conn.copy_records_to_table(
            "rebilling_settings",
            records=settings,
            columns=("account_id", "company_id", "mode", "markups", "active", "version"),
        )
        await conn.copy_records_to_table("accounts", records=accounts, columns=("account_id", "company_id"))
    await conn.execute("ANALYZE wallets; ANALYZE transfers; ANALYZE rebilling_settings")
    # usage-meter's view of the same companies and accounts (as rebilling.events would give
    # it), so ingestion never asks rebilling about them
    async with conn.transaction():
        await conn.copy_records_to_table(
            "companies",
            schema_name="usage_meter",
            records=[(f"{run}-co{c}", "USD") for c in range(w.companies)],
            columns=("company_id", "currency"),
        )
        await conn.copy_records_to_table(
            "accounts", schema_name="usage_meter", records=accounts, columns=("account_id", "company_id")
        )


# --- driving usage ------------------------------------------------------------------------


@dataclass
class Batch:
    http: bool
    body: bytes = b""  # HTTP: {"events": [...]}
    records: list[tuple[bytes, bytes]] = field(default_factory=list)  # Kafka: (key, value)
    sample: list[str] = field(default_factory=list)  # event ids whose latency we follow


def make_batches(w: Workload, first: int, count: int, size: int, every: int, seed_: int) -> list[Batch]:
    """Pre-encoded batches (so the driver spends its CPU sending, not building JSON); one batch
    in four goes to ``usage.ingest``."""
    rng = random.Random(seed_)
    out = []
    for n, start in enumerate(range(first, first + count, size)):
        events = [w.event(rng, i) for i in range(start, min(start + size, first + count))]
        sample = [e["event_id"] for e in events[::every]]
        if n % 4 == 3:
            out.append(
                Batch(
                    False,
                    records=[(e["company_id"].encode(), orjson.dumps(e)) for e in events],
                    sample=sample,
                )
            )
        else:
            out.append(Batch(True, body=orjson.dumps({"events": events}), sample=sample))
    return out


class Driver:
    """Sends batches: HTTP posts and Kafka record batches (one per partition, as a product
    batching its produce calls would), noting each sampled event's send time. Paced sends go
    record by record through the producer's accumulator instead: aiokafka lets one record
    batch per partition wait, so a batch per tick queued behind the previous one and, once
    the broker slowed, timed out in the driver."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack = stack
        self.sent: dict[str, float] = {}
        self.pending: set[str] = set()  # sent samples not yet seen in the ledger (Watcher)
        self.accept: list[float] = []  # HTTP request -> 202 response, seconds
        self.client = httpx.AsyncClient(
            timeout=120,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            limits=httpx.Limits(max_connections=16),
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=stack.bootstrap, linger_ms=0, max_batch_size=1 << 20
        )
        self._partitioner = DefaultPartitioner()
        self._partitions: list[int] = []

    async def start(self) -> None:
        await self.producer.start()
        self._partitions = sorted(await self.producer.partitions_for("usage.ingest"))

    async def close(self) -> None:
        await self.client.aclose()
        await self.producer.stop()

    async def send(self, b: Batch, *, paced: bool = False) -> None:
        t = time.time()
        for eid in b.sample:
            self.sent[eid] = t
        self.pending.update(b.sample)
        if b.http:
            r = await self.client.post(self.stack.url("usage-meter") + "/v1/usage", content=b.body)
            r.raise_for_status()
            self.accept.append(time.time() - t)
            return
        if paced:
            await asyncio.gather(
                *[await self.producer.send("usage.ingest", value, key=key) for key, value in b.records]
            )
            return
        by_partition: dict[int, Any] = {}
        for key, value in b.records:
            p = self._partitioner(key, self._partitions, self._partitions)
            batch = by_partition.get(p)
            if batch is None:
                batch = by_partition[p] = self.producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
        futures = [
            await self.producer.send_batch(batch, "usage.ingest", partition=p)
            for p, batch in by_partition.items()
        ]
        await asyncio.gather(*futures)

    async def flood(self, batches: list[Batch], concurrency: int = 4) -> None:
        queue = list(reversed(batches))

        async def worker() -> None:
            while queue:
                await self.send(queue.pop())

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def paced(self, batches: list[Batch], tick: float) -> None:
        """One batch per tick, on schedule (late ticks are sent at once, never skipped)."""
        inflight: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        for n, b in enumerate(batches):
            delay = start + n * tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.send(b, paced=True))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        await asyncio.gather(*inflight)


# --- watching the ledger ------------------------------------------------------------------


class Watcher:
    """Progress from the wallet's applied-legs counter (cheap), commits of sampled events by
    polling the ledger for their keys; CPU and RSS of every process of the stack."""

    def __init__(self, stack: Stack, conn: asyncpg.Connection) -> None:
        self.stack = stack
        self.conn = conn
        self.seen: dict[str, float] = {}
        self.last_id = 0  # the newest ledger line read for samples (``read_from_now``)
        self._swept = 0.0
        self.procs = processes(stack)
        self.peak = dict.fromkeys(self.procs, 0)
        self._cpu0: dict[str, float] = {}

    async def read_from_now(self) -> None:
        """Samples are looked for in the ledger lines written from now on. Called as each
        measured phase starts: otherwise its first poll reads every line of the phases before,
        in one query in the driver's loop, and delays the sends it measures."""
        self.last_id = await self.conn.fetchval("SELECT coalesce(max(id), 0) FROM transfers")

    def cpu_start(self) -> None:
        self._cpu0 = cpu_seconds(self.procs)
        self.peak = dict.fromkeys(self.procs, 0)

    def cpu_since(self) -> dict[str, float]:
        now = cpu_seconds(self.procs)
        return {n: round(now[n] - self._cpu0.get(n, 0.0), 2) for n in now}

    async def applied(self, client: httpx.AsyncClient) -> int:
        text = (await client.get(self.stack.url("wallet") + "/metrics")).text
        for line in text.splitlines():
            if line.startswith('tally_wallet_usage_applied_total{leg="company"}'):
                return int(float(line.split()[-1]))
        return 0

    async def until(
        self, label: str, target: int, driver: Driver, sending: asyncio.Task[None], poll: float = 0.01
    ) -> float:
        """Wait until ``target`` company legs are applied; returns seconds from now."""
        start = time.perf_counter()
        async with httpx.AsyncClient(timeout=30) as client:
            base = await self.applied(client)
            with Progress(
                TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
            ) as bar:
                task = bar.add_task("", total=target)
                last_progress, last_done, moved = 0.0, -1, time.perf_counter()
                every = 1.0
                while True:
                    await self._poll_samples(driver)
                    now = time.perf_counter()
                    if now - last_progress >= every:
                        last_progress = now
                        done = await self.applied(client) - base
                        # Rendering the wallet's /metrics is ~3% of its CPU at 4 scrapes a
                        # second: scrape once a second, and every 100 ms only in the last
                        # ~2 seconds (the end of the run is then seen within 100 ms).
                        rate = done / max(now - start, 1e-3)
                        every = max(poll, 0.1) if target - done <= 2 * rate else 1.0
                        if done != last_done:
                            last_done, moved = done, now
                        elif now - moved > STALL_SECONDS:
                            raise SystemExit(
                                f"{label}: no debit applied for {STALL_SECONDS}s "
                                f"({done:,} of {target:,}); see the services' logs"
                            )
                        for n, p in self.procs.items():
                            self.peak[n] = max(self.peak[n], rss(p))
                        bar.update(task, completed=done)
                        if done >= target and sending.done():
                            break
                        if sending.done() and sending.exception():
                            raise sending.exception()  # type: ignore[misc]
                    await asyncio.sleep(poll)
        elapsed = time.perf_counter() - start
        while await self._poll_samples(driver):  # the last few samples
            await asyncio.sleep(poll)
        return elapsed

    async def _poll_samples(self, driver: Driver) -> int:
        """Note the commit time of sampled events that reached the ledger; returns how many are
        still waiting. Reads the ledger lines added since the last poll (a range of the primary
        key) rather than looking up every waiting sample's key: at 5,000/s that was ~400 index
        probes every 10 ms, load on the Postgres under test. A line committed out of id order
        (never, with one wallet consumer) would be missed by the range; samples older than a
        second are therefore also looked up by key, once a second. Only the pending samples
        are walked (a poll every 10 ms over all of a phase's samples was the driver's CPU)."""
        pending = driver.pending
        if not pending:
            return 0
        t = time.time()  # visible to this statement => committed before it started
        rows = await self.conn.fetch(
            "SELECT id, usage_event_id FROM transfers WHERE id > $1 AND usage_event_id IS NOT NULL",
            self.last_id,
        )
        for r in rows:
            self.last_id = max(self.last_id, r["id"])
            if r["usage_event_id"] in pending:
                pending.discard(r["usage_event_id"])
                self.seen[r["usage_event_id"]] = t
        if t - self._swept >= 1.0:
            self._swept = t
            late = [e for e in pending if t - driver.sent[e] > 1.0]
            if late:
                for r in await self.conn.fetch(
                    "SELECT usage_event_id FROM transfers WHERE key = ANY($1)",
                    [f"usage:{e}:company" for e in late],
                ):
                    pending.discard(r["usage_event_id"])
                    self.seen[r["usage_event_id"]] = t
        return len(pending)

    def latencies(self, sent: dict[str, float]) -> dict[str, float]:
        return percentiles([max(self.seen[e] - t, 0.0) for e, t in sent.items() if e in self.seen])


STALL_SECONDS = 120  # a phase with no progress for this long aborts the run (never hangs)


def percentiles(samples: list[float]) -> dict[str, float]:
    values = sorted(samples)

    def pct(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else 0.0

    return {
        "samples": len(values),
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "max": round(values[-1], 4) if values else 0.0,
    }


def processes(stack: Stack) -> dict[str, psutil.Process]:
    procs = {n: psutil.Process(stack._procs[n].pid) for n in SERVICES}
    procs["broker"] = psutil.Process(stack._procs["broker"].pid)
    pgdata = str(stack.root / "pgdata")  # the embedded Postgres (not measured when external)
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) > 2 and cmd[0].endswith("/postgres") and pgdata in cmd:
            procs["postgres"] = p
    procs["bench driver"] = psutil.Process()
    return procs


class Busy:
    """How busy the machine's cores are (everything on it: the stack and the driver), sampled
    every half second in a thread, split at ``sent()``: while the driver still sends, and
    after, while the consumers drain what it sent. A pipeline whose stages take turns shows
    here as idle cores while draining (2026-12-04: 96-100% busy while sending, 67-83% while
    the wallet drained, docs/0020)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (end time, busy share of all cores)
        self.sent_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="busy", daemon=True)

    def _sample(self) -> None:
        def read() -> tuple[float, float]:
            t = psutil.cpu_times()
            idle = t.idle + getattr(t, "iowait", 0.0)
            return sum(t) - idle, sum(t)

        busy0, total0 = read()
        while not self._stop.wait(self.every):
            busy1, total1 = read()
            if total1 > total0:
                self.samples.append((time.perf_counter(), (busy1 - busy0) / (total1 - total0)))
            busy0, total0 = busy1, total1

    def __enter__(self) -> Busy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sent(self) -> None:
        self.sent_at = time.perf_counter()

    def figures(self) -> dict[str, float | None]:
        cut = self.sent_at if self.sent_at is not None else float("inf")
        sending = [b for t, b in self.samples if t <= cut]
        draining = [b for t, b in self.samples if t > cut + self.every]  # whole samples after

        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 3) if xs else None

        return {
            "while_sending": mean(sending),
            "while_draining": mean(draining),
            "draining_s": round(len(draining) * self.every, 1),
        }


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            family = [p] + (p.children(recursive=True) if name == "postgres" else [])
            out[name] = sum(sum(q.cpu_times()[:2]) for q in family if q.is_running())
        except psutil.Error:
            out[name] = 0.0
    return out


def rss(p: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return int(p.memory_info().rss)
    return 0


async def settle(stack: Stack, timeout: float = 120) -> float:
    """Wait until every consumer has caught up and every outbox is empty (the notifier and
    recharge may still be reading ``wallet.digest`` after the last debit): a phase must not
    pay for the previous one's backlog. Returns the seconds waited. The lag gauges are each
    consumer's as of its last batch (its partitions then), so this is a strong hint, not a
    proof; after ``timeout`` it says so and returns."""
    start = time.perf_counter()
    behind = 0.0
    async with httpx.AsyncClient(timeout=10) as client:
        while time.perf_counter() - start < timeout:
            behind = 0.0
            for n in SERVICES:
                for line in (await client.get(stack.url(n) + "/metrics")).text.splitlines():
                    if line.startswith(("tally_consumer_lag{", "tally_outbox_backlog{")):
                        behind += float(line.rsplit(" ", 1)[1])
            if behind == 0:
                break
            await asyncio.sleep(0.2)
    if behind:
        console.print(f"[yellow]not settled after {timeout:.0f}s: {behind:,.0f} records behind[/]")
    await asyncio.sleep(1.0)
    return round(time.perf_counter() - start, 1)


async def mean_batches(stack: Stack) -> dict[str, float]:
    """Records per consumed batch, per service and topic, from each service's /metrics."""
    out: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for n in SERVICES:
            sums: dict[str, list[float]] = {}
            for line in (await client.get(stack.url(n) + "/metrics")).text.splitlines():
                if line.startswith("tally_consumer_batch_size_sum") or line.startswith(
                    "tally_consumer_batch_size_count"
                ):
                    labels, value = line.rsplit(" ", 1)
                    topic = labels.split('topic="')[1].split('"')[0]
                    sums.setdefault(topic, [0.0, 0.0])[0 if "_sum" in labels else 1] += float(value)
            for topic, (total, count) in sums.items():
                if count:
                    out[f"{n} {topic}"] = round(total / count, 1)
    return out


async def stage_sums(stack: Stack) -> dict[str, tuple[float, float]]:
    """(sum, count) of each consumer's record age and handle time, per service and topic."""
    out: dict[str, tuple[float, float]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for n in SERVICES:
            for line in (await client.get(stack.url(n) + "/metrics")).text.splitlines():
                for metric, label in (
                    ("tally_consumer_record_age_seconds", "age"),
                    ("tally_consumer_handle_seconds", "handle"),
                ):
                    for part in ("_sum", "_count"):
                        if line.startswith(metric + part + "{"):
                            labels, value = line.rsplit(" ", 1)
                            topic = labels.split('topic="')[1].split('"')[0]
                            k = f"{n} {topic} {label}"
                            total, count = out.get(k, (0.0, 0.0))
                            out[k] = (
                                (total + float(value), count)
                                if part == "_sum"
                                else (total, count + float(value))
                            )
    return out


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean milliseconds per batch of each stage between two ``stage_sums`` snapshots."""
    out = {}
    for k, (total, count) in after.items():
        t0, c0 = before.get(k, (0.0, 0.0))
        if count > c0:
            out[k] = round((total - t0) / (count - c0) * 1000, 1)
    return out


# --- profiling ------------------------------------------------------------------------------


PROFILED = ("usage-meter", "wallet", "notifier", "recharge")
# PG_STATEMENTS=1: the request shapes list the database's costliest statements; the embedded
# Postgres preloads pg_stat_statements for it (and drops it again on the next run without).
PG_STATEMENTS = os.environ.get("PG_STATEMENTS") == "1"
POSTGRES_SETTINGS["shared_preload_libraries"] = "pg_stat_statements" if PG_STATEMENTS else ""


class Profiler:
    """py-spy on each hot service for one phase; prints where the CPU went (own time)."""

    def __init__(self, stack: Stack, out: Path, names: tuple[str, ...]) -> None:
        self.stack, self.out, self.names = stack, out, names
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Profiler:
        self.out.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).parent / "py-spy"
        for n in self.names:
            self.procs[n] = subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--pid",
                    str(self.stack._procs[n].pid),
                    "-o",
                    str(self.out / f"{n}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            p.wait(30)
        for n in self.names:
            self.report(n, self.out / f"{n}.txt")

    @staticmethod
    def report(name: str, path: Path, top: int = 14) -> None:
        own: Counter[str] = Counter()
        total = 0
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            n = int(count)
            total += n
            own[frames[-1].split(" (")[0] + " (" + _short(frames[-1])] += n
        console.print(f"[bold]{name}[/]: {total} samples, own time")
        for frame, n in own.most_common(top):
            console.print(f"  {n / max(total, 1):5.1%}  {frame}")


def _short(frame: str) -> str:
    where = frame.partition(" (")[2].rstrip(")")
    parts = where.split("/")
    return "/".join(parts[-2:]) + ")"


# --- references -----------------------------------------------------------------------------


async def measure_limit(
    conn: asyncpg.Connection, w: Workload, events: int, batch: int = 5000
) -> dict[str, float]:
    """The raw database doing the wallet's ledger writes for the same kind of events on the
    same tables: per 5,000-event batch, create the missing system wallets, COPY the ledger
    lines (two legs for rebilled events), one UPDATE per touched wallet (user and system), as
    the issue defines it. (Until 2026-11-21 it also locked the wallets first, as the wallet
    did; the wallet's one ``UPDATE … RETURNING`` now locks them, so the limit does not.)"""
    rng = random.Random(3)
    cols = (
        "key",
        "debit_wallet",
        "credit_wallet",
        "amount",
        "kind",
        "service",
        "usage_event_id",
        "debit_balance_after",
        "credit_balance_after",
    )
    prepared = []
    for first in range(0, events, batch):
        rows, delta = [], {}
        for i in range(first, min(first + batch, events)):
            e = w.event(rng, i)
            amount = next(m[2] for m in MIX if m[0] == e["service"])
            company, revenue = f"company:{e['company_id']}", "system:platform_revenue:USD"
            delta[company] = delta.get(company, 0) - amount
            delta[revenue] = delta.get(revenue, 0) + amount
            rows.append(
                (
                    f"limit:{i}:c",
                    company,
                    revenue,
                    amount,
                    "usage",
                    e["service"],
                    f"limit-{i}",
                    SEED + delta[company],
                    delta[revenue],
                )
            )
            if int(e["company_id"].rsplit("co", 1)[1]) % 2 == 0:
                account = f"account:{e['account_id']}"
                crev = f"system:company_revenue:{e['company_id']}:USD"
                delta[account] = delta.get(account, 0) - amount * 3 // 2
                delta[crev] = delta.get(crev, 0) + amount * 3 // 2
                rows.append(
                    (
                        f"limit:{i}:a",
                        account,
                        crev,
                        amount * 3 // 2,
                        "usage",
                        e["service"],
                        f"limit-{i}",
                        SEED + delta[account],
                        delta[crev],
                    )
                )
        prepared.append((rows, delta))
    start = time.perf_counter()
    for rows, delta in prepared:
        ids = sorted(delta)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO wallets (id, kind, currency) SELECT unnest($1::text[]), 'system', "
                "'USD' ON CONFLICT DO NOTHING",
                [i for i in ids if i.startswith("system:")],
            )
            await conn.copy_records_to_table("transfers", records=rows, columns=cols)
            await conn.execute(
                "UPDATE wallets SET balance = wallets.balance + v.delta FROM "
                "unnest($1::text[], $2::bigint[]) AS v(id, delta) WHERE wallets.id = v.id",
                ids,
                [delta[i] for i in ids],
            )
    seconds = time.perf_counter() - start
    return {"events": events, "seconds": round(seconds, 3), "events_per_s": round(events / seconds)}


# --- one run --------------------------------------------------------------------------------


async def company_legs(conn: asyncpg.Connection, run: str) -> int:
    """The ledger's company legs of this run's usage (every event has one)."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM transfers WHERE kind = 'usage' AND key LIKE $1", f"usage:{run}-%:company"
        )
    )


async def run_once(
    wallets: int,
    events: int,
    *,
    rates: list[int],
    seconds_per_rate: float,
    references: bool,
    profile: bool,
    shapes: list[int] = [],  # noqa: B006 (read only)
    shape_seconds: float = 10,
    shape_connections: int = 128,
) -> dict[str, Any]:
    run = f"r{int(time.time())}"
    tick = 0.01
    loads = [(max(int(rate * tick), 1), int(rate * seconds_per_rate)) for rate in rates]
    latency_events = sum(n for _, n in loads)
    w = Workload(run, wallets, events + latency_events)
    result: dict[str, Any] = {"wallets": wallets, "events": events}
    with tempfile.TemporaryDirectory(prefix="tally-bench-") as tmp:
        stack = Stack(
            Path(tmp),
            ports=Ports.free(),
            database_url=os.environ.get("DATABASE_URL"),
            isolated_database=True,
            partitions=int(os.environ.get("PARTITIONS", str(EMBEDDED_PARTITIONS))),
            extra_env={"TALLY_INGEST_RATE": "0", "TALLY_LOG_LEVEL": "WARNING"},
        )
        try:
            with console.status("starting the stack and all services…"):
                await stack.start()
                await stack.start_services()
            conn = await asyncpg.connect(stack.database_url, server_settings={"search_path": "wallet"})
            with console.status(f"seeding {wallets:,} funded wallets…"):
                t = time.perf_counter()
                await seed(conn, w)
                result["seed_seconds"] = round(time.perf_counter() - t, 1)
            with console.status(f"encoding {events + latency_events:,} events…"):
                flood = make_batches(w, 0, events, HTTP_BATCH, every=50, seed_=11)
                paced, first = [], events
                for per_tick, n in loads:
                    paced.append(make_batches(w, first, n, per_tick, every=5, seed_=first))
                    first += n
            driver = Driver(stack, issue_token("product", sub="bench"))
            await driver.start()
            watcher = Watcher(stack, conn)

            # 1-2 first, on a stack that has seen nothing else yet (as before the request
            # shapes came in, 2026-12-03): the embedded broker slows as its topics fill, and the
            # big-batch figure is compared with the same run's raw limit, which has no broker
            if events:
                # 1. throughput
                await watcher.read_from_now()
                counting = PG_STATEMENTS and await statements_reset(watcher.conn)
                watcher.cpu_start()
                profiling = Profiler(stack, RESULTS / "profiles" / run, PROFILED) if profile else None
                with profiling or contextlib.nullcontext(), Busy() as busy:
                    sending = asyncio.create_task(driver.flood(flood))
                    sending.add_done_callback(lambda _: busy.sent())
                    # Saturated latencies are seconds: polling the ledger for the samples every
                    # 100 ms (not 10) keeps the driver's own queries from loading Postgres (at
                    # 50 ms they were still ~5 µs/event of Postgres' CPU at 1M wallets, in
                    # pg_stat_statements).
                    elapsed = await watcher.until(
                        f"throughput: {events:,} events", events, driver, sending, poll=0.1
                    )
                cpu = watcher.cpu_since()
                result["mean_batch"] = await mean_batches(stack)
                result["throughput"] = {
                    "seconds": round(elapsed, 2),
                    "events_per_s": round(events / elapsed),
                    "latency_s_saturated": watcher.latencies(driver.sent),
                    "cpu_seconds": cpu,
                    "cpu_us_per_event": {n: round(v / events * 1e6, 1) for n, v in cpu.items()},
                    "peak_rss_mb": {n: round(v / 2**20) for n, v in watcher.peak.items()},
                    "cores_busy": busy.figures(),
                }
                if counting:
                    result["throughput"]["statements"] = await statements(watcher.conn, events)
                # 2. latency at fixed offered loads, lightest first
                result["latency"] = []
                for (per_tick, n), batches in zip(loads, paced, strict=True):
                    with console.status("letting every consumer catch up…"):
                        settled = await settle(stack)
                    driver.sent.clear()
                    driver.pending.clear()
                    driver.accept.clear()
                    stages = await stage_sums(stack)
                    await watcher.read_from_now()
                    watcher.cpu_start()
                    sending = asyncio.create_task(driver.paced(batches, tick))
                    elapsed = await watcher.until(
                        f"latency: {round(per_tick / tick):,}/s offered", n, driver, sending
                    )
                    result["latency"].append(
                        {
                            "offered_per_s": round(per_tick / tick),
                            "events": n,
                            "seconds": round(elapsed, 2),
                            "latency_s": watcher.latencies(driver.sent),
                            "http_accept_s": percentiles(driver.accept),
                            "settle_seconds": settled,
                            "cpu_seconds": watcher.cpu_since(),
                            "stage_ms": stage_means(stages, await stage_sums(stack)),
                        }
                    )
                done = await company_legs(conn, run)
                result["ledger_company_legs"] = done
                if done != events + latency_events:
                    raise SystemExit(f"ledger has {done} company legs, expected {events + latency_events}")
            # 3. request shapes: 1, 10, 100 events per request from many connections (#20)
            result["shapes"] = []
            before = await company_legs(conn, run)
            next_event = 10**9  # event numbers of their own: no clash with the phases above
            for size in shapes:
                with console.status("letting every consumer catch up…"):
                    await settle(stack)
                figures, next_event = await run_shape(
                    stack=stack,
                    watcher=watcher,
                    workload=w,
                    token=issue_token("product", sub="bench-shapes"),
                    size=size,
                    first_event=next_event,
                    connections=shape_connections,
                    seconds=shape_seconds,
                    console=console,
                    pg_stats=PG_STATEMENTS,
                    settle=lambda: settle(stack),
                    profiler=(
                        (lambda phase: Profiler(stack, RESULTS / "profiles" / run / phase, PROFILED))
                        if profile
                        else None
                    ),
                )
                result["shapes"].append(figures)
                show_shape(figures)
            # every event the shapes had accepted is in the ledger, once (end to end is counted by
            # the wallet's own counter while they run)
            shaped = sum(
                f[r]["events_accepted"]
                for f in result["shapes"]
                for r in ("saturated", "half_load", "fixed_rate")
                if r in f
            )
            # the wallet counts a batch before it commits: the last one may still be committing
            for _ in range(600):
                legs = await company_legs(conn, run)
                if legs - before >= shaped:
                    break
                await asyncio.sleep(0.1)
            if legs - before != shaped:
                raise SystemExit(
                    f"ledger has {legs - before} company legs of the request shapes, expected {shaped}"
                )
            await driver.close()
            if events == 0:  # shapes only
                await conn.close()
                return result
            # 4. references, services stopped, same database and tables
            if references:
                for n in SERVICES:
                    stack.kill(n)
                with console.status("the limit: raw batched ledger writes…"):
                    result["limit_raw_database"] = await measure_limit(conn, w, min(events, 100_000))
                with console.status("naive: one transaction per event…"):
                    naive = await measure_naive(stack, run)
                    result["naive_one_tx_per_event"] = {k: round(v, 2) for k, v in naive.items()}
                e2e = result["throughput"]["events_per_s"]
                result["share_of_limit"] = round(e2e / result["limit_raw_database"]["events_per_s"], 3)
                result["times_naive"] = round(e2e / naive["events_per_s"], 1)
            await conn.close()
        finally:
            await stack.stop()
    return result


def python_loop_ms() -> float:
    """A fixed piece of pure-Python work, best of three, in ms: this machine's speed drifts by
    tens of per cent between runs and days (docs/performance.md), and the services are Python,
    so a run's figures are compared through it (lower is faster)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i & 7
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_loop_ms": python_loop_ms(),
    }


def print_statements(console: Console, rows: list[dict[str, Any]]) -> None:
    """The database's costliest statements of a phase (``PG_STATEMENTS=1``)."""
    for st in rows:
        console.print(
            f"  pg {st['exec_us_per_event']:6.1f} µs/event {st['calls_per_1000_events']:6.1f} calls "
            f"{st['rows_per_call']:6.1f} rows  {st['query'][:90]}"
        )


def show_shape(f: dict[str, Any]) -> None:
    sat, half = f["saturated"], f["half_load"]
    cpu = sat["cpu_us_per_event"]
    console.print(
        f"[bold]{f['events_per_request']} event(s)/request[/], {f['connections']} connections: "
        f"{sat['requests_per_s']:,} requests/s, {sat['events_per_s_end_to_end']:,} events/s end to end, "
        f"HTTP p50/p99 {sat['http_ms']['p50']}/{sat['http_ms']['p99']} ms"
        + (f", refused {sat['refused']}" if sat["refused"] else "")
    )
    console.print("  CPU µs/event: " + ", ".join(f"{n} {v:g}" for n, v in cpu.items() if v >= 1))
    print_statements(console, sat.get("statements", []))
    if sat.get("per_1000_events"):
        console.print(
            "  per 1,000 events: " + ", ".join(f"{k} {v:g}" for k, v in sat["per_1000_events"].items())
        )
    console.print(
        f"  at half ({half['requests_per_s_offered']:,} requests/s offered, "
        f"{half['requests_per_s_sent']:,} sent): HTTP p50/p99 "
        f"{half['http_ms']['p50']}/{half['http_ms']['p99']} ms, send → commit p50/p99 "
        f"{half['send_to_commit_ms']['p50']}/{half['send_to_commit_ms']['p99']} ms"
        + (f" (after {half['settled_s']} s catching up)" if "settled_s" in half else "")
    )
    for hop, t in half.get("hops", {}).items():
        console.print(f"    {hop}: mean {t['mean_ms']} ms, p99 ≤ {t['p99_ms_at_most']} ms")
    fixed = f.get("fixed_rate")
    if fixed:
        console.print(
            f"  at {fixed['requests_per_s_offered']:,} requests/s offered "
            f"({fixed['requests_per_s_sent']:,} sent): HTTP p50/p99 "
            f"{fixed['http_ms']['p50']}/{fixed['http_ms']['p99']} ms, send → commit p50/p99 "
            f"{fixed['send_to_commit_ms']['p50']}/{fixed['send_to_commit_ms']['p99']} ms"
        )


def show(r: dict[str, Any]) -> None:
    if "throughput" not in r:
        return
    t = r["throughput"]
    console.print(
        f"[bold]end to end[/]: {t['events_per_s']:,} usage events/s "
        f"({r['events']:,} events, {r['wallets']:,} wallets, half rebilled, "
        f"{t['seconds']}s)"
    )
    s = t["latency_s_saturated"]
    console.print(f"  send → commit while saturated: p50 {s['p50']:.3f}s  p99 {s['p99']:.3f}s")
    busy = t.get("cores_busy")
    if busy and busy["while_sending"] is not None:
        draining = (
            f", then {busy['while_draining']:.0%} for the {busy['draining_s']} s the consumers drained"
            if busy["while_draining"] is not None
            else ""
        )
        console.print(f"  the machine's cores busy: {busy['while_sending']:.0%} while sending{draining}")
    print_statements(console, t.get("statements", []))
    if r.get("latency"):
        table = Table(
            "offered events/s",
            "send → commit p50",
            "p95",
            "p99",
            "max",
            "HTTP 202 p50",
            "p99",
            "samples",
            title="latency at a fixed load",
        )
        for run in r["latency"]:
            lat, acc = run["latency_s"], run["http_accept_s"]
            table.add_row(
                f"{run['offered_per_s']:,}",
                *(f"{lat[k] * 1000:.0f} ms" for k in ("p50", "p95", "p99", "max")),
                f"{acc['p50'] * 1000:.0f} ms",
                f"{acc['p99'] * 1000:.0f} ms",
                str(lat["samples"]),
            )
        console.print(table)
        for run in r["latency"]:  # where the time goes, hop by hop (mean per batch)
            stages = run.get("stage_ms", {})
            console.print(
                f"  {run['offered_per_s']:,}/s, mean ms per batch: "
                + ", ".join(f"{k} {v:g}" for k, v in stages.items() if "usage" in k)
            )
    console.print(
        "records per batch: "
        + ", ".join(f"{k} {v:g}" for k, v in r.get("mean_batch", {}).items() if "usage" in k or "wallet" in k)
    )
    table = Table("process", "cpu s", "µs/event", "peak MB")
    for n, v in t["cpu_seconds"].items():
        table.add_row(n, f"{v:.1f}", f"{t['cpu_us_per_event'][n]:.0f}", f"{t['peak_rss_mb'].get(n, 0)}")
    console.print(table)
    if "limit_raw_database" in r:
        console.print(
            f"limit (raw batched ledger writes): "
            f"{r['limit_raw_database']['events_per_s']:,} events/s -> end to end is "
            f"{r['share_of_limit']:.0%} of it"
        )
        console.print(
            f"naive (one transaction per event): "
            f"{r['naive_one_tx_per_event']['events_per_s']:,.0f} events/s -> end to "
            f"end is {r['times_naive']}x it"
        )


def write(name: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(data, indent=2))
    console.print(f"written to {out}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scaling", action="store_true", help="the scaling curves")
    args = ap.parse_args()
    profile = os.environ.get("PROFILE") == "1"
    if not args.scaling:
        r = await run_once(
            int(os.environ.get("WALLETS", "10000")),
            int(os.environ.get("EVENTS", "100000")),
            rates=[int(x) for x in os.environ.get("RATES", "1000,2500,5000").split(",") if x],
            seconds_per_rate=float(os.environ.get("LATENCY_SECONDS", "10")),
            references=os.environ.get("REFERENCES") != "0",
            profile=profile,
            shapes=[int(x) for x in os.environ.get("SHAPES", "1,10,100").split(",") if x],
            shape_seconds=float(os.environ.get("SHAPE_SECONDS", "10")),
            shape_connections=int(os.environ.get("SHAPE_CONNECTIONS", "128")),
        )
        show(r)
        box = machine()
        console.print(
            f"machine: python loop {box['python_loop_ms']} ms after the run (fixed "
            f"work, lower is faster: compare runs through it)"
        )
        write("e2e", {"benchmark": "e2e", "time": datetime.now(UTC).isoformat(), "machine": box, **r})
        return
    points = [(1_000, 100_000), (100_000, 100_000), (1_000_000, 100_000), (100_000, 1_000_000)]
    rows = []
    for wallets, events in points:
        console.rule(f"{wallets:,} wallets, {events:,} events")
        r = await run_once(wallets, events, rates=[], seconds_per_rate=0, references=True, profile=False)
        r["python_loop_ms"] = python_loop_ms()  # the machine's speed drifts between points
        show(r)
        console.print(f"machine: python loop {r['python_loop_ms']} ms")
        rows.append(r)
    table = Table(
        "wallets",
        "events",
        "events/s",
        "CPU µs/event (all)",
        "services µs/event",
        "Postgres µs/event",
        "limit events/s",
        "share of limit",
    )
    for r in rows:
        per = r["throughput"]["cpu_us_per_event"]
        services = sum(per[n] for n in SERVICES)
        table.add_row(
            f"{r['wallets']:,}",
            f"{r['events']:,}",
            f"{r['throughput']['events_per_s']:,}",
            f"{sum(v for n, v in per.items() if n != 'bench driver'):.0f}",
            f"{services:.0f}",
            f"{per.get('postgres', 0):.0f}",
            f"{r['limit_raw_database']['events_per_s']:,}",
            f"{r['share_of_limit']:.0%}",
        )
    console.print(table)
    write(
        "scaling",
        {"benchmark": "scaling", "time": datetime.now(UTC).isoformat(), "machine": machine(), "points": rows},
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    stop_on_sigterm()
    import uvloop  # the driver's own loop: a small share of the machine (bench/shapes.py)

    uvloop.run(main())

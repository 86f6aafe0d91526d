"""Request-shape phases of ``make bench`` (issue #20): usage as products really send it — 1, 10
or 100 events per request — from many concurrent keep-alive connections.

The driver is raw asyncio over uvloop (no HTTP client library): each connection writes a
pre-built HTTP/1.1 request and reads the answer (status line, headers, Content-Length body), so
it costs a few µs a request, a small share of what the system spends. The runs per shape:

1. **saturated**: ``connections`` closed loops (a connection sends its next request when the
   last is answered) for ``seconds``; events/s end to end = accepted events / time until the
   wallet has applied every one of them (read from its ``applied`` counter), HTTP p50/p99,
   CPU µs per event per process;
2. **half load**: an open loop paced at half the saturated end-to-end event rate; HTTP
   p50/p99 and send -> ledger commit p50/p99 of one event in five (``Watcher`` polls the
   ledger);
3. for one event per request, the same at a **fixed 1,000 requests/s** (#20's HTTP target).

Connections (``SHAPE_CONNECTIONS``, 128 by default) must be enough to saturate: a closed loop
has at most one request in flight per connection, so it sends at most connections / latency
requests a second (Little's law), and the fewer requests in flight, the smaller the batches
at every hop (group commit, relay round, the wallet's batch) that share fixed costs. At one
event per request, 32 connections gave 3,720 events/s at 458 µs of CPU per event (all but the
driver), 128 a median of 5,130 at 329 (2026-12-04, docs/0016).

With ``PROFILE=1`` the saturated run is profiled (py-spy, as ``make bench`` profiles its
throughput phase); with ``PG_STATEMENTS=1`` the database's costliest statements of that run
are listed (pg_stat_statements, which the bench then preloads in the embedded Postgres).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

STALL_SECONDS = 120


class RawHttp:
    """Posts usage over ``connections`` keep-alive HTTP/1.1 connections; notes each request's
    latency and, for sampled events, the send time (``sent``/``pending``, as ``Watcher``
    reads them)."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        make_body: Callable[[int], tuple[bytes, list[str]]],
        size: int,
    ):
        self.host, self.port = host, port
        self.size = size  # events per request: a 202 accepting fewer drops the request's samples
        self.head = (
            f"POST /v1/usage HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.make_body = make_body  # request number -> (JSON body, sampled event ids)
        self.next = 0
        self.latency: list[float] = []
        self.accepted = 0
        self.refused: dict[int, int] = {}
        self.sent: dict[str, float] = {}
        self.pending: set[str] = set()

    def _request(self) -> tuple[bytes, list[str]]:
        body, sample = self.make_body(self.next)
        self.next += 1
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body, sample

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, due: float | None = None
    ) -> None:
        """One request and its answer. ``due``: when an open loop meant to send it; latency is
        counted from then, so a request the driver sends late is not measured as fast
        (coordinated omission)."""
        request, sample = self._request()
        t = time.time()
        for eid in sample:
            self.sent[eid] = t
        self.pending.update(sample)
        start = time.perf_counter() if due is None else min(due, time.perf_counter())
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        at = head.lower().find(b"content-length:")
        length = int(head[at + 15 : head.index(b"\r\n", at)])
        body = await reader.readexactly(length)
        self.latency.append(time.perf_counter() - start)
        if status == 202:
            accepted = body.count(b'"accepted"')
            self.accepted += accepted
            if accepted < self.size:  # which of them is not said here: follow none
                self.pending.difference_update(sample)
        else:
            self.refused[status] = self.refused.get(status, 0) + 1
            self.pending.difference_update(sample)

    async def closed_loop(self, connections: int, seconds: float) -> float:
        """Every connection sends back to back until ``seconds`` have passed; returns the
        time taken."""
        start = time.perf_counter()
        deadline = start + seconds

        async def one() -> None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                while time.perf_counter() < deadline:
                    await self._exchange(reader, writer)
            finally:
                writer.close()

        await asyncio.gather(*(one() for _ in range(connections)))
        return time.perf_counter() - start

    async def open_loop(self, connections: int, rate: float, seconds: float) -> float:
        """``rate`` requests a second in all, on schedule, spread over the connections (a
        connection still waiting for its answer sends late, never skips)."""
        start = time.perf_counter()
        per = connections / rate  # each connection's interval

        async def one(k: int) -> None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                n = 0
                while True:
                    due = start + (k / connections) * per + n * per
                    if due - start >= seconds:
                        return
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await self._exchange(reader, writer, due)
                    n += 1
            finally:
                writer.close()

        await asyncio.gather(*(one(k) for k in range(connections)))
        return time.perf_counter() - start


_COUNTED = (
    "tally_consumer_batch_size_count",
    "tally_consumer_batch_size_sum",
    "tally_group_commit_batches_count",
    "tally_outbox_relays_total",
    "tally_outbox_record_batches_total",
)


async def counters(client: httpx.AsyncClient, stack: Any) -> dict[str, float]:
    """Consumed batches and records per service and topic, group commits and outbox relay
    rounds, from every service's /metrics (their differences over a run: how well the work
    is batched downstream)."""
    from tally_devstack.stack import SERVICES

    out: dict[str, float] = {}
    for n in SERVICES:
        for line in (await client.get(stack.url(n) + "/metrics")).text.splitlines():
            if line.startswith(_COUNTED):
                labels, value = line.rsplit(" ", 1)
                metric = labels.split("{", 1)[0]
                topic = labels.split('topic="')[1].split('"')[0] if 'topic="' in labels else ""
                k = f"{n} {topic} {metric.removeprefix('tally_')}".replace("  ", " ")
                out[k] = out.get(k, 0.0) + float(value)
    return out


def per_event(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
    """Counter increases per 1,000 accepted events."""
    return {
        k: round((v - before.get(k, 0.0)) / max(events, 1) * 1000, 1)
        for k, v in sorted(after.items())
        if v - before.get(k, 0.0) > 0
    }


# Where send -> commit goes, hop by hop (the half-load run): histograms whose means and
# bucket-bound p99s over the run are reported, by (service, metric, topic or route).
_HOPS = {
    ("usage-meter", "tally_http_request_seconds", "/v1/usage"): "HTTP answer (group commit)",
    ("wallet", "tally_consumer_record_age_seconds", "usage.recorded"): (
        "usage.recorded age when the wallet's batch starts (relay to consume)"
    ),
    ("wallet", "tally_consumer_handle_seconds", "usage.recorded"): "the wallet applying a batch",
    ("wallet", "tally_wallet_debit_latency_seconds", ""): "accepted to ledger commit (the wallet's view)",
}


async def histograms(client: httpx.AsyncClient, stack: Any) -> dict[tuple[str, str, str], dict[str, float]]:
    """The ``_HOPS`` histograms as they stand: bucket counts by bound, with sum and count."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for service in sorted({s for s, _, _ in _HOPS}):
        for line in (await client.get(stack.url(service) + "/metrics")).text.splitlines():
            if line.startswith("#") or not line.startswith(tuple(m for _, m, _ in _HOPS)):
                continue
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            labels = name_labels[len(name) :]
            for (svc, metric, which), _ in _HOPS.items():
                if svc != service or not name.startswith(metric) or (which and f'"{which}"' not in labels):
                    continue
                suffix = name[len(metric) :]
                h = out.setdefault((svc, metric, which), {})
                if suffix == "_bucket":
                    le = labels.split('le="')[1].split('"')[0]
                    h[le] = h.get(le, 0.0) + float(value)
                elif suffix in ("_sum", "_count"):
                    h[suffix] = h.get(suffix, 0.0) + float(value)
    return out


def hops(
    before: dict[tuple[str, str, str], dict[str, float]], after: dict[tuple[str, str, str], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Mean and p99 (the upper bound of the bucket it falls in) of each hop over a run, ms."""
    out = {}
    for key, label in _HOPS.items():
        b, a = before.get(key, {}), after.get(key, {})
        count = a.get("_count", 0.0) - b.get("_count", 0.0)
        if count <= 0:
            continue
        mean = (a.get("_sum", 0.0) - b.get("_sum", 0.0)) / count
        bounds = sorted((float(le), a[le] - b.get(le, 0.0)) for le in a if not le.startswith("_"))
        p99 = next((le for le, n in bounds if n >= 0.99 * count), float("inf"))
        out[label] = {
            "mean_ms": round(mean * 1000, 1),
            "p99_ms_at_most": round(p99 * 1000, 1),
            "count": count,
        }
    return out


_STATEMENTS = (
    "SELECT regexp_replace(query, '\\s+', ' ', 'g') AS query, calls, rows, "
    "round(total_exec_time::numeric, 1) AS ms FROM pg_stat_statements "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "ORDER BY total_exec_time DESC LIMIT 15"
)


async def statements_reset(conn: Any) -> bool:
    """Start counting statements (pg_stat_statements, when the server preloads it)."""
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    except Exception:  # not preloaded: the phase goes on without it
        return False
    return True


async def statements(conn: Any, events: int) -> list[dict[str, Any]]:
    """The database's most expensive statements since ``statements_reset``, per 1,000 events."""
    return [
        {
            "query": r["query"][:160],
            "calls_per_1000_events": round(r["calls"] / max(events, 1) * 1000, 1),
            "rows_per_call": round(r["rows"] / max(r["calls"], 1), 1),
            "exec_us_per_event": round(float(r["ms"]) * 1000 / max(events, 1), 1),
        }
        for r in await conn.fetch(_STATEMENTS)
    ]


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    values = sorted(samples)
    if not values:
        return {"p50": 0.0, "p99": 0.0}

    def pct(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {"p50": pct(0.5), "p99": pct(0.99)}


async def run_shape(
    *,
    stack: Any,
    watcher: Any,
    workload: Any,
    token: str,
    size: int,
    first_event: int,
    connections: int,
    seconds: float,
    console: Any,
    settle: Callable[[], Awaitable[float]],
    profiler: Callable[[str], Any] | None = None,
    pg_stats: bool = False,
    fixed_rate: float = 1000,
) -> tuple[dict[str, Any], int]:
    """The runs of one request shape (saturated, half load, and for single events 1,000
    requests/s); returns the figures and the next free event number."""
    url = stack.url("usage-meter")
    host, port = url.split("//")[1].split(":")
    counter = {"n": first_event}

    def maker(every: int) -> Callable[[int], tuple[bytes, list[str]]]:
        rng = random.Random(first_event)

        def make(_: int) -> tuple[bytes, list[str]]:
            start = counter["n"]
            counter["n"] += size
            events = [workload.event(rng, i) for i in range(start, start + size)]
            body = orjson.dumps(events[0] if size == 1 else {"events": events})
            return body, [e["event_id"] for e in events if int(e["event_id"].rsplit("-", 1)[1]) % every == 0]

        return make

    async def paced(rate: float, label: str) -> dict[str, Any]:
        """An open loop at ``rate`` requests/s, once every consumer has caught up: HTTP
        p50/p99, send -> commit p50/p99 of one event in five, CPU µs per event, per-hop times."""
        with console.status("letting every consumer catch up…"):
            settled = await settle()
        base = await watcher.applied(client)
        timed = await histograms(client, stack)
        counted = await counters(client, stack)
        await watcher.read_from_now()
        watcher.cpu_start()
        driver = RawHttp(host, int(port), token, maker(5), size)
        profiling = profiler(f"shape-{size}-{label}") if profiler else contextlib.nullcontext()
        sending = f"{size} event(s)/request: {rate:,.0f} requests/s for {seconds:.0f}s…"
        with profiling, console.status(sending):
            sending_task = asyncio.create_task(driver.open_loop(connections, rate, seconds))
            waiting, moved = -1, time.perf_counter()
            while not sending_task.done() or driver.pending:
                await watcher._poll_samples(driver)
                await asyncio.sleep(0.01)
                if sending_task.done() and sending_task.exception():
                    raise sending_task.exception()  # type: ignore[misc]
                if sending_task.done() and not driver.pending:
                    break
                if len(driver.pending) != waiting:
                    waiting, moved = len(driver.pending), time.perf_counter()
                elif time.perf_counter() - moved > STALL_SECONDS:
                    raise SystemExit(f"{waiting} sampled events not in the ledger after {STALL_SECONDS}s")
            sent_for = sending_task.result()
            await _applied(watcher, client, base + driver.accepted)
        cpu = watcher.cpu_since()
        commits = [watcher.seen[e] - t for e, t in driver.sent.items() if e in watcher.seen]
        return {
            "settled_s": settled,
            "events_accepted": driver.accepted,
            "requests_per_s_offered": round(rate),
            "requests_per_s_sent": round(len(driver.latency) / sent_for),
            "events_per_s": round(driver.accepted / sent_for),
            "refused": driver.refused,
            "http_ms": percentiles_ms(driver.latency),
            "send_to_commit_ms": percentiles_ms(commits),
            "cpu_us_per_event": {n: round(v / max(driver.accepted, 1) * 1e6, 1) for n, v in cpu.items()},
            "hops": hops(timed, await histograms(client, stack)),
            # group commits, relay rounds and consumer batches: how much is shared at this load
            "per_1000_events": per_event(counted, await counters(client, stack), driver.accepted),
        }

    out: dict[str, Any] = {"events_per_request": size, "connections": connections}
    async with httpx.AsyncClient(timeout=30) as client:
        # 1. saturated, closed loop
        base = await watcher.applied(client)
        counted = await counters(client, stack)
        counting = pg_stats and await statements_reset(watcher.conn)
        watcher.cpu_start()
        driver = RawHttp(host, int(port), token, maker(every=10**9), size)
        profiling = profiler(f"shape-{size}") if profiler else contextlib.nullcontext()
        with profiling, console.status(f"{size} event(s)/request: saturating for {seconds:.0f}s…"):
            t0 = time.perf_counter()
            sending = await driver.closed_loop(connections, seconds)
            # inside: the profiler writing its reports when it stops is no part of the run
            done = await _applied(watcher, client, base + driver.accepted)
        e2e = done - t0
        # the CPU the run caused, side consumers and outboxes catching up on it included
        with console.status("letting every consumer catch up…"):
            await settle()
        cpu = watcher.cpu_since()
        accepted = driver.accepted
        counts = per_event(counted, await counters(client, stack), accepted)
        out["saturated"] = {
            "requests_per_s": round(len(driver.latency) / sending),
            "events_accepted": accepted,
            "refused": driver.refused,
            "events_per_s_end_to_end": round(accepted / e2e),
            "http_ms": percentiles_ms(driver.latency),
            "cpu_us_per_event": {n: round(v / max(accepted, 1) * 1e6, 1) for n, v in cpu.items()},
            "per_1000_events": counts,
        }
        if counting:
            out["saturated"]["statements"] = await statements(watcher.conn, accepted)
        # 2. half of the saturated end-to-end rate, open loop; send -> commit of sampled events
        # (half of the accepted request rate would be more than the ledger keeps up with when
        # the edge accepts faster than the wallet applies)
        half = max(accepted / e2e / size / 2, 1.0)
        out["half_load"] = await paced(half, "half")
        # 3. the issue's own HTTP target for single events: p99 at a fixed 1,000 requests/s
        # (half load is more than that once the system saturates above 2,000)
        if size == 1 and fixed_rate:
            out["fixed_rate"] = await paced(fixed_rate, "fixed")
    return out, counter["n"]


async def _applied(watcher: Any, client: httpx.AsyncClient, target: int) -> float:
    """Wait until the wallet has applied ``target`` company legs in all; returns when."""
    moved, last = time.perf_counter(), -1
    while True:
        done = await watcher.applied(client)
        now = time.perf_counter()
        if done >= target:
            return now
        if done != last:
            moved, last = now, done
        elif now - moved > STALL_SECONDS:
            raise SystemExit(f"no debit applied for {STALL_SECONDS}s ({done:,} of {target:,})")
        await asyncio.sleep(0.05)

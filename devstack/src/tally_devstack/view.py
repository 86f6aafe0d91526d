"""The live terminal view of ``make run``: throughput, wallet balances, recent ledger lines."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from tally.auth import issue_token
from tally.events import Topics
from tally_devstack.broker import BrokerProbe, rss_bytes
from tally_devstack.demo import SimStats
from tally_devstack.home import human
from tally_devstack.stack import SERVICES, Stack

BROKER_TOPICS = [*Topics.ALL, *(Topics.dlq(t) for t in Topics.ALL)]
SLOW_FETCH_SECONDS = 0.1  # the broker scans what a partition stores: restart to empty it


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class LiveView:
    def __init__(
        self, stack: Stack, companies: list[str], stats: SimStats | None, accounts: list[str] | None = None
    ) -> None:
        self.stack = stack
        self.companies = companies
        self.accounts = accounts or []
        self.stats = stats
        token = issue_token("platform_admin", sub="make-run", ttl_seconds=7 * 24 * 3600)
        self.client = httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"})
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=6)
        self.started = time.monotonic()
        self.probe: BrokerProbe | None = None

    async def _broker(self) -> str:
        """The broker's memory, the records it holds, and what one fetch of the money path's
        newest record takes (measured now): both grow as the memory-only topics fill."""
        rss = rss_bytes(self.stack.pid("broker"))
        parts = [f"[bold]broker[/] {human(rss) if rss is not None else '?'} RSS"]
        try:
            if self.probe is None:
                self.probe = BrokerProbe(self.stack.bootstrap, timeout=2)
                await self.probe.start()
            held = sum((await self.probe.held(BROKER_TOPICS)).values())
            fetched = await self.probe.fetch_seconds(Topics.USAGE_RECORDED)
        except Exception as exc:
            if self.probe is not None:
                await self.probe.close()
                self.probe = None
            return "  ".join([*parts, f"[red]not answering ({type(exc).__name__})[/]"])
        parts.append(f"{held:,} records held")
        if fetched is None:
            parts.append("fetch: usage.recorded is empty")
        else:
            seconds, records = fetched
            colour = (
                "red"
                if seconds >= 5 * SLOW_FETCH_SECONDS
                else "yellow"
                if seconds >= SLOW_FETCH_SECONDS
                else "green"
            )
            parts.append(
                f"fetch [{colour}]{seconds * 1000:,.1f} ms[/] "
                f"(the newest of {records:,} in a usage.recorded partition)"
            )
            if seconds >= SLOW_FETCH_SECONDS:
                parts.append("[dim]restart make run to empty the broker (the stop drains it first)[/]")
        return "  ".join(parts)

    async def render(self) -> Group:
        accepted = applied = 0.0
        health: dict[str, str] = {}
        for name in SERVICES:
            try:
                r = await self.client.get(self.stack.url(name) + "/metrics")
                health[name] = "up" if r.status_code == 200 else f"HTTP {r.status_code}"
                if name == "usage-meter":
                    accepted = _counter(r.text, "tally_usage_events_total", outcome="accepted")
                if name == "wallet":
                    applied = _counter(r.text, "tally_wallet_usage_applied_total")
            except httpx.HTTPError:
                health[name] = "down"
        now = time.monotonic()
        self.samples.append((now, accepted, applied))
        t0, a0, p0 = self.samples[0]
        dt = max(now - t0, 1e-9)
        rates = Table.grid(padding=(0, 3))
        rates.add_row(
            f"[bold]accepted[/] {accepted:,.0f} ({(accepted - a0) / dt:,.0f}/s)",
            f"[bold]debited[/] {applied:,.0f} ({(applied - p0) / dt:,.0f}/s)",
            *(f"{n}: [{'green' if s == 'up' else 'red'}]{s}[/]" for n, s in health.items()),
        )
        if self.stats:
            mails = len(self.stack.mail.mails())
            rates.add_row(
                f"simulator sent {self.stats.sent:,}",
                f"rejected {self.stats.rejected:,}",
                f"emails {mails} (in {self.stack.mail.folder})",
                self.stats.last_error or "",
            )

        wallets = Table(title="company wallets", expand=True)
        for col in ("company", "balance", "status", "threshold", "reload", "auto-recharge", "recharges"):
            wallets.add_column(col, justify="right" if col != "company" else "left")
        lines: list[tuple[str, dict[str, Any]]] = []
        for cid in self.companies:
            try:
                await self._wallet_row(wallets, cid, f"companies/{cid}")
                txs = (
                    await self.client.get(
                        self.stack.url("wallet") + f"/v1/companies/{cid}/wallet/transactions?limit=5"
                    )
                ).json()["items"]
                lines.extend((cid, t) for t in txs)
            except (httpx.HTTPError, KeyError, ValueError):
                wallets.add_row(cid, "?", "?", "?", "?", "?", "?")
        for aid in self.accounts:
            try:
                await self._wallet_row(wallets, f"  └ {aid}", f"accounts/{aid}", rebilling=True)
            except (httpx.HTTPError, KeyError, ValueError):
                wallets.add_row(aid, "?", "?", "?", "?", "?", "?")
        ledger = Table(title="recent ledger lines", expand=True)
        for col in ("#", "wallet", "kind", "service", "amount", "balance after", "at"):
            ledger.add_column(col)
        for cid, t in sorted(lines, key=lambda x: int(x[1]["id"]), reverse=True)[:10]:
            ledger.add_row(
                t["id"],
                cid,
                t["kind"],
                t["service"] or "",
                t["amount"],
                t["balance_after"],
                t["created_at"][11:23],
            )
        uptime = int(now - self.started)
        panel = Panel(Group(rates, await self._broker()), title=f"Tally — running {uptime}s (Ctrl-C to stop)")
        return Group(panel, wallets, ledger)

    async def _wallet_row(self, table: Table, label: str, owner: str, *, rebilling: bool = False) -> None:
        """Add one wallet's row (``owner``: ``companies/<id>`` or ``accounts/<id>``)."""
        w: dict[str, Any] = (await self.client.get(self.stack.url("wallet") + f"/v1/{owner}/wallet")).json()
        recharges = (
            await self.client.get(self.stack.url("recharge") + f"/v1/{owner}/wallet/recharges?limit=100")
        ).json()["items"]
        done = sum(1 for x in recharges if x["status"] == "succeeded")
        table.add_row(
            f"{label} ({w['rebilling']})" if rebilling else label,
            f"{w['balance']} {w['currency']}",
            w["status"],
            w["threshold"],
            w["reload_amount"],
            "on" if w["auto_recharge"] else "off",
            str(done),
        )

    async def close(self) -> None:
        await self.client.aclose()
        if self.probe is not None:
            await self.probe.close()

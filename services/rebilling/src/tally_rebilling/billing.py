"""Charging resold subscriptions: every period, exactly once per subscription, to cards (never
wallets), through the recharge service's idempotent charge endpoint — the company's card the
platform price; for ``resell``, also the account's card the company price on the company's
connected Stripe."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime

import asyncpg
import httpx

from tally.auth import issue_token
from tally.money import format_micros
from tally.settings import Settings
from tally_rebilling import publish, storage

log = logging.getLogger(__name__)


class ChargeInFlight(Exception):
    """The card charge for this key is being run by another request right now."""


def current_period(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now.year:04d}-{now.month:02d}"


class Biller:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.recharge_url = os.environ.get(
            "TALLY_RECHARGE_URL", f"http://{settings.host}:{settings.port_recharge}")
        self.secret = settings.jwt_secret

    async def _charge(self, client: httpx.AsyncClient, *, key: str, owner: str, company_id: str,
                      account_id: str | None, amount: int, description: str) -> str | None:
        """None when charged; else why not."""
        token = issue_token("platform_admin", sub="rebilling", secret=self.secret, ttl_seconds=300)
        r = await client.post(f"{self.recharge_url}/v1/charges", headers={
            "Authorization": f"Bearer {token}"}, json={
            "key": key, "owner": owner, "company_id": company_id, "account_id": account_id,
            "amount": format_micros(amount), "description": description})
        if r.status_code != 201:
            return f"{owner} charge refused: {r.json().get('error', {}).get('code', r.status_code)}"
        attempt = r.json()
        if attempt["status"] == "pending":
            raise ChargeInFlight  # another run holds this charge: let it settle the period
        if attempt["status"] != "succeeded":
            codes = [t.get("decline_code") for t in attempt["tries"]] or [attempt.get("error")]
            return f"{owner} card charge {attempt['status']}: {codes}"
        return None

    async def charge_period(self, sub: asyncpg.Record, period: str) -> str:
        """Charge one subscription for one period (no-op when already charged)."""
        async with self.pool.acquire() as conn:
            if not await storage.claim_period(conn, sub, period):
                return "already_charged"
            company = await storage.company(conn, sub["company_id"])
        assert company is not None
        error = None
        async with httpx.AsyncClient(timeout=60) as client:
            try:
                error = await self._charge(
                    client, key=f"sub-{sub['id']}-{period}-platform", owner="company",
                    company_id=sub["company_id"], account_id=None, amount=sub["platform_price"],
                    description=f"{sub['product']} {period} (platform price)")
                if error is None and sub["deployment"] == "resell" and sub["company_price"] > 0:
                    error = await self._charge(
                        client, key=f"sub-{sub['id']}-{period}-company", owner="account",
                        company_id=sub["company_id"], account_id=sub["account_id"],
                        amount=sub["company_price"], description=f"{sub['product']} {period}")
            except httpx.HTTPError as exc:
                log.warning("recharge unreachable; the period stays pending",
                            extra={"subscription": sub["id"], "error": str(exc)})
                return "pending"
            except ChargeInFlight:
                return "pending"  # the card charge is idempotent per key; a later run settles
        async with self.pool.acquire() as conn, conn.transaction():
            await storage.settle_period(conn, sub["id"], period,
                                        "failed" if error else "charged", error)
            if error is None:
                await publish.subscription_charged(conn, sub, period, company["currency"])
        return "failed" if error else "charged"

    async def run_period(self, period: str) -> dict[str, int]:
        """Charge every active subscription for ``period``; safe to run any number of times."""
        async with self.pool.acquire() as conn:
            subs = await storage.active_subscriptions(conn)
        counts: dict[str, int] = {}
        for sub in subs:
            outcome = await self.charge_period(sub, period)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts
